"""The backend-neutral plan: byte-sized batches, tasks that write content-named shards, the driver's commit."""

from __future__ import annotations

import itertools
import json
import os
import time

import pytest
from conftest import write_tree

from dlm_pipeline.core.compute import RunStats, plan_batches, plan_read_batches, read_batch, tokenize_batch
from dlm_pipeline.core.config_records import anchors_from_table, load_configs, records_table
from dlm_pipeline.core.corpus import build_raw_corpus, content_key
from dlm_pipeline.core.ingest_index import FINE_SLACK_NS, IngestIndex
from dlm_pipeline.core.token_store import MANIFEST, TokenStore
from dlm_pipeline.core.tokenize import load_tokenizer
from dlm_pipeline.core.tree import scan_tree

TEXTS = [f"def g{i}(y):\n    return y + {i}  # naïve {i}\n" * (1 + i % 7) for i in range(200)]
KEYS = [content_key(t) for t in TEXTS]


def in_process_writer(store: TokenStore, loaded, batch_bytes: int, stats: RunStats):
    """A serial backend: the same tasks Ray runs, one after another in this process."""

    def write(namespace, keys, texts):
        written = []
        for batch, (start, end) in enumerate(plan_batches(texts, batch_bytes)):
            result = tokenize_batch(
                str(store.root), store.max_text_bytes, namespace, loaded, keys[start:end], texts[start:end], batch
            )
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
    first = tokenize_batch(str(store.root), store.max_text_bytes, loaded.cache_namespace, loaded, KEYS[:50], TEXTS[:50])
    ((name, entry),) = first.shards
    path = store.root / name
    data = path.read_bytes()
    again = tokenize_batch(
        str(store.root), store.max_text_bytes, loaded.cache_namespace, loaded, KEYS[:50], TEXTS[:50], attempt=1
    )
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
    lengths_store = TokenStore(tmp_path / "lengths")  # tokenized_cache's first pass: workers write, lengths read back
    lengths = lengths_store.get_or_compute(
        loaded.cache_namespace, KEYS, TEXTS, refuse, in_process_writer(lengths_store, loaded, 1_500, RunStats()), True
    )
    assert lengths.misses == len(TEXTS) and lengths.table.equals(local.table.select(["content_key", "n_tokens"]))


def test_commit_lists_only_regular_shards_of_the_stated_size(tmp_path):
    loaded = load_tokenizer()
    store = TokenStore(tmp_path / "cache")
    ns = loaded.cache_namespace
    good = tokenize_batch(str(store.root), store.max_text_bytes, ns, loaded, KEYS[:20], TEXTS[:20]).shards[0]
    short = tokenize_batch(str(store.root), store.max_text_bytes, ns, loaded, KEYS[20:40], TEXTS[20:40]).shards[0]
    linked = tokenize_batch(str(store.root), store.max_text_bytes, ns, loaded, KEYS[40:60], TEXTS[40:60]).shards[0]
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


# -- ingest: the files the index misses, read by tasks --------------------------------------------

AWS_KEY = "aws_key = 'AKIA" + "Q3EGRYMNHCZ7XWPA'\n"


def hostile_tree(root):
    """Every kind of file the content rules decide on, plus symlinks the walk admits or refuses."""
    files = {
        ".dlm/training.yaml": "dlm_training_version: 1\nmetadata: {lang: py}\n",
        "lax/.dlm/training.yaml": "dlm_training_version: 1\nscan_secrets: false\n",
        "lax/key.py": AWS_KEY,  # kept: its anchor turns the scan off
        "a/key.py": AWS_KEY,  # skipped: secret
        "a/blob.txt": b"ab\x00cd",  # binary
        "a/latin1.txt": b"caf\xe9\n",  # encoding
        "a/big.txt": "x" * 5_000,  # too_large at max_file_bytes=4_096
        "a/crlf.txt": b"\xef\xbb\xbfone\r\ntwo\rthree\n",  # BOM and line ends normalised
        **{f"b/m{i:03d}.py": f"def f{i}():\n    return {i}  # {'é' * (i % 4)}\n" for i in range(120)},
    }
    write_tree(root, files)
    os.symlink("m001.py", root / "b" / "inside_link.py")  # read through its target
    os.symlink("/etc/hostname", root / "b" / "escape_link.py")  # refused by the walk
    os.mkfifo(root / "a" / "pipe.txt")  # not_regular, never opened
    return root


def in_process_reader(batch_bytes: int, calls: list):
    """A serial backend for ingest: the same task Ray runs, batch after batch in this process."""

    def read(root, files):
        calls.append([f.path for f, _ in files])
        entries = {}
        for batch, (start, end) in enumerate(plan_read_batches([f for f, _ in files], 4_096, batch_bytes)):
            args = [(f.path, f.stat, scan) for f, scan in files[start:end]]
            entries.update(read_batch(str(root), args, 4_096, False, batch).entries)
        return entries

    return read


