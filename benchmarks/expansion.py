"""Expansion throughput: ours vs the reference on the same 1,000,000 rows, same process.

    python benchmarks/expansion.py [--rows N] [--seed S]

Prints both times (best of 3 for the reference, best of 5 for ours), the ratio, whether the outputs are identical, and our peak RSS (measured
in a child process that runs only our side, so the reference's Python objects do not count).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from dlm_pipeline.core.config import TrainingConfig  # noqa: E402
from dlm_pipeline.core.corpus import rows_table  # noqa: E402
from dlm_pipeline.core.expansion import EXPANSION_BERNOULLI, apply_plan, plan_corpus, with_mode  # noqa: E402
from dlm_pipeline.core.fraction_hash import HAS_COMPILED_KERNEL  # noqa: E402
from dlm_pipeline.core.rules import Anchor  # noqa: E402
from dlm_pipeline.core.weights import SCOPE_GLOBAL, weights_table  # noqa: E402

WEIGHTS = {
    "lang": {"python": 1.5, "md": 0.5, "rst": 2.25, "txt": 1.0},
    "kind": {"code": 1.0, "docs": 2.5, "notes": 0.3, "tests": 0.0},
    "generated": {"true": 0.1, "false": 1.0},
    "project": {"acme": 1.0, "zeta": 0.75},
}


def make_rows(n: int, rng: random.Random):
    """n rows with 2-4 tags each, ~60% of them with a fractional composed weight."""
    combos = []
    for _ in range(64):
        tags = {"lang": rng.choice(list(WEIGHTS["lang"])), "project": rng.choice(["acme", "zeta", "other"])}
        if rng.random() < 0.8:
            tags["kind"] = rng.choice(list(WEIGHTS["kind"]))
        if rng.random() < 0.5:
            tags["generated"] = rng.choice(["true", "false"])
        combos.append(dict(sorted(tags.items())))
    tags = [combos[rng.randrange(len(combos))] for _ in range(n)]
    paths = [f"src/m{i // 1000:04d}/f{i:07d}.py" for i in range(n)]
    ids = [hashlib.sha256(p.encode()).hexdigest()[:16] for p in paths]
    texts = [f"row {i}" for i in range(n)]
    return ids, paths, texts, tags


WEIGHTS_MAP = weights_table([Anchor("", TrainingConfig(dlm_training_version=1, weights=WEIGHTS))], SCOPE_GLOBAL)


def ours(table, seed):
    """What the asset runs (`expand_corpus` = `plan_corpus` + the gather), timed in its two parts."""
    t0 = time.perf_counter()
    plan = plan_corpus(table, WEIGHTS_MAP, seed)
    t1 = time.perf_counter()
    expanded = with_mode(apply_plan(table, plan), EXPANSION_BERNOULLI)
    t2 = time.perf_counter()
    return plan, expanded, t1 - t0, t2 - t0


def child_peak(parquet: str, seed: int) -> None:
    """Peak RSS of a process that reads the corpus from Parquet and expands it, as the asset does."""
    table = pq.read_table(parquet)
    base = peak_rss_mib()
    _, expanded, _, _ = ours(table, seed)
    print(json.dumps({"peak_mib": peak_rss_mib(), "before_mib": base, "rows_out": expanded.num_rows}))


def peak_rss_mib() -> float:
    """VmHWM: this process's own peak (ru_maxrss would carry the parent's peak across fork+exec)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child_peak(args.child, args.seed)

    from _reference import load_reference

    reference = load_reference()
    ids, paths, texts, tags = make_rows(args.rows, random.Random(0))
    table = rows_table(ids, paths, texts, tags)
    ref_rows = [
        {"_dlm_row_tags": t, "_dlm_section_id": s, "i": i} for i, (t, s) in enumerate(zip(tags, ids, strict=False))
    ]

    best_ref = best_plan = best_full = float("inf")
    for _ in range(3):
        gc.collect()
        t0 = time.perf_counter()
        expected = reference.expand_rows_by_weight(ref_rows, WEIGHTS, seed=args.seed)
        best_ref = min(best_ref, time.perf_counter() - t0)
    for _ in range(5):
        gc.collect()
        plan, expanded, plan_s, full_s = ours(table, args.seed)
        best_plan, best_full = min(best_plan, plan_s), min(best_full, full_s)

    identical = plan.source_rows.tolist() == [r["i"] for r in expected] and expanded["section_id"].to_pylist() == [
        r["_dlm_section_id"] for r in expected
    ]
    fractional = int(np.count_nonzero(plan.weights != np.trunc(plan.weights)))
    with tempfile.TemporaryDirectory() as tmp:
        parquet = str(Path(tmp) / "raw.parquet")
        pq.write_table(table, parquet)
        peak = json.loads(
            subprocess.run(
                [sys.executable, __file__, "--child", parquet, "--seed", str(args.seed)],
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
    print(f"rows in               {args.rows:>12,}   (fractional weight: {fractional:,})")
    print(f"rows out              {len(expected):>12,}")
    print(f"compiled hash kernel  {HAS_COMPILED_KERNEL!s:>12}")
    print(f"reference             {best_ref:>11.3f}s")
    print(
        f"ours: decisions       {best_plan:>11.3f}s   ratio {best_ref / best_plan:6.1f}x  (rows to emit, in order: the reference's output)"
    )
    print(
        f"ours: + Arrow table   {best_full:>11.3f}s   ratio {best_ref / best_full:6.1f}x  (materialised columns, ready for Parquet)"
    )
    print(f"identical output      {identical!s:>12}")
    print(
        f"peak RSS (ours only)  {peak['peak_mib']:>10.0f} MiB (after reading the input: {peak['before_mib']:.0f} MiB)"
    )
    if not identical:
        sys.exit(1)


if __name__ == "__main__":
    main()
