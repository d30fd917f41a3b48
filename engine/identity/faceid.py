"""Zero-shot identity: IP-Adapter-FaceID (diffusers core), conditioned on the subject's ArcFace
embedding, as a fast mode beside the trained LoRA and as a baseline the LoRA must beat.

- A FaceID adapter is a folder holding `faceid.safetensors` (`image_proj.*`: the projection of a
  512-D ArcFace embedding to `num_tokens` cross-attention tokens; `ip_adapter.<i>.to_k_ip/to_v_ip`:
  one key/value pair per cross-attention processor). The published weights come as a pickled .bin:
  `convert_bin` turns one into that folder once, at staging; the engine never unpickles at run time.
- `faceid_adapter(pipe, folder)` loads it into the shared pipeline for a block (`load_ip_adapter`,
  offline, no image encoder: FaceID takes embeddings, not images) and unloads it after, so the
  pipeline goes back as it came; `FaceIDSwitch.scale(s)` (0 renders the base model exactly) and
  `.embeds(embedding, guidance)` give what `engine.diffusion.sampling.render` passes as
  `ip_adapter_image_embeds` (with CFG: zeros as the negative, as the adapter was trained).
- FaceID was trained on insightface buffalo_l embeddings (w600k_r50). `check_face_pack` refuses the
  embedded buffalo_s (w600k_mbf) outside demo mode: its embeddings live in another space.
- The demo model gets a tiny random adapter (`make_demo_faceid`, deterministic, built on demand).
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from engine.errors import ConfigError, JobError

WEIGHTS = "faceid.safetensors"
DEMO_FACEID_NAME = "demo-faceid"  # under <models>/, beside the demo model
DEMO_MARKER = "DEMO_MODEL.json"
DEMO_SEED = 0
EMBEDDING_DIM = 512
DEMO_TOKENS = 4
DRIFT_NOTE = ("FaceID conditions on an ArcFace embedding, the family that measures drift here: its drift is optimised by construction. "
              "Read the second model's (dlib) distances beside it")
TRAINED_ON = "w600k_r50"  # buffalo_l's recognizer: the embeddings FaceID was trained on


def check_face_pack(recognizer: Path, demo: bool) -> None:
    """Refuse FaceID with embeddings of another recognizer than the one it was trained on."""
    if demo or TRAINED_ON in Path(recognizer).name:
        return
    raise ConfigError("faceid_face_pack", f"IP-Adapter-FaceID was trained on insightface buffalo_l embeddings ({TRAINED_ON}); the face "
                                          f"recognizer in use is {Path(recognizer).name}, whose embeddings live in another space. Stage the "
                                          "buffalo_l pack under <models>/insightface/buffalo_l/ (python -m engine models check names the files), "
                                          "or use identity method \"lora\"")


def check_job_face_pack(faces: Any, demo: bool, key: str) -> None:
    """check_face_pack for a job that asks for FaceID at `key`: the refusal names the key."""
    try:
        check_face_pack(faces.files.recognizer, demo)
    except ConfigError as error:
        raise JobError("invalid_job", f"job.toml: {key}: {error.message}") from None


def check_folder(folder: Path, key: str) -> None:
    """A staged FaceID folder: its safetensors file, with both parts of the adapter."""
    path = Path(folder) / WEIGHTS
    if not path.is_file():
        raise ConfigError("model_missing", f"{key}: no {WEIGHTS} in {folder}; convert the published .bin once with "
                                           f"`python -m engine models convert-faceid <file.bin> {folder}`")
    names = _tensor_names(path)
    for part in ("image_proj.", "ip_adapter."):
        if not any(name.startswith(part) for name in names):
            raise ConfigError("model_missing", f"{key}: {path} holds no {part}* tensors: not an IP-Adapter-FaceID file")


def _tensor_names(path: Path) -> list[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as handle:
        return list(handle.keys())


def convert_bin(source: Path, folder: Path) -> Path:
    """The published pickled FaceID .bin ({"image_proj": ..., "ip_adapter": ...}) as `folder`/faceid.safetensors.
    Loaded with torch's weights_only unpickler (tensors and plain containers only)."""
    import torch
    from safetensors.torch import save_file

    data = torch.load(str(source), map_location="cpu", weights_only=True)
    if not isinstance(data, dict) or not {"image_proj", "ip_adapter"} <= set(data):
        raise ConfigError("invalid_model", f"{source} is not an IP-Adapter-FaceID checkpoint (no image_proj / ip_adapter parts)")
    flat = {f"{part}.{name}": tensor.contiguous() for part in ("image_proj", "ip_adapter") for name, tensor in data[part].items()}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(folder / WEIGHTS), metadata={"converted_from": Path(source).name})
    return folder


