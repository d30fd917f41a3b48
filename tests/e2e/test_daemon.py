"""The daemon end to end: a real `python -m daemon --demo` subprocess on a temporary inbox,
real photos, real signals. What a lab relies on: never start on a half-copied photo, never lose
or repeat a job (SIGKILL, SIGTERM, several daemons), refused jobs in failed/ with their inputs
intact, and /metrics telling the truth."""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest
import torch

from daemon.claim import find_claims
from engine.fsutil import sha256_bytes
from engine.kinds.replicate import REPLICATE
from engine.stages import stage_module
from engine.provenance.verification import verify_audit
from tests.harness.jobs import folder_snapshot
from tests.harness.lab import FAST_JOB, Lab, audit_events, drop_job, parse_ts, photo_bytes

STAGE_NAMES = REPLICATE.stages  # a replicate job's stages, in order
STAGES = tuple(map(stage_module, STAGE_NAMES))


def _assert_complete_outbox(job_dir, photo_sha256: str) -> None:
    report = verify_audit(job_dir)
    assert report.ok, report.problems
    for stage in STAGES:  # every stage's outputs, whatever stages the engine has today
        for owned in stage.OUTPUTS:
            assert (job_dir / owned).exists(), f"{owned} of stage {stage.NAME} missing"
    manifest = json.loads((job_dir / "manifest.json").read_text())
    assert manifest["inputs"]["photo.png"] == photo_sha256
    assert (job_dir / "inputs" / "photo.png").is_file()  # the dropped folder itself, kept as evidence
    events = [e["event"] for e in audit_events(job_dir)]
    assert events.count("job_finished") == 1 and events[-1] == "job_finished"


STABLE_SECONDS = 1.5


@pytest.fixture(scope="module")
def one_daemon(tmp_path_factory, shared_models):
    """One daemon for the tests of plain operation (each uses its own folder names): a daemon
    start and its first, cold job cost ~20 s with the diffusion stages, once instead of four times."""
    lab = Lab(tmp_path_factory.mktemp("one-daemon"), shared_models)
    lab.configure(stable_seconds=STABLE_SECONDS)
    daemon = lab.start()
    yield lab, daemon
    try:
        assert daemon.terminate() == 0
        assert all(line.startswith("{") for line in daemon.raw), "stdout holds only JSON lines"
        assert {e["daemon_id"] for e in daemon.events} == {daemon.named("daemon_started")[0]["daemon_id"]}
    finally:
        lab.stop_all()


def test_slow_chunked_copy_is_not_started_before_it_is_complete(one_daemon):
    """A photo written in chunks over ~4 s (a network share) with job.toml already there: the
    daemon must not claim the folder until nothing changed for stable_seconds."""
    lab, daemon = one_daemon
    photo = photo_bytes()
    folder = lab.inbox / "alice"
    folder.mkdir()
    (folder / "job.toml").write_text(FAST_JOB)  # the worst order: job.toml first
    chunks = 8
    size = len(photo) // chunks + 1
    with open(folder / "photo.png", "wb") as handle:
        for number in range(chunks):
            handle.write(photo[number * size:(number + 1) * size])
            handle.flush()
            if number < chunks - 1:
                time.sleep(0.5)  # shorter than stable_seconds: the copy is still going
    last_write = time.time()
    assert daemon.named("job_claimed", folder="alice") == []
    claimed = daemon.wait_for("job_claimed", 30, folder="alice")
    assert claimed["ready_because"] == "stable"
    assert parse_ts(claimed) >= last_write + STABLE_SECONDS - 0.05
    ended = daemon.wait_for("job_ended", 120, job_id=claimed["job_id"])
    assert ended["outcome"] == "finished"
    job_dir = lab.outbox / "alice" / claimed["job_id"]
    _assert_complete_outbox(job_dir, sha256_bytes(photo))
    assert parse_ts({"timestamp": audit_events(job_dir)[0]["ts"]}) >= last_write + STABLE_SECONDS - 0.05  # the engine's own record
    assert not (lab.inbox / "alice").exists() and find_claims(lab.work) == []


