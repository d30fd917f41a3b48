"""GPU benchmark on real-size architectures with random weights: LoRA training steps/s,
render it/s and peak VRAM, with bf16, SDPA, channels_last and torch.compile each on and off.

    python bench/bench_gpu.py                       # SD-1.5 at 768 px and SDXL at 1024 px, on CUDA
    python bench/bench_gpu.py --tiny --device cpu   # the same code on tiny configs: a smoke test here

Architectures: the UNet, VAE and text encoders of SD-1.5 (CLIP ViT-L/14 text encoder) and
SDXL (CLIP ViT-L + OpenCLIP bigG) built from their published configs (written out below: no
hub), random weights from a fixed seed, a tokenizer made offline (engine.diffusion.families.offline_clip_tokenizer).
Random weights cost exactly what trained ones do: the arithmetic and the memory traffic are
the same; only the pictures are noise.

Per model and per setting, with a fresh UNet each time:
  train   the engine's own training step (engine.diffusion.training._training_step: cached VAE
          latent distribution and text embedding, noise, UNet forward under autocast, MSE,
          backward) plus AdamW on a LoRA (r=8 on to_k/to_q/to_v/to_out.0, fp32 LoRA weights
          even on a bf16 UNet, as train_lora does), batch 1, at 768 (SD-1.5) / 1024 (SDXL).
          The "reencode" row does the same but re-encodes the image (VAE) and the caption
          (text encoders) every step, the way diffusers' train_dreambooth_lora.py does.
  render  the trained UNet (LoRA active) in the diffusers text-to-image pipeline, CFG 5.8
          (batch 2 through the UNet), `--render-steps` steps; it/s from the step callback's
          timestamps (denoising loop only), and seconds per image end to end (prompt
          encoding, loop, VAE decode).
Settings, each row one change from "fast" (bf16 + SDPA + channels_last, eager):
  plain       fp32, classic attention (AttnProcessor), NCHW, eager: everything off
  fast        bf16 autocast / bf16 weights, SDPA (AttnProcessor2_0), channels_last
  -bf16       fast with fp32
  -sdpa       fast with classic attention
  -chlast     fast with NCHW
  +compile    fast with torch.compile on the UNet (compile time reported apart)
  reencode    fast, training re-encoding image and caption every step (train only)
Eager rows of both models run first; compiled rows last, each only if the time budget
(`--budget-seconds`) still allows its estimated compile time, so that a leased GPU's time
limit costs the least valuable rows. Each row is also appended to `--out` as JSON as soon as
it is measured.

MFU: the FLOPs of one training step and of one denoising step (the UNet at CFG batch 2: a
one-step call's count subtracted from a two-step call's) counted by
torch.utils.flop_counter.FlopCounterMode on the eager UNet, times the measured rate, divided by
the card's dense bf16 peak (PEAK_BF16, NVIDIA's datasheets, printed with the figure; `--peak-tflops`
overrides it). FlopCounterMode counts matmuls and convolutions, not elementwise work.

Whole chain (`--chain`): a full replicate job through the engine (engine.runner.Engine, the
daemon's code path) on the real-size architecture, random weights saved as a staged diffusers
folder, the default job settings (1,200 steps cap, 16 seeds x LoRA + control, 4 renders x 3
passes at the model's resolution), with models.compile off and on (`--chain-compile`): wall
seconds and peak VRAM per stage, from the audit's stage events.

    python bench/bench_gpu.py --chain --models sd15 --chain-compile both
    python bench/bench_gpu.py --chain --tiny --device cpu --models sd15   # smoke test here

Timing: CUDA synchronisation around host timers; warm-up steps first (they hold the compile
time of +compile rows, reported as `first_steps_s`); peak VRAM from
torch.cuda.max_memory_allocated after a reset at the start of each phase.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402

LORA_RANK = 8
GUIDANCE = 5.8
CAPTION = "a photo of sks person"
PROMPT = "a photo of sks person, spa garden at dusk, candle-lit, 85mm"

# ---------------------------------------------------------------------------- architectures
# Published configs of runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0
# (unet/vae/text_encoder*/config.json), keys that differ from the classes' defaults.
SD15_UNET = dict(sample_size=96, cross_attention_dim=768, attention_head_dim=8, block_out_channels=(320, 640, 1280, 1280),
                 down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",), up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                 layers_per_block=2, norm_num_groups=32)
SDXL_UNET = dict(sample_size=128, cross_attention_dim=2048, attention_head_dim=(5, 10, 20), block_out_channels=(320, 640, 1280),
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), transformer_layers_per_block=(1, 2, 10),
                 layers_per_block=2, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                 projection_class_embeddings_input_dim=2816, norm_num_groups=32)
VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
           latent_channels=4, layers_per_block=2, norm_num_groups=32)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, projection_dim=768, hidden_act="quick_gelu")
CLIP_BIGG = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20, projection_dim=1280, hidden_act="gelu")

# Tiny stand-ins with the same structure (--tiny): the script's smoke test on a CPU.
TINY_SD15_UNET = dict(SD15_UNET, sample_size=8, cross_attention_dim=32, block_out_channels=(32, 32, 64, 64), norm_num_groups=8)
TINY_SDXL_UNET = dict(SDXL_UNET, sample_size=8, cross_attention_dim=64, attention_head_dim=(2, 4, 8), block_out_channels=(32, 64, 64),
                      transformer_layers_per_block=(1, 1, 2), addition_time_embed_dim=8, projection_class_embeddings_input_dim=80,
                      norm_num_groups=8)
TINY_VAE = dict(VAE, block_out_channels=(8, 16, 32, 32), layers_per_block=1, norm_num_groups=8)
TINY_CLIP_L = dict(CLIP_L, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)
TINY_CLIP_BIGG = dict(CLIP_BIGG, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    resolution: int  # px
    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoders: tuple[dict[str, Any], ...]  # SDXL: (CLIP-L, bigG with projection)
    vae_scaling: float


MODELS = {
    "sd15": ModelSpec("sd15", 768, SD15_UNET, VAE, (CLIP_L,), 0.18215),
    "sdxl": ModelSpec("sdxl", 1024, SDXL_UNET, VAE, (CLIP_L, CLIP_BIGG), 0.13025),
}
TINY_MODELS = {
    "sd15": ModelSpec("sd15", 64, TINY_SD15_UNET, TINY_VAE, (TINY_CLIP_L,), 0.18215),
    "sdxl": ModelSpec("sdxl", 64, TINY_SDXL_UNET, TINY_VAE, (TINY_CLIP_L, TINY_CLIP_BIGG), 0.13025),
}


@dataclass(frozen=True)
class Setting:
    name: str
    bf16: bool
    sdpa: bool
    channels_last: bool
    compile: bool = False
    reencode: bool = False


SETTINGS = [
    Setting("plain", bf16=False, sdpa=False, channels_last=False),
    Setting("fast", bf16=True, sdpa=True, channels_last=True),
    Setting("-bf16", bf16=False, sdpa=True, channels_last=True),
    Setting("-sdpa", bf16=True, sdpa=False, channels_last=True),
    Setting("-chlast", bf16=True, sdpa=True, channels_last=False),
    Setting("reencode", bf16=True, sdpa=True, channels_last=True, reencode=True),
    Setting("+compile", bf16=True, sdpa=True, channels_last=True, compile=True),
]
# Dense bf16 tensor-core peaks, FLOP/s: NVIDIA's datasheets give the with-sparsity figure; dense is half.
PEAK_BF16 = {"H200": 989.5e12, "H100 SXM": 989.5e12, "H100 80GB HBM3": 989.5e12, "H100 PCIe": 756.0e12, "H100 NVL": 835.5e12,
             "A100": 312.0e12, "L40S": 362.05e12, "L4": 121.0e12, "A10": 125.0e12}
PEAK_SOURCE = "NVIDIA datasheet, dense bf16 (half the sparsity figure)"
COMPILE_ESTIMATE_S = {"sd15": 150.0, "sdxl": 240.0}  # train + render compiles, H100/H200 class, 16 cores


# ---------------------------------------------------------------------------- building


class Components:
    """Text encoders, tokenizers, VAE and scheduler of one model, built once in fp32; the
    UNet is built fresh for every setting (`unet()`)."""

    def __init__(self, spec: ModelSpec, device: torch.device) -> None:
        from diffusers import AutoencoderKL, DDIMScheduler, EulerDiscreteScheduler
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        from engine.diffusion.families import offline_clip_tokenizer

        self.spec, self.device = spec, device
        self.tokenizer, vocab = offline_clip_tokenizer()
        ids = dict(vocab_size=max(len(vocab), 49408), max_position_embeddings=77, bos_token_id=vocab["<|startoftext|>"],
                   eos_token_id=vocab["<|endoftext|>"], pad_token_id=vocab["<|endoftext|>"])
        torch.manual_seed(0)
        with torch.device(device):
            self.text_encoders = [CLIPTextModel(CLIPTextConfig(**spec.text_encoders[0], **ids))]
            if len(spec.text_encoders) == 2:
                self.text_encoders.append(CLIPTextModelWithProjection(CLIPTextConfig(**spec.text_encoders[1], **ids)))
            self.vae = AutoencoderKL(sample_size=spec.resolution, scaling_factor=spec.vae_scaling, **spec.vae)
        for module in (*self.text_encoders, self.vae):
            module.requires_grad_(False).eval()
        schedule = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
        if spec.name == "sdxl":
            self.scheduler = EulerDiscreteScheduler(timestep_spacing="leading", **schedule)
        else:
            self.scheduler = DDIMScheduler(clip_sample=False, set_alpha_to_one=False, **schedule)

    def unet(self, seed: int = 0) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel

        torch.manual_seed(seed)
        with torch.device(self.device):
            return UNet2DConditionModel(in_channels=4, out_channels=4, **self.spec.unet)

    def pipeline(self, unet: torch.nn.Module, dtype: torch.dtype, compiled: torch.nn.Module | None = None) -> Any:
        """The text-to-image pipeline around `unet`; a compiled UNet is set afterwards, the
        way diffusers' docs do (`pipe.unet = torch.compile(pipe.unet)`)."""
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        for module in (*self.text_encoders, self.vae):
            module.to(dtype)
        if self.spec.name == "sdxl":
            pipe = StableDiffusionXLPipeline(vae=self.vae, text_encoder=self.text_encoders[0], text_encoder_2=self.text_encoders[1],
                                             tokenizer=self.tokenizer, tokenizer_2=self.tokenizer, unet=unet, scheduler=self.scheduler,
                                             force_zeros_for_empty_prompt=True)
        else:
            pipe = StableDiffusionPipeline(vae=self.vae, text_encoder=self.text_encoders[0], tokenizer=self.tokenizer, unet=unet,
                                           scheduler=self.scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        if compiled is not None:
            pipe.unet = compiled
        return pipe


def prepare_unet(components: Components, setting: Setting) -> tuple[torch.nn.Module, list[torch.nn.Parameter]]:
    """A fresh UNet with the setting's dtype, attention and memory format, and a LoRA the way
    engine.diffusion.training.train_lora adds it (fp32 LoRA weights)."""
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0
    from peft import LoraConfig

    from engine.diffusion.training import TARGET_MODULES

    unet = components.unet()
    unet.to(torch.bfloat16 if setting.bf16 else torch.float32)
    unet.set_attn_processor(AttnProcessor2_0() if setting.sdpa else AttnProcessor())
    if setting.channels_last:
        unet.to(memory_format=torch.channels_last)
    unet.requires_grad_(False)
    torch.manual_seed(1)
    unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian", target_modules=TARGET_MODULES), adapter_name="bench")
    unet.set_adapter("bench")
    lora = [p for n, p in unet.named_parameters() if "bench" in n]
    for parameter in lora:
        parameter.data = parameter.data.float()
        parameter.requires_grad_(True)
    return unet, lora


# ---------------------------------------------------------------------------- measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def _peak_gib(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None


def measure_train(components: Components, unet: torch.nn.Module, model: torch.nn.Module, lora: list[torch.nn.Parameter],
                  setting: Setting, warmup: int, steps: int) -> dict[str, Any]:
    """`unet` is the module, `model` what is called (the same, or its torch.compile wrapper)."""
    # Seconds per training step of the engine's step (or the re-encoding variant).
    from diffusers import DDPMScheduler

    from engine.kinds.sections import PhaseSpec
    from engine.diffusion.training import _encode_latents, _encode_text, _training_step

    device = components.device
    dtype = torch.bfloat16 if setting.bf16 else torch.float32
    pipe = components.pipeline(unet, dtype, model if model is not unet else None)
    resolution = components.spec.resolution
    generator = torch.Generator().manual_seed(0)
    images = torch.rand((1, 3, resolution, resolution), generator=generator) * 2 - 1  # a picture's range, [-1, 1]
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    phase = PhaseSpec(name="COARSE", lr=1e-4, alpha=LORA_RANK, loss="mse", optimizer="adamw", min_steps=1, max_steps=10**6)
    optimizer = torch.optim.AdamW(lora, lr=phase.lr)
    cached = (_encode_latents(pipe, images), _encode_text(pipe, CAPTION, resolution))
    model.train()

    def step(called: torch.nn.Module = model) -> float:
        (mean, std), (text, added) = (_encode_latents(pipe, images), _encode_text(pipe, CAPTION, resolution)) if setting.reencode else cached
        loss = _training_step(called, noise_scheduler, mean, std, text, added, phase, 1, generator, device)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())  # read back each step, as the trainer does for its convergence test

    _reset_peak(device)
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    _sync(device)
    first = time.perf_counter() - started
    started = time.perf_counter()
    losses = [step() for _ in range(steps)]
    _sync(device)
    elapsed = time.perf_counter() - started
    finite = all(loss == loss and abs(loss) != float("inf") for loss in losses)
    flops = count_flops(lambda: step(unet))
    return {"train_flops_per_step": flops, "train_steps_per_s": round(steps / elapsed, 3), "train_s_per_step": round(elapsed / steps, 4), "train_first_steps_s": round(first, 2),
            "train_peak_gib": _peak_gib(device), "train_loss_finite": finite}


