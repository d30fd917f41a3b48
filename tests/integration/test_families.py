"""The model families on their tiny twins (issue 33, first part): each family's twin is
recognised as that family, its training conditioning drives its own UNet (SDXL's pooled embedding
and time ids), the LoRA trains its `lora_targets`, and its img2img and inpainting pipelines come
from the text-to-image one by `from_pipe` and render through engine.diffusion.sampling.
One twin build per family for the module; each test under a second on 2 cores."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.diffusion.families import FAMILIES, family_of
from engine.diffusion.sampling import inpaint, render
from engine.diffusion.training import _denoising_loss, _encode_latents, _encode_text
from engine.kinds.sections import PhaseSpec


@pytest.fixture(scope="module", params=[family.name for family in FAMILIES])
def twin(request):
    from diffusers.utils import logging

    logging.disable_progress_bar()
    family = next(f for f in FAMILIES if f.name == request.param)
    pipe, _ = family.build_twin()
    pipe.set_progress_bar_config(disable=True)
    return family, pipe


def test_a_twin_is_its_familys_and_its_conditioning_drives_its_unet(twin):
    from peft import LoraConfig

    family, pipe = twin
    assert family_of(pipe) is family and type(pipe).__name__ == family.text2img
    assert pipe.unet.config.in_channels == family.latent_channels and pipe.vae.config.scaling_factor == family.vae_scaling_factor
    text, added = _encode_text(pipe, "a photo of sks person", 128)
    if family.name == "sdxl":  # the pooled embedding of the second encoder and six time ids, one row each
        assert added is not None and added["text_embeds"].shape == (1, 32) and added["time_ids"].tolist() == [[128, 128, 0, 0, 128, 128]]
        assert text.shape[-1] == pipe.unet.config.cross_attention_dim == 64  # both encoders' hidden states side by side
    else:
        assert added is None and text.shape[-1] == pipe.unet.config.cross_attention_dim
    mean, std = _encode_latents(pipe, torch.zeros(1, 3, 128, 128))
    assert mean.shape == (1, family.latent_channels, 16, 16)
    unet = pipe.unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights="gaussian", target_modules=list(family.lora_targets)), adapter_name="t")
    try:
        trained = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in unet.named_parameters() if ".lora_A." in name}
        assert trained == {"to_k", "to_q", "to_v", "0"}  # to_out.0 ends in "0"
        phase = PhaseSpec(name="COARSE", lr=1e-4, alpha=4, loss="mse", optimizer="adamw", min_steps=1, max_steps=1)
        generator = torch.Generator().manual_seed(0)
        noise = torch.randn(mean.shape, generator=generator)
        from diffusers import DDPMScheduler

        loss = _denoising_loss(unet, DDPMScheduler.from_config(pipe.scheduler.config), mean, noise, torch.tensor([500]), text, added, phase,
                               torch.device("cpu"))
        loss.backward()
        assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in unet.named_parameters() if ".lora_B." in n)
    finally:
        unet.delete_adapters("t")
        unet.zero_grad(set_to_none=True)


def test_a_twins_img2img_and_inpainting_pipelines_are_its_familys_and_render(twin):
    family, pipe = twin
    image2image, inpainting = family.img2img_from(pipe), family.inpaint_from(pipe)
    assert (type(image2image).__name__, type(inpainting).__name__) == (family.img2img, family.inpaint)
    assert family_of(image2image) is family_of(inpainting) is family
    assert image2image.unet is pipe.unet and inpainting.vae is pipe.vae  # from_pipe: the same components, no copy
    for made in (image2image, inpainting):
        made.set_progress_bar_config(disable=True)
    text2img = render(pipe, "a photo", "", [1], steps=2, guidance=5.0, size=128)
    again = render(pipe, "a photo", "", [1], steps=2, guidance=5.0, size=128, init_images=text2img, img2img=image2image, strength=0.5)
    mask = np.zeros((128, 128), bool)
    mask[32:96, 32:96] = True
    painted = inpaint(inpainting, "a photo", "", [1], text2img[0], mask, steps=2, guidance=5.0, strength=1.0)
    assert text2img.shape == again.shape == painted.shape == (1, 128, 128, 3)
    assert not np.array_equal(text2img, again)


@pytest.mark.slow
def test_a_replicate_job_on_the_sdxl_twin_finishes_through_the_engine(tmp_path, astronaut_rgb):
    """The whole replicate chain (prepare, embed, train with SDXL's conditioning, verify, the
    3-pass and 2-pass renders) on the SDXL twin staged as a lab's base and realism models,
    through engine.runner.Engine; the audit log verifies. Slow (opt-in): ~8 s on 2 cores.
    Issue 33's SDXL part carries every kind end to end."""
    import json

    from engine.config import Settings
    from engine.diffusion.models import DEMO_MARKER, make_demo_model
    from engine.provenance.verification import verify_audit
    from engine.runner import Engine
    from tests.harness.jobs import FAST_JOB, make_job

    models = tmp_path / "models"
    (make_demo_model(models / "tiny-xl", family="sdxl") / DEMO_MARKER).unlink()
    settings = Settings.from_table({"paths": {"models": str(models)}, "models": {"base": "tiny-xl", "realism": "tiny-xl"}}, root=tmp_path)
    job = FAST_JOB.replace("[train]\n", "[train]\nresolution = 128\n") + '\n[[render]]\nprompt = "portrait on a rainy street"\nmode = "two_pass"\nsteps = 2\n'
    result = Engine(settings).run_job(make_job(tmp_path / "inbox" / "alice", {"a.png": astronaut_rgb}, job), tmp_path / "outbox")
    assert result.outcome == "finished", result.error
    out = result.output_dir
    assert verify_audit(out).ok
    train = json.loads((out / "train" / "train.json").read_text())
    assert train["resolution"] == 128 and train["total_steps"] > 0
    kohya = next((out / "lora").glob("alice_*.safetensors"))
    from engine.diffusion.kohya import read_kohya_metadata

    assert read_kohya_metadata(kohya)["ss_base_model_version"] == "sdxl_base_v1-0"
    # every record names the family: the audit log's first line, the manifest, the report
    assert json.loads((out / "audit.jsonl").read_text().splitlines()[0])["families"] == {"base": "sdxl", "realism": "sdxl"}
    assert json.loads((out / "manifest.json").read_text())["families"] == {"base": "sdxl", "realism": "sdxl"}
    assert "base: SDXL; realism: SDXL" in (out / "report.html").read_text()
    renders = sorted(p.name.split("_drift_")[0] for p in (out / "renders").glob("*.png"))
    assert renders == ["r0_0_anchor", "r0_0_rescue", "r0_0_scene", "r1_0_anchor", "r1_0_realism"]
