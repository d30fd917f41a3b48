"""`bench_gpu.py --chain`: a whole replicate job through the engine (engine.runner.Engine, the
code path the daemon runs) on a real-size architecture with random weights, staged as a diffusers
folder the way a lab stages real weights. Per stage: wall seconds and peak VRAM (reset at each
`stage_started` audit event, read at its `stage_finished`), once with models.compile off and/or
on; a compiled run does a second job in the same engine, whose seconds are what a warm daemon
pays per subject (the first holds the compiles).

The job is the default one at the model's resolution: 1,200-step cap, 16 seeds x (LoRA +
control), 4 renders x 3 passes. `--tiny` shrinks it to a smoke test (CPU, seconds).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

JOB = """\
[subject]
name = "bench"

[prepare]
size = {size}

[train]
resolution = {size}
max_steps = {max_steps}

[verify]
seeds = {seeds}
steps = {steps}
{renders}"""
RENDER = """
[[render]]
prompt = "portrait in a spa garden at dusk, candle-lit, 85mm, f/2.8"
mode = "three_pass"
count = 1
steps = {steps}
"""


def stage_model(components_class: Any, spec: Any, device: torch.device, folder: Path) -> Path:
    """The architecture's random weights as a diffusers folder (bf16 on CUDA, as the engine loads them)."""
    if (folder / "model_index.json").is_file():
        return folder
    components = components_class(spec, device)
    pipe = components.pipeline(components.unet(), torch.bfloat16 if device.type == "cuda" else torch.float32)
    pipe.unet.to(pipe.vae.dtype)
    incoming = folder.with_name(folder.name + ".incoming")
    shutil.rmtree(incoming, ignore_errors=True)
    pipe.save_pretrained(str(incoming), safe_serialization=True)
    incoming.rename(folder)
    del pipe, components
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return folder


class StageMeter:
    """The engine's audit observer: seconds and peak VRAM of every stage."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.rows, self._started = device, [], 0.0

    def __call__(self, event: str, fields: dict[str, Any]) -> None:
        if event == "stage_started":
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
                torch.cuda.reset_peak_memory_stats(self.device)
            self._started = time.perf_counter()
        elif event == "stage_finished":
            peak = round(torch.cuda.max_memory_allocated(self.device) / 2**30, 2) if self.device.type == "cuda" else None
            self.rows.append({"stage": fields["stage"], "seconds": round(time.perf_counter() - self._started, 2), "peak_gib": peak,
                              "graphs": (fields.get("compiled") or {}).get("graphs")})


def run_job(engine: Any, meter: StageMeter, root: Path, name: str, job_toml: str) -> list[dict[str, Any]]:
    from engine.example import write_example_subject

    source = root / "inbox" / name
    write_example_subject(source)  # scikit-image's astronaut (its job.toml replaced below)
    (source / "job.toml").write_text(job_toml, encoding="utf-8")
    meter.rows = []
    started = time.perf_counter()
    result = engine.run_job(source, root / "outbox")
    if result.outcome != "finished":
        raise RuntimeError(f"the {name} job ended {result.outcome}: {result.error}")
    return meter.rows + [{"stage": "whole job", "seconds": round(time.perf_counter() - started, 2), "peak_gib": None, "graphs": None}]


def run_chains(names: list[str], models: dict[str, Any], device: torch.device, args: Any, components_class: Any) -> str:
    from engine import Settings
    from engine.runner import Engine

    root = args.chain_dir or Path(tempfile.mkdtemp(prefix="bench-chain-"))
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.chain_compile]
    lines = []
    for name in names:
        spec = models[name]
        folder = stage_model(components_class, spec, device, root / "models" / f"bench-{name}")
        size = spec.resolution
        small = dict(max_steps=4, seeds=2, steps=2) if args.tiny else dict(max_steps=1200, seeds=16, steps=30)
        job = JOB.format(size=size, renders="".join(RENDER.format(steps=small["steps"]) for _ in range(4)), **small)
        for compiled in modes:
            settings = Settings.from_table({"paths": {"models": str(root / "models")},
                                            "models": {"base": folder.name, "compile": compiled, "device": device.type,
                                                       "compile_cache": str(root / "inductor-cache")}}, root=root)
            meter = StageMeter(device)
            engine = Engine(settings, observer=meter)
            runs = {"first job": run_job(engine, meter, root / f"{name}-{compiled}", "first", job)}
            if compiled:
                runs["second job (warm)"] = run_job(engine, meter, root / f"{name}-{compiled}", "second", job)
            for run, rows in runs.items():
                lines.append(f"\n{name} {size} px, models.compile = {str(compiled).lower()}, {run}\n")
                lines.append("| stage | seconds | peak VRAM GiB | graphs compiled |")
                lines.append("|---|---|---|---|")
                lines += [f"| {r['stage']} | {r['seconds']} | {r['peak_gib'] if r['peak_gib'] is not None else '—'} | "
                          f"{r['graphs'] if r['graphs'] is not None else '—'} |" for r in rows]
            del engine
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return "\n".join(lines)
