"""The token store on real files: hits, misses, namespaces, eviction, repair after killed writers, concurrency."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dlm_pipeline.core.corpus import content_key
from dlm_pipeline.core.token_store import MANIFEST, TokenStore
from dlm_pipeline.core.tokenize import TokenizerError, cut, fingerprint_of, load_tokenizer

TEXTS = [f"def f{i}(x):\n    return x * {i}  # café {i}\n" * (1 + i % 5) for i in range(300)]
IDS = [content_key(t) for t in TEXTS]


def test_default_tokenizer_loads_offline_and_fingerprint_is_content_based(tmp_path):
    loaded = load_tokenizer()
    assert loaded.tokenizer.get_vocab_size() == 8192
    copy = tmp_path / "elsewhere" / "tokenizer.json"
    copy.parent.mkdir()
    copy.write_text(loaded.tokenizer.to_str())
    assert load_tokenizer(str(copy)).fingerprint == loaded.fingerprint  # path does not matter
    assert load_tokenizer(str(copy.parent)).fingerprint == loaded.fingerprint  # directory form
    assert fingerprint_of(loaded.tokenizer) == loaded.fingerprint


def test_tokenizer_errors_are_clear(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope.json"))
    with pytest.raises(TokenizerError, match="directory without a tokenizer.json"):
        load_tokenizer(str(tmp_path))
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load tokenizer"):
        load_tokenizer(str(tmp_path / "bad.json"))
    with pytest.raises(TokenizerError, match="max_seq_len must be > 0"):
        load_tokenizer(max_seq_len=0)


def test_encode_keeps_full_ids_and_cut_counts_truncation():
    loaded = load_tokenizer(max_seq_len=8)
    full = load_tokenizer().tokenizer.encode("a b c d e f g h i j k l").ids
    encoded = loaded.encode(["a b c d e f g h i j k l", "short"])
    assert encoded.column_names == ["input_ids", "n_tokens"]
    assert encoded["input_ids"].to_pylist()[0] == full and encoded["n_tokens"].to_pylist()[0] == len(full) > 8
    table = cut(encoded, 8)
    assert table["n_tokens"].to_pylist()[0] == 8 and table["truncated"].to_pylist() == [True, False]
    assert table["input_ids"].to_pylist()[0] == full[:8]


def test_hits_after_misses_and_same_ids(tmp_path):
    loaded = load_tokenizer()
    store = TokenStore(tmp_path / "cache")
    cold = store.get_or_compute(loaded.cache_namespace, IDS, TEXTS, loaded.encode)
    assert (cold.hits, cold.misses) == (0, 300)
    warm = store.get_or_compute(loaded.cache_namespace, IDS[::-1], TEXTS[::-1], loaded.encode)
    assert (warm.hits, warm.misses) == (300, 0)
    assert warm.table["input_ids"].to_pylist() == cold.table["input_ids"].to_pylist()[::-1]
    assert cold.table["input_ids"].to_pylist() == [
        e.ids for e in loaded.tokenizer.encode_batch(TEXTS, add_special_tokens=False)
    ]
    assert store.stats()["rows"] == 300 and store.stats()["shards"] == 1


def test_hits_in_stored_order_shuffled_and_across_shards_are_the_encoded_rows(tmp_path):
    """Rows read back in the order they were stored are used without reordering (no copy); any other
    order, a subset or keys spread over two shards give the same rows as the encoder."""
    import random

    loaded = load_tokenizer(max_seq_len=12)
    store = TokenStore(tmp_path / "cache")
    store.get_or_compute(loaded.cache_namespace, IDS[:200], TEXTS[:200], loaded.encode)
    store.get_or_compute(loaded.cache_namespace, IDS[200:], TEXTS[200:], loaded.encode)
    assert store.stats()["shards"] == 2
    order = list(range(300))
    picks = [order[:200], order, order[::-1], random.Random(3).sample(order, 150), [250, 3, 250 - 1, 7]]
    for rows in picks:
        found = store.get_or_compute(
            loaded.cache_namespace, [IDS[i] for i in rows], [TEXTS[i] for i in rows], loaded.encode
        )
        assert found.misses == 0
        expected = loaded.encode([TEXTS[i] for i in rows])
        assert found.table.select(["input_ids", "n_tokens"]).equals(expected.cast(found.table.schema.remove(0)))
        cut_rows = cut(found.table, 12)
        assert cut_rows["input_ids"].to_pylist() == [ids[:12] for ids in expected["input_ids"].to_pylist()]
        assert cut(found.table, 10**6)["input_ids"].to_pylist() == expected["input_ids"].to_pylist()
        lengths = store.get_or_compute(
            loaded.cache_namespace, [IDS[i] for i in rows], [TEXTS[i] for i in rows], loaded.encode, lengths_only=True
        )
        assert lengths.table.column_names == ["content_key", "n_tokens"] and lengths.hits == len(rows)
        assert lengths.table["n_tokens"].to_pylist() == expected["n_tokens"].to_pylist()
    fresh = TokenStore(tmp_path / "fresh").get_or_compute(loaded.cache_namespace, IDS, TEXTS, loaded.encode, None, True)
    assert fresh.misses == 300 and fresh.table.column_names == ["content_key", "n_tokens"]
    assert fresh.table["n_tokens"].to_pylist() == loaded.encode(TEXTS)["n_tokens"].to_pylist()


def test_namespaces_separate_special_tokens_but_not_lengths(tmp_path):
    store = TokenStore(tmp_path / "cache")
    a, b = load_tokenizer(max_seq_len=2048), load_tokenizer(max_seq_len=4)
    assert a.cache_namespace == b.cache_namespace == a.fingerprint[:32]
    cold = store.get_or_compute(a.cache_namespace, IDS, TEXTS, a.encode)
    short = store.get_or_compute(b.cache_namespace, IDS, TEXTS, b.encode)
    assert short.misses == 0 and short.table["input_ids"].to_pylist() == cold.table["input_ids"].to_pylist()
    assert cold.table.column_names == ["content_key", "input_ids", "n_tokens"]
    assert cold.table["content_key"].to_pylist() == IDS
    special = load_tokenizer(add_special_tokens=True)
    assert special.cache_namespace == a.fingerprint[:32] + "-special"
    assert store.get_or_compute(special.cache_namespace, IDS, TEXTS, special.encode).misses == 300
    assert len(store.stats()["namespaces"]) == 2


def test_lru_eviction_never_removes_what_the_run_uses(tmp_path):
    loaded = load_tokenizer()
    store = TokenStore(tmp_path / "cache")
    for start in range(0, 300, 100):
        store.get_or_compute(
            loaded.cache_namespace, IDS[start : start + 100], TEXTS[start : start + 100], loaded.encode
        )
        time.sleep(0.01)
    shards = store.stats()["shards"]
    assert shards == 3
    store.max_bytes = 1  # everything is over the cap now
    result = store.get_or_compute(loaded.cache_namespace, IDS[100:200], TEXTS[100:200], loaded.encode)
    assert result.hits == 100
    manifest = json.loads((store.root / MANIFEST).read_text())["shards"]
    assert set(manifest) == result.shards_used  # only what this run used survives
    assert all((store.root / name).exists() for name in manifest)


def test_repair_after_killed_writes(tmp_path):
    loaded = load_tokenizer()
    store = TokenStore(tmp_path / "cache")
    store.get_or_compute(loaded.cache_namespace, IDS[:100], TEXTS[:100], loaded.encode)
    ns_dir = store.root / loaded.cache_namespace
    (good,) = list(ns_dir.glob("shard-*.parquet"))
    # What killed writers leave: a torn temp file, a finished shard the manifest never heard of,
    # a manifest entry whose file is gone, and a truncated file with a shard name.
    torn = ns_dir / f".shard-{'d' * 32}.parquet.abc_12.tmp"
    torn.write_bytes(good.read_bytes()[:100])
    os.utime(torn, (0, 0))
    orphan = ns_dir / f"shard-{'a' * 32}.parquet"
    orphan.write_bytes(good.read_bytes())
    truncated = ns_dir / f"shard-{'b' * 32}.parquet"
    truncated.write_bytes(good.read_bytes()[:50])
    torn_manifest = store.root / ".manifest.json.dead.tmp"
    torn_manifest.write_text("{")
    os.utime(torn_manifest, (0, 0))
    manifest = json.loads((store.root / MANIFEST).read_text())
    manifest["shards"][f"{loaded.cache_namespace}/shard-{'c' * 32}.parquet"] = {
        "rows": 5,
        "bytes": 5,
        "sha256": "0" * 64,
        "last_used": 0,
    }
    (store.root / MANIFEST).write_text(json.dumps(manifest))

    report = store.repair()
    assert report == {"dropped": 1, "adopted": 1, "deleted": 3, "corrupt": [], "ignored": []}
    assert not torn.exists() and not truncated.exists() and not torn_manifest.exists() and orphan.exists()
    result = store.get_or_compute(loaded.cache_namespace, IDS[:150], TEXTS[:150], loaded.encode)
    assert (result.hits, result.misses) == (100, 50)


def test_unreadable_manifest_is_rebuilt_from_shards(tmp_path):
    loaded = load_tokenizer()
    store = TokenStore(tmp_path / "cache")
    store.get_or_compute(loaded.cache_namespace, IDS[:10], TEXTS[:10], loaded.encode)
    (store.root / MANIFEST).write_text("{torn")
    assert store.get_or_compute(loaded.cache_namespace, IDS[:10], TEXTS[:10], loaded.encode).hits == 10


WRITER = """
import sys
from dlm_pipeline.core.token_store import TokenStore
from dlm_pipeline.core.tokenize import load_tokenizer
loaded = load_tokenizer()
store = TokenStore(sys.argv[1])
i = 0
print("ready", flush=True)
while True:
    texts = ["x = %d  # %d\\n" % (j, i) * 400 for j in range(4000)]
    ids = ["%064x" % (i * 4000 + j) for j in range(len(texts))]
    store.get_or_compute(loaded.cache_namespace, ids, texts, loaded.encode)
    i += 1