def test_dropped_folder_produces_a_full_outbox(one_daemon):
    lab, daemon = one_daemon
    photo = photo_bytes()
    drop_job(lab.inbox, "bob", photos={"photo.png": photo}, ready_marker=False)
    ended = daemon.wait_for("job_ended", 120, folder="bob")
    assert ended["outcome"] == "finished"
    [job_dir] = lab.finished_jobs()["bob"]
    _assert_complete_outbox(job_dir, sha256_bytes(photo))
    assert not (lab.inbox / "bob").exists() and find_claims(lab.work) == []
    assert not (lab.failed / "bob").exists()


def test_bad_jobs_land_in_failed_with_inputs_intact(one_daemon):
    lab, daemon = one_daemon
    photo = photo_bytes()
    staging = lab.root / "staging"  # written here, then renamed in: the snapshot is taken before the daemon looks
    jobs = {
        "unknown-key": {"job_toml": FAST_JOB + "\ncolour = 'blue'\n"},
        "truncated": {"photos": {"photo.jpg": _truncated_jpeg()}},  # an incomplete copy
        "no-face": {"photos": {"photo.png": _no_face_png()}},
    }
    inputs = {}
    for name, options in jobs.items():
        drop_job(staging, name, **options)
        inputs[name] = folder_snapshot(staging / name)
        (staging / name).rename(lab.inbox / name)
    ended = {name: daemon.wait_for("job_ended", 60, folder=name) for name in inputs}
    assert {line["outcome"] for line in ended.values()} == {"failed"}
    expected_codes = {"unknown-key": "invalid_job", "truncated": "truncated_image", "no-face": "no_face_found"}
    for name, snapshot in inputs.items():
        [failed_dir] = list((lab.failed / name).iterdir())
        assert folder_snapshot(failed_dir / "inputs") == snapshot, f"{name}: inputs changed on the way to failed/"
        error = json.loads((failed_dir / "error.json").read_text())
        assert error["code"] == expected_codes[name], error
        assert error["job_id"] == failed_dir.name and error["message"]
        assert error["source"] == str((lab.inbox / name).resolve())  # the folder as dropped, not the claim's work path
        assert ended[name]["output"] == str(failed_dir.resolve())  # the daemon says where the failed copy went
        assert not (lab.inbox / name).exists() and name not in lab.finished_jobs()
    unknown = json.loads((next((lab.failed / "unknown-key").iterdir()) / "error.json").read_text())
    assert any(p["where"].endswith("colour") for p in unknown["problems"])
    assert find_claims(lab.work) == []


