"""The vectorised expansion gives exactly the reference's rows: same copies, same order, same weights."""

from __future__ import annotations

import hashlib
import random

import numpy as np
import pyarrow as pa
import pytest

from dlm_pipeline.core.config import TrainingConfig
from dlm_pipeline.core.corpus import rows_table
from dlm_pipeline.core.expansion import (
    ExpansionTooLarge,
    expand_corpus,
    expand_rows,
    plan_from_weights,
    tag_stats,
)
from dlm_pipeline.core.fraction_hash import (
    HAS_COMPILED_KERNEL,
    _digests_hashlib,
    section_digests,
    section_rolls,
)
from dlm_pipeline.core.rules import Anchor, ancestor_dirs
from dlm_pipeline.core.weights import (
    GLOBAL_ANCHOR,
    SCOPE_GLOBAL,
    SCOPE_NEAREST,
    chain_factor,
    maps_from_table,
    resolve_weights,
    weights_table,
)

KEYS = ["lang", "generated", "kind", "a", "zeta", "1"]
VALUES = ["python", "md", "true", "false", "x", "1", "é"]
FACTORS = [0.0, 0.1, 0.25, 0.5, 0.999999, 1.0, 1.5, 2.25, 3.0, 7.3, 1e-9, 1 / 3, 99.99]


def random_map(rng: random.Random) -> dict[str, dict[str, float]]:
    return {
        k: {v: rng.choice(FACTORS) for v in rng.sample(VALUES, rng.randint(1, 4))}
        for k in rng.sample(KEYS, rng.randint(0, 4))
    }


def random_rows(rng: random.Random, n: int, dirs: list[str]):
    tags = [
        dict(sorted({k: rng.choice(VALUES) for k in rng.sample(KEYS, rng.randint(0, 5))}.items())) for _ in range(n)
    ]
    paths = sorted({f"{rng.choice(dirs)}/f{i}.txt".lstrip("/") for i in range(n)}, key=str.encode)
    ids = [hashlib.sha256(p.encode()).hexdigest()[:16] for p in paths]
    return rows_table(ids, paths, [f"text of {p}" for p in paths], tags[: len(paths)])


def reference_input(table: pa.Table) -> list[dict]:
    """The table's rows in the reference's row format (tags as dicts, in stored order)."""
    return [
        {"_dlm_row_tags": dict(tags), "_dlm_section_id": sid, "i": i}
        for i, (tags, sid) in enumerate(zip(table["tags"].to_pylist(), table["section_id"].to_pylist(), strict=False))
    ]


def reference_rows(reference, rows: list[dict], per_row_maps: list[dict], seed: int) -> list[int]:
    """Indices of the rows the reference emits, applying each row's own map to it alone."""
    out = []
    for row, weights in zip(rows, per_row_maps, strict=False):
        out.extend(r["i"] for r in reference.expand_rows_by_weight([row], weights, seed=seed))
    return out


def ours(table: pa.Table, anchors: list[Anchor], scope: str, seed: int) -> pa.Table:
    return expand_corpus(table, weights_table(anchors, scope), seed)[0]


@pytest.mark.parametrize("trial", range(6))
@pytest.mark.parametrize("scope", [SCOPE_GLOBAL, SCOPE_NEAREST])
def test_parity_with_reference_on_generated_trees(reference, trial, scope):
    rng = random.Random(1000 + trial)
    dirs = ["", "src", "src/gen", "src/gen/deep", "docs", "docs/api", "notes"]
    anchor_dirs = rng.sample(dirs, rng.randint(1, len(dirs)))
    anchors = [Anchor(d, TrainingConfig(dlm_training_version=1, weights=random_map(rng))) for d in anchor_dirs]
    table = random_rows(rng, 400, dirs)
    by_dir = {a.dir: a for a in anchors}
    if scope == SCOPE_GLOBAL:
        ordered = sorted(anchors, key=lambda a: (a.depth, a.dir))
        global_map = reference.merge_weights_maps([a.config.weights for a in ordered])
        per_row = [global_map] * table.num_rows
    else:
        per_row = []
        for path in table["path"].to_pylist():
            chain = [by_dir[d] for d in ancestor_dirs(path.rpartition("/")[0]) if d in by_dir]
            per_row.append(reference.merge_weights_maps([a.config.weights for a in chain]))
    rows, all_paths = reference_input(table), table["path"].to_pylist()
    for seed in (0, 1, 42, 2**40 + 7):
        expanded = ours(table, anchors, scope, seed)
        expected = reference_rows(reference, rows, per_row, seed)
        assert expanded["path"].to_pylist() == [all_paths[i] for i in expected]
        expected_weights = [reference.resolve_row_weight(rows[i]["_dlm_row_tags"], per_row[i]) for i in expected]
        assert expanded["weight"].to_pylist() == expected_weights
        copies = expanded["copy"].to_pylist()
        assert all(
            c == 0 or (c == p + 1 and a == b)
            for c, p, a, b in zip(
                copies[1:], copies, expanded["path"].to_pylist()[1:], expanded["path"].to_pylist(), strict=False
            )
        )


