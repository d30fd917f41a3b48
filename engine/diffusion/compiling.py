"""torch.compile of the diffusion UNets (`models.compile`), and what a job records about it.

With `models.compile = true` every diffusion pipeline engine.diffusion.models loads has its UNet compiled
in place (`unet.compile()`: the module stays the same object, so peft adapters are still added
to and removed from it, and `from_pipe` pipelines share it). Compiling happens at the first call
of each new state of the UNet, not at load: the first render with the job's LoRA, at a new weight,
with the LoRA off, with FaceID's processors in. Each state's graph is kept by dynamo for the life
of the process, so the daemon's next job, whose LoRA has the same adapter name and rank, runs on
the graphs the first job compiled and compiles nothing (tests/integration/test_warm_models.py
counts them). Swapping LoRA weights needs no hotswap for that: with torch's default inlining of
nn.Modules, parameters are graph inputs and the guards look at the module's structure, not at
the values (measured, diffusers 0.42 / peft 0.21 / torch 2.13; see `enable_lora_hotswap` for
adapters whose rank changes between jobs, which this does not do).

Training stays eager (`eager()` around the loop): the training graph is a separate compile
(autograd) worth ~2.5 steps/s on SD-1.5 against a 262 s compile (issue 19's H200 figures), and an
eager loop is the one whose resume is bit-exact.

Inductor's on-disk cache (compiled kernels, FX graphs) lives on the models volume by default
(`models.compile_cache`, relative to the models folder), so a restarted daemon compiles from the
cache in a fraction of the time. A models volume mounted read-only cannot hold it: the cache then
goes to the temporary folder, with a warning, and the audit says which one a job used.

Importing this module imports no torch.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

if TYPE_CHECKING:
    from engine.config import Settings

log = structlog.get_logger(__name__)

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"  # inductor reads it at each lookup; Triton's cache sits under it
FALLBACK_CACHE = "idrep-inductor-cache"  # under the temporary folder, when the configured one cannot be written
# Dynamo keeps at most this many graphs per code object and then runs it eager for good. A job
# visits base, LoRA on at several weights, LoRA off, FaceID in and out: more than torch's 8.
RECOMPILE_LIMIT = 64

_chosen: dict[Path, Path] = {}  # configured cache -> the one used (itself, or the fallback)


def enabled(settings: Settings) -> bool:
    return bool(settings.models.compile)


def check(settings: Settings) -> None:
    """At start-up, with models.compile on: a C compiler must be there (CPU inductor builds its
    kernels with one, and Triton its GPU launchers: a `-runtime` CUDA image has none), else
    ConfigError("compile_unavailable") naming the key, rather than a job failing at its first
    render. Sets up the cache (engine.diffusion.compiling.cache_dir) too."""
    if not enabled(settings):
        return
    import shutil

    from engine.errors import ConfigError

    wanted = os.environ.get("CC")
    found = shutil.which(wanted) if wanted else next(filter(None, map(shutil.which, ("cc", "gcc", "clang"))), None)
    if found is None:
        raise ConfigError("compile_unavailable", f"models.compile = true needs a C compiler for torch.compile's kernels, and "
                                                 f"{'CC=' + wanted + ' is not on PATH' if wanted else 'none (cc, gcc, clang) is on PATH'}; "
                                                 "install one (gcc) in the image, or set models.compile = false")
    cache_dir(settings)


def configured_cache(settings: Settings) -> Path:
    """`models.compile_cache`, absolute: relative names are under the models folder."""
    path = Path(settings.models.compile_cache).expanduser()
    return path if path.is_absolute() else settings.models_dir / path


def cache_dir(settings: Settings) -> Path:
    """The inductor cache this process uses, checked once per configured folder: that folder, or
    the fallback under the temporary folder when it cannot be written. Sets TORCHINDUCTOR_CACHE_DIR."""
    wanted = configured_cache(settings)
    if wanted not in _chosen:
        chosen = wanted
        try:
            wanted.mkdir(parents=True, exist_ok=True)
            probe = tempfile.NamedTemporaryFile(dir=wanted, prefix=".probe.", delete=True)
            probe.close()
        except OSError as exc:
            chosen = Path(tempfile.gettempdir()) / FALLBACK_CACHE
            chosen.mkdir(parents=True, exist_ok=True)
            log.warning("compile_cache_unwritable", configured=str(wanted), error=str(exc), using=str(chosen),
                        hint="models.compile_cache: a writable folder keeps compiled kernels across restarts")
        _chosen[wanted] = chosen
    os.environ[CACHE_ENV] = str(_chosen[wanted])
    return _chosen[wanted]


def compile_unet(pipe: Any, settings: Settings) -> None:
    """Compile `pipe`'s UNet in place (see the module's docstring); the cache is set up first."""
    import torch

    cache = cache_dir(settings)
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # renamed in torch 2.7
    setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
    pipe.unet.compile()
    log.info("unet_compile_enabled", pipeline=type(pipe).__name__, cache_dir=str(cache))


@contextlib.contextmanager
def eager() -> Iterator[None]:
    """Compiled modules run eager inside the block (torch.compiler.set_stance, process-wide)."""
    import torch

    with torch.compiler.set_stance("force_eager"):
        yield


def counters() -> dict[str, int]:
    """Process-wide totals: graphs dynamo compiled, inductor FX-graph cache hits and misses."""
    import sys

    if "torch" not in sys.modules:
        return {"graphs": 0, "cache_hits": 0, "cache_misses": 0}
    from torch._dynamo.utils import counters as dynamo

    return {"graphs": int(dynamo["stats"]["unique_graphs"]), "cache_hits": int(dynamo["inductor"]["fxgraph_cache_hit"]),
            "cache_misses": int(dynamo["inductor"]["fxgraph_cache_miss"])}


def since(before: dict[str, int]) -> dict[str, int]:
    """What was compiled since `before` (a `counters()`): a stage's share, for its audit line."""
    now = counters()
    return {key: now[key] - before.get(key, 0) for key in now}


def facts(settings: Settings) -> dict[str, Any]:
    """For job_started: whether UNets run compiled, and the cache they use."""
    if not enabled(settings):
        return {"enabled": False}
    return {"enabled": True, "cache_dir": str(cache_dir(settings)), "configured_cache_dir": str(configured_cache(settings)),
            "training": "eager"}
