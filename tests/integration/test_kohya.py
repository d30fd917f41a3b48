"""The kohya-format LoRA (engine.diffusion.kohya) beside the diffusers one: the same LoRA for every
mainstream SD tool. Checked on the tiny demo pipeline with a LoRA whose alpha differs from its
rank (where a wrong alpha would show), loaded back through diffusers' own `load_lora_weights`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from engine.resources import Resources
from engine.diffusion.sampling import render
from engine.diffusion.families import family_of
from engine.diffusion.kohya import base_model_digest, kohya_metadata, kohya_state_dict, read_kohya_metadata
from engine.layout import LORA_FILE
from engine.diffusion.training import ADAPTER, TARGET_MODULES, save_lora

RANK, ALPHA = 4, 2.0  # alpha != rank: the file's scaling must be alpha / rank, not 1
NAME = "alice_20260101T000000Z-kohya1.safetensors"


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory):
    """The demo pipeline and a LoRA with random, non-zero up and down weights, saved both ways."""
    from peft import LoraConfig

    from engine.config import Settings

    root = tmp_path_factory.mktemp("kohya")
    (root / "models").mkdir()
    resources = Resources(Settings.from_table({"paths": {"models": str(root / "models")}}, root=root), demo=True)
    pipe = resources.pipeline()
    unet = pipe.unet
    torch.manual_seed(0)
    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=TARGET_MODULES), adapter_name=ADAPTER)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if ADAPTER in name and "lora_B" in name:  # peft starts B at zero: a LoRA that does nothing
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    hashes = resources.hashes("base")
    metadata = kohya_metadata(family=family_of(pipe), rank=RANK, alpha=ALPHA, resolution=128, steps=40, max_steps=1200, images=5,
                              output_name=Path(NAME).stem, trigger="sks", job_id="20260101T000000Z-kohya1", subject="alice",
                              base_model_hashes=hashes, train_fingerprint="f" * 64, demo=True, engine_version="0.1.0")
    lora_dir = root / "lora"
    save_lora(pipe, unet, lora_dir, ALPHA, kohya=(NAME, metadata))
    # The same tensors with diffusers' own converter's alpha (= rank): what the file must not be.
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    wrong = {k: (torch.tensor(float(RANK)) if k.endswith(".alpha") else v) for k, v in kohya_state_dict(get_peft_model_state_dict(unet, adapter_name=ADAPTER), ALPHA).items()}
    save_file(wrong, str(root / "alpha_is_rank.safetensors"))
    unet.delete_adapters(ADAPTER)
    return pipe, lora_dir, root, hashes


def _with_lora(pipe, folder: Path, weight_name: str, fn):
    pipe.load_lora_weights(str(folder), weight_name=weight_name, adapter_name="check")
    try:
        pipe.set_adapters(["check"], adapter_weights=[1.0])
        return fn()
    finally:
        pipe.delete_adapters("check")


def _unet_out(pipe) -> torch.Tensor:
    generator = torch.Generator().manual_seed(3)
    unet = pipe.unet
    latents = torch.randn((1, unet.config.in_channels, 16, 16), generator=generator)
    text = torch.randn((1, 77, unet.config.cross_attention_dim), generator=generator)
    with torch.no_grad():
        return unet(latents, torch.tensor([500]), encoder_hidden_states=text).sample


def _render(pipe) -> np.ndarray:
    return render(pipe, "a photo of sks person", "blurry", [7], steps=2, guidance=5.0, size=128)


def test_the_kohya_file_is_the_same_lora_as_the_diffusers_file(trained):
    pipe, lora_dir, root, _ = trained
    diffusers_name = Path(LORA_FILE).name
    base = _unet_out(pipe)
    from_diffusers = _with_lora(pipe, lora_dir, diffusers_name, lambda: _unet_out(pipe))
    from_kohya = _with_lora(pipe, lora_dir, NAME, lambda: _unet_out(pipe))
    wrong_alpha = _with_lora(pipe, root, "alpha_is_rank.safetensors", lambda: _unet_out(pipe))
    effect = (from_diffusers - base).abs().max().item()
    assert effect > 1e-2  # the LoRA changes the UNet's output: a comparison that can fail
    # Same tensors, same scaling: equal to float32 rounding (stated tolerance 1e-5, 1000x below the LoRA's effect).
    assert torch.allclose(from_kohya, from_diffusers, atol=1e-5, rtol=0), (from_kohya - from_diffusers).abs().max()
    assert (wrong_alpha - from_diffusers).abs().max().item() > 100 * 1e-5  # alpha = rank would be another LoRA
    # End to end, a render: within one grey level (CPU kernels), bit-identical in practice.
    image_diffusers = _with_lora(pipe, lora_dir, diffusers_name, lambda: _render(pipe))
    image_kohya = _with_lora(pipe, lora_dir, NAME, lambda: _render(pipe))
    assert np.abs(image_kohya.astype(int) - image_diffusers.astype(int)).max() <= 1


def test_the_kohya_file_has_kohya_keys_alphas_and_metadata_that_parse(trained):
    _, lora_dir, _, hashes = trained
    path = lora_dir / NAME
    with safe_open(str(path), framework="pt") as handle:
        keys = list(handle.keys())
        alphas = {key: handle.get_tensor(key).item() for key in keys if key.endswith(".alpha")}
    modules = {key.split(".")[0] for key in keys}
    assert keys and all(key.startswith("lora_unet_") for key in keys)
    assert any(key.endswith("_attn1_to_k.lora_down.weight") for key in keys) and any(key.endswith("_to_out_0.lora_up.weight") for key in keys)
    assert set(alphas) == {f"{module}.alpha" for module in modules} and set(alphas.values()) == {ALPHA}
    meta = read_kohya_metadata(path)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == str(RANK) and float(meta["ss_network_alpha"]) == ALPHA
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_resolution"] == "(128, 128)" and int(meta["ss_steps"]) == 40
    assert json.loads(meta["ss_tag_frequency"]) == {"identity": {"sks": 5}} and meta["modelspec.trigger_phrase"] == "sks"
    assert meta["idrep.job_id"] == "20260101T000000Z-kohya1" and meta["idrep.subject"] == "alice" and meta["idrep.demo"] == "true"
    assert json.loads(meta["idrep.base_model_files"]) == hashes and meta["idrep.base_model_sha256"] == base_model_digest(hashes)
    assert len(meta["idrep.train_fingerprint"]) == 64
