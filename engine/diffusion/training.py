"""Training a LoRA on the UNet's attention projections (the model family's `lora_targets`), in adaptive phases: the loop, its losses,
its checkpoints, and the LoRA files it writes. The train stage (engine.stages.train) says what
to train for a job (its kind's `lora_runs`: the job's LoRA and, for an evaluate grid, one per
photo-subset group) and runs `train_lora` once per run; other stages never train.

The phases (default: COARSE, MID, MID_FINE, FINAL_FINE) each have their own learning rate,
LoRA alpha, loss and optimizer, and end when their loss has converged (a plateau of the
slope test in `engine.measure.convergence`), at their own step cap, or at the job's total cap.
The whole loop is `train_lora` below, read top to bottom.

- VAE latent distributions and the caption's conditioning (its model family's
  `training_conditioning`: text embeddings, and for SDXL the pooled embedding and time ids) are computed
  once; each step samples from the cached distribution (bit-identical to re-encoding).
- All randomness of the loop comes from one torch.Generator, so a checkpoint (LoRA tensors,
  optimizer, generator and global RNG states, convergence state, phase and step, the phase
  snapshots so far), written atomically every `checkpoint_every` steps and at every phase
  boundary, resumes bit-exactly.
- A checkpoint is never a pickle (the work folder is on a share anyone may write to between a
  kill and the restart): a generation is `<prefix>-<step:06d>.safetensors` (every tensor) and
  `.json` beside it (everything else, tensors named by key), and both files' sha256 go into the
  audit log when they are written (`train_checkpoint`). A resume takes the newest generation
  whose files are as this stage run recorded them (StageContext.read_recorded); one that is not
  is audited `resume_artifact_mismatch`, deleted, and the next older one tried. The two newest
  generations are kept.
- alpha is applied by setting each LoRA layer's scaling to alpha / r (peft keeps no alpha in
  its state dict, so it is re-applied on resume and written into the saved file's metadata).
- A phase snapshot (`LoraTarget.snapshots`) is the LoRA as it stood when that phase exited,
  with that phase's alpha: an evaluate group that asks for it costs no training step.
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from engine import layout
from engine.diffusion.families import UNET_ATTENTION, family_of
from engine.measure.convergence import RULE_IMPROVEMENT_BOUND, PhaseConvergence
from engine.errors import JobError
from engine.faults import pause_point
from engine.fsutil import check_write, remove_tree, sha256_bytes
from engine.schema import to_plain

if TYPE_CHECKING:  # annotations only: the stage context and the [train] section sit in the job room, above this one
    from engine.context import StageContext
    from engine.kinds.sections import PhaseSpec, TrainSpec


ADAPTER = "identity_train"  # not "training": that is an nn.Module attribute
TARGET_MODULES = list(UNET_ATTENTION)  # what the SD and SDXL families' LoRAs train (the tests and benches name it)
CHARBONNIER_EPS = 1e-3
HUBER_DELTA = 1.0


@dataclass(frozen=True)
class LoraTarget:
    """Where one training run's results go. `directory`: its LoRA folder (diffusers' format);
    `checkpoint`: the prefix of its checkpoint generations' files, relative to the job folder
    (`<checkpoint>-<step:06d>.safetensors` and `.json`); `kohya(alpha, steps)`: the
    kohya-format file's name and metadata, for the job's own LoRA (None: not written);
    `snapshots`: phase name -> the folder of that phase's snapshot; `run`: "" for the job's
    own LoRA, else a name its audit lines and progress carry."""

    directory: Path
    checkpoint: str
    kohya: Callable[[float, int], tuple[str, dict[str, str]]] | None = None
    snapshots: dict[str, Path] = field(default_factory=dict)
    run: str = ""

    def tagged(self, **fields: Any) -> dict[str, Any]:
        return {**fields, "run": self.run} if self.run else fields


def caption(spec: TrainSpec) -> str:
    return f"a photo of {spec.trigger}"


@dataclass
class TrainingResult:
    phases: list[dict[str, Any]]  # per phase: settings, steps, exit reason, summary
    history: list[tuple]  # (phase, global step, phase step, loss, probe loss or None)
    total_steps: int
    resumed_from_step: int | None  # this call resumed from a checkpoint at that step (audit: train_resumed)
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)  # phase -> alpha, step, reached (the phase exited)


def train_lora(ctx: StageContext, pipe: Any, images: torch.Tensor, spec: TrainSpec, target: LoraTarget) -> TrainingResult:
    """The training loop: phases, losses, optimizer swaps, convergence, checkpoints; the LoRA
    (and its phase snapshots) written where `target` says. Eager, also when the UNet is compiled
    for rendering (models.compile; engine.diffusion.compiling says why)."""
    from engine.diffusion.compiling import eager

    with eager():
        return _train_lora(ctx, pipe, images, spec, target)


def _train_lora(ctx: StageContext, pipe: Any, images: torch.Tensor, spec: TrainSpec, target: LoraTarget) -> TrainingResult:
    from diffusers import DDPMScheduler
    from peft import LoraConfig
    from peft.utils import set_peft_model_state_dict

    unet = pipe.unet
    device = unet.device
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    latent_mean, latent_std = _encode_latents(pipe, images)
    text, added_cond = _encode_text(pipe, caption(spec), images.shape[-1])

    probe = make_probe_set(latent_mean, latent_std, spec.probe_size, noise_scheduler.config.num_train_timesteps, spec.seed) \
        if spec.convergence == RULE_IMPROVEMENT_BOUND else None

    torch.manual_seed(spec.seed)  # LoRA init (peft draws from the global generator)
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=spec.rank, lora_alpha=spec.phases[0].alpha, init_lora_weights="gaussian",
                                target_modules=list(family_of(pipe).lora_targets)), adapter_name=ADAPTER)
    unet.set_adapter(ADAPTER)
    lora_parameters = [p for n, p in unet.named_parameters() if ADAPTER in n]
    for parameter in lora_parameters:
        parameter.data = parameter.data.float()  # train LoRA weights in fp32 even on a bf16 UNet
        parameter.requires_grad_(True)
    generator = torch.Generator(device="cpu").manual_seed(spec.seed)

    state = TrainState(convergence=_new_convergence(spec, spec.phases[0]))
    resumed_from = None
    checkpoint = _load_checkpoint(ctx, target)
    if checkpoint is not None:
        set_peft_model_state_dict(unet, checkpoint["lora"], adapter_name=ADAPTER)
        state = TrainState.from_checkpoint(checkpoint, spec)
        _restore_rng(checkpoint["rng"], generator)
        resumed_from = state.global_step
        phase_name = spec.phases[min(state.phase_index, len(spec.phases) - 1)].name
        ctx.audit.event("train_resumed", **target.tagged(step=state.global_step, phase=phase_name, phase_step=state.phase_step))
        ctx.log.info("train_resumed", **target.tagged(step=state.global_step, phase_step=state.phase_step))
        ctx.progress("train_resumed", **target.tagged(step=state.global_step, phase=phase_name))

    unet.train()
    try:
        while state.phase_index < len(spec.phases) and state.global_step < spec.max_steps:
            phase = spec.phases[state.phase_index]
            set_lora_alpha(unet, phase.alpha)
            optimizer = _optimizer(phase, lora_parameters)
            if state.optimizer_state is not None:  # restored from the checkpoint: the phase goes on where it stood
                optimizer.load_state_dict(state.optimizer_state)
                state.optimizer_state = None
            convergence = state.convergence
            # Read back from the objects the loop really uses (the tests check these, not the config).
            ctx.progress("phase_observed", phase=phase.name, optimizer_class=type(optimizer).__name__, optimizer_lr=optimizer.param_groups[0]["lr"],
                         lora_scalings=sorted(lora_scalings(unet)), loss_function=LOSS_FUNCTIONS[phase.loss].__name__)
            if state.phase_step == 0:
                ctx.audit.event("phase_started", **target.tagged(phase=phase.name, lr=phase.lr, alpha=phase.alpha, loss=phase.loss, optimizer=phase.optimizer,
                                                                 step=state.global_step))
            exit_reason, fired_at = None, None
            block: list[tuple[int, int, torch.Tensor, torch.Tensor | None]] = []  # (step, phase step, loss, probe loss) not yet read
            while exit_reason is None:
                loss = _training_step(unet, noise_scheduler, latent_mean, latent_std, text, added_cond, phase, spec.batch_size, generator, device)
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                state.phase_step += 1
                state.global_step += 1
                step = state.global_step
                probed = None
                if probe is not None and convergence.wants_probe(state.phase_step):
                    probed = probe_loss_tensor(unet, noise_scheduler, probe, text, added_cond, phase, device)
                block.append((step, state.phase_step, loss.detach(), probed))
                at_checkpoint = step % spec.checkpoint_every == 0
                if not (state.phase_step % spec.sync_every == 0 or at_checkpoint or state.phase_step >= phase.max_steps or step >= spec.max_steps):
                    continue  # the losses stay on the device: no host sync inside a block
                # The block's end: its losses read to the host at once, fed to the convergence test in order.
                values = torch.stack([row[2] for row in block]).tolist()
                probes = iter(torch.stack([row[3] for row in block if row[3] is not None]).tolist() if any(row[3] is not None for row in block) else [])
                for (row_step, row_phase_step, _, row_probe), value in zip(block, values):
                    probe_value = next(probes) if row_probe is not None else None
                    state.history.append((phase.name, row_step, row_phase_step, value, probe_value))
                    ctx.progress("train_step", **target.tagged(phase=phase.name, step=row_step, phase_step=row_phase_step, loss=value))
                    if exit_reason is None:
                        exit_reason = convergence.update(value, probe_value)
                        fired_at = row_phase_step if exit_reason is not None else None
                block = []
                if exit_reason is None and step >= spec.max_steps:
                    exit_reason, fired_at = "total_cap", state.phase_step
                if exit_reason is None and at_checkpoint:
                    _save_checkpoint(ctx, target, unet, state, optimizer, generator)
                    pause_point(f"train:checkpoint:{step}")
                    ctx.check_stop(f"train step {step}")
            summary = convergence.summary()
            # With sync_every > 1 an exit is seen at the end of its block: the phase trained on to it. The step it fired at is kept.
            fired = {} if fired_at == state.phase_step else {"exit_fired_at_phase_step": fired_at}
            state.phase_records.append({**to_plain(phase), "steps": state.phase_step, "exit_reason": exit_reason, "last_step": state.global_step,
                                        **fired, "summary": summary})
            ctx.audit.event("phase_exit", **target.tagged(phase=phase.name, step=state.global_step, phase_steps=state.phase_step, reason=exit_reason,
                                                          **fired, **{k: v for k, v in summary.items() if k != "steps"}))
            if phase.name in target.snapshots:
                state.snapshots[phase.name] = _snapshot(unet, phase.alpha, state.global_step)
            ctx.log.info("phase_exit", run=target.run or "main", phase=phase.name, step=state.global_step, reason=exit_reason, p_value=summary["p_value"],
                         improvement_upper=summary.get("improvement_upper"), allowed=summary.get("allowed"), probe_loss=summary.get("probe_loss"))
            if exit_reason == "non_finite":
                raise JobError("training_diverged", f"training phase {phase.name} produced a non-finite loss at step {state.global_step}; "
                                                    "lower its lr in [[train.phases]]")
            state.next_phase(spec)
            _save_checkpoint(ctx, target, unet, state, None, generator)
            pause_point(f"train:phase_boundary:{state.phase_index}")
            ctx.check_stop(f"train phase boundary {state.phase_index}")
        final_alpha = spec.phases[min(state.phase_index, len(spec.phases)) - 1].alpha
        for skipped in spec.phases[state.phase_index:]:
            state.phase_records.append({**to_plain(skipped), "steps": 0, "exit_reason": "total_cap", "last_step": state.global_step, "summary": None})
            if skipped.name in target.snapshots:  # never reached: the LoRA stood where training stopped
                state.snapshots[skipped.name] = _snapshot(unet, final_alpha, state.global_step, reached=False)
        save_lora(pipe, unet, target.directory, final_alpha, kohya=target.kohya(final_alpha, state.global_step) if target.kohya else None)
        for name, snapshot in state.snapshots.items():
            save_lora(pipe, unet, target.snapshots[name], snapshot["alpha"], layers=snapshot["lora"])
    finally:
        unet.eval()
        unet.delete_adapters(ADAPTER)  # the pipeline is shared with later jobs
    snapshots = {name: {"alpha": s["alpha"], "step": s["step"], "reached": s["reached"]} for name, s in state.snapshots.items()}
    return TrainingResult(state.phase_records, state.history, state.global_step, resumed_from, snapshots)


def _snapshot(unet: torch.nn.Module, alpha: float, step: int, reached: bool = True) -> dict[str, Any]:
    """The training adapter's weights now, on the CPU, with the alpha they are used at."""
    from peft.utils import get_peft_model_state_dict

    layers = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(unet, adapter_name=ADAPTER).items()}
    return {"lora": layers, "alpha": alpha, "step": step, "reached": reached}


