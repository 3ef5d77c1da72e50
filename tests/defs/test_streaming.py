"""Memory bounded in corpus size: raw_corpus and expanded_corpus (and, on trees whose files repeat a
few texts so tokenizing stays cheap, tokenized_cache and training_dataset) materialized in a fresh
process on a tree of 5 and 30 MB of text (with batch budgets shrunk to 256 KiB, so both trees span
many batches) grow peak RSS by far less than the text added; and streamed outputs are the bytes the
in-memory path writes."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
import pytest

from dlm_pipeline.core import parquet_io
from dlm_pipeline.core.corpus import build_raw_corpus, rows_table
from dlm_pipeline.core.expansion import expand_corpus
from dlm_pipeline.core.fingerprint import parquet_fingerprint, table_fingerprint
from dlm_pipeline.core.parquet_io import ParquetRows, RowStream, write_parquet, write_parquet_stream
from dlm_pipeline.core.tree import scan_tree

MB = 1_000_000
BUDGET = 256 << 10

STEP = r"""
import json, sys
import dagster as dg
from dlm_pipeline.core import corpus, dataset, ingest_index, parquet_io, token_store
corpus.READ_BATCH_BYTES = parquet_io.ROW_GROUP_BYTES = ingest_index.SPILL_FLUSH_BYTES = int(sys.argv[3])
token_store.BATCH_TEXT_BYTES = dataset.BATCH_TEXT_BYTES = int(sys.argv[3])
token_store.BATCH_IDS = dataset.BATCH_IDS = int(sys.argv[3]) // 4
from dlm_pipeline.definitions import build_defs
from dlm_pipeline.defs.compute import ComputeResource
from dlm_pipeline.defs.constants import CORPUS_JOB
from dlm_pipeline.defs.resources import (
    DatasetResource, ParquetIOManager, SourceTree, TokenCacheResource, TokenizerResource,
)

def peak_kib():
    status = open("/proc/self/status").read()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))

root, out = sys.argv[1:3]
defs = build_defs({
    "source": SourceTree(root=root),
    "io_manager": ParquetIOManager(output_dir=out),
    "tokenizer": TokenizerResource(),
    "token_cache": TokenCacheResource(cache_dir=out + "-token-cache"),
    "compute": ComputeResource(),
    "dataset": DatasetResource(),
})
peaks = {}
with dg.DagsterInstance.get() as instance:
    instance.add_dynamic_partitions("seeds", ["1"])
    for asset in sys.argv[4].split(","):
        key = dg.AssetKey(asset)
        job = defs.resolve_job_def(CORPUS_JOB).get_subset(
            asset_selection={key}, asset_check_selection=set(defs.resolve_assets_def(key).check_keys)
        )
        with open("/proc/self/clear_refs", "w") as fh:  # the peak from here on: this asset's
            fh.write("5")
        assert job.execute_in_process(instance=instance, partition_key="1").success
        peaks[asset] = peak_kib() * 1024