"""


def test_sigkilled_writer_leaves_a_readable_store(tmp_path):
    cache = tmp_path / "cache"
    proc = subprocess.Popen([sys.executable, "-c", WRITER, str(cache)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(1.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = TokenStore(cache)
    manifest = json.loads((cache / MANIFEST).read_text())["shards"] if (cache / MANIFEST).exists() else {}
    for name, info in manifest.items():
        assert pq.read_table(cache / name).num_rows == info["rows"]
    store.repair(stale_after=0)
    assert not list(cache.glob("*/.*.tmp"))
    loaded = load_tokenizer()
    again = store.get_or_compute(loaded.cache_namespace, [content_key("y = 1\n")], ["y = 1\n"], loaded.encode)
    assert again.misses == 1


def _worker(cache: str, ids: list[str], texts: list[str], queue) -> None:
    loaded = load_tokenizer()
    result = TokenStore(cache).get_or_compute(loaded.cache_namespace, ids, texts, loaded.encode)
    queue.put(result.table["input_ids"].to_pylist())


def test_concurrent_processes_share_the_store(tmp_path):
    cache = str(tmp_path / "cache")
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    workers = [
        ctx.Process(target=_worker, args=(cache, IDS[:200], TEXTS[:200], queue)),
        ctx.Process(target=_worker, args=(cache, IDS[100:], TEXTS[100:], queue)),
    ]
    for w in workers:
        w.start()
    results = [queue.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(timeout=60)
        assert w.exitcode == 0
    expected = [e.ids for e in load_tokenizer().tokenizer.encode_batch(TEXTS, add_special_tokens=False)]
    assert sorted(map(tuple, results[0] + results[1])) == sorted(map(tuple, expected[:200] + expected[100:]))
    loaded = load_tokenizer()
    after = TokenStore(cache).get_or_compute(loaded.cache_namespace, IDS, TEXTS, loaded.encode)
    assert (after.hits, after.misses) == (300, 0)
    assert after.table["input_ids"].to_pylist() == expected


def test_many_small_shards_are_merged_and_still_hit(tmp_path):
    from dlm_pipeline.core.token_store import COMPACT_AT_SHARDS

    loaded = load_tokenizer()
    store = TokenStore(tmp_path / "cache")
    for start in range(0, 300, 15):  # 20 materializations, each with new sections
        store.get_or_compute(loaded.cache_namespace, IDS[start : start + 15], TEXTS[start : start + 15], loaded.encode)
        assert store.stats()["shards"] <= COMPACT_AT_SHARDS
    assert store.stats()["rows"] == 300  # nothing lost, nothing duplicated
    after = store.get_or_compute(loaded.cache_namespace, IDS, TEXTS, loaded.encode)
    assert (after.hits, after.misses) == (300, 0)
    expected = [e.ids for e in loaded.tokenizer.encode_batch(TEXTS, add_special_tokens=False)]
    assert after.table["input_ids"].to_pylist() == expected


def test_compaction_drops_duplicate_entries(tmp_path):
    loaded = load_tokenizer()
    store = TokenStore(tmp_path / "cache")
    for _ in range(3):  # the same sections written three times, as racing writers could
        store._write_shards(
            loaded.cache_namespace, loaded.encode(TEXTS[:10]).add_column(0, "content_key", pa.array(IDS[:10]))
        )
    assert store.stats()["rows"] == 30
    assert store.compact(at_shards=1) == 2
    assert store.stats()["rows"] == 10 and store.stats()["shards"] == 1


def test_an_old_path_keyed_namespace_misses_and_ages_out(tmp_path):
    """A store written before content keys (`<fp>-L<n>` folders, section_id shards, no sha256)."""
    loaded = load_tokenizer()
    root = tmp_path / "cache"
    old_ns = f"{loaded.fingerprint[:32]}-L2048"
    (root / old_ns).mkdir(parents=True)
    old_shard = root / old_ns / f"shard-{'9' * 32}.parquet"
    pq.write_table(
        pa.table({"section_id": ["a"], "input_ids": [[1, 2]], "n_tokens": [2], "truncated": [False]}), old_shard
    )
    manifest = {
        "version": 1,
        "shards": {f"{old_ns}/{old_shard.name}": {"rows": 1, "bytes": old_shard.stat().st_size, "last_used": 0.0}},
    }
    (root / MANIFEST).write_text(json.dumps(manifest))
    store = TokenStore(root)
    assert store.stats()["namespaces"][old_ns]["rows"] == 1
    lookup = store.get_or_compute(loaded.cache_namespace, IDS[:5], TEXTS[:5], loaded.encode)
    assert lookup.misses == 5 and old_shard.exists() and not lookup.ignored
    store.max_bytes = 1
    store.get_or_compute(loaded.cache_namespace, IDS[:5], TEXTS[:5], loaded.encode)
    assert not old_shard.exists() and set(store.stats()["namespaces"]) == {loaded.cache_namespace}


def test_namespace_mark_names_what_the_store_holds(tmp_path):
    """What lets an unchanged tokenized_cache or dataset count on the store it read: the mark is
    the same while the namespace's listed shards are, and new at every call while one is damaged."""
    loaded = load_tokenizer()
    namespace = loaded.cache_namespace
    store = TokenStore(tmp_path / "cache")
    empty = store.namespace_mark(namespace)
    assert empty == store.namespace_mark(namespace)  # an empty store is not damaged
    store.get_or_compute(namespace, IDS[:100], TEXTS[:100], loaded.encode)
    mark = store.namespace_mark(namespace)
    assert mark != empty and TokenStore(tmp_path / "cache").namespace_mark(namespace) == mark
    assert store.namespace_mark("other-namespace") == empty

    (shard,) = (tmp_path / "cache").glob("*/shard-*.parquet")
    saved = shard.read_bytes()
    shard.write_bytes(saved[: len(saved) // 2])  # damaged by hand: a new mark at every call
    damaged = store.namespace_mark(namespace)
    assert damaged != mark and damaged != store.namespace_mark(namespace)
    shard.write_bytes(saved)
    assert store.namespace_mark(namespace) == mark

    store.get_or_compute(namespace, IDS[100:200], TEXTS[100:200], loaded.encode)
    added = store.namespace_mark(namespace)
    assert added != mark
    store.evict(max_bytes=0)
    assert store.namespace_mark(namespace) not in (mark, added)
    store.clear()
    assert store.namespace_mark(namespace) == empty