def test_ingest_tasks_read_what_the_index_misses_and_give_the_local_corpus(tmp_path):
    root = hostile_tree(tmp_path / "tree")
    home = tmp_path / "home"
    home.mkdir()

    def corpus(read=None, with_index=True):
        scan = scan_tree(root)
        anchors = anchors_from_table(records_table(load_configs(scan)))
        index = IngestIndex(home if with_index else None, scan.root, max_file_bytes=4_096)
        return build_raw_corpus(scan, anchors, max_file_bytes=4_096, index=index, read_batch=read)

    local, calls = corpus(with_index=False), []
    assert {"secret", "binary", "encoding", "too_large", "not_regular", "symlink_escape"} <= set(local.skips)
    time.sleep(FINE_SLACK_NS / 1e9 + 0.02)  # past the racy window, so the index keeps the entries
    remote = corpus(in_process_reader(300, calls))
    assert remote.table.equals(local.table, check_metadata=True)
    assert (remote.skips, remote.skipped, remote.bytes_read) == (local.skips, local.skipped, local.bytes_read)
    assert len(calls) == 1 and len(calls[0]) == remote.files_read > 120 and remote.files_from_index == 0
    again = corpus(in_process_reader(300, calls))  # all from the index: nothing to read
    assert calls[-1] == [] and again.files_read == 0 and again.table.equals(local.table, check_metadata=True)
    assert (again.skips, again.skipped) == (local.skips, local.skipped)
    (root / "b" / "m005.py").write_text("def changed():\n    return 5\n")
    time.sleep(FINE_SLACK_NS / 1e9 + 0.02)
    changed = corpus(in_process_reader(300, calls))
    assert calls[-1] == ["b/m005.py"]
    assert changed.table.equals(corpus(with_index=False).table, check_metadata=True)


def test_ingest_batches_follow_the_walk_sizes_and_tasks_stay_inside_the_root(tmp_path):
    root = hostile_tree(tmp_path / "tree")
    files = [f for f in scan_tree(root).files if f.path.startswith("b/")]
    batches = plan_read_batches(files, 4_096, 300)
    assert batches[0][0] == 0 and batches[-1][1] == len(files) and len(batches) > 10
    assert all(sum(f.stat[0] for f in files[s:e]) <= 300 or e - s == 1 for s, e in batches)
    assert plan_read_batches([], 4_096, 300) == []
    for bad in ("../x", "/etc/hostname", "b/../../x", "", "b/\0"):
        with pytest.raises(ValueError, match="not a relative path inside the source root"):
            read_batch(str(root), [(bad, None, True)], 4_096, False)
    result = read_batch(str(root), [("a/key.py", None, True), ("lax/key.py", None, False)], 4_096, False, attempt=2)
    secret, kept = (entry for _, entry in result.entries)
    assert secret.secret == "secret" and secret.text is None and secret.key == content_key(AWS_KEY)
    assert kept.text == AWS_KEY and kept.secret is None and result.text_bytes == len(AWS_KEY)
    stats = RunStats()
    stats.add(result)
    assert stats.retries == 2 and stats.produced["files"] == 2 and stats.tokens == 0
    assert next(iter(stats.per_worker.values()))["files"] == 2


def test_a_workers_store_is_bounded_by_the_configured_max_text_bytes_not_the_default(tmp_path):
    """Ray's tasks built their store with the default bound (1 MiB texts): with another DLM_MAX_FILE_BYTES
    a worker kept texts the driver's store refuses (or dropped ones it stores, above the default)."""
    loaded = load_tokenizer()
    store = TokenStore(tmp_path / "cache", max_text_bytes=16)  # at most 4 * 16 + 256 = 320 ids a text
    long_text = "".join(f"w{i} " for i in range(400))
    ids = loaded.encode([long_text])["n_tokens"][0].as_py()
    assert ids > store.max_text_ids
    texts, keys = [long_text, *TEXTS[:5]], [content_key(long_text), *KEYS[:5]]
    result = tokenize_batch(str(store.root), store.max_text_bytes, loaded.cache_namespace, loaded, keys, texts)
    assert sum(entry["rows"] for _, entry in result.shards) == 5  # the long text is returned, not stored
    # what the driver then reads of the worker's shards: every stored text, none refused as corrupt
    lookup = store.get_or_compute(
        loaded.cache_namespace, keys, texts, loaded.encode, lambda *_: (list(result.shards), 0.0, 0)
    )
    assert lookup.repaired == [] and lookup.table.num_rows == 6
