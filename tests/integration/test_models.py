"""engine.diffusion.models on the real tiny demo model: build, resolve, load, render, hash; refusals.

Everything runs offline on a CPU in seconds. The single-file test writes the demo model as
one original-layout (LDM) .safetensors checkpoint with `_to_single_file` below, the reverse
of diffusers' own `convert_ldm_*_checkpoint` helpers, and loads it with `from_single_file`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import socket
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from engine.config import ModelSettings, Settings
from engine.errors import ConfigError
from engine.fsutil import hash_tree, sha256_file
from engine.hashcache import HASH_CACHE_FILE
from engine.diffusion.models import (
    DEMO_MARKER,
    check_models,
    load_pipeline,
    make_demo_model,
    model_files_hashes,
    resolve_model,
    select_device_dtype,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _settings(root: Path, **models: object) -> Settings:
    settings = Settings.from_table({"paths": {"models": str(root / "models")}}, root=root)
    return dataclasses.replace(settings, models=dataclasses.replace(ModelSettings(), **models)) if models else settings


def _render(pipe, seed: int = 7) -> np.ndarray:
    generator = torch.Generator(device="cpu").manual_seed(seed)
    result = pipe("a photo of a person", num_inference_steps=2, guidance_scale=5.0, height=128, width=128,
                  generator=generator, output_type="np")
    return np.asarray(result.images)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models folder whose demo model was built on demand by resolve_model."""
    root = tmp_path_factory.mktemp("demo-root")
    resolve_model("sd15", "", _settings(root), demo=True)
    return root


@pytest.fixture(scope="module")
def demo_pipe(demo_root: Path):
    settings = _settings(demo_root)
    return load_pipeline(resolve_model("sd15", "", settings, demo=True), settings)


