"""Tokenized cache vs plain tokenization, cold / warm / weights-only, on a generated corpus.

    python benchmarks/tokenization.py [--files 5000] [--min-mb 20] [--dagster]

(Not `tokenize.py`: a file of that name here would shadow the standard library's `tokenize`
for every script in this folder.)

The corpus is real Python source (this interpreter's standard library, cycled with a unique
header per file until it has --files files and --min-mb MB). Baseline: the same tokenizer's
`encode_batch` over the same unique texts, in the same process. Core mode times the library
(content keys + store lookup + tokenization of misses + cut and gather per seed), then a
`max_seq_len` change and a rename of every file (both must tokenize nothing); --dagster also materializes the
whole graph through Dagster (ephemeral instance, in-process executor) and reports the
tokenized_cache step's own numbers.
"""

from __future__ import annotations

import argparse
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from dlm_pipeline.core.corpus import rows_table, section_id
from dlm_pipeline.core.expansion import expand_rows
from dlm_pipeline.core.token_store import TokenStore, tokenized_rows
from dlm_pipeline.core.tokenize import load_tokenizer


def peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def corpus_files(n_files: int, min_bytes: int) -> dict[str, str]:
    sources = [p for p in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")) if "site-packages" not in p.parts]
    texts = []
    for path in sources:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if 500 < len(text) < 60_000:
            texts.append(text)
    files, total, i = {}, 0, 0
    while len(files) < n_files or total < min_bytes:
        text = f"# generated file {i}\n" + texts[i % len(texts)]
        files[f"pkg{i % 50:02d}/mod_{i:05d}.py"] = text
        total += len(text.encode())
        i += 1
    return files


def timed(fn):
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def core_benchmark(files: dict[str, str]) -> None:
    paths = sorted(files, key=str.encode)
    texts = [files[p] for p in paths]
    ids = [section_id(p, files[p]) for p in paths]
    tags = [{"pkg": p.split("/")[0]} for p in paths]
    table = rows_table(ids, paths, texts, tags)
    loaded = load_tokenizer()
    mb = sum(len(t.encode()) for t in texts) / 1e6

    baseline_out, baseline = timed(lambda: loaded.tokenizer.encode_batch(texts, add_special_tokens=False))
    tokens = sum(len(e.ids) for e in baseline_out)
    del baseline_out
    _, baseline_fast = timed(lambda: loaded.tokenizer.encode_batch_fast(texts, add_special_tokens=False))

    renamed_paths = [f"moved/{p}" for p in paths]
    renamed = rows_table(
        [section_id(p, files[q]) for p, q in zip(renamed_paths, paths, strict=False)], renamed_paths, texts, tags
    )

    def seed_run(
        store: TokenStore, weights: dict, seed: int, rows: pa.Table = table, tokenizer=loaded
    ) -> tuple[pa.Table, int, int]:
        expanded, _ = expand_rows(rows, np.zeros(rows.num_rows, np.int32), [(weights,)], seed)  # one chain of one map
        result = tokenized_rows(store, tokenizer, rows, expanded["section_id"], expanded["copy"])
        out = result.table()
        return out, result.lookup.hits, result.lookup.misses

    weights_a = {"pkg": {f"pkg{i:02d}": 0.5 + (i % 4) * 0.5 for i in range(50)}}
    weights_b = {"pkg": {f"pkg{i:02d}": 2.25 - (i % 3) * 0.5 for i in range(50)}}
    with tempfile.TemporaryDirectory() as tmp:
        store = TokenStore(tmp)
        (cold_out, _, cold_miss), cold = timed(lambda: seed_run(store, weights_a, 0))
        (warm_out, warm_hits, _), warm = timed(lambda: seed_run(store, weights_a, 0))
        (edit_out, edit_hits, edit_miss), edit = timed(lambda: seed_run(store, weights_b, 0))
        (_, seed_hits, _), new_seed = timed(lambda: seed_run(store, weights_a, 1))
        shorter = load_tokenizer(max_seq_len=512)
        (_, _, length_miss), length_change = timed(lambda: seed_run(store, weights_a, 0, tokenizer=shorter))
        (_, _, rename_miss), rename = timed(lambda: seed_run(store, weights_a, 0, rows=renamed))
        assert cold_out.equals(warm_out), "warm output differs from cold"
        kept = set(cold_out["section_id"].to_pylist())  # every text here is unique: one text per section
        newly = set(edit_out["section_id"].to_pylist()) - kept
        assert cold_miss == len(kept) and edit_miss == len(newly) and length_miss == 0 and rename_miss == 0
        cache_bytes = store.stats()["bytes"]

    print(f"corpus             {len(ids):>9,} files  {mb:,.1f} MB  {tokens:,} tokens (bundled dlm-bpe-8k)")
    print(
        f"baseline           {baseline:>9.2f}s  encode_batch over the same unique texts ({tokens / baseline:,.0f} tokens/s)"
    )
    print(
        f"baseline (fast)    {baseline_fast:>9.2f}s  encode_batch_fast, no offsets ({tokens / baseline_fast:,.0f} tokens/s)"
    )
    print(
        f"cold (core)        {cold:>9.2f}s  {cold / baseline:5.2f}x baseline, {cold / baseline_fast:5.2f}x fast baseline  ({cold_miss:,} misses; store {cache_bytes / 1e6:,.1f} MB)"
    )
    print(f"  tokenized cold     {cold_miss:,} of {len(ids):,} texts: the ones seed 0 keeps a copy of (all before)")
    print(f"warm (core)        {warm:>9.2f}s  {cold / warm:5.1f}x faster than cold  ({warm_hits:,} hits)")
    print(
        f"weights-only edit  {edit:>9.2f}s  {cold / edit:5.1f}x faster than cold  ({edit_hits:,} hits, {edit_miss:,} newly needed tokenized; {edit_out.num_rows:,} rows)"
    )
    print(f"new seed           {new_seed:>9.2f}s  {cold / new_seed:5.1f}x faster than cold  ({seed_hits:,} hits)")
    print(f"max_seq_len 512    {length_change:>9.2f}s  {cold / length_change:5.1f}x faster than cold  (0 tokenized)")
    print(f"every file renamed {rename:>9.2f}s  {cold / rename:5.1f}x faster than cold  (0 tokenized)")
    print(f"peak RSS           {peak_rss_mib():>9,.0f} MiB")


def dagster_benchmark(files: dict[str, str]) -> None:
    import dagster as dg

    from dlm_pipeline.definitions import CORPUS_JOB, build_defs
    from dlm_pipeline.defs.compute import ComputeResource
    from dlm_pipeline.defs.resources import (
        DatasetResource,
        ParquetIOManager,
        SourceTree,
        TokenCacheResource,
        TokenizerResource,
    )

    with tempfile.TemporaryDirectory() as tmp, dg.DagsterInstance.ephemeral() as instance:
        root = Path(tmp) / "tree"
        for rel, text in files.items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        (root / ".dlm").mkdir()
        config = root / ".dlm" / "training.yaml"
        config.write_text("dlm_training_version: 1\nmetadata: {lang: python}\nweights: {lang: {python: 1.5}}\n")
        defs = build_defs(
            {
                "source": SourceTree(root=str(root)),
                "io_manager": ParquetIOManager(output_dir=str(Path(tmp) / "out")),
                "tokenizer": TokenizerResource(),
                "token_cache": TokenCacheResource(cache_dir=str(Path(tmp) / "cache")),
                "compute": ComputeResource(),
                "dataset": DatasetResource(),
            }
        )
        instance.add_dynamic_partitions("seeds", ["0", "1"])
        job = defs.resolve_job_def(CORPUS_JOB)

        def run(seed: str) -> tuple[float, dict]:
            start = time.perf_counter()
            result = job.execute_in_process(
                instance=instance,
                partition_key=seed,
                run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}},
            )
            wall = time.perf_counter() - start
            step = next(s for s in instance.get_run_step_stats(result.run_id) if s.step_key == "tokenized_cache")
            event = instance.fetch_materializations(
                dg.AssetRecordsFilter(asset_key=dg.AssetKey("tokenized_cache"), asset_partitions=[seed]), limit=1
            ).records[0]
            meta = {k: v.value for k, v in event.asset_materialization.metadata.items()}
            return wall, {"step": step.end_time - step.start_time, **meta}

        rows = [("cold", *run("0"))]
        rows.append(("warm", *run("0")))
        config.write_text(config.read_text().replace("1.5", "2.25"))
        rows.append(("weights-only edit", *run("0")))
        rows.append(("new seed", *run("1")))
        cold_step = rows[0][2]["step"]
        for name, wall, meta in rows:
            print(
                f"dagster {name:<18} run {wall:6.2f}s  tokenized_cache step {meta['step']:6.2f}s "
                f"({cold_step / meta['step']:5.1f}x vs cold)  hits {meta['cache_hits']:,} misses {meta['cache_misses']:,}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--min-mb", type=float, default=20.0)
    parser.add_argument("--dagster", action="store_true", help="also measure end to end through Dagster")
    args = parser.parse_args()
    files = corpus_files(args.files, int(args.min_mb * 1e6))
    core_benchmark(files)
    if args.dagster:
        dagster_benchmark(files)


if __name__ == "__main__":
    sys.exit(main())
