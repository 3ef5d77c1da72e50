"""The backend-neutral plan: byte-sized batches, tasks that write content-named shards, the driver's commit."""

from __future__ import annotations

import itertools
import json
import os

import pytest

from dlm_pipeline.core.compute import RunStats, plan_batches, tokenize_batch
from dlm_pipeline.core.corpus import content_key
from dlm_pipeline.core.token_store import MANIFEST, TokenStore
from dlm_pipeline.core.tokenize import load_tokenizer

TEXTS = [f"def g{i}(y):\n    return y + {i}  # naïve {i}\n" * (1 + i % 7) for i in range(200)]
KEYS = [content_key(t) for t in TEXTS]


def in_process_writer(store: TokenStore, loaded, batch_bytes: int, stats: RunStats):
    """A serial backend: the same tasks Ray runs, one after another in this process."""

    def write(namespace, keys, texts):
        written = []
        for batch, (start, end) in enumerate(plan_batches(texts, batch_bytes)):
            result = tokenize_batch(str(store.root), namespace, loaded, keys[start:end], texts[start:end], batch)
            stats.tasks += 1
            stats.add(result)
            written.extend(result.shards)
        return written, sum(w["seconds"] for w in stats.per_worker.values()), stats.tokens

    return write


def test_batches_are_consecutive_bounded_by_bytes_and_cover_everything():
    texts = ["é" * 10, "a" * 5, "b" * 30, "", "c" * 3]  # "é" is 2 bytes: 20 bytes
    assert plan_batches(texts, 25) == [(0, 2), (2, 3), (3, 5)]  # 30 bytes alone in its batch
    assert plan_batches(texts, 10**6) == [(0, 5)]
    assert plan_batches([], 10) == []
    many = plan_batches(TEXTS, 2_000)
    assert many[0][0] == 0 and many[-1][1] == len(TEXTS)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(many))
    assert all(sum(len(t.encode()) for t in TEXTS[s:e]) <= 2_000 or e - s == 1 for s, e in many)
    with pytest.raises(ValueError):
        plan_batches(TEXTS, 0)


def test_a_retried_task_rewrites_the_same_shard_and_the_manifest_is_untouched(tmp_path):
    loaded = load_tokenizer()
    store = TokenStore(tmp_path / "cache")
    first = tokenize_batch(str(store.root), loaded.cache_namespace, loaded, KEYS[:50], TEXTS[:50])
    ((name, entry),) = first.shards
    path = store.root / name
    data = path.read_bytes()
    again = tokenize_batch(str(store.root), loaded.cache_namespace, loaded, KEYS[:50], TEXTS[:50], attempt=1)
    assert again.shards[0][0] == name and path.read_bytes() == data  # same name, same bytes
    assert name.split("/")[1] == f"shard-{entry['sha256'][:32]}.parquet"
    assert not (store.root / MANIFEST).exists()  # workers never write the manifest
    assert first.tokens == again.tokens > 0 and first.text_bytes == sum(len(t.encode()) for t in TEXTS[:50])


def test_backend_writes_give_the_same_rows_as_local_and_then_hit(tmp_path):
    loaded = load_tokenizer()
    local = TokenStore(tmp_path / "local").get_or_compute(loaded.cache_namespace, KEYS, TEXTS, loaded.encode)
    store, stats = TokenStore(tmp_path / "remote"), RunStats()

    def refuse(texts):
        raise AssertionError("the driver encoded texts the workers should have")

    remote = store.get_or_compute(
        loaded.cache_namespace, KEYS, TEXTS, refuse, in_process_writer(store, loaded, 1_500, stats)
    )
    assert remote.table.equals(local.table) and remote.misses == len(TEXTS) and remote.hits == 0
    assert stats.tasks > 3 and stats.tokens == remote.encoded_tokens == local.encoded_tokens
    assert len(store.stats()["namespaces"]) == 1 and store.repair()["corrupt"] == []
    warm = store.get_or_compute(
        loaded.cache_namespace, KEYS[::-1], TEXTS[::-1], refuse, in_process_writer(store, loaded, 1_500, RunStats())
    )
    assert warm.hits == len(TEXTS) and warm.table.equals(local.table.take(list(range(len(TEXTS)))[::-1]))


def test_commit_lists_only_regular_shards_of_the_stated_size(tmp_path):
    loaded = load_tokenizer()
    store = TokenStore(tmp_path / "cache")
    ns = loaded.cache_namespace
    good = tokenize_batch(str(store.root), ns, loaded, KEYS[:20], TEXTS[:20]).shards[0]
    short = tokenize_batch(str(store.root), ns, loaded, KEYS[20:40], TEXTS[20:40]).shards[0]
    linked = tokenize_batch(str(store.root), ns, loaded, KEYS[40:60], TEXTS[40:60]).shards[0]
    target = store.root / linked[0]
    os.replace(target, tmp_path / "elsewhere.parquet")
    os.symlink(tmp_path / "elsewhere.parquet", target)
    wrong_size = (short[0], {**short[1], "bytes": short[1]["bytes"] + 1})
    foreign = ("../../etc/passwd", good[1])
    missing = (f"{ns}/shard-{'0' * 32}.parquet", good[1])
    committed = store.commit([good, wrong_size, (linked[0], linked[1]), foreign, missing, (good[0], "not a dict")])
    assert list(committed) == [good[0]]
    assert list(json.loads((store.root / MANIFEST).read_text())["shards"]) == [good[0]]
    # repair adopts the complete shard nobody committed (as after a driver killed before its commit);
    # the driver encodes whatever the workers' shards did not cover (the symlinked one)
    lookup = store.get_or_compute(ns, KEYS[:60], TEXTS[:60], loaded.encode, lambda *_: ([wrong_size, missing], 0.0, 0))
    assert lookup.hits == 40 and lookup.misses == 20
    assert (tmp_path / "elsewhere.parquet").exists() and target.is_symlink()  # never followed nor deleted
    assert lookup.table.equals(
        TokenStore(tmp_path / "fresh").get_or_compute(ns, KEYS[:60], TEXTS[:60], loaded.encode).table
    )
