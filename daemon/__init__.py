"""The daemon: watches the inbox, claims ready job folders, runs them with `engine.Engine`, serves metrics.

Knows nothing of diffusion. One file per concern:
    watch.py    inbox events (watchdog) and readiness of a folder (stable, or a READY marker)
    claim.py    claims in the work area: atomic claim, lease + heartbeat, take-over
    service.py  [daemon] settings and the loop: queue, one job at a time, SIGTERM, recovery
    metrics.py  Prometheus metrics on a private registry
    __main__.py python -m daemon --config config.toml [--inbox DIR] [--outbox DIR] [--poll] [--demo]
"""
