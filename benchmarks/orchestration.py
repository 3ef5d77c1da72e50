"""What Dagster costs per seed: `dlm-pipeline materialize` vs the same work in the core library.

    python benchmarks/orchestration.py [--seeds 1 8] [--parallel 2]

Each CLI run gets a fresh DAGSTER_HOME (SQLite) and the bundled example; the token cache is
warmed first so both sides do the same work. The core side runs the same steps (walk, configs,
weights, corpus, expansion, tokens, Parquet writes) in one process without Dagster.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def cli_wall(seeds: int, parallel: int, cache: Path) -> float:
    with tempfile.TemporaryDirectory() as home:
        shutil_copy = (REPO / "dagster_home" / "dagster.yaml").read_text()
        (Path(home) / "dagster.yaml").write_text(shutil_copy)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DLM_")}
        env.update(DAGSTER_HOME=home, DLM_CACHE_DIR=str(cache))
        args = [sys.executable, "-m", "dlm_pipeline.cli", "materialize", "--parallel", str(parallel)]
        for seed in range(seeds):
            args += ["--seed", str(seed)]
        start = time.perf_counter()
        subprocess.run(args, env=env, check=True, capture_output=True)
        return time.perf_counter() - start


def core_wall(seeds: int, cache: Path) -> float:
    code = f"""
import time, tempfile
start = time.perf_counter()
import numpy as np
from dlm_pipeline import settings
from dlm_pipeline.core.config_records import anchors_from_table, load_configs, records_table
from dlm_pipeline.core.corpus import build_raw_corpus
from dlm_pipeline.core.expansion import expand_rows
from dlm_pipeline.core.parquet_io import write_parquet_atomic
from dlm_pipeline.core.token_store import TokenStore, tokenized_rows
from dlm_pipeline.core.tokenize import load_tokenizer
from dlm_pipeline.core.tree import scan_tree
from dlm_pipeline.core.weights import maps_from_table, row_chains, weights_table
out = tempfile.mkdtemp()
for seed in range({seeds}):
    scan = scan_tree(settings.EXAMPLE_ROOT)
    configs = records_table(load_configs(scan))
    anchors = anchors_from_table(configs)
    weights = weights_table(anchors, "nearest")
    raw = build_raw_corpus(scan_tree(settings.EXAMPLE_ROOT), anchors).table
    row_chain, chains = row_chains(raw["path"], maps_from_table(weights, "nearest"), "nearest")
    expanded, _ = expand_rows(raw, row_chain, chains, seed)
    loaded = load_tokenizer()
    store = TokenStore({str(cache)!r})
    tokens = tokenized_rows(store, loaded, raw, expanded["section_id"], expanded["copy"]).table()
    for name, table in (("c", configs), ("w", weights), ("r", raw), ("e", expanded), ("t", tokens)):
        write_parquet_atomic(table, f"{{out}}/{{name}}/{{seed}}.parquet")
print(time.perf_counter() - start)
"""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--parallel", type=int, default=1, help="worker processes for the CLI (its --parallel)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        cli_wall(1, 1, cache)  # warm the token cache and the OS file cache
        for seeds in args.seeds:
            cli = cli_wall(seeds, args.parallel, cache)
            core = core_wall(seeds, cache)
            print(
                f"{seeds} seed(s), --parallel {args.parallel}: dlm-pipeline materialize {cli:6.2f}s   "
                f"core library {core:5.2f}s   Dagster's share {(cli - core) / seeds:5.2f}s per seed"
            )


if __name__ == "__main__":
    main()
