"""The [daemon] table of config.toml (validated with engine.schema, every problem named), the
folder layout checks, and the engine events -> Prometheus metrics mapping."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from daemon.metrics import DaemonMetrics
from daemon.service import DaemonPaths, DaemonSettings, load_daemon_settings
from engine.config import Settings
from engine.errors import ConfigError


def _settings(tmp_path: Path, daemon: object) -> Settings:
    return Settings.from_table({"daemon": daemon}, root=tmp_path)


def test_defaults_and_paths_relative_to_the_config_file(tmp_path):
    daemon = load_daemon_settings(_settings(tmp_path, {}))
    assert daemon == DaemonSettings()
    paths = DaemonPaths.resolve(daemon, tmp_path)
    assert paths == DaemonPaths(inbox=tmp_path / "inbox", outbox=tmp_path / "outbox", failed=tmp_path / "failed", work=tmp_path / "work")
    daemon = load_daemon_settings(_settings(tmp_path, {"inbox": "share/in", "outbox": "/srv/out", "work": "share/.claimed", "failed": "bad",
                                                       "stable_seconds": 2, "network_share": True, "metrics_port": 0, "daemon_id": "gpu-0"}))
    paths = DaemonPaths.resolve(daemon, tmp_path)
    assert paths.inbox == tmp_path / "share" / "in" and paths.outbox == Path("/srv/out")
    assert paths.work == tmp_path / "share" / ".claimed" and paths.failed == tmp_path / "bad"
    assert daemon.stable_seconds == 2.0 and daemon.network_share and daemon.daemon_id == "gpu-0"


def test_every_problem_is_named_with_its_key(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        load_daemon_settings(_settings(tmp_path, {"inbx": "x", "stable_seconds": -1, "network_share": "yes", "metrics_port": 70000,
                                                  "daemon_id": "has space"}), where="lab.toml")
    problems = {p.where: p.reason for p in excinfo.value.problems}
    assert set(problems) == {"lab.toml: daemon.inbx", "lab.toml: daemon.stable_seconds", "lab.toml: daemon.network_share",
                             "lab.toml: daemon.metrics_port", "lab.toml: daemon.daemon_id"}
    assert "unknown key" in problems["lab.toml: daemon.inbx"]
    assert excinfo.value.code == "invalid_config"
    with pytest.raises(ConfigError) as excinfo:
        load_daemon_settings(_settings(tmp_path, "not a table"))
    assert excinfo.value.problems[0].where.endswith("daemon")


def test_the_backend_and_its_ray_table_are_validated_with_their_keys(tmp_path):
    daemon = load_daemon_settings(_settings(tmp_path, {"backend": "ray", "ray": {"address": "10.0.0.5:6379", "workers": 4,
                                                                                  "keep_models_loaded": False}}))
    assert daemon.backend == "ray" and daemon.ray.address == "10.0.0.5:6379" and daemon.ray.workers == 4
    assert not daemon.ray.keep_models_loaded and daemon.ray.max_retries == 3 and daemon.ray.gpus_per_job == 1.0
    assert daemon.ray.connect_timeout_seconds == 30.0
    with pytest.raises(ConfigError) as excinfo:
        load_daemon_settings(_settings(tmp_path, {"backend": "slurm", "ray": {"adress": "x", "max_retries": -1, "gpus_per_job": "one",
                                                                               "connect_timeout_seconds": 0}}))
    problems = {p.where: p.reason for p in excinfo.value.problems}
    assert set(problems) == {"config.toml: daemon.backend", "config.toml: daemon.ray.adress", "config.toml: daemon.ray.max_retries",
                             "config.toml: daemon.ray.gpus_per_job", "config.toml: daemon.ray.connect_timeout_seconds"}
    assert "'local', 'ray'" in problems["config.toml: daemon.backend"]


def test_the_ray_backend_without_ray_installed_is_refused_naming_the_extra(tmp_path, monkeypatch):
    import sys

    from daemon.cluster import make_backend

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    settings = _settings(tmp_path, {"backend": "ray"})
    with pytest.raises(ConfigError) as excinfo:
        make_backend("ray", None, settings, load_daemon_settings(settings), demo=True, daemon_id="d")
    assert excinfo.value.code == "ray_missing" and "pip install '.[ray]'" in excinfo.value.message


def test_folders_inside_the_inbox_are_refused_unless_hidden(tmp_path):
    DaemonPaths(tmp_path / "in", tmp_path / "out", tmp_path / "failed", tmp_path / "in" / ".work").prepare()
    with pytest.raises(ConfigError, match="inside the inbox"):
        DaemonPaths(tmp_path / "in", tmp_path / "in" / "out", tmp_path / "failed", tmp_path / "work").prepare()


@pytest.mark.skipif(not Path("/dev/shm").is_dir(), reason="needs a second file system")
def test_work_area_on_another_file_system_is_refused(tmp_path):
    import tempfile

    with tempfile.TemporaryDirectory(dir="/dev/shm") as other:
        if os.stat(other).st_dev == os.stat(tmp_path).st_dev:
            pytest.skip("/dev/shm is on the same file system here")
        with pytest.raises(ConfigError, match="not on the inbox's file system"):
            DaemonPaths(tmp_path / "in", tmp_path / "out", tmp_path / "failed", Path(other) / "work").prepare()


def _value(metrics: DaemonMetrics, line_start: str) -> float:
    for line in generate_latest(metrics.registry).decode().splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{line_start} not exposed")


def test_engine_events_become_metrics():
    metrics = DaemonMetrics("d1", stages=("prepare", "embed", "train"))
    metrics.observe("stage_started", {"stage": "train"})
    assert _value(metrics, 'idrep_stage_in_progress{stage="train"}') == 1
    metrics.observe("train_step", {"phase": "COARSE", "step": 1, "loss": 0.5})
    metrics.observe("train_step", {"phase": "MID", "step": 2, "loss": 0.25})
    assert _value(metrics, "idrep_train_steps_total") == 2
    assert _value(metrics, "idrep_train_loss") == 0.25
    assert _value(metrics, "idrep_train_step") == 2
    assert _value(metrics, 'idrep_train_phase{phase="MID"}') == 1
    assert _value(metrics, 'idrep_train_phase{phase="COARSE"}') == 0
    metrics.observe("stage_finished", {"stage": "train", "seconds": 42.0})
    assert _value(metrics, 'idrep_stage_duration_seconds_count{stage="train"}') == 1
    assert _value(metrics, 'idrep_stage_duration_seconds_sum{stage="train"}') == 42
    metrics.observe("seed_scored", {"seed": 1, "lora": True, "drift": 0.12, "face_found": True})
    metrics.observe("seed_scored", {"seed": 1, "lora": False, "drift": None, "face_found": False})
    metrics.observe("render_scored", {"pass_name": "rescue", "mode": "three_pass", "drift": 0.3, "face_found": True})
    metrics.observe("render_scored", {"pass_name": "anchor", "mode": "three_pass", "drift": None, "face_found": False})
    assert _value(metrics, 'idrep_seed_drift_bucket{le="0.15",lora="true"}') == 1
    assert _value(metrics, 'idrep_faces_not_found_total{kind="verify_control"}') == 1
    assert _value(metrics, 'idrep_faces_not_found_total{kind="render"}') == 1
    assert _value(metrics, 'idrep_render_drift_count{mode="three_pass",pass_name="rescue"}') == 1
    metrics.observe("job_finished", {})  # events without a metric are ignored
    metrics.job_ended("failed", 3.0, "no_face_found")
    assert _value(metrics, 'idrep_jobs_total{outcome="failed"}') == 1
    assert _value(metrics, 'idrep_jobs_total{outcome="finished"}') == 0
    assert _value(metrics, 'idrep_job_failures_total{code="no_face_found"}') == 1
    assert _value(metrics, 'idrep_train_phase{phase="MID"}') == 0
    import torch

    initialised = torch.cuda.is_available() and torch.cuda.is_initialized()
    assert _value(metrics, 'idrep_gpu_memory_bytes{kind="allocated"}') == (torch.cuda.memory_allocated() if initialised else 0)
    assert _value(metrics, 'idrep_gpu_memory_bytes{kind="reserved"}') == (torch.cuda.memory_reserved() if initialised else 0)


def _job_started(kind: str, table: dict) -> dict:
    """A job_started event's fields as the engine sends them: the kind, and the whole spec, plain."""
    from engine.job import parse_job_table
    from engine.schema import to_plain

    spec, problems = parse_job_table({"kind": kind, **table}, {}, "alice")
    assert spec is not None and not problems, problems
    return {"kind": kind, "spec": to_plain(spec)}


