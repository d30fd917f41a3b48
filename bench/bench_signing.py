"""What signing costs a job: C2PA Content Credentials on every generated image, the signed head,
the journal line, as a share of the job's wall time.

    python bench/bench_signing.py [--job example|fast] [--rounds 2] [--threads 1]

Method. One process, one `engine.Engine` with lab keys (`engine.provenance.trust.make_lab_keys` in a temp
folder) and one without, the demo model and the embedded face models, the example subject
(scikit-image's astronaut; `--job example` is `python -m engine example`'s job.toml, the job
`scripts/demo` runs). Each round runs the job once signed and once unsigned, alternating which
goes first. In the signed runs every signing step is timed where it runs (wall and CPU seconds):
`ContentCredentials.sign_png` (one per generated image: builds the manifest, hashes the input
photos as ingredients, and has its ES256 signature made by the signer process: of which the
socket round trip `content_signature` is printed apart), `seal` (one signer request: the signer
hashes the audit log and the manifest, signs the head with Ed25519, writes signature.json,
appends the journal line under its lock, fsyncs), and the one-off start of the signer process
(`start_signer`: a Python that loads `cryptography` and the keys). The share is their sum over
the signed job's wall time. The plain
difference signed − unsigned is printed too; on a shared machine it is noise of several times
the measured cost.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.bench_daemon import FAST_JOB  # noqa: E402  (the e2e tests' job, as the daemon bench runs it)
from bench.common import load_average  # noqa: E402


OF_WHICH = "  of which: "  # a step inside another one: printed, not added to the sum


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", choices=("example", "fast"), default="example")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (models.cpu_threads)")
    args = parser.parse_args()

    import structlog

    import engine.provenance.credentials as credentials_module
    import engine.provenance.signer as signer_module
    from engine.config import ModelSettings, Settings
    from engine.example import EXAMPLE_JOB, write_example_subject
    from engine.diffusion.models import demo_model_dir, make_demo_model
    from engine.runner import Engine
    from engine.provenance.trust import make_lab_keys

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(open("/dev/null", "w")))
    root = Path(tempfile.mkdtemp(prefix="bench-signing-"))
    make_demo_model(demo_model_dir(root / "models"))
    make_lab_keys(root / "keys", "Bench Lab")
    base = {"paths": {"models": str(root / "models")}}
    settings = {
        "signed": Settings.from_table({**base, "trust": {"keys": str(root / "keys")}}, root=root),
        "unsigned": Settings.from_table(base, root=root),
    }
    settings = {k: v.with_changes(models=ModelSettings(base="demo", cpu_threads=args.threads)) for k, v in settings.items()}
    timings: dict[str, list[tuple[float, float]]] = defaultdict(list)
    recording = [False]  # only the signed runs' calls are the cost of signing

    def timed(owner: Any, name: str, label: str) -> None:
        original = getattr(owner, name)

        def wrapper(*a: Any, **kw: Any) -> Any:
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                return original(*a, **kw)
            finally:
                if recording[0]:
                    timings[label].append((time.perf_counter() - wall, time.process_time() - cpu))
        setattr(owner, name, wrapper)

    timed(credentials_module.ContentCredentials, "sign_png", "sign_png (C2PA, per image)")
    timed(signer_module.SignerClient, "content_signature", OF_WHICH + "content_signature (socket, ES256)")
    timed(signer_module.SignerClient, "seal", "seal (signer: head, signature.json, journal)")
    load_started = time.perf_counter()
    engines = {kind: Engine(value, demo=True) for kind, value in settings.items()}
    engines["signed"].resources.credentials()
    one_off = time.perf_counter() - load_started
    start_began = time.perf_counter()
    signer_module.start_signer(root / "keys").close()
    keys_load = time.perf_counter() - start_began

    job_toml = EXAMPLE_JOB if args.job == "example" else FAST_JOB
    walls: dict[str, list[float]] = defaultdict(list)
    per_round_signing: list[tuple[float, float]] = []
    print(f"bench_signing: job {args.job!r}, torch threads {args.threads}, load average {load_average()}", flush=True)
    for number in range(args.rounds + 1):  # round 0: untimed warm-up (pipeline load, first kernels)
        order = ("signed", "unsigned") if number % 2 == 0 else ("unsigned", "signed")
        for kind in order:
            timings_before = {label: len(values) for label, values in timings.items()}
            folder = write_example_subject(root / "inbox" / f"{kind}-{number}")
            (folder / "job.toml").write_text(job_toml, encoding="utf-8")
            recording[0] = kind == "signed"
            started = time.perf_counter()
            result = engines[kind].run_job(folder, root / "outbox")
            wall = time.perf_counter() - started
            recording[0] = False
            if result.outcome != "finished":
                raise SystemExit(f"{kind} job ended {result.outcome}: {result.error}")
            if number == 0:
                continue
            walls[kind].append(wall)
            if kind == "signed":
                spent = [value for label, values in timings.items() if not label.startswith(OF_WHICH)
                         for value in values[timings_before.get(label, 0):]]
                per_round_signing.append((sum(w for w, _ in spent), sum(c for _, c in spent)))
    print(f"  {args.rounds} rounds, each the job once signed and once unsigned (order alternating), after one untimed round")
    signed_wall, unsigned_wall = statistics.median(walls["signed"]), statistics.median(walls["unsigned"])
    print(f"  job wall, median: signed {signed_wall:.2f} s, unsigned {unsigned_wall:.2f} s; signed - unsigned {signed_wall - unsigned_wall:+.2f} s "
          "<- noise of that size; the timed steps below are the measurement")
    print("  signing steps in a signed job (medians over every signed run, the warm-up's included)")
    print(f"  {'step':40s} {'calls/job':>9s} {'median ms':>10s} {'total ms/job':>13s}")
    images = len(timings["sign_png (C2PA, per image)"]) // (args.rounds + 1)
    for label, values in sorted(timings.items()):
        per_job = len(values) // (args.rounds + 1)
        median_ms = statistics.median(w for w, _ in values) * 1000
        print(f"  {label:40s} {per_job:9d} {median_ms:10.2f} {median_ms * per_job:13.1f}")
    signing_wall = statistics.median(w for w, _ in per_round_signing)
    signing_cpu = statistics.median(c for _, c in per_round_signing)
    print(f"  signing per job: {signing_wall * 1000:.1f} ms wall ({signing_cpu * 1000:.1f} ms CPU) for {images} images = "
          f"{100 * signing_wall / signed_wall:.2f} % of the signed job's wall time")
    print(f"  once per process, not per job: starting the signer process {keys_load * 1000:.1f} ms; both engines, the signer and the C2PA "
          f"credentials {one_off:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
