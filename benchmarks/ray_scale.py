"""Tokenizing the store's misses, and reading the files of a new tree for ingest: local vs
`--compute ray` with 1 and 2 workers, in one run.

    python benchmarks/ray_scale.py [--files 5000] [--min-mb 20] [--batch-mb 2]

The corpus is the one of benchmarks/tokenization.py (5,000 generated Python files, >= 20 MB).
Each mode tokenizes every text into an empty store through `TokenStore.get_or_compute` (content
keys given; shards written, committed, read back and verified): `local` encodes in this process
(the tokenizer's thread pool uses every core), `ray-N` runs the byte-sized batches of
`dlm_pipeline.core.compute` on a fresh local Ray cluster of N CPUs (one single-threaded task per
CPU). Ray's start-up and its workers' first import are timed apart (a warm-up batch), since a
long-lived cluster pays them once. Ingest writes the corpus as a tree and builds `raw_corpus` with
no ingest index (every file read, credential-scanned and hashed) in this process, then with
`read_batch` on the same cluster (warm page cache and credential scanner for both). Targets
(issue 13): ray-1 within 1.2x of local; ray-2 at least 1.7x faster than ray-1 when the machine
has 2 idle cores; the load average is printed, because it decides whether that holds.
"""

from __future__ import annotations

import argparse
import os
import secrets
import sys
import tempfile
import time

from tokenization import corpus_files

from dlm_pipeline.core.compute import RunStats, read_on_ray, run_on_ray
from dlm_pipeline.core.config_records import anchors_from_table, load_configs, records_table
from dlm_pipeline.core.corpus import DEFAULT_MAX_FILE_BYTES, build_raw_corpus, content_key
from dlm_pipeline.core.token_store import TokenStore
from dlm_pipeline.core.tokenize import load_tokenizer
from dlm_pipeline.core.tree import scan_tree


def write_tree(root: str, files: dict[str, str]) -> None:
    os.makedirs(f"{root}/.dlm")
    with open(f"{root}/.dlm/training.yaml", "w") as fh:
        fh.write("dlm_training_version: 1\nmetadata: {lang: py}\n")
    for path, text in files.items():
        os.makedirs(os.path.dirname(f"{root}/{path}"), exist_ok=True)
        with open(f"{root}/{path}", "w", encoding="utf-8") as fh:
            fh.write(text)


def ingest(root: str, read_batch=None) -> tuple[float, object]:
    start = time.perf_counter()
    scan = scan_tree(root)
    corpus = build_raw_corpus(scan, anchors_from_table(records_table(load_configs(scan))), read_batch=read_batch)
    return time.perf_counter() - start, corpus


def cold(store_root: str, loaded, keys, texts, write_elsewhere=None) -> tuple[float, object]:
    store = TokenStore(store_root)
    start = time.perf_counter()
    lookup = store.get_or_compute(loaded.cache_namespace, keys, texts, loaded.encode, write_elsewhere)
    return time.perf_counter() - start, lookup


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--min-mb", type=float, default=20.0)
    parser.add_argument("--batch-mb", type=float, default=2.0)
    args = parser.parse_args()
    # Token authentication with a throwaway token held in the environment (Ray would otherwise
    # write one to ~/.ray/auth_token).
    os.environ.setdefault("RAY_AUTH_MODE", "token")
    os.environ.setdefault("RAY_AUTH_TOKEN", secrets.token_hex(32))
    import ray

    files = corpus_files(args.files, int(args.min_mb * 1e6))
    texts = list(dict.fromkeys(files[p] for p in sorted(files)))
    keys = [content_key(t) for t in texts]
    loaded = load_tokenizer()
    mb = sum(len(t.encode()) for t in texts) / 1e6
    print(
        f"corpus   {len(texts):,} distinct texts, {mb:,.1f} MB; {os.cpu_count()} cores; "
        f"load average {os.getloadavg()[0]:.1f} at start"
    )
    results, read = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        write_tree(f"{tmp}/tree", files)
        ingest(f"{tmp}/tree")  # warm-up: the page cache and the credential scanner, as Ray's first tasks below
        seconds, corpus = ingest(f"{tmp}/tree")
        read_reference, read["local"] = corpus.table, seconds
        print(f"local    ingest {seconds:7.2f}s  {corpus.files_read / seconds:>8,.0f} files/s")
        seconds, lookup = cold(f"{tmp}/local", loaded, keys, texts)
        reference, results["local"] = lookup.table, seconds
        print(f"local    {seconds:7.2f}s  {lookup.encoded_tokens / seconds:>12,.0f} tokens/s")
        for cpus in (1, 2):
            start = time.perf_counter()
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
            started = time.perf_counter() - start
            start = time.perf_counter()
            run_on_ray(
                f"{tmp}/warmup-{cpus}",
                DEFAULT_MAX_FILE_BYTES,
                loaded.cache_namespace,
                loaded,
                keys[: 2 * cpus],
                texts[: 2 * cpus],
                batch_bytes=1,
            )
            scan = scan_tree(f"{tmp}/tree")
            read_on_ray(scan.root, [(f, True) for f in scan.files[: 2 * cpus]], DEFAULT_MAX_FILE_BYTES, False, 1)
            warmup = time.perf_counter() - start
            stats = RunStats()

            def on_ray(namespace, batch_keys, batch_texts, root=f"{tmp}/ray-{cpus}", stats=stats):
                return run_on_ray(
                    root,
                    DEFAULT_MAX_FILE_BYTES,
                    namespace,
                    loaded,
                    batch_keys,
                    batch_texts,
                    int(args.batch_mb * 2**20),
                    stats=stats,
                )

            seconds, lookup = cold(f"{tmp}/ray-{cpus}", loaded, keys, texts, on_ray)
            read_stats = RunStats()

            def read_on_cluster(root, batch_files, stats=read_stats):
                return read_on_ray(
                    root, batch_files, DEFAULT_MAX_FILE_BYTES, False, int(args.batch_mb * 2**20), stats=stats
                )

            read[f"ray-{cpus}"], corpus = ingest(f"{tmp}/tree", read_on_cluster)
            ray.shutdown()
            assert corpus.table.equals(read_reference), f"ray-{cpus} raw_corpus differs from local"
            print(
                f"ray-{cpus}    ingest {read[f'ray-{cpus}']:7.2f}s  {corpus.files_read / read[f'ray-{cpus}']:>8,.0f} "
                f"files/s  {read_stats.tasks} tasks"
            )
            assert lookup.table.equals(reference), f"ray-{cpus} rows differ from local"
            results[f"ray-{cpus}"] = seconds
            workers = ", ".join(f"{w['tokens_per_second']:,}/s" for w in stats.per_worker.values())
            print(
                f"ray-{cpus}    {seconds:7.2f}s  {lookup.encoded_tokens / seconds:>12,.0f} tokens/s  "
                f"{stats.tasks} tasks, {stats.retries} retries; per worker {workers}  "
                f"(start-up {started:.1f}s + first tasks {warmup:.1f}s, not counted)"
            )
    print(f"ray-1 / local = {results['ray-1'] / results['local']:.2f}x (target <= 1.2x)")
    print(f"ray-1 / ray-2 = {results['ray-1'] / results['ray-2']:.2f}x faster (target >= 1.7x with 2 idle cores)")
    print(f"ingest: ray-1 / local = {read['ray-1'] / read['local']:.2f}x", end=", ")
    print(f"ray-1 / ray-2 = {read['ray-1'] / read['ray-2']:.2f}x faster")
    print(f"load average {os.getloadavg()[0]:.1f} at the end")
    return 0


if __name__ == "__main__":
    sys.exit(main())
