"""models.compile (issue 19): what compiling the UNet costs and saves, job by job, and what the
inductor cache on the models volume saves a restarted daemon.

Three fresh processes in one run, each loading the pipeline through engine.diffusion.models.load_pipeline
(the daemon's code path) and rendering two "jobs" the way the verify stage does: the job's LoRA
in (engine.diffusion.sampling.identity_lora), `--seeds` seeds with the LoRA on, the same seeds with it
off (the control), the LoRA out; job 2 with a second LoRA of the same rank.

  eager        models.compile = false: the baseline
  cold         models.compile = true, an empty inductor cache (a first start)
  warm-cache   models.compile = true, the cache the cold process left (a restarted daemon)

Printed per process: job 1 and job 2 seconds, the graphs each compiled, inductor cache hits, and
the ratios against the eager process of the same run. The model is the tiny demo one unless
`--model` names a staged diffusers folder (real size on a GPU: `--model sd15 --models DIR`).

    .venv/bin/python bench/bench_compile.py                  # CPU, demo model, ~4 min on 2 cores
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import load_average  # noqa: E402

MODES = ("eager", "cold", "warm-cache")


def child(args: argparse.Namespace) -> None:
    import torch
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from engine import Settings

    from engine.diffusion import compiling
    from engine.diffusion.sampling import identity_lora, render
    from engine.diffusion.models import load_pipeline, resolve_model
    from engine.diffusion.training import TARGET_MODULES

    torch.set_num_threads(args.threads)
    models = {"compile": args.child != "eager", "compile_cache": str(args.cache), "base": args.model}
    settings = Settings.from_table({"paths": {"models": str(args.models)}, "models": models}, root=args.models)
    started = time.perf_counter()
    pipe = load_pipeline(resolve_model(args.model, "", settings, demo=args.model == "demo"), settings)
    load_s = time.perf_counter() - started
    size = args.size or int(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    loras = []
    for seed in (1, 2):  # two jobs' LoRAs: same rank, different weights
        unet = copy.deepcopy(pipe.unet)
        torch.manual_seed(seed)
        unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.rank, init_lora_weights="gaussian", target_modules=TARGET_MODULES), adapter_name="made")
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.data.normal_(0, 0.05)
        folder = Path(tempfile.mkdtemp()) / f"lora{seed}"
        type(pipe).save_lora_weights(str(folder), unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name="made")),
                                     safe_serialization=True)
        loras.append(folder)
        del unet
    seeds = list(range(args.seeds))
    jobs = []
    for lora in loras:
        before = compiling.counters()
        started = time.perf_counter()
        with identity_lora(pipe, lora) as switch:
            render(pipe, "a photo of sks person", "", seeds, steps=args.steps, guidance=5.0, size=size)
            switch.off()
            render(pipe, "a photo of sks person", "", seeds, steps=args.steps, guidance=5.0, size=size)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        jobs.append({"seconds": time.perf_counter() - started, **compiling.since(before)})
    print(json.dumps({"mode": args.child, "load_s": load_s, "size": size, "jobs": jobs}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo", help="models.base: demo, or a staged diffusers folder under --models")
    parser.add_argument("--models", type=Path, default=None, help="the models folder (default: a temporary one, demo model built there)")
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=0, help="pixels; 0 = the model's own")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--cache", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    models = args.models or Path(tempfile.mkdtemp(prefix="bench-compile-models-"))
    cache = Path(tempfile.mkdtemp(prefix="bench-compile-cache-"))
    print(f"load average at start: {load_average()}", flush=True)
    results = {}
    for mode in MODES:
        command = [sys.executable, __file__, "--child", mode, "--cache", str(cache), "--models", str(models), "--model", args.model,
                   "--seeds", str(args.seeds), "--steps", str(args.steps), "--size", str(args.size), "--rank", str(args.rank),
                   "--threads", str(args.threads)]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1"))
        if done.returncode != 0:
            sys.exit(f"{mode} failed:\n{done.stderr[-4000:]}")
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1]) | {"process_s": time.perf_counter() - started}
    print(f"load average at end: {load_average()}")
    eager = results["eager"]["jobs"]
    print(f"model {args.model}, {results['eager']['size']} px, {args.seeds} seeds x {args.steps} steps, LoRA on + control per job, rank {args.rank}\n")
    print("| process | job 1 s | job 1 graphs | job 1 cache hits | job 2 s | job 2 graphs | job 1 / eager | job 2 / eager | whole process s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in MODES:
        first, second = results[mode]["jobs"]
        print(f"| {mode} | {first['seconds']:.2f} | {first['graphs']} | {first['cache_hits']} | {second['seconds']:.2f} | {second['graphs']} | "
              f"{first['seconds'] / eager[0]['seconds']:.2f}x | {second['seconds'] / eager[1]['seconds']:.2f}x | {results[mode]['process_s']:.1f} |")


if __name__ == "__main__":
    main()
