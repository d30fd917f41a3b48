"""The statistics of an evaluate grid (engine.stages.evaluate), on plain numbers.

A cell is one (group, prompt, seed) render: its ArcFace drift to the subject's reference, or
None when no face was found. A cell without a face is counted, never scored: it is neither a
drift of 0 nor of 1, and it is left out of every mean, median and test below.

- `summarise`: per (group, prompt) — cells, faces found and not found, mean, median, standard
  deviation, min and max of the drifts found, and the share locked (drift <= threshold) among
  the faces found.
- `paired_test`: a group against the control on the same (prompt, seed) cells — a Wilcoxon
  signed-rank test (scipy.stats.wilcoxon, two-sided) over the cells where both found a face,
  with the median of the differences (group - control: negative = the group renders closer to
  the subject). The method is chosen here and recorded: exact below EXACT_MAX pairs without
  zero or tied differences, else the normal approximation; zero differences are dropped
  (Wilcoxon's own convention, scipy's `zero_method="wilcox"`).
- `holm`: Holm-Bonferroni adjusted p-values, as a grid tests every group against one control.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

EXACT_MAX = 50  # pairs; scipy's exact null distribution is cheap up to here


def summarise(drifts: Sequence[float | None], threshold: float) -> dict[str, Any]:
    """Counts and statistics of one (group, prompt) row of cells."""
    found = [float(d) for d in drifts if d is not None]
    out: dict[str, Any] = {"cells": len(drifts), "faces_found": len(found), "faces_not_found": len(drifts) - len(found)}
    if not found:
        return out | {"mean": None, "median": None, "sd": None, "min": None, "max": None, "locked": 0, "locked_share": None}
    values = np.asarray(found, dtype=np.float64)
    locked = int(np.sum(values <= threshold))
    return out | {
        "mean": _round(values.mean()), "median": _round(np.median(values)),
        "sd": _round(values.std(ddof=1)) if len(values) > 1 else None,
        "min": _round(values.min()), "max": _round(values.max()),
        "locked": locked, "locked_share": _round(locked / len(values)),
    }


def paired_test(group: Mapping[Hashable, float | None], control: Mapping[Hashable, float | None]) -> dict[str, Any]:
    """A group's drifts against the control's on the same cells (keys: (prompt, seed)).

    Returns the pairs used (`n`), the cells left out because either side found no face
    (`excluded`), the median difference, how many cells the group was closer / farther /
    equal, and the Wilcoxon statistic and p-value (None, with `reason`, where no test can
    be made)."""
    keys = sorted(set(group) & set(control), key=repr)
    pairs = [(float(group[k]), float(control[k])) for k in keys if group[k] is not None and control[k] is not None]
    differences = np.asarray([g - c for g, c in pairs], dtype=np.float64)
    out: dict[str, Any] = {
        "n": len(pairs), "excluded": len(keys) - len(pairs),
        "median_difference": _round(np.median(differences)) if len(pairs) else None,
        "closer": int(np.sum(differences < 0)), "farther": int(np.sum(differences > 0)), "equal": int(np.sum(differences == 0)),
        "statistic": None, "p_value": None, "method": None, "reason": "",
    }
    nonzero = differences[differences != 0]
    if not pairs:
        return out | {"reason": "no cell where both the group and the control found a face"}
    if not len(nonzero):
        return out | {"reason": "every paired difference is zero"}
    from scipy.stats import wilcoxon

    ties = len(np.unique(np.abs(nonzero))) < len(nonzero)
    method = "exact" if len(nonzero) <= EXACT_MAX and not ties and len(nonzero) == len(differences) else "approx"
    result = wilcoxon([g for g, _ in pairs], [c for _, c in pairs], zero_method="wilcox", alternative="two-sided", method=method)
    return out | {"statistic": float(result.statistic), "p_value": float(result.pvalue), "method": method}


def holm(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (None stays None and is not counted as a test)."""
    tested = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    adjusted: list[float | None] = [None] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(tested):
        running = max(running, min(1.0, (len(tested) - rank) * p))
        adjusted[i] = running
    return adjusted


def _round(value: float, digits: int = 6) -> float | None:
    value = float(value)
    return None if math.isnan(value) else round(value, digits)
