"""Zero-shot FaceID against the trained LoRA, as a whole job (issue 20).

--kind evaluate (default): the same demo evaluate grid (2 prompts x 4 seeds, the control
included) with one group of method "lora" (the job's LoRA, trained with the example job's
settings: 300 steps at most) and with one group of method "faceid" (no training).
--kind replicate: the example job itself (prepare, train, verify's 8 seeds, its renders) with
[identity] method "lora" (the default) and "faceid" (no training).
The two jobs alternate, each in a fresh job folder of one warm Engine, so both pay the same
model loads (none after the first). Prints wall and CPU seconds per job and the ratio faceid / lora.

    .venv/bin/python bench/bench_faceid.py [--kind evaluate|replicate] [--repeats 2]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import load_average  # noqa: E402
from engine.example import EXAMPLE_JOB  # noqa: E402

TRAIN = EXAMPLE_JOB[EXAMPLE_JOB.index("[prepare]"):EXAMPLE_JOB.index("[verify]")]  # the example job's [prepare] and [train]
GRID = """
[evaluate]
prompts = ["a photo of {trigger}, portrait", "a photo of {trigger}, side profile"]
seeds = [0, 1, 2, 3]
steps = 20

[[evaluate.group]]
name = "g"
"""
METHODS = {"lora": 'phase = "final"\n', "faceid": 'method = "faceid"\n'}
JOBS = {  # per kind: the job.toml of each method
    "evaluate": {method: 'kind = "evaluate"\n' + TRAIN + GRID + group for method, group in METHODS.items()},
    "replicate": {method: EXAMPLE_JOB + f'\n[identity]\nmethod = "{method}"\n' for method in METHODS},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kind", choices=sorted(JOBS), default="evaluate")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from skimage import data

    from engine.config import Settings
    from engine.runner import Engine
    from tests.harness.jobs import make_job

    root = Path(tempfile.mkdtemp(prefix="bench-faceid-"))
    (root / "models").mkdir()
    engine = Engine(Settings.from_table({"paths": {"models": str(root / "models")}}, root=root), demo=True)
    engine.resources.model("base")
    engine.resources.faceid_folder()
    times: dict[str, list[tuple[float, float]]] = {method: [] for method in METHODS}
    for repeat in range(args.repeats):
        for method, toml in JOBS[args.kind].items():
            source = make_job(root / "inbox" / f"{method}{repeat}", {"a.png": data.astronaut()}, toml)
            wall, cpu = time.perf_counter(), time.process_time()
            result = engine.run_job(source, root / "outbox")
            times[method].append((time.perf_counter() - wall, time.process_time() - cpu))
            assert result.outcome == "finished", result.error
            print(f"  {method:6s} repeat {repeat}: {times[method][-1][0]:6.1f} s wall, {times[method][-1][1]:6.1f} s CPU", flush=True)
    best = {method: (min(w for w, _ in rows), min(c for _, c in rows)) for method, rows in times.items()}
    what = "demo evaluate job, 2 prompts x 4 seeds + control" if args.kind == "evaluate" else "the demo example replicate job"
    print(f"{what}, {args.repeats} repeats, load average {load_average()}")
    for method, (wall, cpu) in best.items():
        print(f"  {method:6s} best {wall:6.1f} s wall, {cpu:6.1f} s CPU")
    print(f"  faceid / lora: x{best['faceid'][0] / best['lora'][0]:.2f} wall, x{best['faceid'][1] / best['lora'][1]:.2f} CPU")


if __name__ == "__main__":
    main()
