"""The evaluate kind end to end with the demo model (issue 17): one CSV row per (group + control)
x prompt x seed, charts that render when no face is found anywhere, control cells equal to the
LoRA at weight 0 bit for bit, a photo-subset group that trains a LoRA of its own while a phase
group adds no training step, anchored mining in growing batches, kills mid-mining and mid-grid
that resume, and refusals that name their key. (The mining rule's accept / prune / relax / anchor
is tested on synthetic embeddings in tests/unit/test_mining.py: the demo model's noise holds no
face, so here every candidate is a counted `no_face`.)"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from engine.errors import JobError
from engine.images import read_rgb
from engine.job import load_job
from engine.measure.mining import MineRule
from engine.jobfolder import work_dir
from engine.provenance.verification import verify_audit
from tests.harness.jobs import FAST_TRAIN, make_job
from tests.harness.paths import REPO

TRAIN = FAST_TRAIN.replace("rotations = [-10, 10]\ncrops = [0.8]", "rotations = []\ncrops = []")
JOB = 'kind = "evaluate"\n' + TRAIN + """
[evaluate]
prompts = ["a photo of {trigger}, portrait", "a photo of {trigger}, side profile"]
seeds = [0, 1, 2]
steps = 2
batch_size = 2

[[evaluate.group]]
name = "coarse"
phase = "COARSE"

[[evaluate.group]]
name = "one_photo"
photos = ["a.png"]

[[evaluate.group]]
name = "faceid"
method = "faceid"

[[evaluate.group]]
name = "both"
method = "lora+faceid"
phase = "final"