@pytest.mark.parametrize("speculative", [False, True])
def test_parity_with_reference_on_one_big_random_map(reference, monkeypatch, speculative):
    from dlm_pipeline.core import expansion

    # Large tables hash every row ahead on another thread; force that path here too.
    monkeypatch.setattr(expansion, "SPECULATIVE_HASH_MIN_ROWS", 0 if speculative else 10**9)
    rng = random.Random(7)
    table = random_rows(rng, 5000, [""])
    weights = random_map(rng) | {"kind": {"x": 2.5, "md": 0.5}, "lang": {"python": 1.5, "é": 0.75}}
    rows = reference_input(table)
    for seed in range(5):
        expanded, _ = expand_rows(table, np.zeros(table.num_rows, np.int32), [(weights,)], seed)
        expected = [r["_dlm_section_id"] for r in reference.expand_rows_by_weight(rows, weights, seed=seed)]
        assert expanded["section_id"].to_pylist() == expected


def test_multi_key_product_is_taken_in_sorted_key_order(reference):
    # Unsorted tags in the input are multiplied in sorted key order, like the reference on sorted tags.
    weights = {"b": {"x": 0.1}, "a": {"y": 3.0}, "c": {"z": 1 / 3}}
    tags_sorted = {"a": "y", "b": "x", "c": "z"}
    table = rows_table(["00"], ["p"], ["t"], [{"c": "z", "a": "y", "b": "x"}])
    expanded, plan = expand_rows(table, np.zeros(1, np.int32), [(weights,)], 0)
    assert plan.weights[0] == reference.resolve_row_weight(tags_sorted, weights)


def test_zero_weight_drops_and_empty_map_keeps_once():
    table = rows_table(["a1", "b2"], ["a", "b"], ["x", "y"], [{"k": "drop"}, {"k": "keep"}])
    expanded, plan = expand_rows(table, np.zeros(2, np.int32), [({"k": {"drop": 0.0}},)], 3)
    assert expanded["path"].to_pylist() == ["b"] and plan.copies.tolist() == [0, 1]
    expanded, _ = expand_rows(table, np.full(2, -1, np.int32), [], 3)
    assert expanded["path"].to_pylist() == ["a", "b"]
    assert expanded["weight"].to_pylist() == [1.0, 1.0] and expanded["copy"].to_pylist() == [0, 0]


def test_expanded_columns_and_types():
    table = rows_table(["a1"], ["a"], ["x"], [{"k": "v"}])
    expanded, _ = expand_rows(table, np.zeros(1, np.int32), [({"k": {"v": 3.0}},)], 0)
    assert expanded.schema.names == ["section_id", "path", "text", "tags", "weight", "copy"]
    assert expanded.schema.field("weight").type == pa.float64()
    assert expanded.schema.field("copy").type == pa.int32()
    assert expanded["copy"].to_pylist() == [0, 1, 2]


def test_empty_table_expands_to_empty():
    table = rows_table([], [], [], [])
    expanded, plan = expand_rows(table, np.zeros(0, np.int32), [({"k": {"v": 2.0}},)], 0)
    assert expanded.num_rows == 0 and len(plan.weights) == 0
    assert tag_stats(table["tags"], plan.weights, plan.copies).num_rows == 0


