"""Exact mode (SPEC §7): the same rolls, but exactly floor(n*f + 0.5) extra copies per weight group."""

from __future__ import annotations

import hashlib
import math
import random

import numpy as np
import pyarrow as pa
import pytest

from dlm_pipeline.core.config import TrainingConfig
from dlm_pipeline.core.corpus import rows_table
from dlm_pipeline.core.expansion import (
    EXPANSION_BERNOULLI,
    EXPANSION_EXACT,
    copies_per_row,
    expand_corpus,
    plain_plan,
    table_mode,
    verify_weights,
)
from dlm_pipeline.core.rules import Anchor
from dlm_pipeline.core.weights import SCOPE_NEAREST, weights_table

# group sizes and (distinct) composed weights: quotas with round-half-up (n*f = k + 0.5), f near 0 and near 1
GROUPS = {1: 0.5, 2: 2.25, 3: 2.5, 5: 1.1, 7: 0.999, 10: 3.05, 33: 0.3, 100: 1.5, 250: 0.01}


def roll(seed: int, section: str) -> float:
    return int.from_bytes(hashlib.blake2b(f"{seed}:{section}".encode(), digest_size=8).digest(), "big") / float(1 << 64)


def grouped_corpus() -> tuple[pa.Table, pa.Table]:
    """One tag value per group; rows of all groups interleaved by path."""
    rng = random.Random(5)
    rows = (
        [(f"g{n}", i) for n in GROUPS for i in range(n)]
        + [("whole", i) for i in range(4)]
        + [("drop", i) for i in range(3)]
    )
    rng.shuffle(rows)
    paths = [f"f{j:04d}.txt" for j in range(len(rows))]
    ids = [hashlib.sha256(p.encode()).hexdigest()[:16] for p in paths]
    raw = rows_table(ids, paths, [f"text {p}" for p in paths], [{"g": g} for g, _ in rows])
    weights = {"g": {f"g{n}": w for n, w in GROUPS.items()} | {"whole": 2.0, "drop": 0.0}}
    return raw, weights_table([Anchor("", TrainingConfig(dlm_training_version=1, weights=weights))], SCOPE_NEAREST)


@pytest.mark.parametrize("seed", [0, 1, 42, 2**40 + 7])
def test_exact_mode_gives_the_stated_count_in_groups_of_assorted_sizes(seed):
    raw, table = grouped_corpus()
    expanded, plan = expand_corpus(raw, table, seed, EXPANSION_EXACT)
    groups = raw["tags"].to_pylist()
    ids = raw["section_id"].to_pylist()
    for n, weight in GROUPS.items():
        members = [i for i, tags in enumerate(groups) if dict(tags)["g"] == f"g{n}"]
        whole, fraction = int(weight), weight - int(weight)
        quota = math.floor(n * fraction + 0.5)
        extra = [i for i in members if plan.copies[i] == whole + 1]
        assert all(plan.copies[i] in (whole, whole + 1) for i in members)
        assert len(extra) == quota, (n, weight)
        # the ones with the smallest rolls
        assert sorted(extra) == sorted(sorted(members, key=lambda i: (roll(seed, ids[i]), ids[i]))[:quota])
    for name, copies in (("whole", 2), ("drop", 0)):
        assert {int(plan.copies[i]) for i, tags in enumerate(groups) if dict(tags)["g"] == name} == {copies}
    assert expanded.num_rows == int(plan.copies.sum()) and table_mode(expanded) == EXPANSION_EXACT
    # order and copy numbers as in §3: copies adjacent, in row order
    assert expanded["section_id"].to_pylist() == [
        s for s, c in zip(ids, plan.copies.tolist(), strict=False) for _ in range(c)
    ]
    assert not verify_weights(raw["tags"], plan.weights, plan.copies, EXPANSION_EXACT).groups_off_quota.num_rows


def test_exact_mode_breaks_roll_ties_by_section_id():
    weights = np.full(4, 0.5)
    ids = pa.array(["d", "b", "c", "a"])
    rolls = np.array([0.1, 0.1, 0.7, 0.1])  # three rows share the smallest roll: "a" and "b" win by id
    assert copies_per_row(weights, ids, 0, EXPANSION_EXACT, rolls).tolist() == [0, 1, 0, 1]
    # two separate runs of ties in one group of 8 (quota 4): a, then g before h, then f
    rolls = np.array([0.1, 0.1, 0.2, 0.3, 0.3, 0.3, 0.9, 0.05])
    copies = copies_per_row(np.full(8, 0.5), pa.array(list("hgfedcba")), 0, EXPANSION_EXACT, rolls)
    assert copies.tolist() == [1, 1, 1, 0, 0, 0, 0, 1]
    copies = copies_per_row(
        np.full(7, 0.5), pa.array(list("hgfedcb")), 0, EXPANSION_EXACT, rolls[:7]
    )  # quota 4: c wins the 0.3 run
    assert copies.tolist() == [1, 1, 1, 0, 0, 1, 0]


@pytest.mark.parametrize("seed", [0, 3, 99])
def test_exact_mode_agrees_with_the_row_by_row_implementation(seed):
    raw, table = grouped_corpus()
    _, plan = expand_corpus(raw, table, seed, EXPANSION_EXACT)
    plain = plain_plan(raw, table, seed, EXPANSION_EXACT)
    assert plain.copies.tolist() == plan.copies.tolist() and plain.weights.tolist() == plan.weights.tolist()


def test_bernoulli_stays_the_default_and_keeps_the_reference_rolls():
    raw, table = grouped_corpus()
    default, plan = expand_corpus(raw, table, 7)
    ids = raw["section_id"].to_pylist()
    assert table_mode(default) == EXPANSION_BERNOULLI
    for i, weight in enumerate(plan.weights.tolist()):
        fraction = weight - int(weight) if weight > 0 else 0.0
        assert plan.copies[i] == (int(weight) + (roll(7, ids[i]) < fraction) if weight > 0 else 0)
    assert plain_plan(raw, table, 7).copies.tolist() == plan.copies.tolist()


def test_exact_verdict_flags_a_group_one_copy_off():
    raw, table = grouped_corpus()
    _, plan = expand_corpus(raw, table, 0, EXPANSION_EXACT)
    copies = plan.copies.copy()
    row = int(np.flatnonzero(plan.weights == 1.5)[0])
    copies[row] = 1 if copies[row] == 2 else 2  # still int(w) or int(w)+1, and well inside the binomial bound
    exact = verify_weights(raw["tags"], plan.weights, copies, EXPANSION_EXACT)
    assert exact.groups_off_quota.to_pylist()[0]["weight"] == 1.5 and not exact.rows_out_of_range
    assert not verify_weights(raw["tags"], plan.weights, copies, EXPANSION_BERNOULLI).groups_off_quota.num_rows