[mine]
enabled = true
steps = 2
batch = 2
growth = 2.0
budget = 6
target = 4
"""
JOB_ID = "20260101T000000Z-evaluate"
GROUPS = ("control", "coarse", "one_photo", "faceid", "both")


def _photos(astronaut_rgb):
    return {"a.png": astronaut_rgb, "b.png": np.ascontiguousarray(astronaut_rgb[:, ::-1])}


@pytest.fixture(scope="module")
def finished(tmp_path_factory, astronaut_rgb):
    from engine.config import Settings
    from engine.runner import Engine

    root = tmp_path_factory.mktemp("evaluate")
    (root / "models").mkdir()
    settings = Settings.from_table({"paths": {"models": str(root / "models")}}, root=root)
    source = make_job(root / "inbox" / "alice", _photos(astronaut_rgb), JOB)
    engine = Engine(settings, demo=True)
    started = time.perf_counter()
    result = engine.run_job(source, root / "outbox", job_id=JOB_ID)
    seconds = time.perf_counter() - started
    assert result.outcome == "finished", result.error
    print(f"demo evaluate job (4 groups + control, 2 prompts, 3 seeds; 6 mining candidates): {seconds:.1f} s")
    return root, result.output_dir, seconds, engine


def _info(out: Path) -> dict:
    return json.loads((out / "evaluate" / "evaluate.json").read_text())


def test_a_demo_evaluate_job_runs_end_to_end_with_one_csv_row_per_cell(finished):
    root, out, seconds, _ = finished
    assert seconds < 120  # 2 groups, 2 prompts, 3 seeds (and 6 mining candidates) in under two minutes on this CPU
    assert verify_audit(out).ok
    with open(out / "evaluate" / "evaluate.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == (4 + 1) * 2 * 3
    assert {(r["group"], r["prompt_index"], r["seed"]) for r in rows} == {(g, str(p), str(s)) for g in GROUPS for p in range(2) for s in range(3)}
    assert all(r["demo"] == "true" for r in rows) and all("sks person" in r["prompt"] for r in rows)
    info = _info(out)
    assert [g["name"] for g in info["groups"]] == list(GROUPS) and info["demo"] is True
    # Demo noise has no face: every cell counted, none scored, no test possible, and the reason said.
    assert info["faces_not_found"] == 30 and all(row["drift"] is None and not row["face_found"] for row in info["cells"])
    assert [t["reason"] for t in info["tests"]] == ["no cell where both the group and the control found a face"] * 4
    for row in info["cells"]:
        assert (out / row["file"]).is_file() and hashlib.sha256((out / row["file"]).read_bytes()).hexdigest() == row["sha256"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "evaluate"
    for chart in ("report/evaluate_prompts.png", "report/evaluate_no_face.png", "report/evaluate_groups.png", "report/evaluate_heatmap.png",
                  "evaluate/sheets/control.png", "evaluate/sheets/one_photo.png"):
        assert chart in manifest["outputs"], chart
        assert (out / chart).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (out / "report.html").read_text()
    assert "<h1>Evaluation report: alice</h1>" in page and 'id="tests"' in page and 'id="by-prompt"' in page
    assert not (out / "evaluate_progress").exists() and not (out / "checkpoints").exists()


def test_the_charts_render_with_faces_found_and_without_any(finished):
    """The same charts from a grid with faces in some cells (drifts set by hand), and from one with none."""
    from engine import report
    from engine.measure import evalstats
    _, out, _, _ = finished
    facts = report.JobFacts.read(out)
    rng = np.random.default_rng(0)
    info = _info(out)
    for row in info["cells"]:
        row["drift"] = None if row["seed"] == 2 or row["group"] == "one_photo" else round(float(rng.uniform(0.1, 0.9)), 4)
    info["by_prompt"] = [{"group": g, "prompt_index": p, **evalstats.summarise([r["drift"] for r in info["cells"] if r["group"] == g and r["prompt_index"] == p], 0.18)}
                         for g in GROUPS for p in range(2)]
    info["by_group"] = [{"group": g, **evalstats.summarise([r["drift"] for r in info["cells"] if r["group"] == g], 0.18)} for g in GROUPS]
    for facts.evaluate in (info, _info(out), {}):
        for chart in (report.evaluate_prompts_png, report.evaluate_no_face_png, report.evaluate_groups_png, report.evaluate_heatmap_png):
            assert chart(facts)[:8] == b"\x89PNG\r\n\x1a\n"


def test_control_cells_equal_the_lora_at_weight_zero_bit_for_bit(finished):
    from engine.diffusion.sampling import identity_lora, render

    _, out, _, engine = finished
    info = _info(out)
    pipe = engine.resources.model("base")
    control = {(row["prompt_index"], row["seed"]): read_rgb(out / row["file"]) for row in info["cells"] if row["group"] == "control"}
    with identity_lora(pipe, out / "lora") as lora:
        lora.weight(0.0)
        for index, prompt in enumerate(info["prompts"]):
            for batch in ([0, 1], [2]):  # the grid's own batches (CPU kernels depend on the batch size)
                images = render(pipe, prompt, info["negative_prompt"], batch, steps=info["steps"], guidance=info["guidance"], size=info["resolution"])
                for seed, rgb in zip(batch, images):
                    assert np.array_equal(rgb, control[(index, seed)]), (index, seed)
        lora.weight(1.0)
        at_one = render(pipe, info["prompts"][0], info["negative_prompt"], [0, 1], steps=info["steps"], guidance=info["guidance"], size=info["resolution"])
    assert not np.array_equal(at_one[0], control[(0, 0)])  # the LoRA does change the render: the equality above means something


def test_a_photo_subset_group_trains_its_own_lora_and_a_phase_group_adds_no_step(finished):
    _, out, _, _ = finished
    train = json.loads((out / "train" / "train.json").read_text())
    [group] = train["groups"]
    assert group["name"] == "one_photo" and group["photos"] == ["a.png"] and group["total_steps"] > 0
    assert train["steps_all_runs"] == train["total_steps"] + group["total_steps"]  # the phase group is not a run
    sha = {name: hashlib.sha256((out / rel).read_bytes()).hexdigest() for name, rel in (
        ("main", "lora/pytorch_lora_weights.safetensors"), ("coarse", "lora/phases/COARSE/pytorch_lora_weights.safetensors"),
        ("one_photo", "lora/groups/one_photo/pytorch_lora_weights.safetensors"))}
    assert len(set(sha.values())) == 3
    coarse = train["snapshots"]["COARSE"]
    assert coarse["step"] == train["phases"][0]["last_step"] and coarse["reached"] and coarse["alpha"] == 8.0
    groups = {g["name"]: g for g in _info(out)["groups"]}
    assert groups["coarse"]["extra_training_steps"] == 0 and groups["one_photo"]["extra_training_steps"] == group["total_steps"]
    assert groups["coarse"]["lora_sha256"] == sha["coarse"] and groups["one_photo"]["lora_sha256"] == sha["one_photo"]
    events = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    exits = [(e.get("run"), e["phase"]) for e in events if e["event"] == "phase_exit"]
    assert exits == [(None, "COARSE"), (None, "FINE"), ("one_photo", "COARSE"), ("one_photo", "FINE")]
    # The subset LoRA learned from a.png only: the loss file of its own, beside the job's.
    assert (out / "train" / "loss_one_photo.csv").read_text() != (out / "train" / "loss.csv").read_text()


def test_mining_records_every_candidate_in_growing_batches_and_stops_at_its_budget(finished):
    from engine.stages.mine import batch_sizes

    _, out, _, _ = finished
    assert batch_sizes(MineRule(batch=4, growth=2.0, max_batch=16, budget=64)) == [4, 8, 16, 16, 16, 4]
    info = json.loads((out / "mine" / "mine.json").read_text())
    assert [c["seed"] for c in info["candidates"]] == list(range(1000, 1006)) and [c["batch"] for c in info["candidates"]] == [1, 1, 2, 2, 2, 2]
    assert info["decisions"] == {"no_face": 6} and info["members"] == [] and "budget of 6" in info["stop_reason"]
    assert info["rule"]["anchor_max_drift"] == 0.4 and info["anchored_to"] == "embedding/reference.npy"
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(c["file"] in manifest["outputs"] for c in info["candidates"]) and "report/mine.png" in manifest["outputs"]
    assert 'id="mine"' in (out / "report.html").read_text() and not (out / "mine_progress").exists()


def test_mining_is_off_unless_enabled_and_cannot_be_unanchored(tmp_path, astronaut_rgb):
    spec = load_job(make_job(tmp_path / "a", _photos(astronaut_rgb), 'kind = "evaluate"\n' + TRAIN), {}, (".png",), ()).spec
    assert spec.mine.enabled is False
    with pytest.raises(JobError) as caught:
        load_job(make_job(tmp_path / "b", _photos(astronaut_rgb), 'kind = "evaluate"\n' + TRAIN + "[mine]\nenabled = true\nanchor_max_drift = 0\n"),
                 {}, (".png",), ())
    assert any(p.where == "job.toml: mine.anchor_max_drift" for p in caught.value.problems)


def _run_until_paused(command: list[str], point: str, marker: Path, ready) -> None:
    """Run the engine until it reaches the pause point `point`, check `ready()`, SIGKILL it."""
    env = dict(os.environ, PYTHONPATH=str(REPO), ENGINE_PAUSE_AT=point, ENGINE_PAUSE_FILE=str(marker))
    process = subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, f"never reached {point}"
            time.sleep(0.05)
        ready()
    finally:
        os.kill(process.pid, signal.SIGKILL)
        process.communicate(timeout=30)
        marker.unlink(missing_ok=True)


def test_mining_and_the_grid_killed_midway_resume_without_redoing_finished_batches(finished, tmp_path, astronaut_rgb):
    root, out, _, _ = finished
    config = tmp_path / "config.toml"
    config.write_text(f'[paths]\nmodels = "{root / "models"}"\n')
    source = make_job(tmp_path / "inbox" / "alice", _photos(astronaut_rgb), JOB)
    outbox = tmp_path / "outbox"
    command = [sys.executable, "-m", "engine", "--config", str(config), "run", str(source), "--outbox", str(outbox), "--demo", "--job-id", JOB_ID]
    progress = lambda name: work_dir(outbox, JOB_ID) / name  # noqa: E731
    # Killed after mining's first batch, then (resumed) after the grid's third batch.
    _run_until_paused(command, "mine:batch:1", tmp_path / "paused", lambda: sorted(p.name for p in progress("mine_progress").glob("*.json")) == ["batch_0.json"])
    _run_until_paused(command, "evaluate:batch:3", tmp_path / "paused", lambda: len(list(progress("evaluate_progress").glob("*.json"))) == 3)
    rerun = subprocess.run(command, env=dict(os.environ, PYTHONPATH=str(REPO)), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    final = Path(json.loads(rerun.stdout.strip().splitlines()[-1])["output"])
    events = [json.loads(line) for line in (final / "audit.jsonl").read_text().splitlines()]
    [mined] = [e for e in events if e["event"] == "mine_finished"]
    assert mined["resumed_candidates"] == 2 and mined["candidates"] == 6  # the first batch read back, the second redone
    [scored] = [e for e in events if e["event"] == "evaluate_scored"]
    assert scored["resumed_cells"] == 2 + 1 + 2 and scored["cells"] == 30  # control p0 [0,1], [2]; control p1 [0,1]
    starts = [e for e in events if e["event"] in ("stage_started", "stage_skipped")]
    assert [(e["event"], e["stage"]) for e in starts][-2:] == [("stage_skipped", "mine"), ("stage_started", "evaluate")]
    for folder_info in ("evaluate/evaluate.json", "mine/mine.json"):
        first, again = (json.loads((folder / folder_info).read_text())["candidates" if "mine" in folder_info else "cells"] for folder in (out, final))
        for a, b in zip(first, again, strict=True):  # as the uninterrupted run made them
            assert a["file"] == b["file"] and np.array_equal(read_rgb(out / a["file"]), read_rgb(final / b["file"]))
    assert verify_audit(final).ok


def _safetensors(tensors: dict[str, tuple[int, ...]]) -> bytes:
    import torch
    from safetensors.torch import save

    return save({name: torch.zeros(shape) for name, shape in tensors.items()})


MODEL_FILE = _safetensors({"conv_in.weight": (2, 2)})  # weights, but no LoRA


def _refusal(tmp_path: Path, astronaut_rgb, evaluate: str, files: dict | None = None) -> dict[str, str]:
    """key -> its reasons (joined by " | ")."""
    folder = make_job(tmp_path / "job", {**_photos(astronaut_rgb), **(files or {})}, 'kind = "evaluate"\n' + TRAIN + evaluate)
    with pytest.raises(JobError) as caught:
        load_job(folder, {}, (".png",), ())
    reasons: dict[str, str] = {}
    for problem in caught.value.problems:
        reasons[problem.where] = " | ".join(filter(None, (reasons.get(problem.where), problem.reason)))
    return reasons


def test_a_group_names_its_lora_once_from_a_phase_of_the_job_or_its_photos(tmp_path, astronaut_rgb):
    problems = _refusal(tmp_path, astronaut_rgb, """