print(json.dumps(peaks))
"""


CORPUS_ASSETS = ("training_configs", "weights_map", "raw_corpus", "expanded_corpus")
TOKEN_ASSETS = (*CORPUS_ASSETS, "tokenized_cache", "training_dataset")


def _tree(root, megabytes: int, distinct: int | None = None) -> None:
    """Files of 10-60 KB of random words under two anchors with weights (one fractional), no secret
    scan (not what is measured); with `distinct`, each file's text is one of that many (the same
    ones for every tree size), so tokenizing costs the same whatever the size."""
    rng = random.Random(megabytes)
    words = "alpha beta gamma delta tree seed weight token corpus path text batch stream".split()
    pool_rng = random.Random(0)
    pool = [" ".join(pool_rng.choices(words, k=pool_rng.randint(2_000, 12_000))) + "\n" for _ in range(distinct or 0)]
    for anchor, weight in (("a", "2.0"), ("b", "0.5")):
        (root / anchor / ".dlm").mkdir(parents=True)
        (root / anchor / ".dlm" / "training.yaml").write_text(
            f"dlm_training_version: 1\nscan_secrets: false\nmetadata: {{k: {anchor}}}\nweights: {{k: {{{anchor}: {weight}}}}}\n"
        )
    total = i = 0
    while total < megabytes * MB:
        text = pool[i % len(pool)] if pool else " ".join(rng.choices(words, k=rng.randint(2_000, 12_000))) + "\n"
        (root / "ab"[i % 2] / f"f{i:05d}.txt").write_text(text)
        total, i = total + len(text), i + 1


def _peaks(tmp_path, megabytes: int, assets=CORPUS_ASSETS, distinct: int | None = None) -> dict[str, int]:
    """Peak RSS per asset, each materialized in turn in one fresh process (the peak reset before each)."""
    work = tmp_path / f"{megabytes}-{distinct}"
    root, home, out = work / "tree", work / "home", work / "out"
    root.mkdir(parents=True), home.mkdir()
    _tree(root, megabytes, distinct)
    # The system allocator for Arrow: mimalloc's retained pages move the peak by tens of MB from run
    # to run, which would drown the growth measured here.
    env = {**os.environ, "DAGSTER_HOME": str(home), "ARROW_DEFAULT_MEMORY_POOL": "system"}
    command = [sys.executable, "-c", STEP, str(root), str(out), str(BUDGET), ",".join(assets)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS is read and reset through /proc")
def test_peak_rss_does_not_grow_with_the_tree(tmp_path):
    small, large = _peaks(tmp_path, 5), _peaks(tmp_path, 30)
    added = 25 * MB
    for asset in ("raw_corpus", "expanded_corpus"):
        growth = large[asset] - small[asset]
        # Whole tables held the text about four times over (text strings, the Arrow table, the Parquet
        # buffers; the expansion's copies on top: +270 MB for 35 MB more); batches hold one budget.
        assert growth < added, f"{asset}: peak RSS grew by {growth / MB:.1f} MB for {added / MB:.0f} MB more text"


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="peak RSS is read and reset through /proc")
def test_tokenized_cache_and_training_dataset_peak_rss_does_not_grow_with_the_tree(tmp_path):
    small = _peaks(tmp_path, 5, TOKEN_ASSETS, distinct=40)
    large = _peaks(tmp_path, 30, TOKEN_ASSETS, distinct=40)
    added = 25 * MB
    for asset in ("tokenized_cache", "training_dataset"):
        growth = large[asset] - small[asset]
        # Whole tables held every text and every expanded row's ids; batches hold one budget.
        assert growth < added / 2, f"{asset}: peak RSS grew by {growth / MB:.1f} MB for {added / MB:.0f} MB more text"


def test_streamed_rows_give_the_bytes_and_fingerprint_of_the_whole_table(tmp_path, monkeypatch):
    texts = [f"text {i} " * (i % 50) for i in range(300)]
    table = rows_table([f"{i:016x}" for i in range(300)], [f"p{i:03d}" for i in range(300)], texts, [{"k": "v"}] * 300)
    whole = io.BytesIO()
    write_parquet(table, whole)
    for size in (1, 7, 300):
        streamed = io.BytesIO()
        write_parquet_stream(RowStream(table.schema, table.to_batches(max_chunksize=size)), streamed)
        assert streamed.getvalue() == whole.getvalue()
    monkeypatch.setattr(parquet_io, "ROW_GROUP_BYTES", 2_000)  # many row groups: cut by content, not by batches
    files = set()
    for size in (1, 13, 300):
        path = tmp_path / f"{size}.parquet"
        with open(path, "wb") as fh:
            write_parquet_stream(RowStream(table.schema, table.to_batches(max_chunksize=size)), fh)
        files.add(path.read_bytes())
        assert pq.ParquetFile(path).num_row_groups > 10
        assert parquet_fingerprint(path) == table_fingerprint(table)
        assert pq.read_table(path).equals(table)
    assert len(files) == 1


def test_streamed_expansion_is_the_in_memory_expansion(tree, tmp_path, monkeypatch):
    from dlm_pipeline.core.config_records import anchors_from_table, load_configs, records_table
    from dlm_pipeline.core.expansion import stream_expansion
    from dlm_pipeline.core.weights import weights_table

    files = {".dlm/training.yaml": "dlm_training_version: 1\nmetadata: {k: x}\nweights: {k: {x: 2.5}}\n"}
    files |= {f"d/f{i:03d}.txt": f"line {i}\n" * (1 + i % 40) for i in range(200)}
    root = tree(files)
    scan = scan_tree(root)
    anchors = anchors_from_table(records_table(load_configs(scan)))
    raw = build_raw_corpus(scan, anchors).table
    weights = weights_table(anchors, "nearest")
    path = tmp_path / "raw.parquet"
    with open(path, "wb") as fh:
        write_parquet(raw, fh)
    expected, _ = expand_corpus(pq.read_table(path), weights, 7)  # what expanded_corpus wrote from a whole table
    whole, streamed = io.BytesIO(), stream_expansion(ParquetRows(path), weights, 7)
    write_parquet(expected, whole)
    one_group = io.BytesIO()
    write_parquet_stream(RowStream(streamed.schema, streamed.batches()), one_group)
    assert one_group.getvalue() == whole.getvalue()

    monkeypatch.setattr(parquet_io, "ROW_GROUP_BYTES", 3_000)
    with open(path, "wb") as fh:
        write_parquet_stream(RowStream(raw.schema, raw.to_batches(max_chunksize=17)), fh)
    streamed = stream_expansion(ParquetRows(path), weights, 7, batch_bytes=1_000)
    parts = list(streamed.batches())
    assert len(parts) > 10
    out = tmp_path / "expanded.parquet"
    with open(out, "wb") as fh:
        write_parquet_stream(RowStream(streamed.schema, iter(parts)), fh)
    assert pq.read_table(out).equals(expected, check_metadata=True)
    assert parquet_fingerprint(out) == table_fingerprint(expected)


def test_tokens_and_dataset_in_many_small_batches_are_the_bytes_of_one_batch(tree, pipeline, monkeypatch):
    """Texts looked up and tokenized, and ids read back, a few at a time: the same files, byte for byte."""
    from dlm_pipeline.core import dataset, token_store

    files = {".dlm/training.yaml": "dlm_training_version: 1\nmetadata: {k: x}\nweights: {k: {x: 1.5}}\n"}
    files |= {f"d/f{i:03d}.txt": f"word{i} line {i % 7}\n" * (1 + i % 30) for i in range(120)}
    files |= {f"e/copy{i}.txt": "the same text\n" * 9 for i in range(3)}
    pipe = pipeline(tree(files), max_seq_len=64)
    assert pipe.run("5").success

    def stored() -> dict[str, bytes]:
        folder = pipe.out / "training_dataset" / "5"
        found = {p.name: p.read_bytes() for p in folder.iterdir()}
        return found | {"tokens": pipe.output("tokenized_cache", "5").read_bytes()}

    whole = stored()
    calls, lookup = [], token_store.TokenStore.get_or_compute

    def counting(self, namespace, keys, *args, **kwargs):
        calls.append(len(keys))
        return lookup(self, namespace, keys, *args, **kwargs)

    monkeypatch.setattr(token_store.TokenStore, "get_or_compute", counting)
    for module in (token_store, dataset):
        monkeypatch.setattr(module, "BATCH_TEXT_BYTES", 300)
        monkeypatch.setattr(module, "BATCH_IDS", 50)
    shutil.rmtree(pipe.cache)  # cold: the misses are tokenized in many batches too
    assert pipe.run("5").success
    assert len(calls) > 20 and max(calls) < 40
    assert stored() == whole
