"""Idle CPU of a daemon while folders wait in its inbox, by how many wait and how it watches.

    python bench/bench_scan.py [--folders 0 500 2000] [--modes native polling] [--settle 30] [--seconds 30]

Method. For each watch mode (native: inotify; polling: watchdog's PollingObserver, as for a
network share) and each count of waiting folders, a real `python -m daemon --demo` process is
started on an inbox holding that many folders that never get a job.toml (each with one photo,
as a lab leaves a folder whose job.toml it forgot), with the embedded defaults of [daemon]
(stable_seconds 10, scan_seconds 10, poll_seconds 2). Once it logs `daemon_started` it is left
alone for --settle seconds (every folder is walked when first seen, once more when its stability
window ends, then on its back-off), and then its CPU time (user + system, every thread, read
from /proc/<pid>/stat) is measured over --seconds. The same run measures the daemon with an empty
inbox: the baseline that the others are compared with (`x baseline`).

The daemon walks a waiting folder only when something says it may have changed (daemon/watch.py);
before that, every folder not ready was walked (every entry stat'ed) on every tick of the loop:
500 folders cost 12 % of a core and 2,000 cost 36 %, idle.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import load_average  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` (all its threads) so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


def make_inbox(inbox: Path, folders: int, photo: bytes) -> None:
    for index in range(folders):
        folder = inbox / f"subject-{index:05d}"
        folder.mkdir(parents=True)
        (folder / "photo.png").write_bytes(photo)


def measure(root: Path, models: Path, folders: int, mode: str, settle: float, seconds: float) -> dict[str, float]:
    inbox = root / "inbox"
    inbox.mkdir(parents=True)
    make_inbox(inbox, folders, b"\x89PNG not decoded: the daemon never opens a photo before a job runs")
    config = root / "config.toml"
    config.write_text("\n".join(["[paths]", f"models = {json.dumps(str(models))}", "", "[daemon]",
                                 f"inbox = {json.dumps(str(inbox))}", f"outbox = {json.dumps(str(root / 'outbox'))}",
                                 f"failed = {json.dumps(str(root / 'failed'))}", f"work = {json.dumps(str(inbox / '.work'))}",
                                 "metrics_port = 0", f"network_share = {json.dumps(mode == 'polling')}"]) + "\n")
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    process = subprocess.Popen([sys.executable, "-m", "daemon", "--config", str(config), "--demo"], cwd=root, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    started = threading.Event()

    def read() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            if '"daemon_started"' in line:
                started.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        if not started.wait(300):
            raise RuntimeError(f"the daemon did not start ({mode}, {folders} folders)")
        time.sleep(settle)
        before, clock = cpu_seconds(process.pid), time.monotonic()
        time.sleep(seconds)
        used, wall = cpu_seconds(process.pid) - before, time.monotonic() - clock
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
    return {"cpu_seconds": used, "wall_seconds": wall, "core_percent": 100 * used / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folders", type=int, nargs="+", default=[0, 500, 2000])
    parser.add_argument("--modes", nargs="+", default=["native", "polling"], choices=["native", "polling"])
    parser.add_argument("--settle", type=float, default=30.0, help="seconds after daemon_started before measuring")
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds measured")
    args = parser.parse_args()
    counts = sorted(set(args.folders) | {0})
    with tempfile.TemporaryDirectory(prefix="bench-scan-") as temporary:
        models = Path(temporary) / "models"
        subprocess.run([sys.executable, "-c", "import sys; from pathlib import Path; from engine.diffusion.models import demo_model_dir, make_demo_model; "
                        "make_demo_model(demo_model_dir(Path(sys.argv[1])))", str(models)], cwd=REPO, check=True,
                       env=dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1"))
        print(f"idle daemon CPU, settle {args.settle:g} s, measured over {args.seconds:g} s; cores {os.cpu_count()}, load {load_average()}")
        print(f"{'mode':8} {'folders':>8} {'cpu s':>8} {'% core':>8} {'x baseline':>11}")
        for mode in args.modes:
            baseline = None
            for count in counts:
                result = measure(Path(temporary) / f"{mode}-{count}", models, count, mode, args.settle, args.seconds)
                baseline = result["cpu_seconds"] if baseline is None else baseline
                ratio = result["cpu_seconds"] / baseline if baseline else float("nan")
                print(f"{mode:8} {count:8d} {result['cpu_seconds']:8.2f} {result['core_percent']:8.2f} {ratio:11.2f}", flush=True)


if __name__ == "__main__":
    main()