[[evaluate.group]]
name = "control"
phase = "MID"

[[evaluate.group]]
name = "both"
phase = "final"
photos = ["a.png"]

[[evaluate.group]]
name = "all"
photos = ["a.png", "b.png"]

[[evaluate.group]]
name = "stranger"
photos = ["c.png"]
""")
    assert "is the grid's group without a LoRA" in problems["job.toml: evaluate.group[0].name"]
    assert "'MID' is no phase of [train] (COARSE, FINE)" in problems["job.toml: evaluate.group[0].phase"]
    assert "exactly once" in problems["job.toml: evaluate.group[1]"] and "photos, phase" in problems["job.toml: evaluate.group[1]"]
    assert "use phase = 'final'" in problems["job.toml: evaluate.group[2].photos"]
    assert "'c.png' is not one of the job's photos" in problems["job.toml: evaluate.group[3].photos[0]"]


def test_a_brought_lora_is_a_safetensors_file_of_the_folder_with_its_sha256(tmp_path, astronaut_rgb):
    problems = _refusal(tmp_path, astronaut_rgb, """
[[evaluate.group]]
name = "pickled"
file = "old.ckpt"

[[evaluate.group]]
name = "missing"
file = "gone.safetensors"
sha256 = "%s"

[[evaluate.group]]
name = "weights"
file = "model.safetensors"
sha256 = "%s"
""" % ("0" * 64, hashlib.sha256(MODEL_FILE).hexdigest()), files={"model.safetensors": MODEL_FILE})
    assert "no pickled formats" in problems["job.toml: evaluate.group[0].file"]
    assert "sha256 of 'old.ckpt' is needed" in problems["job.toml: evaluate.group[0].sha256"]
    assert "'gone.safetensors' is not a file in the job folder" in problems["job.toml: evaluate.group[1].file"]
    assert "holds no LoRA weights" in problems["job.toml: evaluate.group[2].file"]


def _run_with_brought_file(engine, tmp_path: Path, astronaut_rgb, name: str, data: bytes, sha256: str):
    """A one-cell grid whose only group is the LoRA file `name` brought in the folder, run by the fixture's engine."""
    job = 'kind = "evaluate"\n' + TRAIN + f"""
[evaluate]
prompts = ["a photo of {{trigger}}"]
seeds = [0]
steps = 1
control = false

[[evaluate.group]]
name = "brought"
file = "{name}"
sha256 = "{sha256}"
"""
    source = make_job(tmp_path / "inbox" / "bob", {**_photos(astronaut_rgb), name: data}, job)
    return engine.run_job(source, tmp_path / "outbox", failed_dir=tmp_path / "failed")