@torch.no_grad()
def measure_render(components: Components, unet: torch.nn.Module, model: torch.nn.Module, setting: Setting, steps: int) -> dict[str, Any]:
    """it/s of the denoising loop and seconds per image end to end, CFG on (UNet batch 2)."""
    device = components.device
    model.eval()
    pipe = components.pipeline(unet, torch.bfloat16 if setting.bf16 else torch.float32, model if model is not unet else None)
    resolution = components.spec.resolution
    stamps: list[float] = []

    def on_step(_pipe, _index, _timestep, kwargs):
        _sync(device)
        stamps.append(time.perf_counter())
        return kwargs

    def call(count: int) -> float:
        stamps.clear()
        started = time.perf_counter()
        pipe(PROMPT, num_inference_steps=count, guidance_scale=GUIDANCE, height=resolution, width=resolution, output_type="np",
             generator=torch.Generator(device="cpu").manual_seed(7), callback_on_step_end=on_step)
        _sync(device)
        return time.perf_counter() - started

    _reset_peak(device)
    first = call(3)  # warm-up: kernels, allocator, and the compile of a +compile row
    total = call(steps)
    if model is not unet:
        pipe.unet = unet  # FLOPs are counted eager: a compiled graph runs under the counter unseen
    one, two = count_flops(lambda: call(1)), count_flops(lambda: call(2))
    pipe.unet = model
    loop_steps = len(stamps) - 1
    loop = stamps[-1] - stamps[0]
    return {"render_flops_per_step": two - one, "render_it_per_s": round(loop_steps / loop, 3), "render_s_per_image": round(total, 3), "render_first_call_s": round(first, 2),
            "render_peak_gib": _peak_gib(device)}


