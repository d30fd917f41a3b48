"""engine.measure.mining on synthetic embeddings: accept, reject, tighten, relax and prune behave as the
module says; a random-walk generator (each batch drawn around the group it made so far, pushed
one way) stays near the real reference with the anchor and wanders off without it."""

from __future__ import annotations

import numpy as np
import pytest

from engine.measure.mining import ACCEPTED, NO_FACE, OFF_ANCHOR, OFF_GROUP, Miner, MineRule, cosine_drift

DIM = 64


def at(drift: float, towards: int = 1, jitter: float = 0.0, seed: int = 0) -> np.ndarray:
    """A unit vector at cosine drift `drift` from e0, turned towards axis `towards`, plus a little noise."""
    angle = np.arccos(1.0 - drift)
    vector = np.zeros(DIM)
    vector[0], vector[towards] = np.cos(angle), np.sin(angle)
    vector += jitter * np.random.default_rng(seed).standard_normal(DIM)
    return vector / np.linalg.norm(vector)


ANCHOR = at(0.0)


def test_candidates_near_the_group_join_and_far_ones_are_rejected_with_the_bound_recorded():
    miner = Miner(MineRule(start_bound=0.2, anchor_max_drift=0.4), anchor=ANCHOR)
    judged = miner.offer([(0, at(0.05)), (1, at(0.06, 2)), (2, at(0.05, 3)), (3, None), (4, at(0.3, 5))])
    assert [c.decision for c in judged] == [ACCEPTED, ACCEPTED, ACCEPTED, NO_FACE, OFF_GROUP]
    assert judged[0].mean_drift_to_group is None and judged[0].group_size == 0  # the first member: only the anchor judges it
    far = judged[4]
    assert far.bound == pytest.approx(miner.rule.start_bound * 1) or far.bound < miner.rule.start_bound  # the group's bound at the time
    assert far.mean_drift_to_group > far.bound and far.facts()["decision"] == OFF_GROUP
    assert list(miner.members) == [0, 1, 2]


def test_the_anchor_refuses_a_face_the_group_would_take():
    # A group that formed near the edge of the anchor's reach; a candidate beside it, just past the reach.
    miner = Miner(MineRule(start_bound=0.3, anchor_max_drift=0.4), anchor=ANCHOR)
    miner.offer([(i, at(0.36, 1, 0.02, seed=i)) for i in range(3)])
    [judged] = miner.offer([(9, at(0.46, 1))])
    assert judged.mean_drift_to_group < judged.bound  # the group alone would accept it
    assert judged.decision == OFF_ANCHOR and judged.anchor_drift == pytest.approx(0.46, abs=1e-6)
    # Without an anchor the same face joins.
    free = Miner(MineRule(start_bound=0.3), anchor=None)
    free.offer([(i, at(0.36, 1, 0.02, seed=i)) for i in range(3)])
    assert free.offer([(9, at(0.46, 1))])[0].decision == ACCEPTED


def test_the_bound_tightens_as_the_group_grows_and_stops_at_k_min():
    rule = MineRule(min_group=3, k_start=2.0, k_min=0.5, k_step=0.1)
    assert [rule.k(n) for n in (1, 3, 4, 10, 18, 100)] == pytest.approx([2.0, 2.0, 1.9, 1.3, 0.5, 0.5])
    miner = Miner(MineRule(start_bound=0.5, max_bound=0.9, prune_k=100.0), anchor=ANCHOR)
    bounds = []
    for batch in range(8):
        miner.offer([(batch * 3 + i, at(0.1, 1 + (batch * 3 + i) % (DIM - 1), 0.01, seed=batch * 3 + i)) for i in range(3)])
        bounds.append(miner.bound())
    stats = miner.group_stats()
    assert miner.bound() == pytest.approx(stats[0] + rule.k(len(miner.members)) * stats[1])
    assert bounds[-1] < bounds[1]  # more members, a smaller k: a tighter bound