def make_demo_faceid(folder: Path, pipe: Any) -> Path:
    """A tiny random FaceID adapter for the demo pipeline's UNet (deterministic: seed 0), into
    `folder` (built beside it, then renamed; an existing demo adapter is kept)."""
    import torch
    from safetensors.torch import save_file

    folder = Path(folder).absolute()
    if (folder / DEMO_MARKER).is_file() and (folder / WEIGHTS).is_file():
        return folder
    unet = pipe.unet
    cross = unet.config.cross_attention_dim
    tensors: dict[str, torch.Tensor] = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(DEMO_SEED)
        tensors["image_proj.proj.0.weight"] = torch.randn(EMBEDDING_DIM, EMBEDDING_DIM) * 0.02
        tensors["image_proj.proj.0.bias"] = torch.zeros(EMBEDDING_DIM)
        tensors["image_proj.proj.2.weight"] = torch.randn(cross * DEMO_TOKENS, EMBEDDING_DIM) * 0.02
        tensors["image_proj.proj.2.bias"] = torch.zeros(cross * DEMO_TOKENS)
        tensors["image_proj.norm.weight"] = torch.ones(cross)
        tensors["image_proj.norm.bias"] = torch.zeros(cross)
        for index, name in enumerate(unet.attn_processors):  # diffusers numbers the processors in this order
            if name.endswith("attn2.processor"):
                hidden = unet.get_submodule(name[: -len(".processor")]).to_k.out_features
                tensors[f"ip_adapter.{index}.to_k_ip.weight"] = torch.randn(hidden, cross) * 0.1
                tensors[f"ip_adapter.{index}.to_v_ip.weight"] = torch.randn(hidden, cross) * 0.1
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        save_file(tensors, str(staging / WEIGHTS))
        (staging / DEMO_MARKER).write_text(json.dumps({"demo": True, "note": "random FaceID adapter for the demo model", "seed": DEMO_SEED,
                                                       "tokens": DEMO_TOKENS}, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        staging.chmod(0o755)
        try:
            staging.rename(folder)
        except OSError:
            if not (folder / WEIGHTS).is_file():  # another process built it meanwhile: theirs stands
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return folder


class FaceIDSwitch:
    def __init__(self, pipe: Any) -> None:
        self._pipe = pipe

    def scale(self, scale: float) -> None:
        """The adapter's weight: 0 renders the base model exactly, 1 as trained."""
        self._pipe.set_ip_adapter_scale(scale)

    @staticmethod
    def embeds(embedding: np.ndarray, guidance: float) -> list[Any]:
        """`ip_adapter_image_embeds` for one ArcFace embedding (every seed of a batch shares it):
        with classifier-free guidance (guidance > 1) a zero embedding is the negative."""
        import torch

        positive = torch.from_numpy(np.asarray(embedding, dtype=np.float32).reshape(1, 1, -1))
        return [torch.cat([torch.zeros_like(positive), positive]) if guidance > 1.0 else positive]


def activate_loras(pipe: Any, weights: dict[str, float]) -> None:
    """Every LoRA adapter of the pipeline active again: loading a FaceID file that carries LoRA
    weights (diffusers names it faceid_0) deactivates the others. Ours at `weights`, the FaceID
    file's at 1."""
    names = sorted({name for names in pipe.get_list_adapters().values() for name in names})
    if names:
        pipe.enable_lora()
        pipe.set_adapters(names, adapter_weights=[weights.get(name, 1.0) for name in names])


@contextlib.contextmanager
def faceid_adapter(pipe: Any, folder: Path) -> Iterator[FaceIDSwitch]:
    """The FaceID adapter of `folder` in `pipe` for the block, unloaded after (also when loading fails half-way)."""
    try:
        pipe.load_ip_adapter(str(folder), subfolder="", weight_name=WEIGHTS, image_encoder_folder=None, local_files_only=True)
    except BaseException:
        with contextlib.suppress(Exception):
            pipe.unload_ip_adapter()
        raise
    try:
        yield FaceIDSwitch(pipe)
    finally:
        pipe.unload_ip_adapter()


class IdentityAdapters:
    """The identity adapters of one block in the shared pipeline (the job's LoRA, FaceID, both or
    neither) and the one place that sets their weights: `set(lora_weight, faceid_scale)` before
    each render, `embeds(guidance)` the FaceID conditioning `render` takes (None without FaceID)."""

    def __init__(self, pipe: Any, lora: Any, faceid: FaceIDSwitch | None, embedding: np.ndarray | None) -> None:
        self._pipe, self._lora, self._faceid, self._embedding = pipe, lora, faceid, embedding

    def set(self, lora_weight: float, faceid_scale: float) -> None:
        if self._faceid is not None:
            self._faceid.scale(faceid_scale)
        if self._lora is None:
            return
        if self._faceid is not None:  # loading FaceID deactivated ours: every LoRA adapter active again, ours at its weight
            from engine.diffusion.sampling import IDENTITY_ADAPTER

            activate_loras(self._pipe, {IDENTITY_ADAPTER: lora_weight})
        elif lora_weight:
            self._lora.weight(lora_weight)
        else:
            self._lora.off()

    def embeds(self, guidance: float) -> list[Any] | None:
        return None if self._faceid is None else self._faceid.embeds(self._embedding, guidance)


@contextlib.contextmanager
def identity_adapters(pipe: Any, lora: Path | None = None, faceid: Path | None = None,
                      embedding: np.ndarray | None = None) -> Iterator[IdentityAdapters]:
    """`lora` (engine.diffusion.sampling.identity_lora) and the FaceID adapter of `faceid` (conditioned on
    `embedding`) in `pipe` for the block, both removed after; neither: the base model exactly."""
    from engine.diffusion.sampling import identity_lora

    with contextlib.ExitStack() as stack:
        switch = None if lora is None else stack.enter_context(identity_lora(pipe, lora))
        adapter = None if faceid is None else stack.enter_context(faceid_adapter(pipe, faceid))
        yield IdentityAdapters(pipe, switch, adapter, embedding)