def test_a_brought_lora_whose_bytes_differ_from_its_sha256_fails_naming_both(finished, tmp_path, astronaut_rgb):
    _, out, _, engine = finished
    lora = (out / "lora" / "pytorch_lora_weights.safetensors").read_bytes()
    result = _run_with_brought_file(engine, tmp_path, astronaut_rgb, "theirs.safetensors", lora, "a" * 64)
    assert result.outcome == "failed"  # refused as it was read, before any training
    error = json.loads(next((tmp_path / "failed").rglob("error.json")).read_text())
    assert "evaluate.group[0].sha256" in error["message"] and hashlib.sha256(lora).hexdigest() in error["message"] and "a" * 64 in error["message"]
    assert not (tmp_path / "outbox").exists() or not list((tmp_path / "outbox").rglob("train.json"))
    assert (next((tmp_path / "failed").rglob("theirs.safetensors"))).read_bytes() == lora  # the input is kept byte for byte


def test_a_brought_file_that_is_no_lora_fails_naming_its_group_and_leaves_the_pipeline_clean(finished, tmp_path, astronaut_rgb):
    _, _, _, engine = finished
    data = _safetensors({"unet.down.lora_A.weight": (2, 2)})  # a "lora" name, but it fits no layer of the model
    result = _run_with_brought_file(engine, tmp_path, astronaut_rgb, "odd.safetensors", data, hashlib.sha256(data).hexdigest())
    assert result.outcome == "failed"
    error = json.loads(next((tmp_path / "failed").rglob("error.json")).read_text())
    assert "evaluate.group[0]" in error["message"] and "cannot be loaded into the base model" in error["message"]
    assert engine.resources.model("base").get_list_adapters() == {}  # the next job gets the pipeline as it was