def test_progress_of_the_long_stages_becomes_metrics():
    metrics = DaemonMetrics("d1", stages=("train", "verify", "render"))
    table = {"train": {"max_steps": 300}, "verify": {"seeds": [3, 5, 8]},
             "render": [{"prompt": "a", "mode": "three_pass", "count": 2}, {"prompt": "b", "mode": "two_pass", "count": 1}]}
    metrics.observe("job_started", _job_started("replicate", table))
    metrics.observe("stage_started", {"stage": "train"})
    assert _value(metrics, 'idrep_stage_progress_planned{stage="train"}') == 300
    assert _value(metrics, 'idrep_stage_progress_done{stage="train"}') == 0
    metrics.observe("train_step", {"phase": "COARSE", "step": 7, "loss": 0.5})
    assert _value(metrics, 'idrep_stage_progress_done{stage="train"}') == 7
    metrics.observe("stage_finished", {"stage": "train", "seconds": 1.0})
    metrics.observe("stage_started", {"stage": "verify"})
    assert _value(metrics, 'idrep_stage_progress_planned{stage="verify"}') == 6  # 3 seeds, with and without the LoRA
    for lora in (True, False):
        metrics.observe("seed_scored", {"seed": 3, "lora": lora, "drift": 0.4, "face_found": True})
    assert _value(metrics, 'idrep_stage_progress_done{stage="verify"}') == 2
    metrics.observe("stage_started", {"stage": "render"})
    assert _value(metrics, 'idrep_stage_progress_planned{stage="render"}') == 2 * 3 + 1 * 2
    metrics.observe("render_scored", {"pass_name": "anchor", "mode": "three_pass", "drift": 0.3, "face_found": True})
    assert _value(metrics, 'idrep_stage_progress_done{stage="render"}') == 1
    metrics.job_ended("finished", 9.0)
    assert _value(metrics, 'idrep_stage_progress_done{stage="render"}') == 0
    assert _value(metrics, 'idrep_stage_progress_planned{stage="render"}') == 0