def test_a_batch_without_acceptance_relaxes_the_bound_until_an_acceptance_resets_it():
    miner = Miner(MineRule(start_bound=0.1, max_bound=0.115, relax=0.1, anchor_max_drift=0.6), anchor=ANCHOR)
    miner.offer([(0, at(0.0))])
    first = miner.bound()
    miner.offer([(1, at(0.5, 2))])
    assert miner.bound() == pytest.approx(first * 1.1)
    miner.offer([(2, at(0.5, 3))])
    assert miner.bound() == pytest.approx(0.115)  # 0.1 x 1.21 would pass max_bound
    assert miner.relax_factor == pytest.approx(1.21)
    miner.offer([(3, at(0.02, 4))])
    assert miner.relax_factor == 1.0 and miner.bound() == pytest.approx(first)
    assert [c.decision for c in miner.candidates] == [ACCEPTED, OFF_GROUP, OFF_GROUP, ACCEPTED]


def test_a_member_the_group_grew_away_from_is_pruned_and_the_batch_recorded():
    miner = Miner(MineRule(start_bound=0.35, prune_k=3.0), anchor=ANCHOR)
    # While the group is small a loose member gets in...
    miner.offer([(0, at(0.02, 1, 0.005, 0)), (1, at(0.02, 1, 0.005, 1)), (2, at(0.25, 7))])
    assert 2 in miner.members
    # ...then the group fills with tight members, and it no longer belongs.
    miner.offer([(10 + i, at(0.02, 1, 0.005, 10 + i)) for i in range(6)])
    assert 2 not in miner.members and 0 in miner.members
    loose = next(c for c in miner.candidates if c.id == 2)
    assert loose.decision == ACCEPTED and loose.pruned_at == 2


def test_mining_stops_at_its_target_or_its_budget():
    target = Miner(MineRule(target=4, budget=100, start_bound=0.5), anchor=ANCHOR)
    target.offer([(i, at(0.02, 1 + i, 0.0)) for i in range(10)])
    assert len(target.members) == 4 and len(target.candidates) == 4 and target.done and "target" in target.stop_reason
    budget = Miner(MineRule(target=50, budget=6), anchor=ANCHOR)
    budget.offer([(i, None) for i in range(10)])
    assert len(budget.candidates) == 6 and budget.done and "budget" in budget.stop_reason


def _walk(anchor: np.ndarray | None, seed: int = 0) -> Miner:
    """A generator that learns from what it accepted last: each batch is drawn around the newest
    members (the reference at first), pushed a step along one direction, as a LoRA retrained on
    its own mined faces drifts."""
    rng = np.random.default_rng(seed)
    rule = MineRule(target=80, budget=400, start_bound=0.3, max_bound=0.5, anchor_max_drift=0.35)
    miner = Miner(rule, anchor=anchor)
    push = np.zeros(DIM)
    push[1] = 0.25
    newest: list[int] = []
    while not miner.done:
        kept = [miner.members[k] for k in newest if k in miner.members]
        centre = np.mean(kept, axis=0) if kept else miner.centroid() if miner.members else ANCHOR
        centre = centre / np.linalg.norm(centre)
        batch = []
        for i in range(8):
            vector = centre + push + 0.04 * rng.standard_normal(DIM)
            batch.append((len(miner.candidates) + i, vector / np.linalg.norm(vector)))
        newest = [c.id for c in miner.offer(batch) if c.decision == ACCEPTED] or newest
    return miner


def test_the_anchor_keeps_a_random_walk_group_near_the_reference_and_without_it_the_group_drifts():
    anchored, free = _walk(ANCHOR), _walk(None)
    reach = anchored.rule.anchor_max_drift
    assert all(cosine_drift(ANCHOR, v) <= reach for v in anchored.members.values())
    assert cosine_drift(ANCHOR, anchored.centroid()) <= reach
    # The same generator and rule without the anchor: the group follows the walk to another face.
    assert cosine_drift(ANCHOR, free.centroid()) > reach
    assert max(cosine_drift(ANCHOR, v) for v in free.members.values()) > 2 * reach
    print(f"centroid drift to the reference: anchored {cosine_drift(ANCHOR, anchored.centroid()):.3f}, "
          f"free {cosine_drift(ANCHOR, free.centroid()):.3f}; anchored rejections by the anchor "
          f"{sum(c.decision == OFF_ANCHOR for c in anchored.candidates)}")