def test_faceid_groups_are_conditioned_on_the_reference_and_both_adapters_act_together(finished):
    """The FaceID cells are the adapter on the subject's reference embedding (re-rendered here in
    the grid's batches, bit for bit); at scale 0 it is the control; the lora+faceid cells differ
    from the LoRA alone and from FaceID alone; the records name the embedding and the adapter."""
    from engine import layout
    from engine.identity import faceid
    from engine.diffusion.sampling import identity_lora, render

    _, out, _, engine = finished
    info = _info(out)
    pipe = engine.resources.model("base")
    reference = layout.reference_embedding(out)
    cells = {(row["group"], row["prompt_index"], row["seed"]): read_rgb(out / row["file"]) for row in info["cells"]}

    def draw(embeds=None, seeds=(0, 1)):
        return render(pipe, info["prompts"][0], info["negative_prompt"], list(seeds), steps=info["steps"], guidance=info["guidance"],
                      size=info["resolution"], ip_adapter_image_embeds=embeds)

    folder = engine.resources.faceid_folder()
    with faceid.faceid_adapter(pipe, folder) as adapter:
        adapter.scale(1.0)
        again = draw(adapter.embeds(reference, info["guidance"]))
        assert all(np.array_equal(again[i], cells[("faceid", 0, seed)]) for i, seed in enumerate((0, 1)))
        adapter.scale(0.0)
        assert all(np.array_equal(img, cells[("control", 0, seed)]) for img, seed in zip(draw(adapter.embeds(reference, info["guidance"])), (0, 1)))
    with identity_lora(pipe, out / "lora") as lora:
        lora.weight(1.0)
        lora_alone = draw()
    for i, seed in enumerate((0, 1)):
        both = cells[("both", 0, seed)]
        assert not np.array_equal(both, lora_alone[i]) and not np.array_equal(both, cells[("faceid", 0, seed)])
    groups = {g["name"]: g for g in info["groups"]}
    assert groups["faceid"]["method"] == "faceid" and groups["faceid"]["lora_file"] is None
    assert groups["faceid"]["faceid"]["embedding"] == "embedding/reference.npy"
    assert groups["faceid"]["faceid"]["embedding_sha256"] == hashlib.sha256((out / "embedding" / "reference.npy").read_bytes()).hexdigest()
    assert groups["both"]["lora_file"] == "lora/pytorch_lora_weights.safetensors" and groups["both"]["faceid"]["scale"] == 1.0
    assert "optimised by construction" in info["faceid_note"] and 'id="faceid-note"' in (out / "report.html").read_text()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["models"]["faceid/faceid.safetensors"] == hashlib.sha256((folder / "faceid.safetensors").read_bytes()).hexdigest()


