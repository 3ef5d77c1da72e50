"""What the AVX2 path of the BLAKE2b kernel buys over its scalar path, end to end (issue 12 item 7).

    python benchmarks/blake2b_avx2.py [--files 5000] [--min-mb 20] [--rows 1000000] [--rounds 5]

The kernel picks its path once, at import (`DLM_BLAKE2B_SCALAR=1` forces scalar), so each timing
runs in a fresh child process; A (vector) and B (scalar) alternate, round after round, so a
machine whose load changes affects both alike. Timed in the child: a whole seed through the core
(walk, configs, raw corpus, weights, expansion, tokenized rows against a warm token store) on
the tokenization benchmark's corpus, and the expansion of --rows rows (benchmarks/expansion.py).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def seed_run(root: str, store_dir: str, seed: int) -> int:
    from dlm_pipeline.core.anchors import anchors_from_table, load_configs, records_table
    from dlm_pipeline.core.corpus import build_raw_corpus
    from dlm_pipeline.core.expansion import expand_corpus
    from dlm_pipeline.core.token_store import TokenStore, tokenized_rows
    from dlm_pipeline.core.tokenize import load_tokenizer
    from dlm_pipeline.core.tree import scan_tree
    from dlm_pipeline.core.weights import SCOPE_NEAREST, weights_table

    scan = scan_tree(root)
    anchors = anchors_from_table(records_table(load_configs(scan)))
    raw = build_raw_corpus(scan, anchors).table
    expanded, _ = expand_corpus(raw, weights_table(anchors, SCOPE_NEAREST), seed)
    out, _ = tokenized_rows(TokenStore(store_dir), load_tokenizer(), raw, expanded["section_id"], expanded["copy"])
    return out.num_rows


def child(root: str, store_dir: str, rows: int) -> None:
    from expansion import make_rows, ours

    from dlm_pipeline.core import _blake2b
    from dlm_pipeline.core.corpus import rows_table

    t0 = time.perf_counter()
    seed_run(root, store_dir, 7)
    seed_s = time.perf_counter() - t0
    table = rows_table(*make_rows(rows, random.Random(0)))
    best = float("inf")
    for _ in range(3):
        _, _, _, full_s = ours(table, 42)
        best = min(best, full_s)
    from dlm_pipeline.core.fraction_hash import section_rolls

    ids = table["section_id"]
    hash_s = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        section_rolls(42, ids)
        hash_s = min(hash_s, time.perf_counter() - t0)
    print(json.dumps({"vectorised": _blake2b.vectorised(), "seed_s": seed_s, "expand_s": best, "hash_s": hash_s}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--min-mb", type=float, default=20.0)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(*args.child, args.rows)

    from tokenization import corpus_files

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "tree"
        for rel, text in corpus_files(args.files, int(args.min_mb * 1e6)).items():
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            (root / rel).write_text(text)
        (root / ".dlm").mkdir()
        weights = ", ".join(f"pkg{i:02d}: {0.25 + (i % 7) * 0.35:.2f}" for i in range(50))
        (root / ".dlm" / "training.yaml").write_text(f"dlm_training_version: 1\nweights: {{pkg: {{{weights}}}}}\n")
        for i in range(50):
            (root / f"pkg{i:02d}" / ".dlm").mkdir()
            (root / f"pkg{i:02d}" / ".dlm" / "training.yaml").write_text(
                f"dlm_training_version: 1\nmetadata: {{pkg: pkg{i:02d}}}\n"
            )
        store = str(Path(tmp) / "store")
        seed_run(str(root), store, 7)  # warm the token store: tokenization must not dominate
        results: dict[str, list[dict]] = {"avx2": [], "scalar": []}
        for _ in range(args.rounds):
            for name in ("avx2", "scalar"):
                env = dict(os.environ)
                env.pop("DLM_BLAKE2B_SCALAR", None)
                if name == "scalar":
                    env["DLM_BLAKE2B_SCALAR"] = "1"
                out = subprocess.run(
                    [sys.executable, __file__, "--rows", str(args.rows), "--child", str(root), store],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                ).stdout
                results[name].append(json.loads(out))
    for i, (a, b) in enumerate(zip(results["avx2"], results["scalar"], strict=True), start=1):
        print(
            f"round {i}: seed avx2 {a['seed_s']:.2f}s scalar {b['seed_s']:.2f}s | expand avx2 {a['expand_s']:.3f}s "
            f"scalar {b['expand_s']:.3f}s | hash {args.rows:,} ids avx2 {a['hash_s']:.3f}s scalar {b['hash_s']:.3f}s"
        )
    for name, runs in results.items():
        seeds = sorted(r["seed_s"] for r in runs)
        expands = sorted(r["expand_s"] for r in runs)
        print(
            f"{name:<7} vectorised={runs[0]['vectorised']!s:<5} seed {seeds[0]:.2f}-{seeds[-1]:.2f}s "
            f"(median {seeds[len(seeds) // 2]:.2f})  expand {args.rows:,} rows {expands[0]:.3f}-{expands[-1]:.3f}s "
            f"(median {expands[len(expands) // 2]:.3f})  "
            f"hash {min(r['hash_s'] for r in runs):.3f}-{max(r['hash_s'] for r in runs):.3f}s"
        )


if __name__ == "__main__":
    main()
