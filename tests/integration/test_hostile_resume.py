"""The share is hostile (issue 30): anything under outbox/.work/<job-id>/ may have been written by
someone else between a kill and the restart. A resume unpickles nothing, reads back only what
this stage run recorded in the audit chain (checkpoint generations, finished batches), rebuilds
a torn ledger from the chain, and sets a damaged chain aside and redoes the work; every job still
ends equal, byte for byte, to a clean run.

One clean run and one kill per kill point serve the whole module: each test works on a copy of
the killed job's outbox (the job folder records its source folder, never the outbox's path)."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import struct
from pathlib import Path

import pytest

from engine.provenance.audit import AUDIT_FILE, AuditLog, read_chain
from engine.fsutil import sha256_bytes, sha256_file
from engine.jobfolder import work_dir
from engine.status import outbox_status
from engine.provenance.verification import verify_audit
from tests.harness.lab import audit_events
from tests.harness.resume import JOB_ID, engine_cli, kill_at, make_two_photo_job, output_hashes, stable_manifest

LORA = "lora/pytorch_lora_weights.safetensors"
# FAST_JOB trains COARSE for 3 steps (a phase boundary: generation 3) and is paused in FINE at
# its step-4 checkpoint (generation 4, mid-phase: AdamP's state with its python-int steps).
MID_TRAINING = "train:checkpoint:4"
NEWEST, OLDER = 4, 3


@pytest.fixture(scope="module")
def job(tmp_path_factory, astronaut_rgb) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("hostile")
    return make_two_photo_job(root, astronaut_rgb)


@pytest.fixture(scope="module")
def clean_run(clean_two_photo_run) -> Path:
    return clean_two_photo_run  # the same job's clean run, shared with test_resume (tests/integration/conftest.py)


def _killed(job, tmp_path_factory, point: str) -> Path:
    source, config = job
    root = tmp_path_factory.mktemp(point.replace(":", "_"))
    kill_at(config, source, root / "outbox", point, root, JOB_ID)
    return root / "outbox"


@pytest.fixture(scope="module")
def killed_mid_training(job, tmp_path_factory, clean_run) -> Path:
    return _killed(job, tmp_path_factory, MID_TRAINING)


@pytest.fixture(scope="module")
def killed_after_embed(job, tmp_path_factory, clean_run) -> Path:
    return _killed(job, tmp_path_factory, "stage:embed:complete")


def _copy(outbox: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of a killed job's outbox: (outbox, the job's work folder)."""
    copy = tmp_path / "outbox"
    shutil.copytree(outbox, copy, symlinks=True)
    return copy, work_dir(copy, JOB_ID)


def _rerun(job, outbox: Path, job_id: str | None = JOB_ID) -> Path:
    """Run the job again (by default with its id; None: found by its source folder); the published folder."""
    source, config = job
    process = engine_cli(config, source, outbox, job_id=job_id)
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr[-4000:]
    result = json.loads(stdout.strip().splitlines()[-1])
    assert (result["job_id"], result["outcome"]) == (JOB_ID, "finished"), result
    return Path(result["output"])


def _last_run(final: Path) -> list[dict]:
    events = audit_events(final)
    return events[max(i for i, e in enumerate(events) if e["event"] in ("job_resumed", "job_started")):]


def _assert_like_the_clean_run(final: Path, clean_run: Path, ignore: tuple[str, ...] = ()) -> None:
    report = verify_audit(final)
    assert report.ok, report.problems
    assert (final / LORA).read_bytes() == (clean_run / LORA).read_bytes()
    assert {k: v for k, v in output_hashes(final).items() if k not in ignore} == output_hashes(clean_run)
    manifest = stable_manifest(final)
    manifest["outputs"] = {k: v for k, v in manifest["outputs"].items() if k not in ignore}
    assert manifest == stable_manifest(clean_run)


