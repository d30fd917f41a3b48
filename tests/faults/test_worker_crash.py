"""The job worker thread ends every run with `job_ended` and a settled claim, whatever ends it.
It was: an exception outside `Exception` (SystemExit, KeyboardInterrupt, or one raised while
settling) killed the thread uncaught, with no job_ended, the job's gauges stuck at "in progress"
and its claim never released. A real Service in this process; the engine's run_job made to raise
SystemExit (fault injection: nothing in the engine raises it today)."""

from __future__ import annotations

import threading
import time

from daemon.claim import find_claims
from daemon.service import Service, load_daemon_settings
from engine import Settings
from tests.e2e.conftest import drop_job
from tests.faults.conftest import check_evidence, drops_of


def _value(service: Service, name: str, **labels: str) -> float:
    return service.metrics.registry.get_sample_value(name, labels) or 0.0


def test_a_job_run_that_dies_of_systemexit_still_ends_and_releases_its_claim(tmp_path, shared_models, monkeypatch):
    settings = Settings.from_table({"paths": {"models": str(shared_models)},
                                    "daemon": {"stable_seconds": 0.2, "scan_seconds": 0.2, "lease_seconds": 3.0, "metrics_port": 0,
                                               "daemon_id": "gpu-0", "max_crashes": 1}}, root=tmp_path)
    service = Service(settings, load_daemon_settings(settings), demo=True)
    runner = threading.Thread(target=service.run, name="service")
    runner.start()
    try:
        deadline = time.monotonic() + 120
        while service.engine is None or not service.heartbeat._thread.is_alive():
            assert time.monotonic() < deadline and runner.is_alive(), "the service did not start"
            time.sleep(0.05)

        def dies(*_args, **_kwargs):
            raise SystemExit("a bug that escapes as a BaseException")

        monkeypatch.setattr(service.engine, "run_job", dies)
        dropped = {"nina": drops_of(drop_job(service.paths.inbox, "nina"))}
        while _value(service, "idrep_jobs_total", outcome="failed") < 1:
            assert time.monotonic() < deadline, "the run never ended"
            time.sleep(0.05)
        # The run that died ended (job_ended, its gauges cleared) and released its claim as a
        # crash; the next run (max_crashes = 1) gave the job up into failed/ with its inputs.
        assert _value(service, "idrep_jobs_total", outcome="crashed") == 1
        assert _value(service, "idrep_job_failures_total", code="too_many_crashes") == 1
        assert _value(service, "idrep_job_in_progress") == 0
        assert find_claims(service.paths.work) == []
        from tests.e2e.conftest import Lab

        assert check_evidence(Lab(tmp_path, shared_models), dropped) == {"nina": ["failed"]}
        assert runner.is_alive(), "the daemon died with its worker"
    finally:
        service.request_stop("test")
        runner.join(60)
    assert not runner.is_alive()
