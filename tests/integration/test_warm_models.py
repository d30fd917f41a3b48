"""Warm models across jobs (issue 19): a daemon that runs two demo jobs one after the other in one
process loads the base diffusion model once. A real Service (local backend) in a thread; the
count is of real calls to engine.models.load_pipeline (wrapped, not replaced)."""

from __future__ import annotations

import threading
import time

import engine.models
from daemon.service import Service, load_daemon_settings
from engine import Settings
from tests.e2e.conftest import drop_job


def test_two_jobs_in_one_daemon_load_the_base_model_once(tmp_path, shared_models, monkeypatch):
    loads = []
    real = engine.models.load_pipeline

    def counted(ref, settings):
        loads.append(ref)
        return real(ref, settings)

    monkeypatch.setattr(engine.models, "load_pipeline", counted)
    settings = Settings.from_table({"paths": {"models": str(shared_models)},
                                    "daemon": {"stable_seconds": 0.1, "scan_seconds": 0.2, "metrics_port": 0, "daemon_id": "warm"}},
                                   root=tmp_path)
    service = Service(settings, load_daemon_settings(settings), demo=True)
    runner = threading.Thread(target=service.run, name="service")
    runner.start()
    try:
        deadline = time.monotonic() + 120
        while service.backend is None:
            assert runner.is_alive() and time.monotonic() < deadline, "the daemon did not start"
            time.sleep(0.05)
        for name in ("first", "second"):
            drop_job(service.paths.inbox, name)
        while (service.metrics.registry.get_sample_value("idrep_jobs_total", {"outcome": "finished"}) or 0) < 2:
            assert runner.is_alive() and time.monotonic() < deadline + 240, "the jobs did not finish"
            time.sleep(0.05)
    finally:
        service.request_stop("test")
        runner.join(60)
    assert len(loads) == 1, [str(ref) for ref in loads]
    assert sorted(p.name for p in service.paths.outbox.iterdir() if not p.name.startswith(".")) == ["first", "second"]
