"""The job worker thread ends every run with `job_ended` and a settled claim, whatever ends it.
It was: an exception outside `Exception` (SystemExit, KeyboardInterrupt, or one raised while
settling) killed the thread uncaught, with no job_ended, the job's gauges stuck at "in progress"
and its claim never released; and an OSError from looking the job up in the outbox counted as a
crash. A real Service in this process, with faults injected where nothing real raises them on
demand: the engine's run_job raising SystemExit, the look-up of published jobs raising EIO."""

from __future__ import annotations

import errno
import threading
import time

from daemon.claim import find_claims
from daemon.service import Service, load_daemon_settings
from engine import Settings
from tests.harness.lab import Lab, drop_job
from tests.harness.faults import check_evidence, drops_of


def _value(service: Service, name: str, **labels: str) -> float:
    return service.metrics.registry.get_sample_value(name, labels) or 0.0


def _started(tmp_path, shared_models, **daemon) -> tuple[Service, threading.Thread]:
    settings = Settings.from_table({"paths": {"models": str(shared_models)},
                                    "daemon": {"stable_seconds": 0.2, "scan_seconds": 0.2, "lease_seconds": 3.0, "metrics_port": 0,
                                               "daemon_id": "gpu-0", **daemon}}, root=tmp_path)
    service = Service(settings, load_daemon_settings(settings), demo=True)
    runner = threading.Thread(target=service.run, name="service")
    runner.start()
    deadline = time.monotonic() + 120
    while service.engine is None or not service.metrics_port or service._stopping.is_set():
        assert time.monotonic() < deadline and runner.is_alive(), "the service did not start"
        time.sleep(0.05)
    time.sleep(0.3)  # its loop is running
    return service, runner


def _wait(condition, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_job_run_that_dies_of_systemexit_still_ends_and_releases_its_claim(tmp_path, shared_models, monkeypatch):
    service, runner = _started(tmp_path, shared_models, max_crashes=1)
    try:
        def dies(*_args, **_kwargs):
            raise SystemExit("a bug that escapes as a BaseException")

        monkeypatch.setattr(service.engine, "run_job", dies)
        dropped = {"nina": drops_of(drop_job(service.paths.inbox, "nina"))}
        _wait(lambda: _value(service, "idrep_jobs_total", outcome="failed") >= 1, "the job to be given up")
        # The run that died ended (job_ended, its gauges cleared) and released its claim as a
        # crash; the next run (max_crashes = 1) gave the job up into failed/ with its inputs.
        assert _value(service, "idrep_jobs_total", outcome="crashed") == 1
        assert _value(service, "idrep_job_failures_total", code="too_many_crashes") == 1
        assert _value(service, "idrep_job_in_progress") == 0
        assert find_claims(service.paths.work) == []
        assert check_evidence(Lab(tmp_path, shared_models), dropped) == {"nina": ["failed"]}
        assert runner.is_alive(), "the daemon died with its worker"
    finally:
        service.request_stop("test")
        runner.join(60)
    assert not runner.is_alive()


def test_a_share_error_while_looking_the_job_up_holds_it_it_is_no_crash(tmp_path, shared_models, monkeypatch):
    import engine.runner as runner_module

    service, runner = _started(tmp_path, shared_models, hold_retry_seconds=0.2)
    try:
        real = runner_module.find_published
        failures = []

        def share_went_away(*args, **kwargs):
            if not failures:
                failures.append(1)
                raise OSError(errno.EIO, "Input/output error", str(service.paths.outbox))
            return real(*args, **kwargs)

        monkeypatch.setattr(runner_module, "find_published", share_went_away)
        dropped = {"olga": drops_of(drop_job(service.paths.inbox, "olga"))}
        _wait(lambda: _value(service, "idrep_jobs_total", outcome="finished") >= 1, "the job to finish after its hold")
        assert _value(service, "idrep_jobs_total", outcome="held") == 1 and _value(service, "idrep_jobs_total", outcome="crashed") == 0
        assert _value(service, "idrep_job_holds_total", code="io_error") == 1
        assert check_evidence(Lab(tmp_path, shared_models), dropped) == {"olga": ["outbox"]}
    finally:
        service.request_stop("test")
        runner.join(60)
