"""IP-Adapter-FaceID with the demo model's tiny random adapter (issue 20, the adapter layer): it
loads offline through diffusers' own loader, a different embedding changes the render, scale 0
and unloading give the base model exactly, batched seeds equal single seeds, the published .bin
is converted with the weights-only unpickler, and the embedded buffalo_s pack is refused outside
demo mode (FaceID was trained on buffalo_l's embeddings)."""

from __future__ import annotations

import hashlib
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch

from engine.identity import faceid
from engine.diffusion.sampling import render
from engine.errors import ConfigError
from tests.harness.paths import REPO

PROMPT = "a photo of a person"


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from engine.config import Settings
    from engine.runner import Engine

    root = tmp_path_factory.mktemp("faceid")
    (root / "models").mkdir()
    engine = Engine(Settings.from_table({"paths": {"models": str(root / "models")}}, root=root), demo=True)
    pipe = engine.resources.model("base")
    folder = faceid.make_demo_faceid(root / "models" / faceid.DEMO_FACEID_NAME, pipe)
    return pipe, folder, root


def _draw(pipe, seeds, embeds=None):
    return render(pipe, PROMPT, "", seeds, steps=3, guidance=5.8, size=128, ip_adapter_image_embeds=embeds)


def test_the_demo_adapter_is_deterministic_and_checks_as_a_faceid_folder(demo, tmp_path):
    pipe, folder, _ = demo
    faceid.check_folder(folder, "models.faceid")
    again = faceid.make_demo_faceid(tmp_path / "again", pipe)
    assert hashlib.sha256((again / faceid.WEIGHTS).read_bytes()).digest() == hashlib.sha256((folder / faceid.WEIGHTS).read_bytes()).digest()
    with pytest.raises(ConfigError, match="models.faceid: no faceid.safetensors"):
        faceid.check_folder(tmp_path, "models.faceid")


def test_an_embedding_conditions_the_render_and_scale_zero_or_unloading_is_the_base_model(demo, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    pipe, folder, _ = demo
    rng = np.random.default_rng(0)
    alice, bob = rng.standard_normal(512).astype(np.float32), rng.standard_normal(512).astype(np.float32)
    base = _draw(pipe, [0, 1])
    with faceid.faceid_adapter(pipe, folder) as adapter:
        adapter.scale(1.0)
        as_alice = _draw(pipe, [0, 1], adapter.embeds(alice, 5.8))
        assert np.array_equal(as_alice, _draw(pipe, [0, 1], adapter.embeds(alice, 5.8)))  # the same embedding, the same render
        as_bob = _draw(pipe, [0, 1], adapter.embeds(bob, 5.8))
        assert np.abs(as_alice.astype(int) - as_bob.astype(int)).max() > 10  # another face, another render
        assert not np.array_equal(as_alice, base)
        alone = np.stack([_draw(pipe, [seed], adapter.embeds(alice, 5.8))[0] for seed in (0, 1)])
        assert np.abs(alone.astype(int) - as_alice.astype(int)).max() <= 1  # batched seeds = single seeds (CPU kernels: 1 grey level)
        adapter.scale(0.0)
        assert np.array_equal(_draw(pipe, [0, 1], adapter.embeds(alice, 5.8)), base)
    assert np.array_equal(_draw(pipe, [0, 1]), base)  # unloaded: the pipeline as it came
    assert not hasattr(pipe.unet, "encoder_hid_proj") or pipe.unet.encoder_hid_proj is None


def test_the_published_bin_is_converted_with_the_weights_only_unpickler(demo, tmp_path):
    from safetensors.torch import load_file

    pipe, folder, _ = demo
    tensors = load_file(str(folder / faceid.WEIGHTS))
    parts = {part: {name[len(part) + 1:]: t for name, t in tensors.items() if name.startswith(part + ".")} for part in ("image_proj", "ip_adapter")}
    torch.save(parts, tmp_path / "ip-adapter-faceid_sd15.bin")
    converted = faceid.convert_bin(tmp_path / "ip-adapter-faceid_sd15.bin", tmp_path / "staged")
    faceid.check_folder(converted, "models.faceid")
    assert {k: v.tolist() for k, v in load_file(str(converted / faceid.WEIGHTS)).items()} == {k: v.tolist() for k, v in tensors.items()}

    class Payload:  # what a hostile checkpoint would carry: code run on unpickling
        def __reduce__(self):
            return (print, ("ran",))

    cli = subprocess.run([sys.executable, "-m", "engine", "models", "convert-faceid", str(tmp_path / "ip-adapter-faceid_sd15.bin"), str(tmp_path / "cli")],
                         cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)), capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    assert (tmp_path / "cli" / faceid.WEIGHTS).read_bytes() == (converted / faceid.WEIGHTS).read_bytes()
    (tmp_path / "hostile.bin").write_bytes(pickle.dumps({"image_proj": Payload(), "ip_adapter": {}}, protocol=2))
    with pytest.raises(pickle.UnpicklingError):
        faceid.convert_bin(tmp_path / "hostile.bin", tmp_path / "never")
    assert not (tmp_path / "never").exists()


def test_the_embedded_buffalo_s_pack_is_refused_outside_demo_mode(demo):
    from pathlib import Path

    with pytest.raises(ConfigError) as caught:
        faceid.check_face_pack(Path("/x/w600k_mbf.onnx"), demo=False)
    assert caught.value.code == "faceid_face_pack" and "buffalo_l" in caught.value.message and "w600k_mbf.onnx" in caught.value.message
    faceid.check_face_pack(Path("/x/w600k_mbf.onnx"), demo=True)
    faceid.check_face_pack(Path("/x/w600k_r50.onnx"), demo=False)