@dataclass
class TrainState:
    """Where the training loop stands: what a checkpoint saves and a resume restores, the same
    fields both ways (`to_checkpoint` / `from_checkpoint`). The LoRA weights and the random
    generators are saved beside it (`_save_checkpoint`)."""

    phase_index: int = 0
    phase_step: int = 0  # steps done in the current phase
    global_step: int = 0
    history: list[tuple] = field(default_factory=list)  # (phase, global step, phase step, loss, probe loss or None)
    phase_records: list[dict[str, Any]] = field(default_factory=list)  # the phases done, as train.json lists them
    convergence: PhaseConvergence | None = None  # the current phase's test; None once every phase is done
    optimizer_state: dict[str, Any] | None = None  # restored mid-phase, for the phase's optimizer to load
    snapshots: dict[str, dict[str, Any]] = field(default_factory=dict)  # phase -> its LoRA at its exit (engine.diffusion.training._snapshot)

    def next_phase(self, spec: TrainSpec) -> None:
        self.phase_index += 1
        self.phase_step = 0
        self.convergence = _new_convergence(spec, spec.phases[self.phase_index]) if self.phase_index < len(spec.phases) else None

    def to_checkpoint(self, optimizer: Any) -> dict[str, Any]:
        """`optimizer`: the phase's, mid-phase; None at a phase boundary (the next phase makes its own)."""
        return {"phase_index": self.phase_index, "phase_step": self.phase_step, "global_step": self.global_step,
                "history": [list(row) for row in self.history],
                "phase_records": self.phase_records, "convergence": self.convergence.to_dict() if self.convergence is not None else None,
                "optimizer": optimizer.state_dict() if optimizer is not None else None, "snapshots": self.snapshots}

    @classmethod
    def from_checkpoint(cls, data: dict[str, Any], spec: TrainSpec) -> "TrainState":
        state = cls(phase_index=data["phase_index"], phase_step=data["phase_step"], global_step=data["global_step"],
                    history=[tuple(row) for row in data["history"]], phase_records=data["phase_records"], optimizer_state=data["optimizer"],
                    snapshots=data["snapshots"])
        if state.phase_index < len(spec.phases):
            state.convergence = (PhaseConvergence.from_dict(data["convergence"]) if data["convergence"]
                                 else _new_convergence(spec, spec.phases[state.phase_index]))
        return state


