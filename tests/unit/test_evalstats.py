"""engine.measure.evalstats on synthetic drifts with known answers: counts that never score a missing
face, Wilcoxon p-values checked against an exact enumeration of the sign-flip distribution
(independent of scipy) and against scipy's own results, Holm's adjustment by hand."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.stats import wilcoxon

from engine.measure.evalstats import holm, paired_test, summarise


def test_a_row_counts_faces_not_found_and_scores_only_the_found_ones():
    row = summarise([0.1, None, 0.3, 0.2], threshold=0.18)
    assert row["cells"] == 4 and row["faces_found"] == 3 and row["faces_not_found"] == 1
    assert row["mean"] == pytest.approx(0.2) and row["median"] == pytest.approx(0.2) and row["sd"] == pytest.approx(0.1)
    assert (row["min"], row["max"]) == (0.1, 0.3)
    assert row["locked"] == 1 and row["locked_share"] == pytest.approx(1 / 3, abs=1e-6)


def test_a_row_without_any_face_has_counts_and_no_score():
    row = summarise([None, None, None], threshold=0.18)
    assert row["cells"] == 3 and row["faces_not_found"] == 3 and row["faces_found"] == 0
    assert row["mean"] is None and row["median"] is None and row["locked_share"] is None and row["locked"] == 0


def _exact_two_sided(differences: list[float]) -> float:
    """P(|W+ - E| >= |w - E|) over all 2^n sign flips: the signed-rank test's null, by enumeration."""
    ranks = np.argsort(np.argsort(np.abs(differences))) + 1
    observed = ranks[np.asarray(differences) > 0].sum()
    centre = ranks.sum() / 2
    hits = sum(abs(sum(r for r, s in zip(ranks, signs) if s) - centre) >= abs(observed - centre) - 1e-12
               for signs in itertools.product((False, True), repeat=len(ranks)))
    return hits / 2 ** len(ranks)


def test_the_paired_test_matches_the_exact_null_distribution():
    rng = np.random.default_rng(3)
    control = rng.uniform(0.3, 0.8, 9)
    differences = [-0.11, -0.05, 0.02, -0.3, -0.07, 0.04, -0.2, -0.01, -0.15]  # distinct magnitudes: no ties
    group = {(0, seed): float(c + d) for seed, (c, d) in enumerate(zip(control, differences))}
    result = paired_test(group, {(0, seed): float(c) for seed, c in enumerate(control)})
    assert result["n"] == 9 and result["excluded"] == 0 and result["method"] == "exact"
    assert result["p_value"] == pytest.approx(_exact_two_sided(differences), abs=1e-8)
    assert result["median_difference"] == pytest.approx(-0.07, abs=1e-6)
    assert (result["closer"], result["farther"], result["equal"]) == (7, 2, 0)


def test_a_group_closer_on_every_cell_has_the_smallest_exact_p():
    control = {(p, s): 0.6 for p in range(2) for s in range(5)}
    group = {key: 0.6 - 0.01 * (i + 1) for i, key in enumerate(sorted(control))}
    result = paired_test(group, control)
    assert result["statistic"] == 0 and result["p_value"] == pytest.approx(2 / 2**10)


def test_cells_without_a_face_on_either_side_are_excluded_not_scored():
    control = {(0, 0): 0.5, (0, 1): None, (0, 2): 0.4, (0, 3): 0.45, (0, 4): 0.7}
    group = {(0, 0): 0.3, (0, 1): 0.2, (0, 2): None, (0, 3): 0.35, (0, 4): 0.6}
    result = paired_test(group, control)
    assert result["n"] == 3 and result["excluded"] == 2
    expected = wilcoxon([0.3, 0.35, 0.6], [0.5, 0.45, 0.7], method="exact")
    assert result["p_value"] == pytest.approx(expected.pvalue) and result["statistic"] == pytest.approx(expected.statistic)


def test_ties_and_zero_differences_take_scipys_approximation_and_say_so():
    control = {(0, s): 0.5 for s in range(8)}
    group = {(0, s): 0.5 + d for s, d in enumerate([-0.1, -0.1, 0.0, -0.2, 0.1, -0.2, -0.3, -0.1])}
    result = paired_test(group, control)
    assert result["method"] == "approx" and result["equal"] == 1
    keys = sorted(control)
    expected = wilcoxon([group[k] for k in keys], [control[k] for k in keys], zero_method="wilcox", method="approx")
    assert result["p_value"] == pytest.approx(expected.pvalue, abs=1e-8)


def test_no_test_without_pairs_or_without_a_difference():
    assert paired_test({(0, 0): None}, {(0, 0): 0.4})["reason"].startswith("no cell where both")
    same = paired_test({(0, 0): 0.4, (0, 1): 0.5}, {(0, 0): 0.4, (0, 1): 0.5})
    assert same["p_value"] is None and same["reason"] == "every paired difference is zero" and same["median_difference"] == 0


def test_holm_adjusts_like_the_textbook_and_keeps_untested_groups_untested():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([None, 0.02, 0.5]) == [None, pytest.approx(0.04), pytest.approx(0.5)]
    assert holm([0.6, 0.7]) == [1.0, 1.0]