def test_retouch_variants_become_metrics():
    metrics = DaemonMetrics("d1", stages=("prepare", "embed", "retouch"))
    table = {"retouch": {"regions": ["under_eye", "chin"], "combine": True, "strengths": [0.2, 0.25], "seeds": [0, 1, 2]}}
    metrics.observe("job_started", _job_started("retouch", table))
    metrics.observe("stage_started", {"stage": "retouch"})
    assert _value(metrics, 'idrep_stage_progress_planned{stage="retouch"}') == 3 * 2 * 3  # 2 regions + their combination
    metrics.observe("retouch_variant", {"region_set": "chin", "strength": 0.2, "seed": 0, "accepted": True, "drift": 0.01, "texture_ratio": 0.95})
    metrics.observe("retouch_variant", {"region_set": "chin", "strength": 0.2, "seed": 1, "accepted": False, "drift": 0.2, "texture_ratio": None})
    assert _value(metrics, 'idrep_retouch_variants_total{outcome="accepted"}') == 1
    assert _value(metrics, 'idrep_retouch_variants_total{outcome="rejected"}') == 1
    assert _value(metrics, 'idrep_retouch_drift_bucket{le="0.05"}') == 1 and _value(metrics, "idrep_retouch_drift_count") == 2
    assert _value(metrics, 'idrep_retouch_texture_ratio_bucket{le="1.0"}') == 1 and _value(metrics, "idrep_retouch_texture_ratio_count") == 1
    assert _value(metrics, 'idrep_stage_progress_done{stage="retouch"}') == 2


def test_evaluate_cells_become_metrics_and_progress():
    metrics = DaemonMetrics("d1", stages=("prepare", "embed", "train", "evaluate"))
    table = {"train": {"max_steps": 10}, "evaluate": {"prompts": ["a", "b"], "seeds": [0, 1, 2], "control": True,
                                                       "group": [{"name": "main", "phase": "final", "photos": []}, {"name": "one", "photos": ["a.png"]}]}}
    metrics.observe("job_started", _job_started("evaluate", table))
    metrics.observe("stage_started", {"stage": "train"})
    assert _value(metrics, 'idrep_stage_progress_planned{stage="train"}') == 2 * 10  # the job's LoRA and the photo-subset group's
    metrics.observe("train_step", {"phase": "COARSE", "step": 10, "loss": 0.1})
    metrics.observe("train_step", {"phase": "COARSE", "step": 3, "loss": 0.1, "run": "one"})
    assert _value(metrics, 'idrep_stage_progress_done{stage="train"}') == 13
    metrics.observe("stage_started", {"stage": "evaluate"})
    assert _value(metrics, 'idrep_stage_progress_planned{stage="evaluate"}') == 3 * 2 * 3
    metrics.observe("evaluate_cell", {"group": "control", "prompt_index": 0, "seed": 0, "face_found": True, "drift": 0.4})
    metrics.observe("evaluate_cell", {"group": "main", "prompt_index": 0, "seed": 0, "face_found": False, "drift": None})
    assert _value(metrics, 'idrep_evaluate_cells_total{face="found"}') == 1 and _value(metrics, 'idrep_evaluate_cells_total{face="not_found"}') == 1
    assert _value(metrics, 'idrep_faces_not_found_total{kind="evaluate"}') == 1 and _value(metrics, "idrep_evaluate_drift_count") == 1
    assert _value(metrics, 'idrep_stage_progress_done{stage="evaluate"}') == 2


