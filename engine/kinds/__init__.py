"""Job kinds: which pipeline a job asks for (job.toml's top-level `kind`; "replicate" when absent).

A kind is data (`Kind`, engine.kinds.registry): its name, its stages in order (names from
engine.stages), the frozen dataclass its job.toml is read into (`kind`, `subject`, `prepare` and
the kind's own sections), the report's sections, its own checks (the prompts the denylist screens,
cross-checks between keys), what it trains and the work each stage plans. The runner, ledger,
resume, audit log, outbox, failed/, report and status work the same for every kind, from this
data alone.

Each built-in kind is one module here that owns everything about it (replicate, retouch, restore,
evaluate); the sections several kinds share are engine.kinds.sections. A new kind is one module
defining its `Kind` (listed below), plus the stages of its own in engine/stages; `register_kind`
adds one from outside (a test's throw-away kind). engine.job, the generic loader, imports this
package; nothing here imports engine.job.

Plain data: importing it pulls in no stage (readers of job folders, `status` and the daemon's
metrics, use it).
"""

from __future__ import annotations

from engine.kinds.evaluate import EVALUATE
from engine.kinds.registry import (
    Kind,
    all_kinds,
    all_stage_names,
    kind_named,
    known_kinds,
    progress_units,
    register_kind,
    sections_of_other_kinds,
    unregister_kind,
)
from engine.kinds.replicate import REPLICATE
from engine.kinds.restore import RESTORE
from engine.kinds.retouch import RETOUCH
from engine.kinds.sections import COMMON_SECTIONS, DEFAULT_KIND, KindSpec, LoraRun

for _built_in in (REPLICATE, RETOUCH, RESTORE, EVALUATE):
    register_kind(_built_in)

__all__ = ["COMMON_SECTIONS", "DEFAULT_KIND", "Kind", "KindSpec", "LoraRun", "all_kinds", "all_stage_names", "kind_named", "known_kinds",
           "progress_units", "register_kind", "sections_of_other_kinds", "unregister_kind"]
