"""Seconds per seed of seed discovery: batched renders against one seed per call.

    python bench/bench_seeds.py [--seeds 8] [--batch 4] [--steps 10] [--repeats 5] [--threads 1]

What is measured, on the tiny demo model (engine.diffusion.models.make_demo_model) at its native
128 px, with the verify stage's prompt, negative prompt and guidance: the wall-clock and CPU
seconds that `engine.diffusion.sampling.render` takes per seed when the seeds go in batches of
`--batch` (as the verify stage renders them) and when each seed has a call of its own.
Why: batching is the verify stage's speed claim; a batch shares the per-call overhead
(prompt encoding, scheduler set-up, Python dispatch) and gives the kernels larger tensors.

The two ways alternate in `--repeats` rounds (each round renders every seed both ways, in
alternating order), so that load from other processes on a shared machine falls on both
alike; one untimed render of each layout comes first (the first calls allocate and pick
kernels). Prints median seconds per seed of each way (over the rounds), the ratio
single / batched, and the largest difference, in grey levels, between a seed rendered in
a batch and the same seed rendered alone (FINDINGS: CPU kernels depend on the batch size,
so expect at most 1; a seed's image does not depend on its neighbours in the batch beyond that).

Renders here are without a LoRA (the verify stage renders each seed with the job's LoRA and
again without it, as a control); a LoRA adds the same small cost per image to both ways.
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

SIZE = 128  # pixels; the demo model's native size, the verify stage's size in demo runs
BASE_SEED = 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=8, help="candidate seeds rendered each way per round")
    parser.add_argument("--batch", type=int, default=4, help="seeds per call in the batched way (the verify stage's default)")
    parser.add_argument("--steps", type=int, default=10, help="denoising steps per render")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; each renders every seed both ways")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (FINDINGS: 2 stall on the 2-core VM)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))  # the engine's info events are not results
    # transformers' notices (no torchvision; the demo's byte-level tokenizer truncating the
    # 94-token negative prompt to 77, as the pipeline does in the engine too) are not results either.
    transformers.utils.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory(prefix="bench-seeds-") as scratch:
        bench(args, demo_pipeline(Path(scratch)))


def demo_pipeline(root: Path) -> Any:
    """The tiny demo model, built into `root` and loaded the way the engine loads it."""
    from engine.config import Settings
    from engine.diffusion.models import load_pipeline, make_demo_model, resolve_model

    settings = Settings.from_table({"paths": {"models": str(root / "models")}}, root=root)
    make_demo_model(root / "models" / "demo")
    return load_pipeline(resolve_model("demo", "", settings, demo=True), settings)


def bench(args: argparse.Namespace, pipe: Any) -> None:
    """Render the seeds both ways on `pipe` and print the table."""
    from engine.config import Settings
    from engine.diffusion.sampling import render
    from engine.kinds.replicate import VerifySpec
    from engine.stages import verify

    prompt = VerifySpec().prompt
    negative = Settings.load(None).render.negative_prompt
    seeds = [BASE_SEED + index for index in range(args.seeds)]
    batches = [seeds[i : i + args.batch] for i in range(0, len(seeds), args.batch)]

    def render_seeds(layout: list[list[int]]) -> np.ndarray:
        """Every seed of `layout`, one render call per inner list: N x H x W x 3 uint8."""
        return np.concatenate([render(pipe, prompt, negative, group, steps=args.steps, guidance=verify.GUIDANCE, size=SIZE) for group in layout])

    layouts = {"batched": batches, "single": [[seed] for seed in seeds]}
    for layout in layouts.values():
        render_seeds([layout[0]])  # warm-up, untimed

    wall: dict[str, list[float]] = {"batched": [], "single": []}
    cpu: dict[str, list[float]] = {"batched": [], "single": []}
    images: dict[str, np.ndarray] = {}
    started = time.perf_counter()
    for round_index in range(args.repeats):
        order = ("batched", "single") if round_index % 2 == 0 else ("single", "batched")
        for name in order:
            wall_seconds, cpu_seconds, images[name] = timed(lambda: render_seeds(layouts[name]))
            wall[name].append(wall_seconds / len(seeds))
            cpu[name].append(cpu_seconds / len(seeds))
    total = time.perf_counter() - started

    difference = np.abs(images["batched"].astype(np.int16) - images["single"].astype(np.int16))
    per_seed = difference.reshape(len(seeds), -1).max(axis=1)

    print(f"bench_seeds: torch {torch.__version__}, threads {torch.get_num_threads()}, load average {load_average()}")
    print(f"  demo model at {SIZE} px, {args.steps} steps, guidance {verify.GUIDANCE}, {len(seeds)} seeds, "
          f"batches of {args.batch} ({len(batches)} calls) vs {len(seeds)} single calls; {args.repeats} rounds, {total:.1f} s in all")
    print(f"  {'way':<8} {'median s/seed':>13} {'mean s/seed':>11} {'min s/seed':>10} {'median CPU s/seed':>17}")
    for name in ("batched", "single"):
        print(f"  {name:<8} {statistics.median(wall[name]):>13.4f} {statistics.fmean(wall[name]):>11.4f} {min(wall[name]):>10.4f} "
              f"{statistics.median(cpu[name]):>17.4f}")
    ratios = {
        "median": statistics.median(wall["single"]) / statistics.median(wall["batched"]),
        "min": min(wall["single"]) / min(wall["batched"]),
        "median CPU": statistics.median(cpu["single"]) / statistics.median(cpu["batched"]),
    }
    print("  ratio single / batched: " + ", ".join(f"{name} {value:.2f}x" for name, value in ratios.items()))
    print(f"  batched vs single, same seed: max abs pixel difference {int(difference.max())} grey levels "
          f"(per seed: {', '.join(str(int(value)) for value in per_seed)}); "
          f"{int(np.count_nonzero(difference))} of {difference.size} values differ")


def timed(work: Callable[[], np.ndarray]) -> tuple[float, float, np.ndarray]:
    """(wall seconds, CPU seconds of this process, result) of one call of `work`.

    CPU time counts the work done and not the time spent waiting for a core that another
    process holds. (With several torch threads it also counts their spinning.)"""
    wall_started, cpu_started = time.perf_counter(), time.process_time()
    result = work()
    return time.perf_counter() - wall_started, time.process_time() - cpu_started, result



if __name__ == "__main__":
    main()
