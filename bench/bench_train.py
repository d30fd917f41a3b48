"""Seconds per LoRA training step: the engine's step against a re-encode-every-step baseline.

    python bench/bench_train.py [--steps 30] [--repeats 4] [--warmup 3] [--batch-size 1] [--threads 1]
                                [--baseline-attention both|classic|sdpa]

What is measured, on the tiny demo model (engine.diffusion.models.make_demo_model), 128-px crops of
scikit-image's astronaut, one UNet LoRA (r=4 on engine.diffusion.training.TARGET_MODULES), AdamW:

  ours      engine.diffusion.training._training_step on the VAE latent distribution and the text
            embedding computed once (engine.diffusion.training._encode_latents / _encode_text,
            outside the timed loop), then backward, optimizer step, zero_grad. This is the
            inner loop of `train_lora`, minus its bookkeeping (convergence, checkpoints).
  baseline  a plain loop in the style of diffusers' examples/dreambooth/train_dreambooth_lora.py:
            every step tokenizes the caption, runs the text encoder, runs
            `vae.encode(pixels).latent_dist.sample() * scaling_factor`, then noise, timesteps,
            add_noise, UNet, MSE, backward, optimizer step, zero_grad. (The example's gradient
            clipping and learning-rate scheduler are left out: the engine has neither, and
            the comparison is about re-encoding, nothing else.)
            It runs with one of two attention implementations in the UNet and the VAE:
    baseline-classic  diffusers' classic `AttnProcessor` (explicit baddbmm + softmax + bmm),
            the "default attention" the issue asks the baseline to use;
    baseline-sdpa     `AttnProcessor2_0` (torch's scaled_dot_product_attention), which the
            engine sets on its UNet (engine.diffusion.models.load_pipeline) and diffusers picks on torch 2:
            the pure re-encoding comparison, same attention as ours.
            With both (the default) one run separates the two effects: sdpa / ours is what
            encoding once saves, classic / sdpa what SDPA saves, classic / ours both together.
            The processors are switched between steps, outside the timed calls; one UNet
            forward with each is compared first (printed: they compute the same attention).

Both read the loss back as a Python float each step, as both real loops do for logging.
Why: caching the encodings is the trainer's one speed claim (FINDINGS: 17-30 % faster on
the tiny model, where the UNet dominates); this puts a number on it in one run, same
pipeline, same adapter, same optimizer. The loops alternate step by step (and which
goes first), in `--repeats` rounds, so that load from other processes on a shared machine
falls on both alike (with three loops the order rotates); each round begins with untimed
warm-up steps of each loop (the first calls allocate and pick kernels). Prints wall-clock
median, mean and min seconds per step, the median CPU seconds per step (the process's CPU
time: the work done, nearly free of the waiting that other processes cause) and the ratios
of each: every baseline / ours, and classic / sdpa when both run.

A benchmark, not a test: it asserts nothing except that the baseline's inputs equal the
engine's cached ones and that both attention processors give the same UNet output
(otherwise the comparison would be of different computations).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.common import load_average  # noqa: E402
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import structlog  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
import torch.nn.functional as F  # noqa: E402

RESOLUTION = 128  # pixels; the demo model's native size (16 x 16 latents)
LORA_RANK = 4
LORA_ALPHA = 8.0
LEARNING_RATE = 1e-4
# Square crops (top, left, side) of the 512 x 512 astronaut: whole, head and shoulders, face.
CROPS = ((0, 0, 512), (0, 96, 384), (20, 120, 280), (40, 150, 220))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="timed steps of each loop per round")
    parser.add_argument("--repeats", type=int, default=4, help="rounds, each: warm-up, then --steps steps of each loop, alternating")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each loop at the start of each round")
    parser.add_argument("--batch-size", type=int, default=1, help="images per step (the engine's default is 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (FINDINGS: 2 stall on the 2-core VM)")
    parser.add_argument("--baseline-attention", choices=("both", "classic", "sdpa"), default="both",
                        help="the baseline's attention: classic AttnProcessor, SDPA (AttnProcessor2_0, as ours), or both as two loops")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))  # the engine's info events are not results
    transformers.utils.logging.set_verbosity_error()  # its no-torchvision notice is not a result
    with tempfile.TemporaryDirectory(prefix="bench-train-") as scratch:
        bench(args, demo_pipeline(Path(scratch)))


def demo_pipeline(root: Path) -> Any:
    """The tiny demo model, built into `root` and loaded the way the engine loads it."""
    from engine.config import Settings
    from engine.diffusion.models import load_pipeline, make_demo_model, resolve_model

    settings = Settings.from_table({"paths": {"models": str(root / "models")}}, root=root)
    make_demo_model(root / "models" / "demo")
    return load_pipeline(resolve_model("demo", "", settings, demo=True), settings)


def bench(args: argparse.Namespace, pipe: Any) -> None:
    """Time both loops on `pipe` and print the table."""
    from diffusers import DDPMScheduler
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    from peft import LoraConfig

    from engine.kinds.sections import PhaseSpec, TrainSpec
    from engine.diffusion import training as train
    images = astronaut_crops(RESOLUTION)
    prompt = train.caption(TrainSpec())
    unet, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    device = unet.device
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    # The engine's caches, computed once, outside every timed loop.
    latent_mean, latent_std = train._encode_latents(pipe, images)
    text, added_cond = train._encode_text(pipe, prompt, RESOLUTION)

    # One adapter and one optimizer for both loops (the adapter set up as train_lora does).
    torch.manual_seed(0)
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, init_lora_weights="gaussian", target_modules=train.TARGET_MODULES),
                     adapter_name=train.ADAPTER)
    unet.set_adapter(train.ADAPTER)
    lora_parameters = [p for name, p in unet.named_parameters() if train.ADAPTER in name]
    for parameter in lora_parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.AdamW(lora_parameters, lr=LEARNING_RATE)
    unet.train()

    phase = PhaseSpec("COARSE", lr=LEARNING_RATE, alpha=LORA_ALPHA, loss="mse", optimizer="adamw")
    generator = torch.Generator(device="cpu").manual_seed(0)

    def our_step() -> float:
        loss = train._training_step(unet, noise_scheduler, latent_mean, latent_std, text, added_cond, phase, args.batch_size, generator, device)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    attention = {"sdpa": AttnProcessor2_0, "classic": AttnProcessor}
    engine_processors = {type(processor).__name__ for processor in unet.attn_processors.values()}

    def use_attention(kind: str) -> None:
        """Set the attention processor of the UNet and the VAE (outside the timed calls)."""
        unet.set_attn_processor(attention[kind]())
        vae.set_attn_processor(attention[kind]())

    def baseline_step() -> float:
        pixel_values = images[torch.randint(0, len(images), (args.batch_size,))].to(device, vae.dtype)
        input_ids = tokenizer([prompt] * args.batch_size, padding="max_length", max_length=tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
        encoder_hidden_states = text_encoder(input_ids.to(device))[0]
        latents = vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=device).long()
        noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
        target = noise_scheduler.get_velocity(latents, noise, timesteps) if noise_scheduler.config.prediction_type == "v_prediction" else noise
        prediction = unet(noisy_latents, timesteps, encoder_hidden_states).sample
        loss = F.mse_loss(prediction.float(), target.float(), reduction="mean")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    check_same_inputs(pipe, images, prompt, latent_mean, text)
    attention_gap = check_same_attention(unet, latent_mean, text, attention)

    # method -> (step function, attention processor it runs with); ours keeps the engine's (SDPA).
    baselines = ("sdpa", "classic") if args.baseline_attention == "both" else (args.baseline_attention,)
    steps_of = {"ours": (our_step, "sdpa"), **{f"baseline-{kind}": (baseline_step, kind) for kind in baselines}}
    methods = list(steps_of)
    wall: dict[str, list[float]] = {method: [] for method in methods}
    cpu: dict[str, list[float]] = {method: [] for method in methods}
    losses: dict[str, list[float]] = {method: [] for method in methods}
    started = time.perf_counter()
    for _ in range(args.repeats):
        for step, kind in steps_of.values():
            use_attention(kind)
            for _ in range(args.warmup):
                step()
        for index in range(args.steps):
            # Alternate step by step, and rotate which goes first, so load from other processes falls on all alike.
            shift = index % len(methods)
            for method in methods[shift:] + methods[:shift]:
                step, kind = steps_of[method]
                use_attention(kind)
                wall_seconds, cpu_seconds, loss = time_step(step)
                wall[method].append(wall_seconds)
                cpu[method].append(cpu_seconds)
                losses[method].append(loss)
    use_attention("sdpa")
    total = time.perf_counter() - started

    print(f"bench_train: torch {torch.__version__}, threads {torch.get_num_threads()}, load average {load_average()}")
    print(f"  demo model, {len(images)} crops at {RESOLUTION} px, batch {args.batch_size}, LoRA r={LORA_RANK} on {', '.join(train.TARGET_MODULES)}, "
          f"{len(lora_parameters)} LoRA tensors")
    print(f"  {args.repeats} x {args.steps} timed steps per method, alternating step by step, {args.warmup} warm-up steps per method "
          f"per round; {total:.1f} s in all")
    print(f"  attention: ours {', '.join(sorted(engine_processors))} (as the engine loads the UNet); baseline-sdpa AttnProcessor2_0, "
          f"baseline-classic AttnProcessor, in UNet and VAE; one UNet forward differs by {attention_gap:.1e} between them")
    print(f"  {'method':<16} {'median s/step':>13} {'mean s/step':>11} {'min s/step':>10} {'median CPU s/step':>17} {'mean loss':>9}")
    for method in methods:
        print(f"  {method:<16} {statistics.median(wall[method]):>13.4f} {statistics.fmean(wall[method]):>11.4f} {min(wall[method]):>10.4f} "
              f"{statistics.median(cpu[method]):>17.4f} {statistics.fmean(losses[method]):>9.4f}")
    pairs = [(method, "ours") for method in methods[1:]]
    if len(methods) == 3:
        pairs.append(("baseline-classic", "baseline-sdpa"))
    for slow, fast in pairs:
        ratios = {
            "median": statistics.median(wall[slow]) / statistics.median(wall[fast]),
            "mean": statistics.fmean(wall[slow]) / statistics.fmean(wall[fast]),
            "min": min(wall[slow]) / min(wall[fast]),
            "median CPU": statistics.median(cpu[slow]) / statistics.median(cpu[fast]),
        }
        print(f"  ratio {slow} / {fast}: " + ", ".join(f"{name} {value:.2f}x" for name, value in ratios.items()))


def astronaut_crops(resolution: int) -> torch.Tensor:
    """Square crops of scikit-image's astronaut, resized (Lanczos, as the trainer does):
    N x 3 x R x R float in [-1, 1]."""
    from PIL import Image
    from skimage import data

    photo = data.astronaut()
    tensors = []
    for top, left, side in CROPS:
        crop = Image.fromarray(photo[top : top + side, left : left + side]).resize((resolution, resolution), Image.Resampling.LANCZOS)
        tensors.append(torch.from_numpy(np.asarray(crop).copy()).permute(2, 0, 1).float() / 127.5 - 1.0)
    return torch.stack(tensors)


@torch.no_grad()
def check_same_inputs(pipe: Any, images: torch.Tensor, prompt: str, latent_mean: torch.Tensor, text: torch.Tensor) -> None:
    """The baseline's way of encoding gives the engine's cached values (distribution mean and
    text embedding), so the two loops differ in when they encode, not in what."""
    vae, tokenizer = pipe.vae, pipe.tokenizer
    mean = vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor
    input_ids = tokenizer([prompt], padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    hidden = pipe.text_encoder(input_ids.to(pipe.text_encoder.device))[0]
    latent_gap = float((mean.float().cpu() - latent_mean).abs().max())
    text_gap = float((hidden.float() - text.float()).abs().max())
    if latent_gap > 1e-5 or text_gap > 1e-5:
        raise SystemExit(f"baseline encodes differently from the engine: latents differ by {latent_gap:.2e}, text by {text_gap:.2e}")


@torch.no_grad()
def check_same_attention(unet: Any, latent_mean: torch.Tensor, text: torch.Tensor, attention: dict[str, Any]) -> float:
    """Largest difference of one UNet forward between the two attention processors (they
    compute the same attention; only the kernels differ). Leaves SDPA set."""
    latents = latent_mean[:1].to(unet.device, unet.dtype)
    timestep = torch.tensor([500], device=unet.device)
    outputs = {}
    for kind, processor in attention.items():
        unet.set_attn_processor(processor())
        outputs[kind] = unet(latents, timestep, text[:1].to(unet.device, unet.dtype)).sample.float()
    unet.set_attn_processor(attention["sdpa"]())
    gap = float((outputs["sdpa"] - outputs["classic"]).abs().max())
    if gap > 1e-3:
        raise SystemExit(f"classic and SDPA attention give different UNet outputs (max difference {gap:.2e})")
    return gap


def time_step(step: Callable[[], float]) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of this process, loss) of one call of `step`.

    CPU time counts the work done and not the time spent waiting for a core that another
    process holds. (With several torch threads it also counts their spinning.)"""
    wall_started, cpu_started = time.perf_counter(), time.process_time()
    loss = step()
    return time.perf_counter() - wall_started, time.process_time() - cpu_started, loss



if __name__ == "__main__":
    main()