def test_restore_verdicts_become_metrics():
    metrics = DaemonMetrics("d1", stages=("restore",))
    metrics.observe("restore_verdict", {"verdict": "flag", "face_coverage": 0.18})
    metrics.observe("restore_verdict", {"verdict": "ok", "face_coverage": 0.04})
    assert _value(metrics, 'idrep_restores_total{verdict="flag"}') == 1 and _value(metrics, 'idrep_restores_total{verdict="ok"}') == 1
    assert _value(metrics, 'idrep_restore_face_coverage_bucket{le="0.05"}') == 1 and _value(metrics, "idrep_restore_face_coverage_count") == 2


def test_each_daemon_has_its_own_registry():
    first, second = DaemonMetrics("a"), DaemonMetrics("b")
    first.job_ended("finished", 1.0)
    assert _value(first, 'idrep_jobs_total{outcome="finished"}') == 1
    assert _value(second, 'idrep_jobs_total{outcome="finished"}') == 0


def test_the_metrics_server_holds_no_thread_per_connection():
    """It was prometheus_client's server: one thread per connection, without bound; then a pool
    of 4 threads that 4 silent clients held. 50 clients that connect and say nothing start no
    thread, and a scrape answers while they are connected (tests/faults/test_metrics_port.py
    jams the port harder)."""
    import socket
    import threading
    import time
    import urllib.request

    metrics = DaemonMetrics("gpu-0")
    port = metrics.serve("127.0.0.1", 0)
    before = threading.active_count()
    idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
    try:
        time.sleep(0.2)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            assert b"idrep_jobs_total" in response.read()
        assert threading.active_count() == before
    finally:
        for connection in idle:
            connection.close()
        metrics.close()


def test_seed_discovery_of_every_identity_method_is_counted_per_group():
    """[identity] compare renders four groups at each seed: each has its drift series and its
    faces-not-found count; the LoRA/control histogram keeps only its two groups."""
    metrics = DaemonMetrics("d1", stages=("train", "verify", "render"))
    spec = {"train": {"max_steps": 300}, "verify": {"seeds": 3}, "identity": {"method": "faceid", "compare": True}, "render": []}
    metrics.observe("job_started", {"spec": spec})
    metrics.observe("stage_started", {"stage": "verify"})
    assert _value(metrics, 'idrep_stage_progress_planned{stage="verify"}') == 12  # 3 seeds x (faceid, lora, lora+faceid, control)
    metrics.observe("seed_scored", {"seed": 0, "group": "faceid", "lora": False, "drift": 0.2, "face_found": True})
    metrics.observe("seed_scored", {"seed": 0, "group": "lora+faceid", "lora": True, "drift": None, "face_found": False})
    metrics.observe("seed_scored", {"seed": 0, "group": "control", "lora": False, "drift": 0.5, "face_found": True})
    assert _value(metrics, 'idrep_verify_drift_count{group="faceid"}') == 1
    assert _value(metrics, 'idrep_faces_not_found_total{kind="verify_lora+faceid"}') == 1
    assert _value(metrics, 'idrep_seed_drift_count{lora="false"}') == 1  # the control only: FaceID is not the control
    assert _value(metrics, 'idrep_stage_progress_done{stage="verify"}') == 3
    metrics.observe("stage_finished", {"stage": "verify", "seconds": 1.0})
    plain = DaemonMetrics("d2", stages=("train",))
    plain.observe("job_started", {"spec": {"train": {"max_steps": 300}, "identity": {"method": "faceid"}}})
    plain.observe("stage_started", {"stage": "train"})
    assert _value(plain, 'idrep_stage_progress_planned{stage="train"}') == 0  # FaceID alone trains nothing