class _Payload:
    """What a hostile checkpoint carries: unpickling it creates `marker` (code run on load)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def test_planted_pickles_are_never_unpickled_and_the_job_finishes_as_a_clean_run(job, killed_mid_training, clean_run, tmp_path):
    import torch

    outbox, work = _copy(killed_mid_training, tmp_path)
    marker = tmp_path / "unpickled"
    buffer = tmp_path / "payload.pt"
    torch.save({"lora": _Payload(marker)}, buffer)
    pickle_bytes = buffer.read_bytes()
    # (a) at the old checkpoint's name, which older engines loaded with weights_only=False
    (work / "checkpoints" / "train.pt").write_bytes(pickle_bytes)
    # (b) as the newest generation's tensors, with a sidecar that names it
    tensors, sidecar = work / "checkpoints" / f"train-{NEWEST:06d}.safetensors", work / "checkpoints" / f"train-{NEWEST:06d}.json"
    tensors.write_bytes(pickle_bytes)
    planted = json.loads(sidecar.read_text())
    planted["tensors_sha256"] = sha256_bytes(pickle_bytes)
    sidecar.write_text(json.dumps(planted))

    final = _rerun(job, outbox)

    assert not marker.exists()
    last = _last_run(final)
    mismatched = {e["file"]: e for e in last if e["event"] == "resume_artifact_mismatch"}
    assert set(mismatched) == {f"checkpoints/train-{NEWEST:06d}.safetensors", f"checkpoints/train-{NEWEST:06d}.json"}
    assert mismatched[f"checkpoints/train-{NEWEST:06d}.safetensors"]["found"] == sha256_bytes(pickle_bytes)
    assert [e["file"] for e in last if e["event"] == "train_checkpoint_ignored"] == ["checkpoints/train.pt"]
    assert [e["step"] for e in last if e["event"] == "train_resumed"] == [OLDER]
    _assert_like_the_clean_run(final, clean_run)
    torch.load(buffer, weights_only=False)  # the payload was live: what the old engine did runs it
    assert marker.exists()


def _flip_a_lora_bit(path: Path) -> None:
    """Flip one bit inside the first LoRA tensor's bytes of a .safetensors file."""
    data = bytearray(path.read_bytes())
    (length,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + length])
    begin, end = header[min(key for key in header if key.startswith("lora."))]["data_offsets"]
    assert end > begin
    data[8 + length + begin + (end - begin) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("flipped", [(NEWEST,), pytest.param((NEWEST, OLDER), marks=pytest.mark.slow)], ids=["newest", "every generation"])
def test_a_flipped_bit_in_a_checkpoint_resumes_from_the_newest_generation_as_recorded(job, killed_mid_training, clean_run, tmp_path, flipped):
    """The newest generation damaged: training resumes from the older one. Every one damaged:
    it starts again from the stage's start. Either way the LoRA is the clean run's."""
    outbox, work = _copy(killed_mid_training, tmp_path)
    recorded = {}
    for step in flipped:
        tensors = work / "checkpoints" / f"train-{step:06d}.safetensors"
        recorded[f"checkpoints/train-{step:06d}.safetensors"] = (sha256_file(tensors), step)
        _flip_a_lora_bit(tensors)

    final = _rerun(job, outbox)

    last = _last_run(final)
    mismatches = [e for e in last if e["event"] == "resume_artifact_mismatch"]
    assert {e["file"]: (e["expected"], e["step"]) for e in mismatches} == recorded
    assert all(e["found"] not in (None, e["expected"]) for e in mismatches)
    assert [e["step"] for e in last if e["event"] == "train_resumed"] == ([OLDER] if OLDER not in flipped else [])
    _assert_like_the_clean_run(final, clean_run)


# One kind of damage in the default run; the others (same path through Ledger.read) are slow.
@pytest.mark.parametrize("damage", ["cut in half", pytest.param("padded with NULs", marks=pytest.mark.slow),
                                    pytest.param("embed's commit lost", marks=pytest.mark.slow)])
def test_a_torn_ledger_is_rebuilt_from_the_audit_and_the_finished_stages_are_kept(job, killed_after_embed, clean_run, tmp_path, damage):
    """The issue's case 6: state.json cut in half after a kill sent the job to failed/ as
    internal_error JSONDecodeError, its work deleted, although every finished stage was intact.
    "embed's commit lost": a kill between embed's stage_finished line and the ledger's commit."""
    outbox, work = _copy(killed_after_embed, tmp_path)
    state = work / "state.json"
    text = state.read_bytes()
    if damage == "cut in half":
        state.write_bytes(text[:len(text) // 2])
    elif damage == "padded with NULs":
        state.write_bytes(text + b"\0" * 4096)
    else:
        ledger = json.loads(text)
        ledger["stages"][1].update(status="running", artifacts={}, models={})
        state.write_text(json.dumps(ledger))
    [running] = outbox_status(outbox).running  # a torn state.json: `status` reads the job from its audit log
    assert (running.job_id, running.stage) == (JOB_ID, "embed" if damage == "embed's commit lost" else "train")

    final = _rerun(job, outbox, job_id=None)  # found by its source folder, as a plain re-run does

    last = _last_run(final)
    [rebuilt] = [e for e in audit_events(final) if e["event"] == "ledger_rebuilt"]
    assert rebuilt["reason"] == ("differs" if damage == "embed's commit lost" else "torn")
    assert [e["stage"] for e in last if e["event"] == "stage_skipped"] == ["prepare", "embed"]
    assert [e["stage"] for e in last if e["event"] == "stage_started"] == ["train", "verify", "render"]
    _assert_like_the_clean_run(final, clean_run)


def test_an_edited_audit_line_sets_the_chain_aside_and_every_stage_is_redone(job, killed_after_embed, clean_run, tmp_path):
    outbox, work = _copy(killed_after_embed, tmp_path)
    audit = work / AUDIT_FILE
    lines = audit.read_text().splitlines()
    number = next(i for i, line in enumerate(lines, start=1) if '"stage_finished"' in line and '"prepare"' in line)
    lines[number - 1] = lines[number - 1].replace('"stage":"prepare"', '"stage":"prepared"')  # edited without re-hashing
    audit.write_text("\n".join(lines) + "\n")
    damaged = audit.read_bytes()

    final = _rerun(job, outbox)

    [aside] = [path for path in final.iterdir() if path.name.startswith(f"{AUDIT_FILE}.damaged-")]
    assert aside.read_bytes() == damaged  # kept, never deleted
    events = audit_events(final)
    first = events[0]
    assert first["event"] == "audit_damaged" and first["prev"] == "0" * 64
    assert (first["file"], first["sha256"], first["size"], first["broken_line"]) == (aside.name, sha256_bytes(damaged), len(damaged), number)
    assert not [e for e in events if e["event"] == "stage_skipped"]
    assert [e["stage"] for e in events if e["event"] == "stage_started"] == ["prepare", "embed", "train", "verify", "render"]
    _assert_like_the_clean_run(final, clean_run, ignore=(aside.name,))


# ---------------------------------------------------------------------------- read back only what was recorded

def _context(job_dir: Path, settings):
    """A stage's context as the runner makes one, on the job folder's audit log."""
    from engine.context import StageContext

    audit = AuditLog(job_dir / AUDIT_FILE, "job-1")
    return StageContext(job=None, job_id="job-1", job_dir=job_dir, settings=settings, resources=None, audit=audit, fingerprint="fp")


def test_scratch_is_read_back_only_as_this_stage_run_recorded_it(tmp_path, settings):
    ctx = _context(tmp_path / "job", settings)
    ctx.audit.event("stage_started", stage="mine", fingerprint="fp", continues=False)
    rows = b'[{"seed": 1}]\n'
    digests = ctx.write_recorded("scratch_written", {"mine_progress/batch_0.json": rows}, stage="mine")
    assert digests == {"mine_progress/batch_0.json": sha256_bytes(rows)}
    assert ctx.read_recorded("mine_progress/batch_0.json") == rows
    assert ctx.read_recorded("mine_progress/batch_1.json") is None  # never written: nothing to say

    ctx.path("mine_progress/batch_0.json").write_bytes(b'[{"seed": 2}]\n')  # edited on the share
    ctx.path("mine_progress/batch_1.json").write_bytes(b"[]\n")  # planted
    (tmp_path / "elsewhere.json").write_bytes(rows)
    ctx.path("mine_progress/batch_2.json").symlink_to(tmp_path / "elsewhere.json")
    assert [ctx.read_recorded(f"mine_progress/batch_{n}.json", stage="mine") for n in range(3)] == [None, None, None]
    mismatches = [r for r in read_chain(ctx.audit.path).records if r["event"] == "resume_artifact_mismatch"]
    assert [(r["file"], r["expected"], r["reason"]) for r in mismatches] == [
        ("mine_progress/batch_0.json", sha256_bytes(rows), "not as recorded"),
        ("mine_progress/batch_1.json", None, "not recorded by this stage run"),
        ("mine_progress/batch_2.json", None, "not recorded by this stage run")]
    assert not any(os.path.lexists(ctx.path(f"mine_progress/batch_{n}.json")) for n in range(3))
    assert (tmp_path / "elsewhere.json").read_bytes() == rows  # a link is removed, not what it points at

    ctx.write_recorded("scratch_written", {"mine_progress/batch_0.json": rows}, stage="mine")
    resumed = _context(tmp_path / "job", settings)  # the next process, after a kill
    assert resumed.read_recorded("mine_progress/batch_0.json") == rows  # the interrupted run's record, as written
    resumed.audit.event("stage_started", stage="mine", fingerprint="fp", continues=True)
    assert resumed.read_recorded("mine_progress/batch_0.json") == rows  # a run that continues it trusts it
    fresh = _context(tmp_path / "job", settings)
    fresh.audit.event("stage_started", stage="mine", fingerprint="fp", continues=False)  # a new run of the stage
    assert fresh.read_recorded("mine_progress/batch_0.json") is None  # recorded by an earlier run: not trusted


# ---------------------------------------------------------------------------- the checkpoint format

@pytest.mark.parametrize("optimizer_name", ["adamw", "adamp"])
def test_optimizer_and_random_states_round_trip_exactly_through_safetensors_and_json(optimizer_name):
    """Every entry of AdamW's and AdamP's state (tensors, AdamW's 0-dim float step tensor,
    AdamP's python-int step, betas as a tuple, param indices as int keys) and every random
    generator's state come back from the two files exactly as they were, types included."""
    import random

    import numpy as np
    import torch
    from safetensors.torch import load, save

    from engine.kinds.sections import PhaseSpec
    from engine.diffusion.training import _join_tensors, _optimizer, _restore_rng, _rng_state, _split_tensors

    parameters = [torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))]
    optimizer = _optimizer(PhaseSpec(name="P", optimizer=optimizer_name), parameters)
    for _ in range(3):
        (parameters[0].square().sum() + parameters[1].sum()).backward()
        optimizer.step()
        optimizer.zero_grad()
    generator = torch.Generator().manual_seed(7)
    torch.randn(3, generator=generator)
    np.random.normal()  # numpy's cached gaussian is set
    random.gauss(0, 1)
    state = {"optimizer": optimizer.state_dict(), "rng": _rng_state(generator), "history": [["P", 1, 1, 0.5, None]]}

    tensors: dict[str, torch.Tensor] = {}
    plain = json.loads(json.dumps(_split_tensors(state, "", tensors)))
    back = _join_tensors(plain, load(save(tensors)))

    def same(a, b) -> bool:
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        if isinstance(a, dict):
            return type(b) is dict and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
        if isinstance(a, (list, tuple)):
            return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        return type(a) is type(b) and a == b

    assert same(state["optimizer"], back["optimizer"])
    assert same(state["rng"], back["rng"]) and same(state["history"], back["history"])

    def draws() -> list:
        return [torch.randn(2, generator=generator), torch.rand(2), np.random.normal(), np.random.rand(), random.gauss(0, 1), random.random()]

    expected = draws()
    _restore_rng(back["rng"], generator)
    again = draws()
    assert all(torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b for a, b in zip(expected, again))


# ---------------------------------------------------------------------------- a forger who re-hashes the chain

@pytest.fixture(scope="module")
def killed_signed_mid_training(job, tmp_path_factory, clean_run) -> Path:
    """The same job killed mid-training in a lab with keys (the signer witnessed its chain as it
    grew): (its outbox, the lab's config.toml)."""
    from engine.provenance.trust import make_lab_keys

    source, config = job
    root = tmp_path_factory.mktemp("signed-kill")
    make_lab_keys(root / "keys", "Witness Lab")
    signed = root / "config.toml"
    signed.write_text(config.read_text() + f'[trust]\nkeys = "{root / "keys"}"\n')
    kill_at(signed, source, root / "outbox", MID_TRAINING, root, JOB_ID)
    return root / "outbox", signed


def _forge_newest_checkpoint(work: Path) -> None:
    """What a share-writer who holds no key does to poison a resume: change the newest checkpoint's
    LoRA, record its new sha256 in the chain's line for it, and re-hash the chain from there on."""
    from engine.provenance.audit import line_hash
    from engine.fsutil import canonical_json

    tensors, sidecar = (work / "checkpoints" / f"train-{NEWEST:06d}.{suffix}" for suffix in ("safetensors", "json"))
    _flip_a_lora_bit(tensors)
    planted = json.loads(sidecar.read_text())
    planted["tensors_sha256"] = sha256_file(tensors)
    sidecar.write_text(json.dumps(planted))
    records = [json.loads(line) for line in (work / AUDIT_FILE).read_text().splitlines()]
    [line] = [r for r in records if r["event"] == "train_checkpoint" and r["step"] == NEWEST]
    line["files"].update({path.relative_to(work).as_posix(): sha256_file(path) for path in (tensors, sidecar)})
    prev = "0" * 64
    for record in records:
        record["prev"] = prev
        record["hash"] = line_hash(record)
        prev = record["hash"]
    (work / AUDIT_FILE).write_text("".join(canonical_json(record) + "\n" for record in records))
    assert read_chain(work / AUDIT_FILE).broken_at is None  # a chain that checks


def test_a_rehashed_chain_cannot_poison_a_signed_labs_resume(job, killed_signed_mid_training, killed_mid_training, clean_run, tmp_path):
    """With lab keys the signer witnessed the chain's head after every line a resume trusts; a
    forger who rewrites a checkpoint and re-hashes the chain cannot forge those witnesses, so the
    forged record is not trusted and training resumes from the generation before. Without keys
    the same forgery is taken at its word (the control: what the witness is for)."""
    from engine.jobfolder import WITNESS_FILE

    killed, signed_config = killed_signed_mid_training
    signed_outbox, signed_work = _copy(killed, tmp_path / "signed")
    assert (signed_work / WITNESS_FILE).is_file()
    _forge_newest_checkpoint(signed_work)
    final = _rerun((job[0], signed_config), signed_outbox)
    last = _last_run(final)
    events = audit_events(final)
    [unwitnessed] = [e for e in events if e["event"] == "unwitnessed_lines"]  # declared first thing on opening the chain
    forged_line = next(i for i, e in enumerate(events, 1) if e["event"] == "train_checkpoint" and e["step"] == NEWEST)
    assert unwitnessed["from_line"] <= forged_line <= unwitnessed["to_line"]
    assert [(e["file"], e["reason"]) for e in last if e["event"] == "resume_artifact_mismatch" and e["file"].endswith(".safetensors")] == [
        (f"checkpoints/train-{NEWEST:06d}.safetensors", "not recorded by this stage run")]
    assert [e["step"] for e in last if e["event"] == "train_resumed"] == [OLDER]
    assert (final / LORA).read_bytes() == (clean_run / LORA).read_bytes()
    assert verify_audit(final).ok, verify_audit(final).problems

    plain_outbox, plain_work = _copy(killed_mid_training, tmp_path / "plain")
    _forge_newest_checkpoint(plain_work)
    poisoned = _rerun(job, plain_outbox)
    assert [e["step"] for e in _last_run(poisoned) if e["event"] == "train_resumed"] == [NEWEST]
    assert (poisoned / LORA).read_bytes() != (clean_run / LORA).read_bytes()  # unsigned: the share is trusted as far as it goes
