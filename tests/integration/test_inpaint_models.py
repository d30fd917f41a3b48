"""models.inpaint (issue 15): the inpainting model of retouch and restore, staged (a 9-channel
UNet) or "base" (the base model's components through from_pipe); the demo model's 9-channel
twin; each model role refuses the other kind of pipeline, naming its key."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import Settings
from engine.errors import ConfigError
from engine.fsutil import hash_tree
from engine.diffusion.models import DEMO_MARKER, make_demo_model
from engine.resources import Resources


def _settings(root: Path, **models: str) -> Settings:
    (root / "models").mkdir(parents=True, exist_ok=True)
    return Settings.from_table({"paths": {"models": str(root / "models")}, "models": models}, root=root)


def _staged(demo_folder: Path, target: Path) -> Path:
    """A copy of a generated model staged as a lab would stage real weights (no demo marker)."""
    shutil.copytree(demo_folder, target)
    (target / DEMO_MARKER).unlink()
    return target


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, Path]:
    """The demo model and its inpainting twin, generated once for this module."""
    root = tmp_path_factory.mktemp("inpaint-models")
    return make_demo_model(root / "demo"), make_demo_model(root / "demo-inpaint", inpaint=True)


def _inpaint_once(pipe, seed: int = 0) -> np.ndarray:
    image = torch.from_numpy(np.random.default_rng(0).random((1, 3, 128, 128), dtype=np.float32))
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., 40:80, 40:80] = 1.0
    return pipe(prompt=["a photo"], image=image, mask_image=mask, num_inference_steps=3, strength=0.5, height=128, width=128,
                generator=[torch.Generator().manual_seed(seed)], output_type="np").images


def test_the_demo_model_has_a_deterministic_9_channel_inpainting_twin(tmp_path, built):
    demo, twin = built
    again = make_demo_model(tmp_path / "again", inpaint=True)
    assert hash_tree(again, again) == hash_tree(twin, twin)  # byte-identical builds
    demo_files, twin_files = hash_tree(demo, demo), hash_tree(twin, twin)
    for shared in ("text_encoder/model.safetensors", "vae/diffusion_pytorch_model.safetensors"):
        assert demo_files[shared] == twin_files[shared]  # a twin: only the UNet differs
    assert demo_files["unet/diffusion_pytorch_model.safetensors"] != twin_files["unet/diffusion_pytorch_model.safetensors"]

    resources = Resources(_settings(tmp_path), demo=True)
    pipe = resources.pipeline("inpaint")
    assert type(pipe).__name__ == "StableDiffusionInpaintPipeline" and pipe.unet.config.in_channels == 9
    first = _inpaint_once(pipe)
    assert first.shape == (1, 128, 128, 3) and np.array_equal(first, _inpaint_once(pipe))
    assert any(name.startswith("inpaint/unet/") for name in resources.hashes("inpaint"))


def test_a_staged_inpainting_folder_loads_as_models_inpaint(tmp_path, built):
    _staged(built[1], tmp_path / "models" / "sd15-inpainting")
    resources = Resources(_settings(tmp_path, inpaint="sd15-inpainting"))
    pipe = resources.pipeline("inpaint")
    assert type(pipe).__name__ == "StableDiffusionInpaintPipeline" and pipe.unet.config.in_channels == 9
    assert "inpaint/unet/diffusion_pytorch_model.safetensors" in resources.hashes("inpaint")


def test_inpaint_base_is_the_base_models_own_components(tmp_path, built):
    """models.inpaint = "base" (the default): no second copy of the weights, so the job's LoRA
    in the base pipeline acts in the inpainting one too; the same files are recorded."""
    _staged(built[0], tmp_path / "models" / "sd15")
    resources = Resources(_settings(tmp_path, base="sd15"))
    base, inpainting = resources.pipeline("base"), resources.pipeline("inpaint")
    assert type(inpainting).__name__ == "StableDiffusionInpaintPipeline" and inpainting.unet is base.unet
    assert resources.pipeline("inpaint") is inpainting  # made once
    assert resources.hashes("inpaint") == resources.hashes("base")
    assert _inpaint_once(inpainting).shape == (1, 128, 128, 3)


def test_each_role_refuses_the_other_kind_of_model_naming_its_key(tmp_path, built):
    demo, twin = built
    _staged(demo, tmp_path / "models" / "sd15")
    _staged(twin, tmp_path / "models" / "sd15-inpainting")
    with pytest.raises(ConfigError, match=r"models\.inpaint: .*sd15 is a text-to-image model \(StableDiffusionPipeline\); models\.inpaint "
                                          r"takes an inpainting model \(a 9-channel UNet"):
        Resources(_settings(tmp_path, inpaint="sd15")).model_ref("inpaint")
    with pytest.raises(ConfigError, match=r"models\.base: .*sd15-inpainting is an inpainting model .*stage it as models\.inpaint"):
        Resources(_settings(tmp_path, base="sd15-inpainting")).model_ref("base")
    # An inpainting pipeline whose UNet is not a 9-channel one (a mislabelled folder).
    mislabelled = _staged(demo, tmp_path / "models" / "relabelled")
    index = (mislabelled / "model_index.json").read_text().replace('"StableDiffusionPipeline"', '"StableDiffusionInpaintPipeline"')
    (mislabelled / "model_index.json").write_text(index)
    with pytest.raises(ConfigError, match=r"models\.inpaint: .*relabelled has a UNet of 4 input channels; an inpainting model has 9"):
        Resources(_settings(tmp_path, inpaint="relabelled")).model_ref("inpaint")


def test_a_tiny_sdxl_inpainting_model_loads_as_models_inpaint(tmp_path, built):
    # The "sdxl" family's inpainting twin (engine.diffusion.families.sdxl), staged as a lab would stage one.
    (make_demo_model(tmp_path / "models" / "tiny-xl-inpainting", inpaint=True, family="sdxl") / DEMO_MARKER).unlink()
    pipe = Resources(_settings(tmp_path, inpaint="tiny-xl-inpainting")).pipeline("inpaint")
    assert type(pipe).__name__ == "StableDiffusionXLInpaintPipeline" and pipe.unet.config.in_channels == 9
    assert _inpaint_once(pipe).shape == (1, 128, 128, 3)