def test_a_faceid_group_has_no_lora_and_a_lora_group_needs_one(tmp_path, astronaut_rgb):
    problems = _refusal(tmp_path, astronaut_rgb, """
[[evaluate.group]]
name = "fid"
method = "faceid"
phase = "final"

[[evaluate.group]]
name = "both"
method = "lora+faceid"
""")
    assert "a group of method 'faceid' has no LoRA; drop phase" in problems["job.toml: evaluate.group[0]"]
    assert "exactly once" in problems["job.toml: evaluate.group[1]"]


def test_a_grid_of_faceid_groups_trains_nothing(finished, tmp_path, astronaut_rgb):
    _, _, _, engine = finished
    job = 'kind = "evaluate"\n' + TRAIN + """
[evaluate]
prompts = ["a photo of {trigger}"]
seeds = [0, 1]
steps = 2

[[evaluate.group]]
name = "zero_shot"
method = "faceid"
"""
    source = make_job(tmp_path / "inbox" / "dora", _photos(astronaut_rgb), job)
    result = engine.run_job(source, tmp_path / "outbox")
    assert result.outcome == "finished", result.error
    out = result.output_dir
    train = json.loads((out / "train" / "train.json").read_text())
    assert train["main_trained"] is False and train["steps_all_runs"] == 0 and train["phases"] == []
    assert not (out / "lora").exists()
    events = [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]
    assert not [e for e in events if e["event"] in ("phase_started", "phase_exit")]
    assert [(c["group"], c["seed"]) for c in _info(out)["cells"]] == [("control", 0), ("control", 1), ("zero_shot", 0), ("zero_shot", 1)]
    assert "it was not trained" in (out / "report.html").read_text() and verify_audit(out).ok