@pytest.fixture()
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Any attempt to open a connection is recorded and fails."""
    attempts: list[object] = []

    def refuse(self: socket.socket, address: object) -> None:
        attempts.append(address)
        raise OSError("network use in a test that must stay offline")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts


# --------------------------------------------------------------------------- the demo model


def test_demo_model_builds_on_demand_loads_offline_and_renders(demo_root: Path, demo_pipe) -> None:
    from diffusers import StableDiffusionPipeline
    from diffusers.models.attention_processor import AttnProcessor2_0

    folder = demo_root / "models" / "demo"
    assert json.loads((folder / DEMO_MARKER).read_text()) == {
        "demo": True, "note": "random weights, renders are noise", "seed": 0, "resolution": 128}
    assert (folder / "tokenizer" / "vocab.json").is_file() and (folder / "tokenizer" / "merges.txt").is_file()

    assert type(demo_pipe) is StableDiffusionPipeline
    assert demo_pipe.vae_scale_factor == 8  # 128 px -> 16x16 latents, like SD
    assert demo_pipe.unet.device.type == "cpu" and demo_pipe.unet.dtype == torch.float32
    assert {type(p) for p in demo_pipe.unet.attn_processors.values()} == {AttnProcessor2_0}
    assert demo_pipe.safety_checker is None

    images = _render(demo_pipe)
    assert images.shape == (1, 128, 128, 3)
    assert np.isfinite(images).all() and images.std() > 0.01  # noise, but not a flat image
    np.testing.assert_array_equal(images, _render(demo_pipe))  # a fixed generator repeats exactly


def test_demo_tokenizer_reloads_to_the_same_ids(demo_root: Path, demo_pipe) -> None:
    from transformers import CLIPTokenizer

    reloaded = CLIPTokenizer.from_pretrained(demo_root / "models" / "demo" / "tokenizer", local_files_only=True)
    prompt = "a photo of sks person, 35mm, ünïcode ✓"
    ids = demo_pipe.tokenizer(prompt).input_ids
    assert ids == reloaded(prompt).input_ids
    assert ids[0] == demo_pipe.tokenizer.bos_token_id and ids[-1] == demo_pipe.tokenizer.eos_token_id
    assert demo_pipe.tokenizer.unk_token_id not in ids[1:-1]


def test_demo_build_is_deterministic_fast_and_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    started = time.perf_counter()
    first = make_demo_model(tmp_path / "a")
    seconds = time.perf_counter() - started
    assert torch.equal(torch.rand(3), expected_draw)
    second = make_demo_model(tmp_path / "b")

    files_a, files_b = hash_tree(first, first), hash_tree(second, second)
    assert files_a == files_b
    assert {"unet/diffusion_pytorch_model.safetensors", "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/model.safetensors"} <= set(files_a)
    assert seconds < 2.0, f"demo build took {seconds:.2f} s"

    # Rebuilding in place replaces the folder with the same bytes and leaves no debris.
    make_demo_model(first)
    assert hash_tree(first, first) == files_a
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]


def test_demo_build_refuses_to_overwrite_another_folder(tmp_path: Path) -> None:
    precious = tmp_path / "models" / "demo"
    precious.mkdir(parents=True)
    (precious / "notes.txt").write_text("not a model")
    with pytest.raises(ConfigError) as refused:
        resolve_model("sd15", "", _settings(tmp_path), demo=True)
    assert str(precious) in refused.value.message
    assert [p.name for p in precious.iterdir()] == ["notes.txt"]


# --------------------------------------------------------------------------- refusals


def test_demo_is_refused_unless_asked_for(tmp_path: Path) -> None:
    settings = _settings(tmp_path, base="demo")
    with pytest.raises(ConfigError) as refused:
        resolve_model("demo", "", settings, demo=False)
    assert refused.value.code == "demo_not_requested"
    assert "--demo" in refused.value.message
    assert not (tmp_path / "models" / "demo").exists()


def test_missing_model_names_the_absolute_path_and_how_to_stage_it(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    expected = tmp_path.resolve() / "models" / "sd15"
    with pytest.raises(ConfigError) as refused:
        resolve_model("sd15", "", settings, demo=False)
    assert refused.value.code == "model_missing"
    assert f"copy a diffusers folder with model_index.json to {expected}" in refused.value.message.lower()
    assert "models.base" in refused.value.message

    with pytest.raises(ConfigError) as both:
        check_models(settings, demo=False, need_realism=True)
    assert both.value.code == "model_missing"
    assert [p.where for p in both.value.problems] == ["models.base", "models.realism"]
    assert str(expected) in both.value.message and str(tmp_path.resolve() / "models" / "realism") in both.value.message

    assert [ref.kind for ref in check_models(settings, demo=True, need_realism=True)] == ["demo", "demo"]


def test_incomplete_folder_names_what_is_missing(tmp_path: Path, demo_root: Path) -> None:
    staged = tmp_path / "models" / "sd15"
    shutil.copytree(demo_root / "models" / "demo", staged)
    (staged / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    shutil.rmtree(staged / "scheduler")
    with pytest.raises(ConfigError) as refused:
        resolve_model("sd15", "", _settings(tmp_path), demo=False)
    assert f"weights in {staged.resolve()}/unet/" in refused.value.message
    assert f"{staged.resolve()}/scheduler/" in refused.value.message

    (staged / "model_index.json").unlink()
    with pytest.raises(ConfigError, match="has no model_index.json"):
        resolve_model("sd15", "", _settings(tmp_path), demo=False)


def test_hub_id_is_refused_without_allow_download_and_without_network(tmp_path: Path, no_network: list[object]) -> None:
    settings = _settings(tmp_path, base="runwayml/stable-diffusion-v1-5")
    started = time.perf_counter()
    with pytest.raises(ConfigError) as refused:
        resolve_model(settings.models.base, "", settings, demo=False)
    assert time.perf_counter() - started < 2.0
    assert no_network == []
    assert refused.value.code == "model_missing"
    assert "models.allow_download = false" in refused.value.message
    assert str(tmp_path.resolve() / "models" / "runwayml" / "stable-diffusion-v1-5") in refused.value.message

    allowed = _settings(tmp_path, base="runwayml/stable-diffusion-v1-5", allow_download=True)
    ref = resolve_model(allowed.models.base, "", allowed, demo=False)  # resolving alone never downloads
    assert (ref.kind, ref.name, ref.path) == ("hub_id", "runwayml/stable-diffusion-v1-5", tmp_path.resolve() / "models" / "hub")
    assert no_network == []


def test_single_file_without_config_folder_names_the_key(tmp_path: Path) -> None:
    checkpoint = tmp_path / "models" / "model.safetensors"
    checkpoint.parent.mkdir(parents=True)
    checkpoint.write_bytes(b"\0" * 16)
    with pytest.raises(ConfigError, match="models.base_config") as refused:
        resolve_model("model.safetensors", "", _settings(tmp_path), demo=False)
    assert str(checkpoint.resolve()) in refused.value.message
    with pytest.raises(ConfigError, match="models.realism_config"):
        resolve_model("model.safetensors", "sd15-config", _settings(tmp_path), demo=False, role="realism")


# --------------------------------------------------------------------------- single-file checkpoints


def test_single_file_that_is_no_whole_checkpoint_or_the_wrong_family_is_refused(tmp_path: Path, demo_root: Path) -> None:
    from safetensors.torch import save_file

    models = tmp_path / "models"
    shutil.copytree(demo_root / "models" / "demo", models / "sd-config", ignore=shutil.ignore_patterns("*.safetensors"))
    save_file({"lora_unet_down_blocks_0.alpha": torch.zeros(1)}, models / "lora.safetensors")
    save_file({"model.diffusion_model.out.2.bias": torch.zeros(1), "conditioner.embedders.1.model.ln_final.bias": torch.zeros(1)},
              models / "xl.safetensors")
    settings = _settings(tmp_path)
    with pytest.raises(ConfigError, match="holds no UNet") as refused:
        resolve_model("lora.safetensors", "sd-config", settings, demo=False)
    assert refused.value.code == "model_invalid"
    with pytest.raises(ConfigError, match="is an SDXL checkpoint but its config folder .* is SD-1.x/2.x"):
        resolve_model("xl.safetensors", "sd-config", settings, demo=False)
    with pytest.raises(ConfigError, match="no checkpoint at .*missing.safetensors") as missing:
        resolve_model("missing.safetensors", "sd-config", settings, demo=False)
    assert missing.value.code == "model_missing"




def test_single_file_checkpoint_loads_offline_and_renders_like_the_folder(
    tmp_path: Path, demo_root: Path, demo_pipe, no_network: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    import diffusers.utils.hub_utils
    import huggingface_hub.constants
    from safetensors.torch import save_file

    # Prove local_files_only is what keeps us offline, not the test environment's HF_HUB_OFFLINE.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(diffusers.utils.hub_utils, "HF_HUB_OFFLINE", False)

    models = tmp_path / "models"
    models.mkdir()
    save_file(_to_single_file(demo_pipe), models / "tiny-sd.safetensors")
    # The config folder: the demo folder without its weights (configs, tokenizer, scheduler).
    shutil.copytree(demo_root / "models" / "demo", models / "tiny-sd-config",
                    ignore=shutil.ignore_patterns("*.safetensors"))

    settings = _settings(tmp_path, base="tiny-sd.safetensors", base_config="tiny-sd-config")
    [ref] = check_models(settings, demo=False, need_realism=False)
    assert (ref.kind, ref.path, ref.config_path) == ("single_file", models.resolve() / "tiny-sd.safetensors", models.resolve() / "tiny-sd-config")
    pipe = load_pipeline(ref, settings)
    assert no_network == []

    for name in ("unet", "vae", "text_encoder"):
        expected, loaded = getattr(demo_pipe, name).state_dict(), getattr(pipe, name).state_dict()
        assert expected.keys() == loaded.keys(), name
        for key in expected:
            torch.testing.assert_close(loaded[key], expected[key], rtol=0, atol=0, msg=f"{name}: {key}")
    np.testing.assert_array_equal(_render(pipe), _render(demo_pipe))

    hashes = model_files_hashes(ref)
    assert hashes["tiny-sd.safetensors"] == sha256_file(models / "tiny-sd.safetensors")
    assert "config/model_index.json" in hashes and "config/unet/config.json" in hashes


def _to_single_file(pipe) -> dict[str, torch.Tensor]:
    """The pipeline's UNet, VAE and CLIP text encoder in the original Stable Diffusion
    checkpoint layout (model.diffusion_model.*, first_stage_model.*, cond_stage_model.*):
    the inverse of diffusers' convert_ldm_{unet,vae,clip}_checkpoint for SD-1.x."""
    layers = pipe.unet.config.layers_per_block
    per_block = layers + 1
    attention_blocks = {int(m.group(1)) for k in pipe.unet.state_dict() if (m := re.match(r"up_blocks\.(\d+)\.attentions", k))}
    resnet = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
              "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
    fixed = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}

    def resnet_part(rest: str) -> str:
        head, tail = rest.split(".", 1)
        return f"{resnet[head]}.{tail}"

    def unet_key(key: str) -> str:
        head, _, tail = key.rpartition(".")
        if head in fixed:
            return f"{fixed[head]}.{tail}"
        rules = [
            (r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda b, j, r: f"input_blocks.{b * per_block + j + 1}.0.{resnet_part(r)}"),
            (r"down_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda b, j, r: f"input_blocks.{b * per_block + j + 1}.1.{r}"),
            (r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", lambda b, r: f"input_blocks.{(b + 1) * per_block}.0.op.{r}"),
            (r"mid_block\.resnets\.(\d+)\.(.+)", lambda k, r: f"middle_block.{2 * k}.{resnet_part(r)}"),
            (r"mid_block\.attentions\.0\.(.+)", lambda r: f"middle_block.1.{r}"),
            (r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda b, j, r: f"output_blocks.{b * per_block + j}.0.{resnet_part(r)}"),
            (r"up_blocks\.(\d+)\.attentions\.(\d+)\.(.+)", lambda b, j, r: f"output_blocks.{b * per_block + j}.1.{r}"),
            (r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)",
             lambda b, r: f"output_blocks.{b * per_block + layers}.{2 if b in attention_blocks else 1}.conv.{r}"),
        ]
        for pattern, build in rules:
            if match := re.fullmatch(pattern, key):
                return build(*(int(g) if g.isdigit() else g for g in match.groups()))
        raise AssertionError(f"no LDM name for UNet key {key}")

    blocks = len(pipe.vae.config.block_out_channels)
    attention = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}

    def vae_key(key: str, value: torch.Tensor) -> tuple[str, torch.Tensor]:
        rules = [
            (r"(encoder)\.down_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda c, i, j, r: f"{c}.down.{i}.block.{j}.{r}"),
            (r"(encoder)\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.+)", lambda c, i, r: f"{c}.down.{i}.downsample.conv.{r}"),
            (r"(decoder)\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)", lambda c, i, j, r: f"{c}.up.{blocks - 1 - i}.block.{j}.{r}"),
            (r"(decoder)\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.+)", lambda c, i, r: f"{c}.up.{blocks - 1 - i}.upsample.conv.{r}"),
            (r"(\w+)\.mid_block\.resnets\.(\d+)\.(.+)", lambda c, k, r: f"{c}.mid.block_{k + 1}.{r}"),
        ]
        key = key.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        if match := re.fullmatch(r"(\w+)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            coder, layer, kind = match.groups()
            if kind == "weight" and layer != "group_norm":
                value = value[:, :, None, None]  # LDM keeps attention projections as 1x1 convolutions
            return f"{coder}.mid.attn_1.{attention[layer]}.{kind}", value
        for pattern, build in rules:
            if match := re.fullmatch(pattern, key):
                return build(*(int(g) if g.isdigit() else g for g in match.groups())), value
        return key, value  # conv_in, conv_out, norm_out, quant_conv, post_quant_conv keep their names

    checkpoint: dict[str, torch.Tensor] = {}
    for key, value in pipe.unet.state_dict().items():
        checkpoint[f"model.diffusion_model.{unet_key(key)}"] = value.contiguous()
    for key, value in pipe.vae.state_dict().items():
        name, value = vae_key(key, value)
        checkpoint[f"first_stage_model.{name}"] = value.contiguous()
    for key, value in pipe.text_encoder.state_dict().items():
        # transformers 5's CLIPTextModel has no `text_model.` level; the LDM layout has it.
        checkpoint[f"cond_stage_model.transformer.text_model.{key.removeprefix('text_model.')}"] = value.contiguous()
    return checkpoint


def test_sdxl_folder_loads_as_an_sdxl_pipeline(tmp_path: Path, demo_root: Path) -> None:
    from diffusers import StableDiffusionXLPipeline

    # The "sdxl" family's tiny twin (engine.diffusion.families.sdxl), staged as a lab would stage one.
    (make_demo_model(tmp_path / "models" / "tiny-xl", family="sdxl") / DEMO_MARKER).unlink()

    settings = _settings(tmp_path, base="tiny-xl")
    [ref] = check_models(settings, demo=False, need_realism=False)
    pipe = load_pipeline(ref, settings)
    assert type(pipe) is StableDiffusionXLPipeline
    images = _render(pipe)
    assert images.shape == (1, 128, 128, 3) and images.std() > 0.01


def test_unsupported_pipeline_is_refused_at_resolve(tmp_path: Path, demo_root: Path) -> None:
    staged = tmp_path / "models" / "inpaint"
    shutil.copytree(demo_root / "models" / "demo", staged)
    index = json.loads((staged / "model_index.json").read_text())
    (staged / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionInpaintPipeline"}))
    with pytest.raises(ConfigError, match="StableDiffusionInpaintPipeline") as refused:
        resolve_model("inpaint", "", _settings(tmp_path), demo=False)  # as models.base: an inpainting model goes to models.inpaint
    assert refused.value.code == "model_unsupported"
    (staged / "model_index.json").write_text(json.dumps({**index, "_class_name": "KandinskyPipeline"}))
    with pytest.raises(ConfigError, match="names the pipeline 'KandinskyPipeline'; supported: StableDiffusionPipeline") as refused:
        resolve_model("inpaint", "", _settings(tmp_path), demo=False)
    assert refused.value.code == "model_unsupported"


# --------------------------------------------------------------------------- hashes, devices


def test_hash_cache_hashes_once_and_rehashes_a_touched_or_swapped_file(tmp_path: Path) -> None:
    from engine import hashcache

    settings = _settings(tmp_path)
    ref = resolve_model("sd15", "", settings, demo=True)
    hashes = model_files_hashes(ref)
    weights = ref.path / "unet" / "diffusion_pytorch_model.safetensors"
    assert hashes["unet/diffusion_pytorch_model.safetensors"] == sha256_file(weights)
    assert set(hashes) >= {"model_index.json", DEMO_MARKER, "vae/diffusion_pytorch_model.safetensors", "tokenizer/tokenizer.json"}

    cache_path = settings.models_dir / HASH_CACHE_FILE
    cache = json.loads(cache_path.read_text())
    entry = cache["files"][str(weights.resolve())]
    assert entry == {"key": list(hashcache.file_key(weights)), "sha256": hashes["unet/diffusion_pytorch_model.safetensors"]}

    # The store is the lab's own (its models volume): a hit is used without reading the file again
    # (here in a process that starts afresh: this one also remembers the digest in memory)...
    entry["sha256"] = "0" * 64
    cache_path.write_text(json.dumps(cache))
    hashcache._memory.clear()
    assert model_files_hashes(ref)["unet/diffusion_pytorch_model.safetensors"] == "0" * 64
    # ...until the file's mtime changes, which forces a re-hash and updates the store...
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert model_files_hashes(ref) == hashes
    assert json.loads(cache_path.read_text())["files"][str(weights.resolve())]["sha256"] == hashes["unet/diffusion_pytorch_model.safetensors"]
    # ...and a file swapped in place with its old size and mtime put back is hashed again too (its ctime moved).
    stat = weights.stat()
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert model_files_hashes(ref)["unet/diffusion_pytorch_model.safetensors"] == sha256_file(weights) != hashes["unet/diffusion_pytorch_model.safetensors"]


def test_device_and_dtype_follow_hardware_and_settings(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        device, dtype = select_device_dtype(_settings(tmp_path))
        assert device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
    else:
        assert select_device_dtype(_settings(tmp_path)) == (torch.device("cpu"), torch.float32)
        with pytest.raises(ConfigError) as refused:
            select_device_dtype(_settings(tmp_path, device="cuda"))
        assert refused.value.code == "device_unavailable"
    assert select_device_dtype(_settings(tmp_path, device="cpu", dtype="bfloat16")) == (torch.device("cpu"), torch.bfloat16)


@pytest.mark.gpu
def test_demo_model_loads_and_renders_on_cuda(tmp_path: Path) -> None:
    settings = _settings(tmp_path)
    pipe = load_pipeline(resolve_model("sd15", "", settings, demo=True), settings)
    assert pipe.unet.device.type == "cuda"
    assert pipe.unet.dtype == (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16)
    images = _render(pipe)
    assert images.shape == (1, 128, 128, 3) and np.isfinite(images).all()
