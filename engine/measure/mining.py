"""Anchored face mining, on embeddings: which generated candidates join a growing "sim-group".

Candidates arrive in batches (engine.stages.mine renders them from the trained LoRA). Each is
judged in turn against the group as it stands:

1. **Anchor.** Its drift (1 - cosine) to the real subject's reference embedding must be at most
   `anchor_max_drift`: the group can never wander off to another face, however consistent that
   face becomes. (`Miner(anchor=None)` exists for the test that shows the drift without it; a
   job cannot ask for it.)
2. **Group.** Its mean drift to the current members must be within the bound. While the group
   has fewer than `min_group` members the bound is `start_bound`; from then on it is
   `mean + k(N) * sd` of the members' own mean drifts to each other, where
   `k(N) = max(k_min, k_start - k_step * (N - min_group))` tightens as the group grows (capped
   below at k_min), and the bound never exceeds `max_bound`.
3. **Relax.** After a batch with no acceptance the bound is multiplied by (1 + relax) (again,
   and again, up to max_bound); an acceptance resets it.
4. **Prune.** After each batch (with at least min_group + 1 members), a member whose mean drift
   to the others exceeds the others' own `mean + prune_k * sd` (leave-one-out: the outlier
   inflates no statistic that judges it) is removed, and the batch is recorded on it (`pruned_at`).
5. **Stop** at `target` members or `budget` candidates offered.

Every decision is recorded with the bound at the time (mine.json), so a lab can replay it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from engine.schema import Bool, Float, Int, Str, rule

ACCEPTED = "accepted"
NO_FACE = "no_face"
OFF_ANCHOR = "rejected_anchor"
OFF_GROUP = "rejected_group"
# The keys of MineRule the Miner reads, in the order mine.json records them.
RULE_KEYS = ("target", "budget", "start_bound", "max_bound", "min_group", "k_start", "k_min", "k_step", "relax", "prune_k", "anchor_max_drift")


@dataclass(frozen=True)
class MineRule:
    """Anchored face mining from the job's LoRA: job.toml's [mine] as it is read (the evaluate
    kind's section, engine.kinds.evaluate; the schema's rules in the field metadata). The rule
    the Miner applies, and how the mine stage renders its candidates (`enabled`, `prompt`,
    `base_seed`, `lora_weight`, `steps`, `guidance`, the growing batches). Off unless `enabled`.
    The anchor (`anchor_max_drift` to the real subject's reference) cannot be switched off:
    mining that is not anchored to a real subject is not offered."""

    enabled: bool = field(default=False, metadata=rule(Bool()))
    prompt: str = field(default="a photo of {trigger}, portrait, neutral background", metadata=rule(Str(min_len=1, max_len=1000)))
    base_seed: int = field(default=1000, metadata=rule(Int(0, 2**32 - 1)))
    lora_weight: float = field(default=1.0, metadata=rule(Float(0.0, 2.0, low_open=True)))
    steps: int = field(default=30, metadata=rule(Int(1, 200)))
    guidance: float = field(default=5.8, metadata=rule(Float(0.0, 30.0)))
    target: int = field(default=12, metadata=rule(Int(1, 256)))  # members: mining stops when the group has them
    budget: int = field(default=64, metadata=rule(Int(1, 4096)))  # candidates at most
    batch: int = field(default=4, metadata=rule(Int(1, 64)))  # the first batch; each next one `growth` times larger
    growth: float = field(default=2.0, metadata=rule(Float(1.0, 8.0)))
    max_batch: int = field(default=16, metadata=rule(Int(1, 64)))
    anchor_max_drift: float = field(default=0.4, metadata=rule(Float(0.0, 1.0, low_open=True)))
    start_bound: float = field(default=0.35, metadata=rule(Float(0.0, 2.0, low_open=True)))
    max_bound: float = field(default=0.6, metadata=rule(Float(0.0, 2.0, low_open=True)))
    min_group: int = field(default=3, metadata=rule(Int(2, 64)))
    k_start: float = field(default=2.0, metadata=rule(Float(0.0, 10.0)))
    k_min: float = field(default=0.5, metadata=rule(Float(0.0, 10.0)))
    k_step: float = field(default=0.1, metadata=rule(Float(0.0, 10.0)))
    relax: float = field(default=0.1, metadata=rule(Float(0.0, 1.0)))
    prune_k: float = field(default=3.0, metadata=rule(Float(0.0, 100.0, low_open=True)))

    def rule_facts(self) -> dict[str, Any]:
        """The rule the Miner applies (mine.json's "rule"), without the rendering settings."""
        return {name: getattr(self, name) for name in RULE_KEYS}

    def k(self, members: int) -> float:
        return max(self.k_min, self.k_start - self.k_step * max(0, members - self.min_group))


def cosine_drift(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(1.0 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@dataclass
class Candidate:
    """One candidate as judged: its id (a seed), the decision and the numbers behind it."""

    id: int
    batch: int
    decision: str
    bound: float | None = None
    mean_drift_to_group: float | None = None
    anchor_drift: float | None = None
    group_size: int = 0  # members when it was judged
    pruned_at: int | None = None  # the batch after which it left the group

    def facts(self) -> dict[str, Any]:
        return {"id": self.id, "batch": self.batch, "decision": self.decision, "bound": _r(self.bound), "mean_drift_to_group": _r(self.mean_drift_to_group),
                "anchor_drift": _r(self.anchor_drift), "group_size": self.group_size, "pruned_at": self.pruned_at}


@dataclass
class Miner:
    rule: MineRule
    anchor: np.ndarray | None
    candidates: list[Candidate] = field(default_factory=list)
    members: dict[int, np.ndarray] = field(default_factory=dict)  # candidate id -> embedding, in order of acceptance
    relax_factor: float = 1.0
    batches: int = 0

    @property
    def done(self) -> bool:
        return len(self.members) >= self.rule.target or len(self.candidates) >= self.rule.budget

    @property
    def stop_reason(self) -> str:
        if len(self.members) >= self.rule.target:
            return f"target of {self.rule.target} members reached"
        return f"budget of {self.rule.budget} candidates spent with {len(self.members)} members" if self.done else "not finished"

    def group_stats(self) -> tuple[float, float] | None:
        """Mean and sd of each member's mean drift to the other members (None below two members)."""
        own = self._own_drifts()
        if len(own) < 2:
            return None
        values = np.asarray(list(own.values()))
        return float(values.mean()), float(values.std(ddof=1))

    def bound(self) -> float:
        """The mean drift to the group a candidate may have now."""
        rule = self.rule
        stats = self.group_stats() if len(self.members) >= rule.min_group else None
        base = rule.start_bound if stats is None else stats[0] + rule.k(len(self.members)) * stats[1]
        return min(rule.max_bound, base * self.relax_factor)

    def offer(self, batch: list[tuple[int, np.ndarray | None]]) -> list[Candidate]:
        """Judge a batch of (id, embedding or None when no face was found), then prune and relax."""
        self.batches += 1
        judged = []
        for key, embedding in batch:
            if len(self.candidates) + len(judged) >= self.rule.budget or len(self.members) >= self.rule.target:
                break
            judged.append(self._judge(key, embedding))
        self.candidates += judged
        self._prune()
        if any(c.decision == ACCEPTED for c in judged):
            self.relax_factor = 1.0
        elif judged:
            self.relax_factor *= 1.0 + self.rule.relax
        return judged

    def _judge(self, key: int, embedding: np.ndarray | None) -> Candidate:
        size = len(self.members)
        if embedding is None:
            return Candidate(key, self.batches, NO_FACE, group_size=size)
        bound = self.bound()
        anchor = cosine_drift(self.anchor, embedding) if self.anchor is not None else None
        mean = float(np.mean([cosine_drift(m, embedding) for m in self.members.values()])) if self.members else None
        if anchor is not None and anchor > self.rule.anchor_max_drift:
            decision = OFF_ANCHOR
        elif mean is not None and mean > bound:
            decision = OFF_GROUP
        else:
            decision = ACCEPTED
            self.members[key] = np.asarray(embedding, dtype=np.float64)
        return Candidate(key, self.batches, decision, bound, mean, anchor, size)

    def _pairwise(self) -> tuple[list[int], np.ndarray]:
        keys = list(self.members)
        vectors = np.stack([self.members[k] / np.linalg.norm(self.members[k]) for k in keys]) if keys else np.zeros((0, 1))
        return keys, 1.0 - vectors @ vectors.T

    def _own_drifts(self) -> dict[int, float]:
        keys, drifts = self._pairwise()
        if len(keys) < 2:
            return {}
        return {k: float((drifts[i].sum() - drifts[i, i]) / (len(keys) - 1)) for i, k in enumerate(keys)}

    def _prune(self) -> None:
        """Leave-one-out: a member goes when its mean drift to the others exceeds the others'
        own mean + prune_k * sd (an outlier inflates no statistic that judges it)."""
        keys, drifts = self._pairwise()
        if len(keys) < self.rule.min_group + 1:
            return
        gone = []
        for i, key in enumerate(keys):
            rest = [j for j in range(len(keys)) if j != i]
            sub = drifts[np.ix_(rest, rest)]
            own = (sub.sum(axis=1) - np.diag(sub)) / (len(rest) - 1)
            if drifts[i, rest].mean() > own.mean() + self.rule.prune_k * own.std(ddof=1):
                gone.append(key)
        for key in gone:
            del self.members[key]
            next(c for c in self.candidates if c.id == key).pruned_at = self.batches

    def centroid(self) -> np.ndarray | None:
        if not self.members:
            return None
        mean = np.mean(list(self.members.values()), axis=0)
        return mean / np.linalg.norm(mean)


def _r(value: float | None) -> float | None:
    return None if value is None else round(float(value), 6)