def set_lora_alpha(unet: torch.nn.Module, alpha: float) -> None:
    """Change the LoRA scaling (alpha / r) of every LoRA layer of the training adapter."""
    from peft.tuners.lora import LoraLayer

    for module in unet.modules():
        if isinstance(module, LoraLayer) and ADAPTER in module.r:
            module.scaling[ADAPTER] = alpha / module.r[ADAPTER]


def lora_scalings(unet: torch.nn.Module) -> set[float]:
    """The distinct scalings of the training adapter's layers (for tests and the log)."""
    from peft.tuners.lora import LoraLayer

    return {module.scaling[ADAPTER] for module in unet.modules() if isinstance(module, LoraLayer) and ADAPTER in module.scaling}


def save_lora(pipe: Any, unet: torch.nn.Module, directory: Path, alpha: float, *, kohya: tuple[str, dict[str, str]] | None = None,
              layers: dict[str, torch.Tensor] | None = None) -> None:
    """pytorch_lora_weights.safetensors in the diffusers format, alpha in its metadata; with
    `kohya` (file name, metadata), the same LoRA in kohya's format beside it. Both appear at once
    (written into a staging folder, then one rename).

    Without the metadata, `load_lora_weights` assumes alpha = r and the reloaded LoRA would
    be wrong whenever alpha != r (FINDINGS)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from engine.diffusion.kohya import kohya_state_dict

    peft_layers = layers if layers is not None else get_peft_model_state_dict(unet, adapter_name=ADAPTER)
    diffusers_layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in convert_state_dict_to_diffusers(peft_layers).items()}
    metadata = unet.peft_config[ADAPTER].to_dict()
    metadata["lora_alpha"] = alpha
    metadata.pop("alpha_pattern", None)
    # peft keeps target_modules as a set: its order changes between processes (hash
    # randomisation), which would make equal LoRAs differ byte for byte.
    metadata["target_modules"] = sorted(metadata["target_modules"])
    staging = directory.with_name(f".{directory.name}{layout.INCOMING_SUFFIX}")
    remove_tree(staging)
    staging.parent.mkdir(parents=True, exist_ok=True)
    type(pipe).save_lora_weights(str(staging), unet_lora_layers=diffusers_layers, unet_lora_adapter_metadata=metadata, safe_serialization=True)
    canonicalise_safetensors_header(staging / layout.LORA_WEIGHTS)
    if kohya is not None:
        name, kohya_meta = kohya
        save_file(kohya_state_dict(peft_layers, alpha), str(staging / name), metadata=kohya_meta)
        canonicalise_safetensors_header(staging / name)
    remove_tree(directory)
    check_write(str(directory))
    staging.rename(directory)


def canonicalise_safetensors_header(path: Path) -> None:
    """Rewrite a .safetensors header with sorted keys, in place.

    safetensors writes its `__metadata__` from a hash map, so the key order (and with it the
    file's sha256) changes from process to process although nothing else does. Readers
    locate tensors by their explicit offsets, so key order is free; the header keeps its
    length (padded with spaces, as the format allows) and the tensor bytes are untouched.
    """
    import struct

    with open(path, "r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
        canonical = json.dumps(header, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        if len(canonical) > length:
            return  # cannot happen for the same content; leave the file as safetensors wrote it
        handle.seek(8)
        handle.write(canonical + b" " * (length - len(canonical)))
        handle.flush()
        os.fsync(handle.fileno())


def _training_step(unet, noise_scheduler, latent_mean, latent_std, text, added_cond, phase: PhaseSpec, batch_size: int,
                   generator: torch.Generator, device: torch.device) -> torch.Tensor:
    count = latent_mean.shape[0]
    index = torch.randint(0, count, (batch_size,), generator=generator)
    mean, std = latent_mean[index], latent_std[index]
    latents = mean + std * torch.randn(mean.shape, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,), generator=generator)
    return _denoising_loss(unet, noise_scheduler, latents, noise, timesteps, text, added_cond, phase, device)


@dataclass(frozen=True)
class ProbeSet:
    """Fixed (latent, noise, timestep) tuples: the loss on them changes only as the weights do,
    not with the random draw of each step, so it shows a trend the per-step loss hides.

    Drawn once from a generator of its own (`seed + PROBE_SEED_OFFSET`): evaluating it takes
    nothing from the training generator, so a resume stays bit-exact. One timestep per equal
    slice of [0, T): the probe sees every noise level, not a random handful."""

    latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor


PROBE_SEED_OFFSET = 0x9E3779B9


def make_probe_set(latent_mean: torch.Tensor, latent_std: torch.Tensor, size: int, num_train_timesteps: int, seed: int) -> ProbeSet:
    generator = torch.Generator(device="cpu").manual_seed((seed + PROBE_SEED_OFFSET) % 2**63)
    index = torch.arange(size) % latent_mean.shape[0]  # every training image in turn
    mean, std = latent_mean[index], latent_std[index]
    latents = mean + std * torch.randn(mean.shape, generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    offsets = torch.rand(size, generator=generator, dtype=torch.float64)
    timesteps = ((torch.arange(size, dtype=torch.float64) + offsets) * num_train_timesteps / size).long().clamp(0, num_train_timesteps - 1)
    return ProbeSet(latents, noise, timesteps)


def probe_loss(unet, noise_scheduler, probe: ProbeSet, text, added_cond, phase: PhaseSpec, device: torch.device) -> float:
    """The phase's loss on the probe set, with today's weights (no gradients, no optimizer step)."""
    return float(probe_loss_tensor(unet, noise_scheduler, probe, text, added_cond, phase, device))


@torch.no_grad()
def probe_loss_tensor(unet, noise_scheduler, probe: ProbeSet, text, added_cond, phase: PhaseSpec, device: torch.device) -> torch.Tensor:
    """`probe_loss` left on the device (read with the block it belongs to)."""
    return _denoising_loss(unet, noise_scheduler, probe.latents, probe.noise, probe.timesteps, text, added_cond, phase, device).detach()


def _denoising_loss(unet, noise_scheduler, latents, noise, timesteps, text, added_cond, phase: PhaseSpec, device: torch.device) -> torch.Tensor:
    batch_size = latents.shape[0]
    latents, noise, timesteps = latents.to(device), noise.to(device), timesteps.to(device)
    noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    if noise_scheduler.config.prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        target = noise
    encoder_states = text.expand(batch_size, -1, -1)
    kwargs = {}
    if added_cond is not None:
        kwargs["added_cond_kwargs"] = {k: v.expand(batch_size, -1) for k, v in added_cond.items()}
    with torch.autocast(device_type=device.type, dtype=unet.dtype, enabled=device.type == "cuda" and unet.dtype != torch.float32):
        prediction = unet(noisy.to(unet.dtype), timesteps, encoder_states, **kwargs).sample
    return LOSS_FUNCTIONS[phase.loss](prediction.float(), target.float())


def mse_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(prediction, target)


def huber_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.huber_loss(prediction, target, delta=HUBER_DELTA)


def charbonnier(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """A smooth L1: sqrt(d^2 + eps^2), robust to outliers and differentiable at 0."""
    return torch.sqrt((prediction - target) ** 2 + CHARBONNIER_EPS**2).mean()


LOSS_FUNCTIONS = {"mse": mse_loss, "huber": huber_loss, "charbonnier": charbonnier}


def _optimizer(phase: PhaseSpec, parameters: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    if phase.optimizer == "adamp":
        from adamp import AdamP

        return AdamP(parameters, lr=phase.lr)
    # fused: one kernel for the whole update on a CUDA device (torch's fastest AdamW; on the CPU
    # torch's default foreach path is kept, so CPU results stay as they were).
    return torch.optim.AdamW(parameters, lr=phase.lr, fused=bool(parameters) and parameters[0].is_cuda)


def _new_convergence(spec: TrainSpec, phase: PhaseSpec) -> PhaseConvergence:
    return PhaseConvergence(min_steps=phase.min_steps, max_steps=phase.max_steps, window=spec.plateau_window, p_threshold=spec.plateau_p_value,
                            rule=spec.convergence, probe_every=spec.probe_every, horizon=spec.convergence_horizon,
                            epsilon=spec.convergence_epsilon, confidence=spec.convergence_confidence)


@torch.no_grad()
def _encode_latents(pipe: Any, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std of the VAE's latent distribution of every training image, scaled, on the CPU."""
    vae = pipe.vae
    distribution = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    scale = vae.config.scaling_factor
    return (distribution.mean.float() * scale).cpu(), (distribution.std.float() * scale).cpu()


@torch.no_grad()
def _encode_text(pipe: Any, prompt: str, resolution: int) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
    """The caption's conditioning, once: its text embeddings and the UNet's added conditioning
    (None, or SDXL's pooled embedding and time ids), as the model's family encodes it."""
    return family_of(pipe).training_conditioning(pipe, prompt, resolution)


CHECKPOINT_FORMAT = 1  # the .json's "format": tensors in the .safetensors beside it, the rest here; never a pickle
KEEP_GENERATIONS = 2  # checkpoint generations kept on disk per training run: the newest, and one to fall back to


def _generation_files(target: LoraTarget, step: int) -> tuple[str, str]:
    """The (tensors, sidecar) files of the generation at `step`, relative to the job folder."""
    stem = f"{target.checkpoint}-{step:06d}"
    return f"{stem}.safetensors", f"{stem}.json"


def _generations_on_disk(ctx: StageContext, target: LoraTarget) -> list[int]:
    """The steps of the generations with at least one file on disk, newest first."""
    folder = ctx.path(target.checkpoint).parent
    pattern = re.compile(re.escape(Path(target.checkpoint).name) + r"-(\d{6,})\.(?:safetensors|json)")
    steps = set()
    if folder.is_dir():
        for entry in os.scandir(folder):
            match = pattern.fullmatch(entry.name)
            if match and match.group(1) == f"{int(match.group(1)):06d}":  # the name _generation_files gives, no other spelling
                steps.add(int(match.group(1)))
    return sorted(steps, reverse=True)


def _remove_generation(ctx: StageContext, target: LoraTarget, step: int) -> None:
    for relative in _generation_files(target, step):
        remove_tree(ctx.path(relative))


def _save_checkpoint(ctx: StageContext, target: LoraTarget, unet: Any, state: TrainState, optimizer: Any, generator: torch.Generator) -> None:
    """Write the generation at this step (tensors, then the sidecar), record both files' sha256
    in the audit log (`train_checkpoint`), then delete all but the newest KEEP_GENERATIONS."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save

    checkpoint = {
        **state.to_checkpoint(optimizer),
        "lora": get_peft_model_state_dict(unet, adapter_name=ADAPTER),
        "rng": _rng_state(generator),
    }
    tensors: dict[str, torch.Tensor] = {}
    plain = _split_tensors(checkpoint, "", tensors)
    tensor_bytes = save(tensors)
    tensors_file, sidecar_file = _generation_files(target, state.global_step)
    sidecar = {"format": CHECKPOINT_FORMAT, "fingerprint": ctx.fingerprint, "step": state.global_step, "torch_threads": torch.get_num_threads(),
               "tensors_file": Path(tensors_file).name, "tensors_sha256": sha256_bytes(tensor_bytes), "state": plain}
    sidecar_bytes = (json.dumps(sidecar, sort_keys=True, indent=1, allow_nan=True) + "\n").encode("utf-8")
    ctx.write_recorded("train_checkpoint", {tensors_file: tensor_bytes, sidecar_file: sidecar_bytes}, **target.tagged(step=state.global_step))
    for step in _generations_on_disk(ctx, target)[KEEP_GENERATIONS:]:
        _remove_generation(ctx, target, step)


def _load_checkpoint(ctx: StageContext, target: LoraTarget) -> dict[str, Any] | None:
    """The newest checkpoint generation that this very stage run wrote and recorded, or None
    (train from the start). A generation whose files are missing, or not as the audit log
    recorded them, is deleted (StageContext.read_recorded audits `resume_artifact_mismatch`)
    and the next older one is tried. Nothing here unpickles: JSON and safetensors only, each
    parsed from the very bytes whose hash was checked."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    legacy = ctx.path(target.checkpoint + ".pt")
    if os.path.lexists(legacy):  # an older engine's pickle, or one planted there: never read
        ctx.audit.event("train_checkpoint_ignored", **target.tagged(file=f"{target.checkpoint}.pt", reason="a pickle (older format): never read"))
    for step in _generations_on_disk(ctx, target):
        tensors_file, sidecar_file = _generation_files(target, step)
        sidecar_bytes = ctx.read_recorded(sidecar_file, **target.tagged(step=step))
        tensor_bytes = ctx.read_recorded(tensors_file, **target.tagged(step=step))
        if sidecar_bytes is None or tensor_bytes is None:
            _remove_generation(ctx, target, step)
            continue
        try:
            sidecar = json.loads(sidecar_bytes.decode("utf-8"))
            if sidecar.get("format") != CHECKPOINT_FORMAT or sidecar.get("fingerprint") != ctx.fingerprint or sidecar.get("step") != step:
                raise ValueError("written for another format, stage run or step")
            if sidecar.get("tensors_sha256") != sha256_bytes(tensor_bytes):
                raise ValueError("its tensors file is not the one its sidecar names")
            checkpoint = _join_tensors(sidecar["state"], load(tensor_bytes))
            checkpoint["torch_threads"] = sidecar.get("torch_threads")
        except (SafetensorError, ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:  # recorded but unusable: the next older one
            ctx.audit.event("train_checkpoint_ignored", **target.tagged(file=sidecar_file, step=step, reason=f"{type(exc).__name__}: {str(exc)[:200]}"))
            _remove_generation(ctx, target, step)
            continue
        if checkpoint["torch_threads"] != torch.get_num_threads():
            ctx.log.warning("train_threads_differ", checkpoint=checkpoint["torch_threads"], now=torch.get_num_threads())
        return checkpoint
    return None


def _split_tensors(value: Any, key: str, tensors: dict[str, torch.Tensor]) -> Any:
    """`value` as JSON, each tensor moved into `tensors` under its key path and replaced by
    {"$tensor": key}; a tuple becomes {"$tuple": [...]}, a dict with keys other than strings
    (an optimizer's state, by parameter index) {"$items": [[key, value], ...]}. Every python
    scalar stays what it was (`_join_tensors` gives back the very same structure)."""
    if isinstance(value, torch.Tensor):
        tensors[key] = value.detach().to("cpu").contiguous()
        return {"$tensor": key}
    if isinstance(value, tuple):
        return {"$tuple": [_split_tensors(item, f"{key}.{i}", tensors) for i, item in enumerate(value)]}
    if isinstance(value, list):
        return [_split_tensors(item, f"{key}.{i}", tensors) for i, item in enumerate(value)]
    if isinstance(value, dict):
        if all(isinstance(k, str) and not k.startswith("$") for k in value):
            return {k: _split_tensors(item, f"{key}.{k}" if key else k, tensors) for k, item in value.items()}
        if not all(isinstance(k, (str, int)) and not isinstance(k, bool) for k in value):
            raise TypeError(f"checkpoint {key}: keys of type {sorted({type(k).__name__ for k in value})} cannot be saved")
        return {"$items": [[k, _split_tensors(item, f"{key}.{k}", tensors)] for k, item in value.items()]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, np.generic):  # a numpy scalar in a phase summary: its python value
        return value.item()
    raise TypeError(f"checkpoint {key}: a {type(value).__name__} cannot be saved (tensors, JSON scalars, lists, tuples and dicts only)")


def _join_tensors(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """The inverse of `_split_tensors`."""
    if isinstance(value, list):
        return [_join_tensors(item, tensors) for item in value]
    if isinstance(value, dict):
        if set(value) == {"$tensor"}:
            return tensors[value["$tensor"]]
        if set(value) == {"$tuple"}:
            return tuple(_join_tensors(item, tensors) for item in value["$tuple"])
        if set(value) == {"$items"}:
            return {k: _join_tensors(item, tensors) for k, item in value["$items"]}
        return {k: _join_tensors(item, tensors) for k, item in value.items()}
    return value


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every random generator the loop touches, as tensors and JSON scalars (no pickle needed)."""
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"generator": generator.get_state(), "torch": torch.get_rng_state(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(position), "has_gauss": int(has_gauss),
                      "cached_gaussian": float(cached_gaussian)},
            "python": {"version": version, "state": list(internal), "gauss_next": gauss_next}}


def _restore_rng(rng: dict[str, Any], generator: torch.Generator) -> None:
    generator.set_state(rng["generator"])
    torch.set_rng_state(rng["torch"])
    numpy_state = rng["numpy"]
    np.random.set_state((numpy_state["kind"], numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"], numpy_state["has_gauss"],
                         numpy_state["cached_gaussian"]))
    python_state = rng["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss_next"]))