def _truncated_jpeg() -> bytes:
    import io

    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.astronaut()).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()[: buffer.tell() // 2]


def _no_face_png() -> bytes:
    from skimage import data

    from engine.images import png_bytes

    return png_bytes(data.coffee())


def test_metrics_answer_and_match_what_happened(one_daemon):
    lab, daemon = one_daemon
    before = daemon.metrics()
    assert before["idrep_queue_depth"] == 0 and before["idrep_job_in_progress"] == 0
    for name in ("good-1", "good-2"):
        drop_job(lab.inbox, name)
    drop_job(lab.inbox, "bad-1", job_toml="colour = 'blue'\n")
    for name in ("good-1", "good-2", "bad-1"):
        daemon.wait_for("job_ended", 120, folder=name)
    after = daemon.metrics()

    def grew(key: str) -> float:
        return after[key] - before.get(key, 0.0)

    assert grew('idrep_jobs_total{outcome="finished"}') == 2
    assert grew('idrep_jobs_total{outcome="failed"}') == 1
    assert grew('idrep_job_failures_total{code="invalid_job"}') == 1
    assert grew('idrep_job_duration_seconds_count{outcome="finished"}') == 2
    for stage in STAGE_NAMES:  # the refused job never reached a stage
        assert grew(f'idrep_stage_duration_seconds_count{{stage="{stage}"}}') == 2
        assert after[f'idrep_stage_in_progress{{stage="{stage}"}}'] == 0
    # The totals agree with everything the daemon logged since it started.
    ended = Counter(e["outcome"] for e in daemon.named("job_ended"))
    for outcome in ("finished", "failed", "interrupted", "lost", "crashed"):
        assert after[f'idrep_jobs_total{{outcome="{outcome}"}}'] == ended.get(outcome, 0), outcome
    assert after["idrep_queue_depth"] == 0 and after["idrep_job_in_progress"] == 0
    if not torch.cuda.is_available():  # the daemon never initialised CUDA: the collector says so, and does not fail
        assert after['idrep_gpu_memory_bytes{kind="allocated"}'] == 0 and after['idrep_gpu_memory_bytes{kind="reserved"}'] == 0
    assert grew("idrep_train_steps_total") == 2  # FAST_JOB trains one step, and two jobs finished
    assert sum(v for k, v in after.items() if k.startswith("idrep_claims_taken_over_total")) == 0
    assert after[f'idrep_daemon_info{{backend="local",daemon_id="{daemon.events[0]["daemon_id"]}",demo="true",watch="native"}}'] == 1
    by_node = {k: v for k, v in after.items() if k.startswith("idrep_backend_jobs_total{")}
    assert sum(by_node.values()) == len(daemon.named("job_ended")) and all('backend="local"' in k for k in by_node)
    assert after['idrep_attempts_lost_total{backend="local"}'] == 0
    assert not any("good-1" in key or "bad-1" in key for key in after), "no subject names in labels"


def test_polling_mode_works_without_inotify_events(lab):
    """--poll: watchdog's PollingObserver, as on a network share where inotify sees nothing."""
    daemon = lab.start("--poll")
    started = daemon.named("daemon_started")[0]
    assert started["watch"] == "polling" and started["observer"] == "PollingObserver"
    drop_job(lab.inbox, "carol", ready_marker=False)
    claimed = daemon.wait_for("job_claimed", 30, folder="carol")
    assert claimed["ready_because"] == "stable"
    assert daemon.wait_for("job_ended", 60, folder="carol")["outcome"] == "finished"
    assert len(lab.finished_jobs()["carol"]) == 1
    assert daemon.terminate() == 0


SLOW_PREPARE_JOB = FAST_JOB.replace("size = 64\nrotations = []\ncrops = []",
                                    "size = 512\nrotations = [-8, -6, -4, -2, 2, 4, 6, 8]\ncrops = [0.9, 0.8, 0.7, 0.6, 0.5, 0.45, 0.4, 0.35]")


def test_sigterm_stops_cleanly_and_the_job_resumes_after_a_restart(lab):
    lab.configure(daemon_id="gpu-0")
    daemon = lab.start()
    photo = photo_bytes()
    drop_job(lab.inbox, "dave", job_toml=SLOW_PREPARE_JOB, photos={"a.png": photo, "b.png": photo})
    started = daemon.wait_for("stage_started", 60, stage=STAGE_NAMES[0])
    assert daemon.terminate(timeout=120) == 0  # the stage in flight finishes, then a clean exit
    job_id = started["job_id"]
    assert daemon.wait_for("job_ended", 1, job_id=job_id)["outcome"] == "interrupted"
    [claimed] = find_claims(lab.work)  # still claimed, inputs in the work area, claim released
    assert claimed.job_id == job_id and claimed.claim.released and claimed.has_folder()
    assert lab.finished_jobs() == {} and not any(lab.failed.iterdir())

    restarted = lab.start(name="restarted")
    assert restarted.named("daemon_started")[0]["own_claims_to_recover"] == [job_id]
    taken = restarted.wait_for("claim_taken_over", 30, job_id=job_id)
    assert taken["reason"] == "restart" and taken["crashes"] == 0
    resuming = restarted.wait_for("job_resuming", 30, job_id=job_id)
    assert STAGE_NAMES[0] in resuming["completed_stages"]
    assert restarted.wait_for("job_ended", 120, job_id=job_id)["outcome"] == "finished"
    [job_dir] = lab.finished_jobs()["dave"]
    events = [e["event"] for e in audit_events(job_dir)]
    assert Counter(events)["job_started"] == 1 and Counter(events)["job_interrupted"] == 1
    assert Counter(events)["job_resumed"] == 1 and Counter(events)["job_finished"] == 1
    first_stage_runs = [e for e in audit_events(job_dir) if e["event"] == "stage_started" and e["stage"] == STAGE_NAMES[0]]
    assert len(first_stage_runs) == 1, "a completed stage was run again"
    assert verify_audit(job_dir).ok
    assert find_claims(lab.work) == []
    assert restarted.terminate() == 0


def _kill_paused(lab, name: str, folder: str):
    """Start a daemon that pauses inside the first stage of its first job, wait, SIGKILL it."""
    marker = lab.root / f"paused-{name}"
    daemon = lab.start(name=name, env={"ENGINE_PAUSE_AT": "prepare:photo:0", "ENGINE_PAUSE_FILE": str(marker)})
    claimed = daemon.wait_for("job_claimed", 60, folder=folder)
    lab.wait_until(marker.exists, 60, f"{name} to pause in prepare")
    killed_at = time.time()
    daemon.kill()
    return daemon, claimed["job_id"], killed_at


def test_sigkill_mid_job_then_restart_resumes_first_and_runs_nothing_twice(lab):
    lab.configure(daemon_id="gpu-0")
    drop_job(lab.inbox, "erin")
    _, job_id, _ = _kill_paused(lab, "killed", "erin")
    drop_job(lab.inbox, "frank")  # arrives while the daemon is down
    restarted = lab.start(name="restarted")
    taken = restarted.wait_for("claim_taken_over", 30, job_id=job_id)
    assert taken["reason"] == "restart" and taken["crashes"] == 1  # own claim: no waiting for the lease
    assert restarted.wait_for("job_ended", 60, job_id=job_id)["outcome"] == "finished"
    assert restarted.wait_for("job_ended", 60, folder="frank")["outcome"] == "finished"
    claims = restarted.named("job_claimed") + restarted.named("claim_taken_over")
    assert min(claims, key=parse_ts)["job_id"] == job_id, "its own unfinished claim is recovered first"
    jobs = lab.finished_jobs()
    assert {k: len(v) for k, v in jobs.items()} == {"erin": 1, "frank": 1}
    events = audit_events(jobs["erin"][0])
    names = Counter(e["event"] for e in events)
    assert names["job_started"] == 1 and names["job_resumed"] == 1 and names["job_finished"] == 1
    assert verify_audit(jobs["erin"][0]).ok
    assert find_claims(lab.work) == [] and list(lab.inbox.iterdir()) == []
    assert restarted.terminate() == 0


def test_a_job_that_keeps_killing_daemons_is_given_up_into_failed(lab):
    lab.configure(daemon_id="gpu-0", max_crashes=1)
    folder = drop_job(lab.inbox, "grace")
    snapshot = folder_snapshot(folder)
    _, job_id, _ = _kill_paused(lab, "killed", "grace")
    restarted = lab.start(name="restarted")
    ended = restarted.wait_for("job_ended", 30, job_id=job_id)
    assert ended["outcome"] == "failed" and ended["code"] == "too_many_crashes"
    failed_dir = lab.failed / "grace" / job_id
    assert json.loads((failed_dir / "error.json").read_text())["code"] == "too_many_crashes"
    assert folder_snapshot(failed_dir / "inputs") == snapshot
    assert not (lab.outbox / ".work" / job_id).exists()
    assert find_claims(lab.work) == []
    assert restarted.terminate() == 0


def test_sigkill_during_training_resumes_from_its_checkpoint(lab):
    lab.configure(daemon_id="gpu-0")
    job = FAST_JOB.replace("[train]\nmax_steps = 1", "[train]\nmax_steps = 20\ncheckpoint_every = 5")
    assert "checkpoint_every = 5" in job
    drop_job(lab.inbox, "heidi", job_toml=job)
    marker = lab.root / "paused-in-training"
    # The engine pauses right after writing its step-10 checkpoint; SIGKILL lands there.
    killed = lab.start(name="killed", env={"ENGINE_PAUSE_AT": "train:checkpoint:10", "ENGINE_PAUSE_FILE": str(marker)})
    lab.wait_until(marker.exists, 300, "training to reach its step-10 checkpoint")
    job_id = killed.named("job_claimed")[0]["job_id"]
    assert killed.wait_for("train_checkpoint", 5, job_id=job_id, step=10)
    killed.kill()
    restarted = lab.start(name="restarted")
    resumed = restarted.wait_for("train_resumed", 120, job_id=job_id)
    assert resumed["step"] == 10, f"training did not resume from its checkpoint: {resumed}"  # the log says from which step
    assert restarted.wait_for("job_ended", 300, job_id=job_id)["outcome"] == "finished"
    assert len(restarted.named("train_resumed")) == 1 and restarted.named("training_resumed") == []  # one line for one resume
    [job_dir] = lab.finished_jobs()["heidi"]
    events = audit_events(job_dir)
    names = Counter(e["event"] for e in events)
    assert names["job_started"] == 1 and names["job_resumed"] == 1 and names["job_finished"] == 1
    assert [e["stage"] for e in events if e["event"] == "stage_started"].count(STAGE_NAMES[0]) == 1
    assert verify_audit(job_dir).ok
    assert restarted.terminate() == 0


def test_three_daemons_thirty_jobs_each_done_exactly_once_and_a_dead_daemons_claim_is_taken_over(lab):
    lease_seconds = 2.0
    lab.configure(scan_seconds=0.5, lease_seconds=lease_seconds)
    marker = lab.root / "paused-d3"
    daemons = [lab.start(name="d1", wait=False), lab.start(name="d2", wait=False),
               lab.start(name="d3", wait=False, env={"ENGINE_PAUSE_AT": "prepare:photo:0", "ENGINE_PAUSE_FILE": str(marker)})]
    for daemon in daemons:
        daemon.wait_started()
    d1, d2, d3 = daemons
    photo = photo_bytes()
    names = [f"s{number:02d}" for number in range(30)]
    for name in names:
        drop_job(lab.inbox, name, photos={"photo.png": photo})
    lab.wait_until(marker.exists, 60, "d3 to pause inside a job")
    stranded = d3.named("job_claimed")[0]
    killed_at = time.time()
    d3.kill()
    lab.wait_until(lambda: sum(len(v) for v in lab.finished_jobs().values()) >= 30 and find_claims(lab.work) == [], 240, "30 finished jobs")

    # The dead daemon's claim was taken over by a live one, only after its lease ran out.
    takeovers = d1.named("claim_taken_over") + d2.named("claim_taken_over")
    assert [t["job_id"] for t in takeovers] == [stranded["job_id"]]
    assert takeovers[0]["reason"] == "expired" and takeovers[0]["previous_owner"] == d3.events[0]["daemon_id"]
    assert parse_ts(takeovers[0]) - killed_at >= lease_seconds * 2 / 3 - 0.1  # last renewal was at most lease/3 before the kill
    # Every job exactly once: one outbox folder each, one start and one finish in its audit log.
    jobs = lab.finished_jobs()
    assert sorted(jobs) == names and all(len(v) == 1 for v in jobs.values())
    for name, [job_dir] in jobs.items():
        events = Counter(e["event"] for e in audit_events(job_dir))
        assert events["job_started"] == 1 and events["job_finished"] == 1, (name, events)
        assert events["job_resumed"] == (1 if job_dir.name == stranded["job_id"] else 0), (name, events)
    finished = Counter(e["job_id"] for d in daemons for e in d.named("job_ended", outcome="finished"))
    assert len(finished) == 30 and set(finished.values()) == {1}
    claimed = Counter(e["folder"] for d in daemons for e in d.named("job_claimed"))
    assert claimed == {name: 1 for name in names}, "a folder was claimed twice"
    assert len(d1.named("job_ended")) > 0 and len(d2.named("job_ended")) > 0, "both live daemons worked"
    assert list(lab.inbox.iterdir()) == [] and not any(lab.failed.iterdir())
    assert not [p for p in (lab.outbox / ".work").rglob("state.json")], "an unfinished job was left behind"
    counts = [d.metrics() for d in (d1, d2)]
    assert sum(m['idrep_jobs_total{outcome="finished"}'] for m in counts) == 30
    assert sum(m['idrep_claims_taken_over_total{reason="expired"}'] for m in counts) == 1
    assert d1.terminate() == 0 and d2.terminate() == 0
