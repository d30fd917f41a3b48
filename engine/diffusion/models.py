"""Diffusion weights: where they are, whether they are all there, loading them, hashing them.

Every model comes from the local models folder (`Settings.models_dir`, a volume in the
container). A name in config.toml is a path under that folder (or an absolute path):

    a folder with model_index.json       -> a diffusers folder
    a .safetensors / .ckpt file          -> a single-file checkpoint; its configs and tokenizer
                                            come from a local diffusers folder (`models.base_config`)
    "org/name" that is not a local path  -> a hub id, used only when models.allow_download = true
    "demo"                               -> the tiny generated model, only when --demo asks for it

Nothing here reaches the network unless `allow_download` is true: local loads pass
`local_files_only=True`, and `from_single_file` is only ever called with a local config
folder (without one, diffusers quietly falls back to downloading SD-1.5's configs).

Which pipelines a folder may name, and what a staged folder of each needs, is its model
family's (engine.diffusion.families): SD-1.x/2.x and SDXL, each text-to-image or inpainting.

The demo model is the "sd" family's tiny twin, random weights from a fixed seed, generated on
the spot (no files needed, nothing downloaded) so that the whole chain runs on a CPU in seconds.
Its renders are noise; `DEMO_MODEL.json` in its folder says so.

Importing this module loads no weights and imports neither torch nor diffusers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from engine.diffusion.families import TWIN_RESOLUTION, TWIN_SEED, Family, family_named, family_of, family_of_checkpoint, index_classes
from engine.errors import ConfigError, Problem
from engine.hashcache import sha256_of_files

if TYPE_CHECKING:
    import torch

    from engine.config import Settings

log = structlog.get_logger(__name__)

DEMO_NAME = "demo"  # the word in config.toml / the folder name under <models>/
DEMO_MARKER = "DEMO_MODEL.json"
DEMO_SEED = TWIN_SEED
DEMO_RESOLUTION = TWIN_RESOLUTION  # pixels; the demo VAE downsamples 8x like SD, so 16x16 latents
DEMO_FAMILY = "sd"  # the demo model is this family's tiny twin
SINGLE_FILE_SUFFIXES = (".safetensors", ".ckpt")

KIND_FOLDER = "diffusers_folder"
KIND_SINGLE_FILE = "single_file"
KIND_HUB = "hub_id"
KIND_DEMO = "demo"

# Inpainting pipelines (each family's `inpaint`, a UNet of its `inpaint_channels`: latents, mask,
# masked-image latents): only models.inpaint takes them, and models.inpaint takes nothing else
# (its "base" is the base model via from_pipe).
INPAINT_FROM_BASE = "base"  # models.inpaint = "base": the base model's own components, as an inpainting pipeline
DEMO_INPAINT_NAME = "demo-inpaint"  # the demo model's 9-channel twin, under <models>/
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")
_NO_WEIGHTS_CLASS_WORDS = ("Tokenizer", "Scheduler", "FeatureExtractor", "ImageProcessor", "Processor")
# An "org/name" hub repository id (huggingface_hub's rules, loosely): one slash, no spaces.
_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")


@dataclass(frozen=True)
class ModelRef:
    """Where one model is, as found by `resolve_model` (nothing loaded yet).

    kind         "diffusers_folder" | "single_file" | "hub_id" | "demo"
    name         what config.toml said ("sd15", "/abs/x.safetensors", "org/name", "demo")
    path         absolute: the folder, the checkpoint file, or (hub_id) the download cache folder
    config_path  absolute local diffusers folder with the configs and tokenizer (single_file only)
    models_dir   the models folder the name was resolved in (holds the hash cache)
    """

    kind: str
    name: str
    path: Path
    config_path: Path | None
    models_dir: Path

    @property
    def is_demo(self) -> bool:
        return self.kind == KIND_DEMO

    def describe(self) -> dict[str, Any]:
        """JSON-able facts for the audit log."""
        return {
            "kind": self.kind,
            "name": self.name,
            "path": str(self.path),
            "config_path": str(self.config_path) if self.config_path else None,
            "demo": self.is_demo,
        }


# --------------------------------------------------------------------------- resolving


def resolve_model(name: str, config_name: str, settings: Settings, demo: bool, *, role: str = "base") -> ModelRef:
    """Find the model `name` (a `models.<role>` value) without loading it.

    With `demo` the answer is always the tiny generated model at <models>/demo (built here
    when missing). Otherwise "demo" is refused, and anything not staged raises
    ConfigError("model_missing") naming the absolute path expected and how to stage it.
    `role` names the config keys in messages ("base", "realism" or "inpaint") and says which
    pipelines are accepted: inpainting ones (a 9-channel UNet) for `inpaint` only.
    """
    models_dir = settings.models_dir
    key = f"models.{role}"
    config_key = f"models.{role}_config"
    if demo:
        return _demo_ref(models_dir, inpaint=role == "inpaint")
    name = name.strip()
    if name == DEMO_NAME:
        raise ConfigError(
            "demo_not_requested",
            f'{key} = "demo" names the tiny generated model (random weights, its renders are noise); '
            f"it is only used when asked for with --demo. Stage a real model under {models_dir} and set {key}.",
        )
    path = _local_path(name, models_dir)
    if path.is_dir():
        _check_diffusers_folder(path, key, inpaint=role == "inpaint")
        return ModelRef(KIND_FOLDER, name, path, None, models_dir)
    if path.is_file():
        if path.suffix.lower() not in SINGLE_FILE_SUFFIXES:
            raise ConfigError(
                "model_unsupported",
                f"{key} = {name!r} is the file {path}, which is neither a .safetensors nor a .ckpt checkpoint; "
                "stage a diffusers folder (with model_index.json) or a single-file checkpoint",
            )
        config_path = _single_file_config(path, config_name, models_dir, config_key)
        _check_checkpoint(path, config_path, key, inpaint=role == "inpaint")
        return ModelRef(KIND_SINGLE_FILE, name, path, config_path, models_dir)
    if _HUB_ID.fullmatch(name) and not Path(name).expanduser().is_absolute():
        if settings.models.allow_download:
            return ModelRef(KIND_HUB, name, models_dir / "hub", None, models_dir)
        raise ConfigError(
            "model_missing",
            f"{key} = {name!r}: no folder {path} and downloads are off (models.allow_download = false). "
            f"Copy a diffusers folder with model_index.json to {path}, or set {key} in config.toml "
            "to a staged model (models.allow_download = true only on a machine allowed to reach the model hub)",
        )
    if path.suffix.lower() in SINGLE_FILE_SUFFIXES:
        raise ConfigError(
            "model_missing",
            f"{key} = {name!r}: no checkpoint at {path}. Copy the {path.suffix} file to {path} "
            f"(with {config_key} naming a local diffusers config folder), or set {key} in config.toml",
        )
    raise ConfigError(
        "model_missing",
        f"{key} = {name!r}: nothing at {path}. Copy a diffusers folder with model_index.json to {path} "
        f"(or set {key} to a single .safetensors checkpoint, with {config_key} naming a local diffusers config folder), "
        f"or set {key} in config.toml",
    )


def check_models(settings: Settings, demo: bool, need_realism: bool) -> list[ModelRef]:
    """Start-up check: every configured diffusion model is staged (nothing is loaded).

    Raises one ConfigError listing every missing model, so a lab fixes them all in one go.
    Returns [base] or [base, realism]; with `demo` both are the generated demo model.
    """
    models = settings.models
    wanted = [("base", models.base, models.base_config)]
    if need_realism:
        wanted.append(("realism", models.realism, models.realism_config))
    refs: list[ModelRef] = []
    problems: list[Problem] = []
    for role, name, config_name in wanted:
        try:
            refs.append(resolve_model(name, config_name, settings, demo, role=role))
        except ConfigError as error:
            problems.append(Problem(f"models.{role}", f"{error.code}: {error.message}"))
    if problems:
        if len(problems) == 1:
            message = problems[0].reason
        else:
            message = f"{len(problems)} diffusion models are not usable: " + "; ".join(map(str, problems))
        raise ConfigError("model_missing", message, problems=tuple(problems))
    return refs


def _local_path(name: str, models_dir: Path) -> Path:
    path = Path(name).expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else models_dir / path))


def _check_diffusers_folder(folder: Path, key: str, inpaint: bool = False) -> None:
    """Refuse a folder that diffusers would fail on later: no model_index.json, an
    unsupported pipeline (or one of the wrong kind for `key`), or a component folder (or its
    weights) missing."""
    index_path = folder / "model_index.json"
    if not index_path.is_file():
        raise ConfigError(
            "model_missing",
            f"{key}: {folder} has no model_index.json. A diffusers folder holds model_index.json with "
            "unet/, vae/, text_encoder/, tokenizer/ and scheduler/ beside it: copy the whole folder there, "
            f"or set {key} to a single .safetensors checkpoint",
        )
    index = _read_model_index(index_path)
    family = _pipeline_family(index, index_path)
    _check_kind(index, index_path, key, inpaint, _unet_channels(folder / "unet" / "config.json"), family)
    _check_components(index, index_path, key, family)
    missing: list[str] = []
    for component, (library, class_name) in _components(index).items():
        sub = folder / component
        if not sub.is_dir():
            missing.append(f"{sub}/ ({class_name})")
        elif _needs_weights(class_name) and not _has_weights(sub):
            missing.append(f"weights in {sub}/ (e.g. {_default_weight_name(library)})")
    if missing:
        raise ConfigError(
            "model_missing",
            f"{key}: the diffusers folder {folder} is incomplete, missing " + ", ".join(missing)
            + "; copy the complete folder again",
        )


def _single_file_config(path: Path, config_name: str, models_dir: Path, config_key: str) -> Path:
    if not config_name.strip():
        raise ConfigError(
            "model_missing",
            f"{path} is a single-file checkpoint: set {config_key} to a local diffusers folder holding its "
            "configs and tokenizer (model_index.json, unet/config.json, vae/config.json, text_encoder/config.json, "
            "tokenizer/, scheduler/; no weights needed). Without it diffusers would download them",
        )
    config_path = _local_path(config_name.strip(), models_dir)
    if not (config_path / "model_index.json").is_file():
        raise ConfigError(
            "model_missing",
            f"{config_key} = {config_name!r}: no model_index.json in {config_path}. Copy the config folder of the "
            f"checkpoint's family (e.g. stable-diffusion-v1-5 without its weights) to {config_path}",
        )
    index_path = config_path / "model_index.json"
    index = _read_model_index(index_path)
    _check_components(index, index_path, config_key, _pipeline_family(index, index_path))
    return config_path


def _check_checkpoint(path: Path, config_path: Path, key: str, inpaint: bool = False) -> None:
    """Read a .safetensors header (a few KB, no tensors) to refuse files that are not a whole
    Stable Diffusion checkpoint (a LoRA, a lone VAE) or do not match the config folder's family.
    .ckpt files are pickles: they are only checked when loaded (torch.load, weights_only=True)."""
    if path.suffix.lower() != ".safetensors":
        return
    try:
        with open(path, "rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
            if header_size > 100 * 1024 * 1024:
                raise ValueError(f"header of {header_size} bytes")
            header = json.loads(handle.read(header_size))
            names = [n for n in header if n != "__metadata__"]
    except (OSError, struct.error, ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
        raise ConfigError("model_invalid", f"{key}: {path} is not a readable .safetensors file ({exc})") from None
    if not any(n.startswith("model.diffusion_model.") for n in names):
        raise ConfigError(
            "model_invalid",
            f"{key}: {path} holds no UNet (no model.diffusion_model.* tensors): it is not a whole Stable Diffusion "
            "checkpoint (a LoRA or a VAE?). Stage the full checkpoint",
        )
    family = family_of_checkpoint(names)
    index_path = config_path / "model_index.json"
    index = _read_model_index(index_path)
    expected = _pipeline_family(index, index_path)
    first_conv = (header.get("model.diffusion_model.input_blocks.0.0.weight") or {}).get("shape") or [None, None]
    _check_kind(index, index_path, key, inpaint, first_conv[1] if len(first_conv) > 1 else None, expected, checkpoint=path)
    if family != expected:
        raise ConfigError(
            "model_invalid",
            f"{key}: {path} is an {family.label} checkpoint but its config folder {config_path} is {expected.label}; "
            "stage the matching config folder",
        )


def _read_model_index(index_path: Path) -> dict[str, Any]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError("model_invalid", f"{index_path} is not readable JSON: {exc}") from None
    if not isinstance(index, dict):
        raise ConfigError("model_invalid", f"{index_path} is not a JSON object")
    return index


def _pipeline_family(index: dict[str, Any], index_path: Path) -> Family:
    try:
        return family_of(index)
    except ValueError:
        raise ConfigError(
            "model_unsupported",
            f"{index_path} names the pipeline {index.get('_class_name')!r}; supported: {', '.join(index_classes())}",
        ) from None


def model_family(ref: ModelRef) -> Family:
    """The family of a resolved model, from its model_index.json (nothing is loaded)."""
    if ref.kind == KIND_DEMO:
        return family_named(DEMO_FAMILY)
    folder = ref.config_path if ref.kind == KIND_SINGLE_FILE else _hub_folder(ref) if ref.kind == KIND_HUB else ref.path
    index_path = Path(folder) / "model_index.json"
    return _pipeline_family(_read_model_index(index_path), index_path)


def _check_components(index: dict[str, Any], index_path: Path, key: str, family: Family) -> None:
    """A model_index.json of `family` lists every component the family loads (its `components`:
    SDXL's second text encoder and tokenizer too): a folder without one would fail only when loaded."""
    listed = _components(index)
    absent = [component for component in family.components if component not in listed]
    if absent:
        raise ConfigError("model_invalid", f"{key}: {index_path} lists no {', '.join(absent)}; an {family.label} pipeline "
                                           f"({index.get('_class_name')}) needs {', '.join(family.components)}: copy the complete folder again")


def _check_kind(index: dict[str, Any], index_path: Path, key: str, inpaint: bool, channels: int | None, family: Family,
                checkpoint: Path | None = None) -> None:
    """models.inpaint takes inpainting pipelines with a UNet of the family's inpainting channels
    (9), and the other roles anything else: each refusal names the key and where the other kind goes."""
    is_inpaint = family.is_inpaint(index.get("_class_name"))
    what = checkpoint or index_path.parent
    if inpaint and not is_inpaint:
        raise ConfigError("model_unsupported", f"{key}: {what} is a text-to-image model ({index.get('_class_name')}); {key} takes an inpainting "
                                               f"model (a {family.inpaint_channels}-channel UNet, e.g. stable-diffusion-inpainting) or "
                                               f'"{INPAINT_FROM_BASE}" (the base model\'s own weights as an inpainting pipeline)')
    if not inpaint and is_inpaint:
        raise ConfigError("model_unsupported", f"{key}: {what} is an inpainting model ({index.get('_class_name')}); stage it as models.inpaint, "
                                               f"and give {key} a text-to-image model")
    if inpaint and channels is not None and channels != family.inpaint_channels:
        raise ConfigError("model_invalid", f"{key}: {what} has a UNet of {channels} input channels; an inpainting model has {family.inpaint_channels} "
                                           "(latents, mask, masked image)")


def _unet_channels(config_path: Path) -> int | None:
    try:
        return int(json.loads(config_path.read_text(encoding="utf-8")).get("in_channels"))
    except (OSError, ValueError, TypeError, AttributeError):
        return None  # the completeness check below names what is missing


def _components(index: dict[str, Any]) -> dict[str, tuple[str, str]]:
    """model_index.json entries that are loaded from a subfolder: name -> (library, class)."""
    found: dict[str, tuple[str, str]] = {}
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        library, class_name = value
        if library is None or class_name is None:
            continue  # e.g. "safety_checker": [null, null]
        found[name] = (str(library), str(class_name))
    return found


def _needs_weights(class_name: str) -> bool:
    return not any(word in class_name for word in _NO_WEIGHTS_CLASS_WORDS)


def _has_weights(folder: Path) -> bool:
    return any(p.suffix in _WEIGHT_SUFFIXES for p in folder.iterdir() if p.is_file())


def _default_weight_name(library: str) -> str:
    return "model.safetensors" if library == "transformers" else "diffusion_pytorch_model.safetensors"


# --------------------------------------------------------------------------- the demo model


def demo_model_dir(models_dir: Path) -> Path:
    return Path(models_dir) / DEMO_NAME


def _demo_ref(models_dir: Path, inpaint: bool = False) -> ModelRef:
    folder = Path(models_dir) / (DEMO_INPAINT_NAME if inpaint else DEMO_NAME)
    if not (folder / DEMO_MARKER).is_file() or not (folder / "model_index.json").is_file():
        try:
            # Replace only our own damaged build; never a complete one another process may be loading.
            make_demo_model(folder, replace=(folder / DEMO_MARKER).is_file(), inpaint=inpaint)
        except OSError as exc:
            raise ConfigError("model_missing", f"cannot build the demo model at {folder}: {exc}") from None
    return ModelRef(KIND_DEMO, DEMO_INPAINT_NAME if inpaint else DEMO_NAME, folder, None, Path(models_dir))


def make_demo_model(directory: Path, *, replace: bool = True, inpaint: bool = False, family: str = DEMO_FAMILY) -> Path:
    """Generate the tiny twin of `family` (random weights, seed 0; the demo model is the "sd"
    family's) into `directory`; with `inpaint`, its inpainting twin (the same text encoders, VAE
    and tokenizers; a 9-channel UNet). Tests stage the "sdxl" twin the same way.

    Deterministic: building twice gives byte-identical files, so its hashes in audit logs
    are comparable across machines with the same library versions. The folder appears
    whole or not at all (built beside it, then renamed). An existing demo folder (one with
    DEMO_MODEL.json) is replaced, or kept with `replace=False` (the on-demand build: another
    process may be loading it); any other non-empty folder is refused.
    Takes ~0.2 s once torch and diffusers are imported; ~7 MB on disk.
    """
    directory = Path(directory).absolute()
    started = time.perf_counter()
    _quiet_libraries()
    twin = family_named(family)
    pipe, vocab = twin.build_twin(inpaint=inpaint)
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        pipe.save_pretrained(str(staging), safe_serialization=True)
        # transformers 5 saves the tokenizer as tokenizer.json only; the classic files let
        # the folder load under transformers 4 as well.
        for tokenizer in (component for component in twin.components if component.startswith("tokenizer")):
            (staging / tokenizer / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
            (staging / tokenizer / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
        # The demo model's marker names no family (its bytes are in every demo job's model hashes).
        marker = {"demo": True, "note": "random weights, renders are noise", "seed": DEMO_SEED, "resolution": DEMO_RESOLUTION,
                  **({"inpaint": True} if inpaint else {}), **({"family": twin.name} if twin.name != DEMO_FAMILY else {})}
        (staging / DEMO_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        _make_readable(staging)
        _move_into_place(staging, directory, replace)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    log.info("demo_model_built", path=str(directory), seconds=round(time.perf_counter() - started, 3))
    return directory


def _make_readable(folder: Path) -> None:
    """mkdtemp makes 0700 folders and some writers 0600 files; the models volume is shared."""
    folder.chmod(0o755)
    for path in folder.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _move_into_place(staging: Path, directory: Path, replace: bool) -> None:
    if directory.is_dir() and not any(directory.iterdir()):
        directory.rmdir()
    if not directory.exists():
        try:
            os.rename(staging, directory)
            return
        except OSError:
            if (directory / DEMO_MARKER).is_file():
                return  # another process built it at the same moment: same bytes
            raise
    if not (directory / DEMO_MARKER).is_file():
        raise ConfigError(
            "model_invalid",
            f"{directory} exists and is not a generated demo model (no {DEMO_MARKER}); refusing to overwrite it",
        )
    if not replace:
        return  # an intact demo model is already there (built by another process meanwhile)
    retired = directory.with_name(f".{directory.name}.{os.getpid()}.old")
    os.rename(directory, retired)
    os.rename(staging, directory)
    shutil.rmtree(retired, ignore_errors=True)


# --------------------------------------------------------------------------- loading


def select_device_dtype(settings: Settings) -> tuple[torch.device, torch.dtype]:
    """Device and weight dtype from the hardware and `models.device` / `models.dtype`.

    auto: CUDA when torch sees it, in bfloat16 where the GPU supports it (else float16);
    float32 on CPU, where half precision is slow or unsupported.
    """
    import torch

    wanted_device = settings.models.device
    has_cuda = torch.cuda.is_available()
    if wanted_device == "cuda" and not has_cuda:
        raise ConfigError(
            "device_unavailable",
            f'models.device = "cuda" but torch {torch.__version__} sees no CUDA device; set models.device = "auto" or "cpu"',
        )
    device = torch.device("cuda" if wanted_device == "cuda" or (wanted_device == "auto" and has_cuda) else "cpu")
    if settings.models.dtype != "auto":
        dtype = getattr(torch, settings.models.dtype)
    elif device.type == "cuda":
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32
    return device, dtype


def load_pipeline(ref: ModelRef, settings: Settings) -> Any:
    """Load `ref` as the pipeline class its model_index.json names (a family's text-to-image
    pipeline, or for models.inpaint its inpainting one),
    on the device and in the dtype `select_device_dtype` picks, SDPA attention, no progress bars;
    with models.compile its UNet compiled in place (engine.diffusion.compiling).

    Local forms never touch the network (local_files_only=True). The pipeline keeps the
    components its folder lists (a folder that ships a safety checker keeps it).
    """
    import diffusers
    from diffusers.models.attention_processor import AttnProcessor2_0

    _quiet_libraries()
    started = time.perf_counter()
    device, dtype = select_device_dtype(settings)

    def pipeline_class(index_path: Path) -> Any:
        index = _read_model_index(index_path)
        _pipeline_family(index, index_path)  # one of ours, or a ConfigError naming it
        return getattr(diffusers, index["_class_name"])

    if ref.kind == KIND_SINGLE_FILE:
        if ref.config_path is None or not (ref.config_path / "model_index.json").is_file():
            # Never let from_single_file fall back to fetching configs from the hub.
            raise ConfigError("model_missing", f"{ref.path}: its local config folder {ref.config_path} has no model_index.json")
        pipe = pipeline_class(ref.config_path / "model_index.json").from_single_file(
            str(ref.path), config=str(ref.config_path), local_files_only=True, dtype=dtype
        )
    else:
        folder = _hub_folder(ref) if ref.kind == KIND_HUB else ref.path
        pipe = pipeline_class(folder / "model_index.json").from_pretrained(
            str(folder), dtype=dtype, local_files_only=True, **_variant_kwargs(folder)
        )
    pipe.to(device)
    pipe.unet.set_attn_processor(AttnProcessor2_0())
    pipe.set_progress_bar_config(disable=True)
    if settings.models.compile:
        from engine.diffusion.compiling import compile_unet

        compile_unet(pipe, settings)
    log.info(
        "pipeline_loaded", kind=ref.kind, name=ref.name, pipeline=type(pipe).__name__,
        device=str(device), dtype=str(dtype).removeprefix("torch."), seconds=round(time.perf_counter() - started, 3),
    )
    return pipe


def _variant_kwargs(folder: Path) -> dict[str, str]:
    """Folders shipped with only fp16 files (`*.fp16.safetensors`) need variant="fp16"."""
    unet = folder / "unet"
    if unet.is_dir():
        names = [p.name for p in unet.iterdir()]
        plain = any(n.startswith("diffusion_pytorch_model.") and n.count(".") == 1 for n in names)
        if not plain and any(".fp16." in n for n in names):
            return {"variant": "fp16"}
    return {}


def _hub_folder(ref: ModelRef) -> Path:
    """Download (or find in <models>/hub) the files a pipeline needs. Only reached when
    models.allow_download is true: resolve_model never makes a hub ref otherwise."""
    from diffusers import DiffusionPipeline

    return Path(DiffusionPipeline.download(ref.name, cache_dir=str(ref.path)))


def _quiet_libraries() -> None:
    """No progress bars on stderr from a library that runs inside a daemon (FINDINGS)."""
    import diffusers.utils.logging
    import huggingface_hub.utils
    import transformers.utils.logging

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


# --------------------------------------------------------------------------- hashing


def model_files_hashes(ref: ModelRef) -> dict[str, str]:
    """sha256 of every file the model is loaded from, keyed by a stable relative name.

    diffusers folder: model_index.json and every file of the component subfolders it names
    (weights, configs, tokenizer), e.g. "unet/diffusion_pytorch_model.safetensors".
    single file: the checkpoint's file name, and its config folder under "config/".
    Each file is hashed once per content (engine.hashcache, remembered in <models>/.hash-cache.json),
    so a 5 GB checkpoint costs ~10 s the first time only.
    """
    files = model_files(ref)
    started = time.perf_counter()
    hashed = sha256_of_files(files, ref.models_dir)
    if hashed.files_hashed:
        log.info("model_hashed", name=ref.name, files=len(files), files_hashed=hashed.files_hashed, bytes_hashed=hashed.bytes_hashed,
                 seconds=round(time.perf_counter() - started, 3))
    return dict(sorted(hashed.sha256.items()))


def model_files(ref: ModelRef) -> dict[str, Path]:
    if ref.kind == KIND_SINGLE_FILE:
        files = {ref.path.name: ref.path}
        if ref.config_path is not None:
            files.update({f"config/{name}": path for name, path in _folder_files(ref.config_path).items()})
        return files
    folder = _hub_folder(ref) if ref.kind == KIND_HUB else ref.path
    files = _folder_files(folder)
    if ref.kind == KIND_DEMO and (folder / DEMO_MARKER).is_file():
        files[DEMO_MARKER] = folder / DEMO_MARKER
    return files


def _folder_files(folder: Path) -> dict[str, Path]:
    """model_index.json plus the files of the component subfolders it names (what
    from_pretrained reads; stray top-level checkpoints in a downloaded repo are not)."""
    index_path = folder / "model_index.json"
    files = {"model_index.json": index_path}
    for component in _components(_read_model_index(index_path)):
        sub = folder / component
        if not sub.is_dir():
            continue
        for path in sorted(sub.rglob("*")):
            if path.is_file() and not path.name.startswith(".") and not path.name.endswith(".tmp"):
                files[path.relative_to(folder).as_posix()] = path
    return files
