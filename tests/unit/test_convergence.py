"""The phase-exit statistics against numbers worked out independently: by hand, by numpy, by
scipy.stats.linregress; and a checkpoint round trip that must not change a single decision."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats

from engine.measure.convergence import PhaseConvergence, SlopeWindow, Welford


def _flat_noisy(steps: int, seed: int = 7) -> list[float]:
    """A converged loss: a constant with small Gaussian noise."""
    rng = np.random.default_rng(seed)
    return (0.35 + 0.01 * rng.standard_normal(steps)).tolist()


def _falling(steps: int, seed: int = 11) -> list[float]:
    """A loss still learning: exponential decay (time constant 400 steps) plus noise."""
    rng = np.random.default_rng(seed)
    step = np.arange(steps)
    return (0.1 + 2.0 * np.exp(-step / 400.0) + 0.01 * rng.standard_normal(steps)).tolist()


def _run(phase: PhaseConvergence, losses: list[float]) -> list[str | None]:
    """Feed losses until the phase exits; the decision after each step."""
    decisions: list[str | None] = []
    for loss in losses:
        decisions.append(phase.update(loss))
        if decisions[-1] is not None:
            break
    return decisions


# --- Welford -------------------------------------------------------------------------------


def test_welford_hand_series():
    # [2, 4, 4, 4, 5, 5, 7, 9]: sum 40, mean 5; squared deviations 9+1+1+1+0+0+4+16 = 32,
    # population variance 32/8 = 4, sample variance 32/7.
    welford = Welford()
    for value in [2, 4, 4, 4, 5, 5, 7, 9]:
        welford.update(value)
    assert welford.count == 8
    assert welford.mean == pytest.approx(5.0, abs=1e-15)
    assert welford.population_variance == pytest.approx(4.0, abs=1e-14)
    assert welford.variance == pytest.approx(32 / 7, abs=1e-14)


def test_welford_matches_numpy():
    values = np.random.default_rng(1).normal(loc=3.0, scale=0.5, size=2000)
    welford = Welford()
    for value in values:
        welford.update(value)
    assert welford.mean == pytest.approx(float(np.mean(values)), rel=1e-12, abs=0)
    assert welford.variance == pytest.approx(float(np.var(values, ddof=1)), rel=1e-12, abs=0)
    assert welford.population_variance == pytest.approx(float(np.var(values, ddof=0)), rel=1e-12, abs=0)


def test_welford_stays_accurate_on_a_large_offset():
    # Mean 1e8, spread 1: the sum-of-squares formula would lose every digit here.
    values = 1e8 + np.random.default_rng(2).standard_normal(500)
    welford = Welford()
    for value in values:
        welford.update(value)
    assert welford.variance == pytest.approx(float(np.var(values, ddof=1)), rel=1e-7)


def test_welford_undefined_variances():
    welford = Welford()
    assert welford.variance is None and welford.population_variance is None
    welford.update(3.0)
    assert welford.variance is None
    assert welford.population_variance == 0.0


def test_welford_round_trip_is_exact():
    welford = Welford()
    for value in [0.1, 0.2, 0.30000000000000004, 1 / 3, 1e-17]:
        welford.update(value)
    restored = Welford.from_dict(json.loads(json.dumps(welford.to_dict())))
    assert (restored.count, restored.mean, restored.m2) == (welford.count, welford.mean, welford.m2)
    assert all(type(v) in (int, float) for v in welford.to_dict().values())


# --- SlopeWindow ---------------------------------------------------------------------------


def test_slope_hand_worked_example():
    # y = [1, 2, 2, 3, 4] at x = 0..4.
    # x̄ = 2, ȳ = 2.4; Sxx = 4+1+0+1+4 = 10;
    # Sxy = (-2)(-1.4) + (-1)(-0.4) + 0 + (1)(0.6) + (2)(1.6) = 7.0  ->  slope = 0.7.
    # intercept = 2.4 - 0.7*2 = 1.0; fitted 1.0, 1.7, 2.4, 3.1, 3.8;
    # residuals 0, 0.3, -0.4, -0.1, 0.2  ->  SSR = 0.09+0.16+0.01+0.04 = 0.30.
    # s² = SSR/(n-2) = 0.1; SE = sqrt(0.1/10) = 0.1; t = 0.7/0.1 = 7, with 3 degrees of freedom.
    # Student t with ν = 3 has a closed-form CDF:
    #   F(t) = 1/2 + (1/π) [ t / (√3 (1 + t²/3)) + arctan(t/√3) ],
    # so the two-sided p = 2(1 - F(7)) = 1 - (2/π) [ 7/(√3·52/3) + arctan(7/√3) ] ≈ 0.0059863.
    window = SlopeWindow(5, [1, 2, 2, 3, 4])
    t = 7.0
    p_by_hand = 1.0 - (2.0 / math.pi) * (t / (math.sqrt(3) * (1 + t * t / 3)) + math.atan(t / math.sqrt(3)))
    assert window.slope() == pytest.approx(0.7, abs=1e-14)
    assert window.p_value() == pytest.approx(p_by_hand, abs=1e-12)
    assert window.p_value() == pytest.approx(0.0059863, abs=1e-7)


@pytest.mark.parametrize("n, trend, seed", [(3, 0.0, 0), (4, 0.5, 1), (10, 0.0, 2), (25, -0.002, 3), (50, -0.01, 4), (50, 1e-4, 5)])
def test_slope_and_p_value_match_numpy_and_scipy(n, trend, seed):
    rng = np.random.default_rng(seed)
    x = np.arange(n, dtype=np.float64)
    y = 0.8 + trend * x + 0.05 * rng.standard_normal(n)
    window = SlopeWindow(n, y.tolist())
    expected = stats.linregress(x, y)
    assert window.slope() == pytest.approx(float(np.polyfit(x, y, deg=1)[0]), rel=1e-10, abs=1e-12)
    assert window.p_value() == pytest.approx(float(expected.pvalue), abs=1e-10)


def test_window_keeps_only_the_last_size_losses():
    y = np.random.default_rng(6).standard_normal(40).cumsum()
    window = SlopeWindow(12)
    for value in y:
        window.append(value)
    assert len(window) == 12
    tail = y[-12:]
    x = np.arange(12, dtype=np.float64)
    assert window.slope() == pytest.approx(float(np.polyfit(x, tail, deg=1)[0]), rel=1e-10, abs=1e-12)
    assert window.p_value() == pytest.approx(float(stats.linregress(x, tail).pvalue), abs=1e-10)


def test_degenerate_windows():
    assert SlopeWindow(5).slope() is None
    assert SlopeWindow(5, [1.0]).slope() is None
    two = SlopeWindow(5, [1.0, 3.0])
    assert two.slope() == pytest.approx(2.0) and two.p_value() is None  # no residual dof
    # Flat: zero residual variance with slope 0 is a plateau by definition. 0.1 is not exact
    # in binary, so a careless mean could leave a rounding residue; the answer must not.
    flat = SlopeWindow(10, [0.1] * 10)
    assert flat.slope() == 0.0 and flat.p_value() == 1.0
    # Perfectly straight, sloped: certainly a trend.
    assert SlopeWindow(5, [1, 2, 3, 4, 5]).p_value() == 0.0
    assert SlopeWindow(6, [0.3 - 0.01 * i for i in range(6)]).p_value() == 0.0


def test_window_size_below_three_is_refused():
    with pytest.raises(ValueError, match="at least 3"):
        SlopeWindow(2)


# --- PhaseConvergence ----------------------------------------------------------------------


def test_plateau_on_flat_noisy_series_at_the_first_step_linregress_agrees():
    min_steps, window, p_threshold = 60, 30, 0.2
    losses = _flat_noisy(1000)
    decisions = _run(PhaseConvergence(min_steps, 1000, window, p_threshold), losses)
    # Independently: the first step >= max(min_steps, window) whose last `window` losses have a
    # linregress p-value above the threshold.
    expected_step = next(
        step
        for step in range(max(min_steps, window), len(losses) + 1)
        if stats.linregress(np.arange(window), losses[step - window : step]).pvalue > p_threshold
    )
    assert decisions[-1] == "plateau"
    assert len(decisions) == expected_step
    assert min_steps <= expected_step < 200  # it converged promptly, not by luck at the end


def test_falling_series_runs_to_max_steps():
    phase = PhaseConvergence(min_steps=20, max_steps=300, window=30, p_threshold=0.2)
    decisions = _run(phase, _falling(1000))
    assert decisions[:-1] == [None] * 299
    assert decisions[-1] == "max_steps"
    assert phase.steps == 300
    assert phase.summary()["slope"] < 0 and phase.summary()["p_value"] < 1e-6


def test_min_steps_is_respected_on_a_perfectly_flat_series():
    # The window is flat (p = 1.0) from step 10 on, yet the phase must run to step 40.
    decisions = _run(PhaseConvergence(min_steps=40, max_steps=500, window=10, p_threshold=0.5), [0.25] * 500)
    assert decisions == [None] * 39 + ["plateau"]


def test_a_half_filled_window_is_never_judged():
    decisions = _run(PhaseConvergence(min_steps=0, max_steps=500, window=20, p_threshold=0.5), [0.25] * 500)
    assert decisions == [None] * 19 + ["plateau"]


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_loss_exits_at_once_without_touching_the_statistics(bad):
    phase = PhaseConvergence(min_steps=50, max_steps=500, window=10, p_threshold=0.5)
    assert _run(phase, [1.0, 0.9, 0.8]) == [None, None, None]
    before = phase.to_dict()
    assert phase.update(bad) == "non_finite"
    after = phase.to_dict()
    assert after.pop("exit_reason") == "non_finite"
    before.pop("exit_reason")
    assert after == before
    assert math.isfinite(phase.summary()["mean"])


def test_update_after_exit_is_refused():
    phase = PhaseConvergence(min_steps=1, max_steps=1, window=3, p_threshold=0.5)
    assert phase.update(1.0) == "max_steps"
    with pytest.raises(RuntimeError, match="already ended"):
        phase.update(1.0)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(min_steps=10, max_steps=5, window=5, p_threshold=0.5),
        dict(min_steps=0, max_steps=0, window=5, p_threshold=0.5),
        dict(min_steps=0, max_steps=10, window=5, p_threshold=1.0),
        dict(min_steps=0, max_steps=10, window=2, p_threshold=0.5),
    ],
)
def test_bad_settings_are_refused(kwargs):
    with pytest.raises(ValueError):
        PhaseConvergence(**kwargs)


def test_summary_before_and_after_steps():
    phase = PhaseConvergence(min_steps=0, max_steps=100, window=5, p_threshold=0.5)
    assert phase.summary() == {"rule": "no_visible_trend", "steps": 0, "mean": None, "variance": None, "slope": None, "p_value": None}
    for loss in [1, 2, 2, 3, 4]:
        phase.update(loss)
    summary = phase.summary()
    assert summary["steps"] == 5
    assert summary["mean"] == pytest.approx(2.4)
    assert summary["variance"] == pytest.approx(1.3)  # (1.96+0.16+0.16+0.36+2.56)/4
    assert summary["slope"] == pytest.approx(0.7)
    assert summary["p_value"] == pytest.approx(0.0059863, abs=1e-7)


@pytest.mark.parametrize("cut", [1, 17, 100, 170])
def test_resume_from_json_checkpoint_is_bit_exact(cut):
    # Falling for 150 steps, then flat: the plateau exit (step 175) comes after every cut point.
    losses = _falling(150) + _flat_noisy(400, seed=3)
    settings = dict(min_steps=40, max_steps=600, window=25, p_threshold=0.3)

    straight = PhaseConvergence(**settings)
    straight_decisions = _run(straight, losses)

    first = PhaseConvergence(**settings)
    resumed_decisions = _run(first, losses[:cut])
    checkpoint = json.loads(json.dumps(first.to_dict()))
    resumed = PhaseConvergence.from_dict(checkpoint)
    assert resumed.to_dict() == first.to_dict()
    if resumed_decisions[-1] is None:
        resumed_decisions += _run(resumed, losses[cut:])

    assert straight_decisions[-1] == "plateau"
    assert resumed_decisions == straight_decisions
    assert resumed.to_dict() == straight.to_dict()
    assert resumed.summary() == straight.summary()
