"""A replicate job's [identity] method with the demo model and its tiny random FaceID adapter
(issue 20): "faceid" trains nothing and renders every pass with FaceID scaled like the LoRA;
"lora+faceid" renders with both adapters; `compare` puts the four rows (LoRA, FaceID, both,
control) on the same seeds in verify.json, the drift report and the report's seed table; the
control is the base model exactly, a group's render does not depend on the groups before it,
and the audit holds the embedding's and the adapter's hashes."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from engine import layout

from engine.identity import faceid
from engine.errors import JobError
from engine.images import read_rgb
from engine.kinds.replicate import IdentitySpec, JobSpec, RenderSpec, replicate_lora_runs
from engine.provenance.verification import verify_audit
from tests.harness.jobs import FAST_JOB, make_job

FACEID_JOB = FAST_JOB + '\n[identity]\nmethod = "faceid"\nfaceid_scale = 0.8\n'
BOTH_JOB = FAST_JOB + '\n[identity]\nmethod = "lora+faceid"\ncompare = true\n'
RENDER_PASSES = {"anchor": 1.0, "scene": 0.85, "rescue": 0.90}  # engine.stages.render's LoRA weights per pass


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, astronaut_rgb):
    from engine.config import Settings
    from engine.runner import Engine

    root = tmp_path_factory.mktemp("identity")
    (root / "models").mkdir()
    engine = Engine(Settings.from_table({"paths": {"models": str(root / "models")}}, root=root), demo=True)
    out = {}
    for name, toml in (("faceid", FACEID_JOB), ("both", BOTH_JOB)):
        result = engine.run_job(make_job(root / "inbox" / name, {"a.png": astronaut_rgb}, toml), root / "outbox")
        assert result.outcome == "finished", result.error
        out[name] = result.output_dir
    return engine, out


def _json(path: Path) -> dict:
    return json.loads(path.read_text())


def _audit(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "audit.jsonl").read_text().splitlines()]


def test_the_verify_groups_and_what_is_trained_follow_the_method():
    assert IdentitySpec().verify_groups == ("lora", "control")
    assert IdentitySpec("faceid").verify_groups == ("faceid", "control")
    assert IdentitySpec("faceid", compare=True).verify_groups == ("faceid", "lora", "lora+faceid", "control")
    assert IdentitySpec("lora+faceid", compare=True).verify_groups[0] == "lora+faceid"
    job = JobSpec(render=(RenderSpec("x"),))
    assert len(replicate_lora_runs(job)) == 1
    for identity, runs in ((IdentitySpec("faceid"), 0), (IdentitySpec("faceid", compare=True), 1), (IdentitySpec("lora+faceid"), 1)):
        assert len(replicate_lora_runs(JobSpec(render=(RenderSpec("x"),), identity=identity))) == runs


def test_a_faceid_job_trains_nothing_and_scales_faceid_in_every_pass_like_the_lora(jobs):
    engine, out = jobs
    job = out["faceid"]
    assert verify_audit(job).ok
    assert not (job / "lora").exists()
    train = _json(job / "train" / "train.json")
    assert train["main_trained"] is False and train["total_steps"] == 0
    verify = _json(job / "verify" / "verify.json")
    assert verify["groups"] == ["faceid", "control"] and verify["method"] == "faceid"
    assert "optimised by construction" in verify["faceid_note"]
    embedding_sha256 = hashlib.sha256((job / "embedding" / "reference.npy").read_bytes()).hexdigest()
    assert verify["group_facts"]["faceid"]["faceid"] == {"scale": 0.8, "embedding": "embedding/reference.npy", "embedding_sha256": embedding_sha256}
    assert verify["group_facts"]["faceid"]["lora_sha256"] is None and verify["group_facts"]["control"] == {"lora_weight": 0.0, "lora_sha256": None}
    renders = [row for row in _json(job / "drift_report.json")["renders"] if row["kind"] == "render"]
    assert {row["pass"] for row in renders} == set(RENDER_PASSES)
    for row in renders:
        text = Image.open(job / row["file"]).text
        assert json.loads(text["lora_weight"]) == 0.0
        assert json.loads(text["faceid_scale"]) == pytest.approx(0.8 * RENDER_PASSES[row["pass"]])
    kinds = {row["kind"] for row in _json(job / "drift_report.json")["renders"]}
    assert kinds == {"verify_faceid", "verify_control", "render"}
    selected = next(line for line in _audit(job) if line.get("event") == "seed_selected")
    assert selected["method"] == "faceid" and selected["groups"]["faceid"]["faceid"]["embedding_sha256"] == embedding_sha256
    adapter_sha256 = hashlib.sha256((engine.resources.faceid_folder() / faceid.WEIGHTS).read_bytes()).hexdigest()
    assert _json(job / "manifest.json")["models"][f"faceid/{faceid.WEIGHTS}"] == adapter_sha256  # the adapter's hash, in the signed manifest
    page = (job / "report.html").read_text()
    assert f"faceid/{faceid.WEIGHTS}" in page and 'id="faceid-note"' in page
    assert _seed_block_groups(page) == ["FaceID (no LoRA)", "control (no LoRA)"]


def test_compare_puts_four_rows_on_the_same_seeds_and_each_group_stands_alone(jobs):
    from engine.diffusion.sampling import render
    from engine.stages.verify import GUIDANCE

    engine, out = jobs
    job = out["both"]
    assert verify_audit(job).ok
    verify = _json(job / "verify" / "verify.json")
    groups = ["lora+faceid", "lora", "faceid", "control"]
    assert verify["groups"] == groups and verify["method"] == "lora+faceid"
    seeds = [candidate["seed"] for candidate in verify["candidates"]]
    images = {g: [read_rgb(job / candidate[g]["file"]) for candidate in verify["candidates"]] for g in groups}
    for a in groups:
        for b in groups:
            if a < b:
                assert not np.array_equal(images[a][0], images[b][0]), (a, b)  # both adapters act in lora+faceid, each alone acts
    # The control is the base model exactly: every adapter of the groups before it was removed.
    pipe = engine.resources.model("base")
    base = render(pipe, verify["prompt"], verify["negative_prompt"], seeds, steps=verify["steps"], guidance=GUIDANCE, size=verify["resolution"])
    assert all(np.array_equal(image, expected) for image, expected in zip(images["control"], base))
    # FaceID's row, rendered after both LoRA groups' blocks, equals FaceID alone rendered directly: their LoRA left nothing behind.
    with faceid.faceid_adapter(pipe, engine.resources.faceid_folder()) as adapter:
        adapter.scale(1.0)
        reference = np.load(job / "embedding" / "reference.npy")
        direct = render(pipe, verify["prompt"], verify["negative_prompt"], seeds, steps=verify["steps"], guidance=GUIDANCE,
                        size=verify["resolution"], ip_adapter_image_embeds=adapter.embeds(reference, GUIDANCE))
    assert all(np.abs(image.astype(int) - expected.astype(int)).max() <= 1 for image, expected in zip(images["faceid"], direct))
    lora_sha256 = hashlib.sha256((job / layout.LORA_FILE).read_bytes()).hexdigest()
    assert verify["group_facts"]["lora+faceid"]["lora_sha256"] == lora_sha256 and "faceid" in verify["group_facts"]["lora+faceid"]
    rows = _json(job / "drift_report.json")["renders"]
    assert [row["kind"] for row in rows if row["kind"].startswith("verify")] == [f"verify_{g}" for _ in seeds for g in groups]
    for row in (r for r in rows if r["kind"] == "render"):  # the job's method renders: both adapters, FaceID scaled like the LoRA
        text = Image.open(job / row["file"]).text
        assert json.loads(text["lora_weight"]) == json.loads(text["faceid_scale"]) == RENDER_PASSES[row["pass"]]
    page = (job / "report.html").read_text()
    assert _seed_block_groups(page) == ["LoRA + FaceID", "with LoRA", "FaceID (no LoRA)", "control (no LoRA)"]


def test_a_job_asking_for_faceid_is_refused_with_the_embedded_buffalo_s_pack_outside_demo(jobs):
    engine, _ = jobs
    faces = engine.resources.faces()
    assert faces.files.recognizer.name == "w600k_mbf.onnx"  # the embedded pack
    with pytest.raises(JobError) as caught:
        faceid.check_job_face_pack(faces, False, "identity.method")
    assert caught.value.message.startswith("job.toml: identity.method: ") and "buffalo_l" in caught.value.message
    faceid.check_job_face_pack(faces, True, "identity.method")


def test_config_may_default_the_method_and_only_a_replicate_job_has_an_identity_section():
    from engine.job import parse_job_table

    spec, problems = parse_job_table({"render": [{"prompt": "x"}]}, {"identity": {"method": "faceid"}}, "alice")
    assert not problems and spec.identity.method == "faceid"
    spec, problems = parse_job_table({"render": [{"prompt": "x"}], "identity": {"method": "lora"}}, {"identity": {"method": "faceid"}}, "alice")
    assert spec.identity.method == "lora"  # the job's own key wins
    _, problems = parse_job_table({"render": [{"prompt": "x"}], "identity": {"method": "instantid"}}, {}, "alice")
    assert [p.where for p in problems] == ["job.toml: identity.method"] and "lora+faceid" in problems[0].reason
    _, problems = parse_job_table({"kind": "evaluate", "evaluate": {"prompts": ["x"], "seeds": [0]}, "identity": {}}, {}, "alice")
    assert any(p.where == "job.toml: identity" and "replicate" in p.reason for p in problems)


def _seed_block_groups(page: str) -> list[str]:
    """The groups of the report's first seed block (seed discovery), in the order shown."""
    block = page.split('<div class="seed" data-seed=', 1)[1].split('<div class="seed" data-seed=', 1)[0]
    return re.findall(r"<figcaption><b>([^<]+)</b>", block)
