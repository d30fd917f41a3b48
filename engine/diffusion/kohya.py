"""The job's LoRA in kohya's format: the interchange format for SD LoRAs, which AUTOMATIC1111 /
Forge, ComfyUI, InvokeAI and Fooocus read (and diffusers' `load_lora_weights` too).

Keys: `lora_unet_<module path with _>.lora_down.weight` / `.lora_up.weight`, and one `.alpha`
scalar per module. Tools scale a module by alpha / rank, so `.alpha` holds the final phase's
alpha, not the rank diffusers' own converter writes (`convert_state_dict_to_kohya` sets alpha =
rank, which would change the LoRA's strength whenever alpha != rank). The module paths are
diffusers' for every family; the base model's version and architecture in the metadata are the
model family's (engine.diffusion.families: `kohya_base_version`, `kohya_architecture`).

Metadata follows kohya's conventions (`ss_*`, read by the tools' LoRA browsers, and
`modelspec.*`) plus our own `idrep.*` keys, so a file that travels alone says where it came
from: the job, the subject, the trigger word, the base model's sha256, and the fingerprint of
the train stage (the job's audit log has a `stage_started` line with that fingerprint). The
audit head itself is left out on purpose: it differs between a resumed job and a clean run of
the same inputs, and the LoRA must not.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from engine.fsutil import canonical_json, sha256_bytes

if TYPE_CHECKING:
    import torch

    from engine.diffusion.families import Family


def kohya_file_name(subject: str, job_id: str) -> str:
    """`<subject>_<job-id>.safetensors`: the name says whose LoRA it is when it is copied elsewhere."""
    return f"{subject}_{job_id}.safetensors"


def kohya_state_dict(peft_layers: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """A UNet's LoRA in kohya's keys, from peft's state dict (`get_peft_model_state_dict`),
    with `.alpha` = `alpha` on every module."""
    import torch
    from diffusers.utils import convert_state_dict_to_kohya

    converted = convert_state_dict_to_kohya({f"unet.{key}": value for key, value in peft_layers.items()})
    out: dict[str, torch.Tensor] = {}
    for key, value in converted.items():
        if key.endswith(".alpha"):
            out[key] = torch.tensor(float(alpha), dtype=torch.float32)
        else:
            out[key] = value.detach().to("cpu", torch.float32).contiguous()
    return out


def base_model_digest(hashes: dict[str, str]) -> str:
    """One sha256 for a base model of several files: of the sorted {file: sha256} map, as
    canonical JSON (the map is in the manifest, under `models`)."""
    return sha256_bytes(canonical_json(dict(sorted(hashes.items()))).encode("utf-8"))


def kohya_metadata(*, family: Family, rank: int, alpha: float, resolution: int, steps: int, max_steps: int, images: int,
                   output_name: str, trigger: str, job_id: str, subject: str, base_model_hashes: dict[str, str],
                   train_fingerprint: str, demo: bool, engine_version: str) -> dict[str, str]:
    """safetensors metadata (every value a string, as the format wants); the base model's
    version and architecture as `family` names them for kohya's tools."""
    version, architecture = family.kohya_base_version, family.kohya_architecture
    return {
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(rank),
        "ss_network_alpha": f"{float(alpha):g}",
        "ss_base_model_version": version,
        "ss_v2": "False",
        "ss_resolution": f"({resolution}, {resolution})",
        "ss_steps": str(steps),
        "ss_max_train_steps": str(max_steps),
        "ss_num_train_images": str(images),
        "ss_output_name": output_name,
        "ss_tag_frequency": json.dumps({"identity": {trigger: images}}, sort_keys=True),  # the trigger word, for the tools' LoRA browsers
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": architecture,
        "modelspec.implementation": "diffusers",
        "modelspec.title": output_name,
        "modelspec.trigger_phrase": trigger,
        "idrep.job_id": job_id,
        "idrep.subject": subject,
        "idrep.trigger": trigger,
        "idrep.base_model_sha256": base_model_digest(base_model_hashes),
        "idrep.base_model_files": json.dumps(dict(sorted(base_model_hashes.items())), sort_keys=True),
        "idrep.train_fingerprint": train_fingerprint,
        "idrep.demo": str(demo).lower(),
        "idrep.engine_version": engine_version,
        "idrep.note": "made by identity-replication-daemon; the job's audit log, manifest and report hold its evidence",
    }


def read_kohya_metadata(path: Any) -> dict[str, str]:
    """The metadata of a kohya LoRA file (for tests and `verify`-style readers)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return dict(handle.metadata() or {})