def count_flops(call: Any) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        call()
    return int(counter.get_total_flops())


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    """The card's dense bf16 peak and where the figure comes from (None on a CPU or an unknown card)."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    if device.type != "cuda":
        return None, "no peak for a CPU"
    name = torch.cuda.get_device_name(device)
    match = max((key for key in PEAK_BF16 if key in name), key=len, default=None)
    return (PEAK_BF16[match], f"{match}: {PEAK_SOURCE}") if match else (None, f"{name}: not in PEAK_BF16; pass --peak-tflops")


def add_mfu(row: dict[str, Any], peak: float | None) -> None:
    for phase, rate in (("train", "train_steps_per_s"), ("render", "render_it_per_s")):
        flops, per_s = row.get(f"{phase}_flops_per_step"), row.get(rate)
        if flops and per_s:
            row[f"{phase}_tflops"] = float(f"{flops * per_s / 1e12:.4g}")
            row[f"{phase}_mfu"] = round(flops * per_s / peak, 4) if peak else None


def run_setting(components: Components, setting: Setting, args: argparse.Namespace) -> dict[str, Any]:
    row: dict[str, Any] = {"model": components.spec.name, "resolution": components.spec.resolution, "setting": setting.name}
    started = time.perf_counter()
    unet, lora = prepare_unet(components, setting)
    model = torch.compile(unet) if setting.compile else unet
    try:
        row.update(measure_train(components, unet, model, lora, setting, args.warmup, args.train_steps))
        if not setting.reencode:
            row.update(measure_render(components, unet, model, setting, args.render_steps))
    except Exception as error:  # one row's failure (out of memory, a compile error) must not cost the others
        traceback.print_exc()
        row["error"] = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}"
    finally:
        del unet, model, lora
        if setting.compile:
            torch._dynamo.reset()
        gc.collect()
        if components.device.type == "cuda":
            torch.cuda.empty_cache()
    row["seconds"] = round(time.perf_counter() - started, 1)
    return row


# ---------------------------------------------------------------------------- report


def percent(value: float | None) -> str:
    return f"{value * 100:.1f} %" if value is not None else "—"


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | setting | train steps/s | × plain | × fast | train peak GiB | render it/s | × plain | × fast | s/image | render peak GiB | first steps s (train / render) | TFLOP/s (train / render) | MFU (train / render) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]

    def ratio(row: dict[str, Any], key: str, base: str) -> str:
        reference = next((r for r in rows if r["model"] == row["model"] and r["setting"] == base and r.get(key)), None)
        return f"{row[key] / reference[key]:.2f}×" if reference and row.get(key) else "—"

    for row in rows:
        if "skipped" in row or "error" in row:
            lines.append(f"| {row['model']} | {row['setting']} | {row.get('skipped') or row.get('error')} |||||||||||||")
            continue
        lines.append(f"| {row['model']} {row['resolution']} | {row['setting']} | {row['train_steps_per_s']} | {ratio(row, 'train_steps_per_s', 'plain')} | "
                     f"{ratio(row, 'train_steps_per_s', 'fast')} | {row['train_peak_gib']} | {row.get('render_it_per_s', '—')} | "
                     f"{ratio(row, 'render_it_per_s', 'plain')} | {ratio(row, 'render_it_per_s', 'fast')} | {row.get('render_s_per_image', '—')} | "
                     f"{row.get('render_peak_gib', '—')} | {row['train_first_steps_s']} / {row.get('render_first_call_s', '—')} | "
                     f"{row.get('train_tflops', '—')} / {row.get('render_tflops', '—')} | {percent(row.get('train_mfu'))} / {percent(row.get('render_mfu'))} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="sd15,sdxl")
    parser.add_argument("--settings", default=",".join(s.name for s in SETTINGS), help="comma-separated subset of the rows")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny configs of the same structure (smoke test)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--train-steps", type=int, default=20)
    parser.add_argument("--render-steps", type=int, default=20)
    parser.add_argument("--budget-seconds", type=float, default=520.0, help="skip compiled rows that would not fit")
    parser.add_argument("--out", type=Path, default=None, help="append each row here as a JSON line")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the card's dense bf16 peak, when PEAK_BF16 does not know it")
    parser.add_argument("--chain", action="store_true", help="the whole replicate job through the engine instead of the rows")
    parser.add_argument("--chain-compile", choices=("off", "on", "both"), default="both", help="models.compile for --chain")
    parser.add_argument("--chain-dir", type=Path, default=None, help="where --chain stages its models and runs its jobs (default: a temporary folder)")
    args = parser.parse_args()

    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    started = time.perf_counter()
    device = torch.device(args.device)
    models = TINY_MODELS if args.tiny else MODELS
    wanted = [s for s in SETTINGS if s.name in args.settings.split(",")]
    names = [name for name in args.models.split(",") if name]
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
            "tiny": args.tiny, "train_steps": args.train_steps, "render_steps": args.render_steps}
    import diffusers
    import peft
    import transformers

    info.update(diffusers=diffusers.__version__, peft=peft.__version__, transformers=transformers.__version__)
    peak, peak_source = peak_flops(device, args.peak_tflops)
    info.update(peak_bf16_tflops=peak / 1e12 if peak else None, peak_source=peak_source)
    print(json.dumps(info), flush=True)
    if args.chain:
        from bench.chain import run_chains

        print(run_chains(names, models, device, args, Components))
        print(f"\nwhole script: {time.perf_counter() - started:.0f} s")
        return 0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 rows measure fp32, not TF32
        torch.backends.cudnn.allow_tf32 = False
    rows: list[dict[str, Any]] = []
    eager_seconds: dict[str, float] = {}
    components: dict[str, Components] = {}
    # Eager rows of every model first, compiled ones last (they may not fit the budget).
    order = [(name, s) for name in names for s in wanted if not s.compile] + [(name, s) for name in names for s in wanted if s.compile]
    for name, setting in order:
        if setting.compile:
            estimate = eager_seconds.get(name, 0.0) + COMPILE_ESTIMATE_S[name] * (0.05 if args.tiny else 1.0)
            left = args.budget_seconds - (time.perf_counter() - started)
            if estimate > left:
                row = {"model": name, "setting": setting.name, "skipped": f"skipped: ~{estimate:.0f} s needed, {left:.0f} s of budget left"}
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
        if name not in components:
            components.pop(next(iter(components), None), None)  # one model's components on the device at a time
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
            built = time.perf_counter()
            components[name] = Components(models[name], device)
            print(json.dumps({"model": name, "built_s": round(time.perf_counter() - built, 1)}), flush=True)
        row = run_setting(components[name], setting, args)
        add_mfu(row, peak)
        if setting.name == "fast":
            eager_seconds[name] = row["seconds"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with args.out.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps({**info, **row}) + "\n")
    print()
    print(table(rows))
    print(f"\nwhole script: {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
