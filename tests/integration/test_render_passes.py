"""What reaches the diffusion pipelines, read back from the pipelines' own calls on the demo
model: every prompt, negative prompt, guidance, strength and LoRA weight of seed discovery and
of the three render passes, the trigger in each prompt, and the rescue pass's 30 % blend back
to the anchor. Seed selection at the face-model boundary: the ArcFace scores of the candidates
are set (the demo model's renders hold no face), so ranking, ties, a drift of exactly the
threshold and the render from the locked seed are exercised."""

from __future__ import annotations

import json

import numpy as np
import pytest

from engine.diffusion.sampling import IDENTITY_ADAPTER
from engine.images import read_rgb
from engine.runner import Engine
from engine.stages import render as render_stage
from engine.stages import verify as verify_stage
from tests.harness.jobs import FAST_JOB, make_job

TRIGGER = "zqx person"
JOB = FAST_JOB.replace('[[render]]\nprompt = "portrait in a garden"\nsteps = 2\n',
                       '[[render]]\nprompt = "portrait in a garden"\nsteps = 2\nnegative_prompt = "extra fingers"\n')
JOB = JOB.replace("[train]\n", f'[train]\ntrigger = "{TRIGGER}"\n').replace("[verify]\nseeds = 2\n", "[verify]\nseeds = 4\nthreshold = 0.18\n")


def _lora_weight(unet) -> float | None:
    """The identity LoRA's weight at this moment (None: LoRA off)."""
    from peft.tuners.lora import LoraLayer

    for module in unet.modules():
        if isinstance(module, LoraLayer) and IDENTITY_ADAPTER in module.scaling:
            if module.disable_adapters or IDENTITY_ADAPTER not in module.active_adapters:
                return None
            return round(module.scaling[IDENTITY_ADAPTER] / (module.lora_alpha[IDENTITY_ADAPTER] / module.r[IDENTITY_ADAPTER]), 6)
    return None


@pytest.fixture(scope="module")
def passes(tmp_path_factory, astronaut_rgb):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    from engine.config import Settings

    root = tmp_path_factory.mktemp("passes")
    settings = Settings.from_table({"paths": {"models": str(root / "models")}}, root=root)
    engine = Engine(settings, demo=True)
    calls: list[dict] = []
    originals = {cls: cls.__call__ for cls in (StableDiffusionPipeline, StableDiffusionImg2ImgPipeline)}

    def recorder(cls):
        def call(self, *args, **kwargs):
            result = originals[cls](self, *args, **kwargs)
            calls.append({"img2img": cls is StableDiffusionImg2ImgPipeline, "prompt": kwargs["prompt"], "negative": kwargs["negative_prompt"],
                          "guidance": kwargs["guidance_scale"], "strength": kwargs.get("strength"), "lora": _lora_weight(self.unet),
                          "images": np.clip(np.rint(np.asarray(result.images) * 255.0), 0, 255).astype(np.uint8)})
            return result
        return call

    # Set ArcFace drifts for the LoRA candidates, in the order verify scores them (seeds 0-3):
    # seed 2 ties seed 1 at exactly the threshold and loses the tie to the lower seed; seed 3 has no face.
    drifts = iter([(0.30, True), (0.18, True), (0.18, True), (None, False)])
    real_score = verify_stage.score

    def set_score(faces, rgb, reference):
        nonlocal drifts
        return next(drifts, None) or real_score(faces, rgb, reference)  # controls: the real (no face) score

    patch = pytest.MonkeyPatch()
    for cls in originals:
        patch.setattr(cls, "__call__", recorder(cls))
    patch.setattr(verify_stage, "score", set_score)
    try:
        result = engine.run_job(make_job(root / "alice", {"a.png": astronaut_rgb}, JOB), root / "outbox")
    finally:
        patch.undo()
    assert result.outcome == "finished", result.error
    return result, calls, settings


def test_seed_selection_ranks_breaks_ties_by_seed_and_locks_at_exactly_the_threshold(passes):
    result, _, _ = passes
    chosen = json.loads((result.output_dir / "verify" / "verify.json").read_text())
    assert chosen["ranking"] == [1, 2, 0]  # by drift, ties by seed; the faceless seed 3 is not ranked
    assert (chosen["status"], chosen["best_seed"], chosen["locked_seed"], chosen["best_drift"]) == ("locked", 1, 1, 0.18)
    assert chosen["faces_not_found"]["lora"] == 1
    report = json.loads((result.output_dir / "drift_report.json").read_text())
    assert report["seed_selection"]["locked_seed"] == 1


def test_every_pipeline_call_gets_the_pass_settings_the_trigger_and_the_negative_prompt(passes):
    result, calls, settings = passes
    base_negative = settings.render.negative_prompt
    verify_prompt = f"a photo of {TRIGGER}, portrait, neutral background"
    seed_calls = calls[:4]  # verify: 4 seeds in batches of 2, with the LoRA then without
    assert all(c["prompt"] == [verify_prompt] * 2 and c["guidance"] == verify_stage.GUIDANCE and not c["img2img"] for c in seed_calls)
    lora_group, control_group = seed_calls[:2], seed_calls[2:4]
    assert [c["lora"] for c in lora_group] == [1.0, 1.0] and [c["lora"] for c in control_group] == [None, None]
    assert all(c["negative"] == [base_negative] * len(c["prompt"]) for c in seed_calls)
    anchor, scene, rescue = calls[4:7]
    negative = f"{base_negative}, extra fingers"
    assert (anchor["img2img"], anchor["prompt"], anchor["guidance"], anchor["lora"]) == (False, [verify_prompt], render_stage.ANCHOR.guidance, render_stage.ANCHOR.lora_weight)
    scene_prompt = [f"{TRIGGER}, portrait in a garden"]
    assert (scene["img2img"], scene["prompt"], scene["guidance"], scene["strength"], scene["lora"]) == (
        True, scene_prompt, render_stage.SCENE.guidance, render_stage.SCENE.strength, render_stage.SCENE.lora_weight)
    assert (rescue["img2img"], rescue["prompt"], rescue["guidance"], rescue["strength"], rescue["lora"]) == (
        True, scene_prompt, render_stage.RESCUE.guidance, render_stage.RESCUE.strength, render_stage.RESCUE.lora_weight)
    assert [c["negative"] for c in (anchor, scene, rescue)] == [[negative]] * 3
    assert len(calls) == 7  # nothing else reached a pipeline
    # The rescue pass is blended 30 % back to the anchor, as saved.
    rows = json.loads((result.output_dir / "drift_report.json").read_text())["renders"]
    saved = {row["pass"]: row for row in rows if row["kind"] == "render"}
    assert saved["anchor"]["seed"] == 1 and saved["scene"]["seed"] == 1 + render_stage.SEED_STRIDE  # from the locked seed
    expected = np.clip(np.rint(0.7 * rescue["images"][0].astype(np.float64) + 0.3 * anchor["images"][0].astype(np.float64)), 0, 255).astype(np.uint8)
    assert np.array_equal(read_rgb(result.output_dir / saved["rescue"]["file"]), expected)
    assert all(row["negative_prompt"] == negative for row in saved.values())
