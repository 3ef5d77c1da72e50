"""Ingest throughput: walk + rules + read + normalise + section_id on a generated tree.

    python benchmarks/ingest.py [--files 20000] [--anchors 50] [--ignore-patterns 0]

Builds the tree in a temporary folder (files of 200 B - 8 KB, some binary and non-UTF-8,
50 anchors with include/exclude/ignore rules), then times the core library's discovery,
config loading and raw-corpus build, and prints files/s and MB/s. `--ignore-patterns N` adds a
root `.dlm/ignore` of N patterns (every third a `!negation`) to time large ignore files.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from pathlib import Path

from dlm_pipeline.core.config_records import anchors_from_table, load_configs, records_table
from dlm_pipeline.core.corpus import build_raw_corpus
from dlm_pipeline.core.globs import glob_set
from dlm_pipeline.core.tree import scan_tree

WORDS = "def class return import yield lambda async await data record value parse".split()


def build_tree(root: Path, n_files: int, n_anchors: int, rng: random.Random) -> int:
    dirs = [f"pkg{i // 10}/mod{i % 10}" for i in range(max(n_anchors, 1) * 4)]
    written = 0
    for i, d in enumerate(rng.sample(dirs, n_anchors)):
        anchor = root / d / ".dlm"
        anchor.mkdir(parents=True, exist_ok=True)
        (anchor / "training.yaml").write_text(
            "dlm_training_version: 1\n"
            f"metadata: {{area: a{i % 7}, lang: python}}\n"
            'exclude: ["**/*_test.py"]\n'
            f"weights: {{area: {{a{i % 7}: {rng.choice([0.5, 1.5, 2.25])}}}}}\n"
        )
        (anchor / "ignore").write_text("*.tmp\n!keep.tmp\n")
    for i in range(n_files):
        d = root / rng.choice(dirs)
        d.mkdir(parents=True, exist_ok=True)
        kind = rng.random()
        name = f"f{i:05d}" + (".py" if kind < 0.8 else ".md" if kind < 0.95 else "_test.py")
        if i % 97 == 0:
            data = b"\x00\x01binary" * 20
        elif i % 89 == 0:
            data = b"caf\xe9 " * 40
        else:
            data = " ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 1300))).encode() + b"\n"
        (d / name).write_bytes(data)
        written += len(data)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=20_000)
    parser.add_argument("--anchors", type=int, default=50)
    parser.add_argument("--ignore-patterns", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        total_bytes = build_tree(root, args.files, args.anchors, random.Random(0))
        if args.ignore_patterns:
            (root / ".dlm").mkdir(exist_ok=True)
            patterns = [f"gen{i}/*.tmp{i}" if i % 3 else f"!keep{i}*" for i in range(args.ignore_patterns)]
            (root / ".dlm" / "ignore").write_text("\n".join(patterns) + "\n")
        best = None
        for _ in range(3):
            glob_set.cache_clear()  # each round compiles its globs, as a fresh process would
            t0 = time.perf_counter()
            scan = scan_tree(root)
            configs = records_table(load_configs(scan))
            t1 = time.perf_counter()
            corpus = build_raw_corpus(scan, anchors_from_table(configs))
            t2 = time.perf_counter()
            if best is None or t2 - t0 < best[0]:
                best = (t2 - t0, t1 - t0, corpus)
        elapsed, discovery, corpus = best
        print(
            f"files on disk      {args.files:>10,}  ({total_bytes / 1e6:.1f} MB, {args.anchors} anchors, {configs.num_rows} config files)"
        )
        print(
            f"rows               {corpus.table.num_rows:>10,}  (excluded {corpus.files_excluded:,}, skipped {dict(corpus.skips)})"
        )
        print(f"walk + configs     {discovery:>10.3f}s")
        print(f"total              {elapsed:>10.3f}s")
        print(f"throughput         {args.files / elapsed:>10,.0f} files/s   {total_bytes / 1e6 / elapsed:,.1f} MB/s")


if __name__ == "__main__":
    main()
