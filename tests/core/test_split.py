"""The split (SPEC §7): keyed on content, decided before expansion, stable, leak-free."""

import hashlib

import numpy as np
import pyarrow as pa

from dlm_pipeline.core.corpus import content_key, rows_table, section_id
from dlm_pipeline.core.dataset import plan_dataset
from dlm_pipeline.core.expansion import apply_plan, plan_from_weights
from dlm_pipeline.core.split import content_keys, train_order, validation_side


def corpus(files: dict[str, str], tags: dict[str, dict] | None = None) -> pa.Table:
    paths = sorted(files, key=str.encode)
    return rows_table(
        [section_id(p, files[p]) for p in paths],
        paths,
        [files[p] for p in paths],
        [(tags or {}).get(p, {}) for p in paths],
    )


def expanded(raw: pa.Table, weights: np.ndarray, seed: int) -> pa.Table:
    plan = plan_from_weights(weights, raw["section_id"].combine_chunks(), seed)
    return apply_plan(raw, plan).select(["section_id", "copy"])


def plan(raw: pa.Table, weights: np.ndarray, seed: int = 0, split_seed: int = 0, val_fraction: float = 0.3):
    return plan_dataset(
        raw, expanded(raw, weights, seed), weights, seed=seed, split_seed=split_seed, val_fraction=val_fraction
    )


def texts_of(raw: pa.Table, rows: np.ndarray) -> list[str]:
    return raw["text"].take(pa.array(rows, pa.int64())).to_pylist()


def many_files(n: int, prefix: str = "f") -> dict[str, str]:
    return {f"{prefix}{i:03d}.py": f"print({i})  # {prefix}\n" for i in range(n)}


def test_side_is_the_spec_formula():
    keys = [content_key(f"text {i}") for i in range(200)]
    for split_seed, fraction in [(0, 0.1), (7, 0.5), (3, 0.0)]:
        expected = [
            int.from_bytes(hashlib.blake2b(f"split:{split_seed}:{k}".encode(), digest_size=8).digest(), "big") / 2**64
            < fraction
            for k in keys
        ]
        assert validation_side(keys, split_seed, fraction).tolist() == expected
    assert not validation_side(keys, 0, 0.0).any()
    assert 40 < validation_side(keys, 0, 0.5).sum() < 160


def test_train_order_is_the_spec_order():
    ids = pa.array(["b", "a", "a", "c", "a"])
    copies = np.array([0, 0, 1, 0, 2])
    expected = sorted(
        range(5),
        key=lambda i: (
            hashlib.blake2b(f"order:5:{ids[i].as_py()}:{copies[i]}".encode(), digest_size=8).digest(),
            ids[i].as_py(),
            copies[i],
        ),
    )
    assert train_order(5, ids, copies).tolist() == expected


def test_duplicates_share_a_side_and_copies_never_leak():
    files = many_files(60)
    for i in range(0, 60, 3):  # the same text at several paths
        files[f"copies/a/{i}.py"] = files[f"f{i:03d}.py"]
        files[f"copies/b/{i}.py"] = files[f"f{i:03d}.py"]
    raw = corpus(files)
    weights = np.full(raw.num_rows, 3.0)  # every file upsampled: copies must stay on one side
    result = plan(raw, weights, val_fraction=0.3)
    train, validation = set(texts_of(raw, result.train_rows)), set(texts_of(raw, result.validation_rows))
    assert train and validation and not train & validation
    assert len(result.train_rows) == 3 * int((~result.validation).sum())
    assert len(result.validation_rows) == int(result.validation.sum())  # once each, no copies
    by_text = {}
    for text, side in zip(raw["text"].to_pylist(), result.validation.tolist(), strict=False):
        by_text.setdefault(text, set()).add(side)
    assert all(len(sides) == 1 for sides in by_text.values())


def test_split_is_deterministic():
    raw = corpus(many_files(50))
    weights = np.full(raw.num_rows, 1.5)
    a, b = plan(raw, weights, seed=4), plan(raw, weights, seed=4)
    assert a.train_rows.tolist() == b.train_rows.tolist()
    assert a.validation_rows.tolist() == b.validation_rows.tolist()


def test_validation_is_identical_for_every_expansion_seed():
    raw = corpus(many_files(80))
    weights = np.full(raw.num_rows, 1.5)
    plans = [plan(raw, weights, seed=seed) for seed in range(4)]
    assert all(p.validation_rows.tolist() == plans[0].validation_rows.tolist() for p in plans)
    assert len({tuple(p.train_rows.tolist()) for p in plans}) == 4  # the train side is shuffled per seed


def test_adding_or_removing_files_moves_no_other_file_across():
    base = many_files(80)
    grown = {**base, **many_files(40, prefix="new")}
    shrunk = {p: t for i, (p, t) in enumerate(sorted(base.items())) if i % 4}

    def sides(files):
        raw = corpus(files)
        result = plan(raw, np.ones(raw.num_rows))
        return dict(zip(raw["path"].to_pylist(), result.validation.tolist(), strict=False))

    before = sides(base)
    for changed in (sides(grown), sides(shrunk)):
        assert all(before[p] == side for p, side in changed.items() if p in before)


def test_validation_holds_rows_of_positive_weight_ordered_by_content_key():
    raw = corpus(many_files(100))
    weights = np.where(np.arange(raw.num_rows) % 2, 0.0, 0.4)  # half dropped, half rarely copied
    result = plan(raw, weights, val_fraction=0.5)
    rows = result.validation_rows.tolist()
    assert rows and all(weights[r] > 0 and result.validation[r] for r in rows)
    assert len(rows) == int((result.validation & (weights > 0)).sum())
    keys = [result.content_keys[r] for r in rows]
    assert keys == sorted(keys)


def test_validation_side_is_independent_of_the_weights():
    raw = corpus(many_files(60))
    light, heavy = plan(raw, np.full(raw.num_rows, 0.5)), plan(raw, np.full(raw.num_rows, 7.0))
    assert light.validation.tolist() == heavy.validation.tolist()


def test_split_seed_changes_the_split():
    raw = corpus(many_files(100))
    weights = np.ones(raw.num_rows)
    assert plan(raw, weights, split_seed=0).validation.tolist() != plan(raw, weights, split_seed=1).validation.tolist()


def test_content_keys_hashed_in_place_are_content_key_of_each_text():
    """Keys hashed from the Arrow buffers equal `content_key` of each Python string, for sliced,
    chunked and large string columns, empty and non-ASCII texts."""
    texts = ["", "a", "café\n", "日本語 " * 50, "x" * 5000, "\r\n"] * 7
    expected = [content_key(t) for t in texts]
    array = pa.array(texts, pa.string())
    assert content_keys(array) == expected
    assert content_keys(array.slice(5, 20)) == expected[5:25]
    assert content_keys(pa.chunked_array([array.slice(0, 3), array.slice(3)])) == expected
    assert content_keys(pa.array(texts, pa.large_string()).slice(1)) == expected[1:]
    assert content_keys(pa.array([], pa.string())) == []