def test_absurd_products_are_refused_before_allocating():
    with pytest.raises(ExpansionTooLarge, match="lower the weights"):
        plan_from_weights(np.array([1e12]), pa.array(["a1"]), 0)


def test_tag_stats_expected_and_realized():
    table = rows_table(["a1", "b2", "c3"], ["a", "b", "c"], ["x", "y", "z"], [{"k": "v"}, {"k": "v"}, {"k": "w"}])
    _, plan = expand_rows(table, np.zeros(3, np.int32), [({"k": {"v": 2.0, "w": 0.0}},)], 0)
    stats = tag_stats(table["tags"], plan.weights, plan.copies).to_pylist()
    assert stats == [
        {"tag_key": "k", "tag_value": "v", "rows": 2, "expected": 4.0, "realized": 4, "whole": 4.0, "variance": 0.0},
        {"tag_key": "k", "tag_value": "w", "rows": 1, "expected": 0.0, "realized": 0, "whole": 0.0, "variance": 0.0},
    ]


@pytest.mark.parametrize("seed", [0, 5, 123456789012345678901234567890])
def test_batched_hash_equals_hashlib(seed):
    rng = random.Random(seed % 1000)
    items = ["".join(rng.choice("0123456789abcdefé/:") for _ in range(rng.randint(0, 300))) for _ in range(3000)]
    expected = [int.from_bytes(hashlib.blake2b(f"{seed}:{s}".encode(), digest_size=8).digest(), "big") for s in items]
    assert section_digests(seed, items).tolist() == expected
    assert _digests_hashlib(f"{seed}:".encode(), items).tolist() == expected
    sliced = pa.array(items).slice(100, 500)
    assert section_rolls(seed, sliced).tolist() == [v / float(1 << 64) for v in expected[100:600]]


def test_roll_rounding_matches_python_int_division_at_the_edges():
    rng = random.Random(3)
    values = [2**64 - 1, 2**64 - 1024, 2**64 - 1025, 2**64 - 2048, 2**63, 2**63 + 1, 2**53 + 1, 2**53 + 3, 0, 1]
    values += [rng.getrandbits(64) for _ in range(50_000)]
    as_float = np.array(values, dtype=np.uint64).astype(np.float64) * 2.0**-64
    assert as_float.tolist() == [v / float(1 << 64) for v in values]


def test_compiled_kernel_is_built_here():
    # The fallback gives the same numbers, but CI installs with a compiler: make sure we measure the real kernel.
    assert HAS_COMPILED_KERNEL


def test_global_map_orders_by_depth_then_path(reference):
    anchors = [
        Anchor("b", TrainingConfig(dlm_training_version=1, weights={"k": {"v": 2.0}})),
        Anchor("a", TrainingConfig(dlm_training_version=1, weights={"k": {"v": 3.0}})),
        Anchor("", TrainingConfig(dlm_training_version=1, weights={"k": {"v": 5.0, "w": 0.5}})),
        Anchor("a/deep", TrainingConfig(dlm_training_version=1, weights={"k": {"w": 4.0}})),
    ]
    maps = maps_from_table(weights_table(anchors, SCOPE_GLOBAL), SCOPE_GLOBAL)
    assert maps[GLOBAL_ANCHOR] == {"k": {"v": 2.0, "w": 4.0}}
    table = weights_table(anchors, SCOPE_NEAREST)
    assert maps_from_table(table, SCOPE_NEAREST) == {  # each anchor's own map, stored once
        "": {"k": {"v": 5.0, "w": 0.5}},
        "a": {"k": {"v": 3.0}},
        "a/deep": {"k": {"w": 4.0}},
        "b": {"k": {"v": 2.0}},
    }
    # resolved along each row's chain, they give the merged maps of the ancestors
    row_chain, chains = resolve_weights(pa.array(["x.txt", "a/y.txt", "a/deep/z.txt", "b/w.txt"]), table)
    merged = [{k: {v: chain_factor(chains[c], k, v) for v in ("v", "w")}} for c in row_chain.tolist() for k in ("k",)]
    assert merged == [
        {"k": {"v": 5.0, "w": 0.5}},
        {"k": {"v": 3.0, "w": 0.5}},
        {"k": {"v": 3.0, "w": 4.0}},
        {"k": {"v": 2.0, "w": 0.5}},
    ]
