"""The daemon: watches the inbox, claims ready job folders, runs them with `engine.Engine`, serves metrics.

Knows nothing of diffusion. One file per concern:
    watch.py    inbox events (watchdog) and readiness of a folder (stable, or a READY marker)
    claim.py    claims in the work area: atomic claim, lease + heartbeat, take-over
    service.py  the loop: queue, the jobs in flight, SIGTERM, recovery, a new claim generation per attempt
    cluster.py  where a job's attempt runs: this process (local) or a Ray cluster's GPU workers (ray)
    settings.py [daemon] and [daemon.ray]
    status.py   python -m daemon status: the shared folders, read-only
    metrics.py  Prometheus metrics on a private registry
    __main__.py python -m daemon --config config.toml [--inbox DIR] [--outbox DIR] [--poll] [--demo]
"""
