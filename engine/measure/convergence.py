"""When has a training phase's loss stopped improving? Welford, slope window, plateau test.

The trainer runs each LoRA phase (COARSE, MID, MID_FINE, FINAL_FINE) until its loss has
converged instead of for a fixed number of steps. After every optimizer step it feeds the
step's loss (a unitless float, whatever the phase's loss function returns) to a
`PhaseConvergence`, which answers with an exit reason or None:

- ``"non_finite"``: the loss is NaN or infinite; training has diverged, stop now.
- ``"plateau"``: at least ``max(min_steps, window)`` steps have run and a straight line fitted
  to the last ``window`` losses has a slope that is not significantly different from zero
  (two-sided t-test p-value above ``p_threshold``): the loss is no longer going down.
- ``"max_steps"``: the phase reached its step budget without a plateau.

A *high* p-value is the exit signal: it means the window gives no evidence of a trend. The
threshold therefore trades speed for patience: the higher it is, the flatter the window
must look before the phase ends. That is the rule `no_visible_trend`, kept for comparison:
it stops when it *cannot see* a trend, and per-step diffusion losses (dominated by the random
timestep) hide any trend a 50-step window could show, so it ends most phases at their first
judged step (issue 13's simulation: 75-80 % of phases at step 50, whatever the curve).

The default rule, `improvement_bound`, judges a low-noise signal instead, the loss on a
fixed probe set (the trainer evaluates it every `probe_every` steps), and ends a phase when
the improvement still to come is *confidently small*:

- ``"converged"``: the upper confidence bound (one-sided, `confidence`) of the improvement
  over the next `horizon` steps, from the window's slope and its standard error, is at most
  `epsilon` x the window's mean probe loss (the one-sided half of an equivalence test, in
  units of the loss level, so it means the same for MSE, Huber and Charbonnier phases);
- ``"diverging"``: the lower confidence bound of the rise over the next `horizon` steps is
  above `epsilon` x the mean, over a full window: the probe loss is confidently going up (not
  a plateau; the next phase, with its lower learning rate, takes over).

The window holds the last `window // probe_every` probe losses; it is judged from `min_steps`
on, once it holds 3 of them (so `min_steps` acts even when it is shorter than the window).

All state (counts, running sums, the window's losses) converts to and from plain JSON-safe
dicts with `to_dict`/`from_dict`, so a checkpoint written mid-phase resumes with exactly the
same numbers, and so exactly the same exit decisions, as a run that never stopped.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from typing import Any

import numpy as np
from scipy import stats

EXIT_NON_FINITE = "non_finite"
EXIT_PLATEAU = "plateau"  # no_visible_trend's exit
EXIT_CONVERGED = "converged"  # improvement_bound's exits
EXIT_DIVERGING = "diverging"
EXIT_MAX_STEPS = "max_steps"

RULE_IMPROVEMENT_BOUND = "improvement_bound"
RULE_NO_VISIBLE_TREND = "no_visible_trend"
RULES = (RULE_IMPROVEMENT_BOUND, RULE_NO_VISIBLE_TREND)
MIN_PROBES = 3  # a slope's standard error needs n - 2 >= 1

# A fit whose residuals are all within this many float64 ulps of the losses' magnitude is
# "perfect": the residual variance is rounding noise, and the t statistic would be noise/noise.
_PERFECT_FIT_ULPS = 16.0


class Welford:
    """Running count, mean and variance of a stream, in one pass and O(1) memory.

    Welford's update keeps the sum of squared deviations (`m2`) directly instead of the sum of
    squares, so the variance stays accurate when the mean is large compared with the spread
    (a loss of 0.1234 +- 1e-5, say), where the textbook sum-of-squares formula cancels away.
    """

    def __init__(self, count: int = 0, mean: float = 0.0, m2: float = 0.0) -> None:
        self.count = count
        self.mean = mean
        self.m2 = m2  # sum of squared deviations from the current mean

    def update(self, value: float) -> None:
        """Fold one observation into the running statistics."""
        value = float(value)
        self.count += 1
        delta = value - self.mean
        self.mean += delta / self.count
        self.m2 += delta * (value - self.mean)

    @property
    def variance(self) -> float | None:
        """Sample variance (divides by n - 1); None with fewer than 2 observations."""
        if self.count < 2:
            return None
        return self.m2 / (self.count - 1)

    @property
    def population_variance(self) -> float | None:
        """Population variance (divides by n); None with no observations."""
        if self.count < 1:
            return None
        return self.m2 / self.count

    def to_dict(self) -> dict[str, Any]:
        return {"count": self.count, "mean": float(self.mean), "m2": float(self.m2)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Welford:
        return cls(count=int(data["count"]), mean=float(data["mean"]), m2=float(data["m2"]))


class SlopeWindow:
    """The last `size` losses, and the least-squares trend through them.

    The losses are taken to be one optimizer step apart, so the slope is in loss units per
    step (negative while the loss is still falling). Only the window's own positions
    0..n-1 are used as x: a slope does not depend on where the x axis starts.
    """

    def __init__(self, size: int, values: Iterable[float] = ()) -> None:
        if size < 3:
            raise ValueError(f"slope window size must be at least 3 (a p-value needs n - 2 >= 1), got {size}")
        self.size = size
        self.values: deque[float] = deque((float(value) for value in values), maxlen=size)

    def append(self, value: float) -> None:
        """Add the newest loss; once full, the oldest one drops out."""
        self.values.append(float(value))

    def __len__(self) -> int:
        return len(self.values)

    def _fit(self) -> tuple[float, float, float, float] | None:
        """(slope, sum of squared residuals, Sxx, magnitude of the losses), or None below 2 points."""
        n = len(self.values)
        if n < 2:
            return None
        y = np.fromiter(self.values, dtype=np.float64, count=n)
        x = np.arange(n, dtype=np.float64)
        x_centred = x - x.mean()
        y_centred = y - y.mean()
        sxx = float(np.dot(x_centred, x_centred))
        slope = float(np.dot(x_centred, y_centred)) / sxx
        residuals = y_centred - slope * x_centred
        ssr = float(np.dot(residuals, residuals))
        return slope, ssr, sxx, float(np.max(np.abs(y)))

    def _is_flat(self) -> bool:
        return len(self.values) > 0 and min(self.values) == max(self.values)

    def slope(self) -> float | None:
        """Ordinary least-squares slope of loss against step (loss per step); None below 2 points.

        A window of identical losses has a slope of exactly 0.0 (not a rounding residue).
        """
        if self._is_flat() and len(self.values) >= 2:
            return 0.0
        fit = self._fit()
        return None if fit is None else fit[0]

    def p_value(self) -> float | None:
        """Two-sided p-value of "the true slope is 0", from the t distribution with n - 2 dof.

        t = slope / SE, SE = sqrt(SSR / (n - 2) / Sxx). None below 3 points (no residual
        degrees of freedom). When the residual variance is zero the t statistic is undefined,
        so the answer is decided directly: a flat window (slope 0) is the very definition of
        a plateau, p = 1.0; a perfectly straight sloped line is certainly a trend, p = 0.0.
        """
        n = len(self.values)
        if n < 3:
            return None
        if self._is_flat():
            return 1.0
        fit = self._fit()
        assert fit is not None  # n >= 3
        slope, ssr, sxx, magnitude = fit
        rounding_noise = n * (_PERFECT_FIT_ULPS * np.finfo(np.float64).eps * magnitude) ** 2
        if ssr <= rounding_noise:
            return 1.0 if slope == 0.0 else 0.0
        standard_error = math.sqrt(ssr / (n - 2) / sxx)
        t_statistic = slope / standard_error
        return float(min(1.0, 2.0 * stats.t.sf(abs(t_statistic), n - 2)))

    def slope_and_error(self) -> tuple[float, float] | None:
        """(slope, its standard error), per position; None below 3 points. A flat or perfectly
        straight window has an error of exactly 0.0 (rounding noise is not evidence)."""
        n = len(self.values)
        if n < 3:
            return None
        if self._is_flat():
            return 0.0, 0.0
        fit = self._fit()
        assert fit is not None
        slope, ssr, sxx, magnitude = fit
        if ssr <= n * (_PERFECT_FIT_ULPS * np.finfo(np.float64).eps * magnitude) ** 2:
            return slope, 0.0
        return slope, math.sqrt(ssr / (n - 2) / sxx)

    def mean(self) -> float | None:
        return float(np.mean(np.fromiter(self.values, dtype=np.float64))) if self.values else None

    def to_dict(self) -> dict[str, Any]:
        return {"size": self.size, "values": [float(value) for value in self.values]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SlopeWindow:
        return cls(size=int(data["size"]), values=data["values"])


def improvement_bound(window: SlopeWindow, *, spacing: int, horizon: float, confidence: float) -> dict[str, float] | None:
    """The window's trend as bounds over the next `horizon` steps (its points `spacing` steps
    apart): `improvement_upper`, the most the loss can confidently still fall, and `rise_lower`,
    the least it confidently rises; with the slope per step, its standard error and the mean.
    None below 3 points."""
    fitted = window.slope_and_error()
    if fitted is None:
        return None
    slope, error = fitted[0] / spacing, fitted[1] / spacing
    quantile = float(stats.t.ppf(confidence, len(window) - 2))
    mean = window.mean()
    assert mean is not None
    return {"slope_per_step": slope, "slope_se": error, "window_mean": mean, "t_quantile": quantile,
            "improvement_upper": horizon * (-slope + quantile * error), "rise_lower": horizon * (slope - quantile * error)}


class PhaseConvergence:
    """Decides, step by step, when one training phase should end, and says why.

    `min_steps` and `max_steps` count optimizer steps of this phase; `window` is the number
    of most recent losses the plateau test looks at; `p_threshold` (0 < p < 1) is the p-value
    above which the window's slope counts as "no trend". The plateau test only starts once
    ``max(min_steps, window)`` steps have run, so it never judges a half-filled window and
    never ends a phase before its minimum.
    """

    def __init__(self, min_steps: int, max_steps: int, window: int, p_threshold: float, *, rule: str = RULE_NO_VISIBLE_TREND,
                 probe_every: int = 1, horizon: float = 100.0, epsilon: float = 0.01, confidence: float = 0.95) -> None:
        if not 0 <= min_steps <= max_steps:
            raise ValueError(f"need 0 <= min_steps <= max_steps, got min_steps={min_steps}, max_steps={max_steps}")
        if max_steps < 1:
            raise ValueError(f"max_steps must be at least 1, got {max_steps}")
        if not 0.0 < p_threshold < 1.0:
            raise ValueError(f"p_threshold must be between 0 and 1, got {p_threshold}")
        if rule not in RULES:
            raise ValueError(f"unknown convergence rule {rule!r}; rules are {', '.join(RULES)}")
        if probe_every < 1 or (rule == RULE_IMPROVEMENT_BOUND and window // probe_every < MIN_PROBES):
            raise ValueError(f"a window of {window} steps holds {window // max(probe_every, 1)} probe losses at one every {probe_every} "
                             f"steps; the improvement bound needs at least {MIN_PROBES}")
        if not (horizon > 0 and epsilon > 0 and 0.5 < confidence < 1.0):
            raise ValueError(f"need horizon > 0, epsilon > 0 and 0.5 < confidence < 1, got {horizon}, {epsilon}, {confidence}")
        self.min_steps = min_steps
        self.max_steps = max_steps
        self.p_threshold = float(p_threshold)
        self.rule = rule
        self.probe_every = probe_every if rule == RULE_IMPROVEMENT_BOUND else 1
        self.horizon, self.epsilon, self.confidence = float(horizon), float(epsilon), float(confidence)
        self.steps = 0  # finite losses seen in this phase
        self.welford = Welford()  # over the whole phase, for the log and the report
        # no_visible_trend: the last `window` step losses; improvement_bound: the probe losses of
        # the last `window` steps.
        self.window = SlopeWindow(window if rule == RULE_NO_VISIBLE_TREND else window // probe_every)
        self.last_probe: float | None = None
        self.last_bound: dict[str, float] | None = None
        self.exit_reason: str | None = None

    def wants_probe(self, step_in_phase: int) -> bool:
        """Should the trainer evaluate the probe loss after this step of the phase (1-based)?"""
        return self.rule == RULE_IMPROVEMENT_BOUND and step_in_phase % self.probe_every == 0

    def update(self, loss: float, probe: float | None = None) -> str | None:
        """Record one step's loss (and, under improvement_bound, the probe loss evaluated after
        it when `wants_probe` said so); return why the phase should end now, or None to go on.

        A non-finite loss ends the phase at once and is not folded into the statistics (it
        would poison the mean and the window for good). When convergence and the step budget
        are reached on the same step, the reason is the convergence one: the loss did converge.
        Calling again after an exit is a bug in the caller and raises RuntimeError.
        """
        if self.exit_reason is not None:
            raise RuntimeError(f"phase already ended ({self.exit_reason}) after {self.steps} steps")
        loss = float(loss)
        if not math.isfinite(loss) or (probe is not None and not math.isfinite(float(probe))):
            self.exit_reason = EXIT_NON_FINITE
            return self.exit_reason
        self.steps += 1
        self.welford.update(loss)
        if self.rule == RULE_NO_VISIBLE_TREND:
            self.window.append(loss)
            if self.steps >= max(self.min_steps, self.window.size):
                p_value = self.window.p_value()
                if p_value is not None and p_value > self.p_threshold:
                    self.exit_reason = EXIT_PLATEAU
                    return self.exit_reason
        elif probe is not None:
            self.last_probe = float(probe)
            self.window.append(self.last_probe)
            self.last_bound = improvement_bound(self.window, spacing=self.probe_every, horizon=self.horizon, confidence=self.confidence)
            if self.last_bound is not None and self.steps >= self.min_steps:
                allowed = self.epsilon * abs(self.last_bound["window_mean"])
                if self.last_bound["rise_lower"] > allowed:  # confidently rising: never "converged"
                    if len(self.window) == self.window.size:  # and called diverging on a full window only
                        self.exit_reason = EXIT_DIVERGING
                        return self.exit_reason
                elif self.last_bound["improvement_upper"] <= allowed:
                    self.exit_reason = EXIT_CONVERGED
                    return self.exit_reason
        if self.steps >= self.max_steps:
            self.exit_reason = EXIT_MAX_STEPS
            return self.exit_reason
        return None

    def summary(self) -> dict[str, Any]:
        """The numbers worth logging at a phase exit (or a progress tick); None where undefined."""
        summary: dict[str, Any] = {
            "rule": self.rule,
            "steps": self.steps,
            "mean": self.welford.mean if self.welford.count else None,
            "variance": self.welford.variance,
            "slope": self.window.slope(),
            "p_value": self.window.p_value(),
        }
        if self.rule == RULE_IMPROVEMENT_BOUND:
            bound = self.last_bound or {}
            summary.update(probe_loss=self.last_probe, probes_in_window=len(self.window), window_mean=bound.get("window_mean"),
                           slope_se=bound.get("slope_se"), improvement_upper=bound.get("improvement_upper"),
                           rise_lower=bound.get("rise_lower"), allowed=None if not bound else self.epsilon * abs(bound["window_mean"]),
                           horizon=self.horizon, epsilon=self.epsilon, confidence=self.confidence)
        return summary

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to resume bit-exactly; JSON-safe (floats round-trip exactly)."""
        return {
            "min_steps": self.min_steps,
            "max_steps": self.max_steps,
            "p_threshold": self.p_threshold,
            "rule": self.rule,
            "probe_every": self.probe_every,
            "horizon": self.horizon,
            "epsilon": self.epsilon,
            "confidence": self.confidence,
            "steps": self.steps,
            "exit_reason": self.exit_reason,
            "welford": self.welford.to_dict(),
            "window": self.window.to_dict(),
            "last_probe": self.last_probe,
            "last_bound": self.last_bound,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PhaseConvergence:
        window = SlopeWindow.from_dict(data["window"])
        rule = data.get("rule", RULE_NO_VISIBLE_TREND)
        probe_every = int(data.get("probe_every", 1))
        phase = cls(
            min_steps=int(data["min_steps"]),
            max_steps=int(data["max_steps"]),
            window=window.size * (probe_every if rule == RULE_IMPROVEMENT_BOUND else 1),
            p_threshold=float(data["p_threshold"]),
            rule=rule,
            probe_every=probe_every,
            horizon=float(data.get("horizon", 100.0)),
            epsilon=float(data.get("epsilon", 0.01)),
            confidence=float(data.get("confidence", 0.95)),
        )
        phase.steps = int(data["steps"])
        phase.exit_reason = data["exit_reason"]
        phase.welford = Welford.from_dict(data["welford"])
        phase.window = window
        phase.last_probe = data.get("last_probe")
        phase.last_bound = data.get("last_bound")
        return phase
