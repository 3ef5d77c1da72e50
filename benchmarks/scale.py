"""Memory and time against corpus size: each asset materialized alone, in its own process, on
generated trees of 100 MB, 300 MB and 1 GB of text, beside a plain baseline in the same run.

    python benchmarks/scale.py [--sizes 100,300,1000] [--skip-tokenize] [--keep DIR]

The tree: text files of 2-100 KB (random lines of words) under four anchors with tags and weights
(docs 2.0, src 1.0, notes 0.5, tests 1.5). Each asset runs in a fresh process through the real
definitions on one DAGSTER_HOME (its inputs are read from storage, as in any run); the process
reports its peak RSS (VmHWM) and the step's wall time. `--skip-tokenize` materializes only
training_configs, weights_map, raw_corpus and expanded_corpus (tokenized_cache and training_dataset are left out and
the output says so). The plain baseline walks the tree and reads and decodes every file, in a
process of its own. Time per MB is the step's wall time over the MB of text in the tree.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MB = 1_000_000
WORDS = (
    "def return import class self value index tree file seed weight token corpus path text for in if "
    "else while yield lambda with open read write batch stream memory bound parquet arrow row column"
).split()
ANCHORS = {"docs": ("docs", "2.0"), "src": ("src", "1.0"), "notes": ("notes", "0.5"), "tests": ("tests", "1.5")}
CORPUS_ASSETS = ["training_configs", "weights_map", "raw_corpus", "expanded_corpus"]
TOKEN_ASSETS = ["tokenized_cache", "training_dataset"]

STEP = r"""
import json, os, sys, time
import dagster as dg
from dlm_pipeline.defs.constants import CORPUS_JOB
from dlm_pipeline.definitions import build_defs
from dlm_pipeline.defs.resources import ParquetIOManager, SourceTree, TokenCacheResource, TokenizerResource, DatasetResource
from dlm_pipeline.defs.compute import ComputeResource

asset, root, out, seed = sys.argv[1:5]
defs = build_defs({
    "source": SourceTree(root=root),
    "io_manager": ParquetIOManager(output_dir=out),
    "tokenizer": TokenizerResource(),
    "token_cache": TokenCacheResource(cache_dir=os.path.join(out, "..", "token_cache")),
    "compute": ComputeResource(),
    "dataset": DatasetResource(),
})
with dg.DagsterInstance.get() as instance:
    if seed not in instance.get_dynamic_partitions("seeds"):
        instance.add_dynamic_partitions("seeds", [seed])
    key = dg.AssetKey(asset)  # the asset alone, with only the checks built into it (configs_valid)
    own_checks = set(defs.resolve_assets_def(key).check_keys)
    job = defs.resolve_job_def(CORPUS_JOB).get_subset(asset_selection={key}, asset_check_selection=own_checks)
    start = time.perf_counter()
    result = job.execute_in_process(instance=instance, partition_key=seed, raise_on_error=False)
    seconds = time.perf_counter() - start
status = open("/proc/self/status").read()
peak_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
print(json.dumps({"ok": result.success, "seconds": seconds, "peak_mib": peak_kib / 1024}))
"""

PLAIN = r"""
import json, os, sys, time
start = time.perf_counter()
chars = 0
for folder, dirs, files in os.walk(sys.argv[1]):
    dirs[:] = sorted(d for d in dirs if d != ".dlm")
    for name in sorted(files):
        with open(os.path.join(folder, name), "rb") as fh:
            chars += len(fh.read().decode("utf-8").replace("\r\n", "\n"))
seconds = time.perf_counter() - start
status = open("/proc/self/status").read()
peak_kib = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:")))
print(json.dumps({"ok": True, "seconds": seconds, "peak_mib": peak_kib / 1024}))
"""


def generate(root: Path, megabytes: int) -> int:
    """Files of 2-100 KB of random lines under the anchors, until `megabytes` MB of text; returns the bytes."""
    rng = random.Random(megabytes)
    lines = [" ".join(rng.choices(WORDS, k=rng.randint(4, 14))) + "\n" for _ in range(20_000)]
    for anchor, (kind, weight) in ANCHORS.items():
        (root / anchor / ".dlm").mkdir(parents=True, exist_ok=True)
        config = f"dlm_training_version: 1\nmetadata: {{kind: {kind}}}\nweights: {{kind: {{{kind}: {weight}}}}}\n"
        (root / anchor / ".dlm" / "training.yaml").write_text(config)
    tops, total, i = list(ANCHORS), 0, 0
    while total < megabytes * MB:
        size = rng.randint(2_000, 100_000)
        text = "".join(rng.choices(lines, k=max(1, size // 60)))
        folder = root / tops[i % len(tops)] / f"pkg{(i // len(tops)) % 100:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"m{i:06d}.txt").write_text(text)
        total += len(text)
        i += 1
    return total


def run(script: str, *args: str, env: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:1])} failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if not result["ok"]:
        raise SystemExit(f"{args[0]} did not succeed:\n{done.stderr[-3000:]}")
    return result


def measure(size_mb: int, work: Path, assets: list[str]) -> list[tuple[str, float, float, float]]:
    """(what, seconds, s/MB, peak MiB) for the plain baseline and each asset on a tree of `size_mb` MB."""
    root, home, out = work / "tree", work / "home", work / "out"
    for folder in (root, home, out):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    text_mb = generate(root, size_mb) / MB
    env = {**os.environ, "DAGSTER_HOME": str(home), "PYTHONPATH": str(REPO)}
    os.sync()
    rows = []
    plain = run(PLAIN, str(root), env=env)
    rows.append(("plain read", plain["seconds"], plain["seconds"] / text_mb, plain["peak_mib"]))
    for asset in assets:
        step = run(STEP, asset, str(root), str(out), "1", env=env)
        rows.append((asset, step["seconds"], step["seconds"] / text_mb, step["peak_mib"]))
    return [(f"{size_mb} MB ({text_mb:,.0f} MB text)", 0.0, 0.0, 0.0), *rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,300,1000", help="tree sizes in MB of text, comma separated")
    parser.add_argument("--skip-tokenize", action="store_true", help="leave tokenized_cache and training_dataset out")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (default: a temp folder)")
    args = parser.parse_args()
    assets = CORPUS_ASSETS + ([] if args.skip_tokenize else TOKEN_ASSETS)
    if args.skip_tokenize:
        print("--skip-tokenize: tokenized_cache and training_dataset are not materialized; assets:", ", ".join(assets))
    work = args.keep or Path(tempfile.mkdtemp(prefix="dlm-scale-"))
    print(f"{'':<18} {'seconds':>9} {'s/MB':>8} {'peak RSS MiB':>13}", flush=True)
    try:
        for size in (int(s) for s in args.sizes.split(",")):
            started = time.perf_counter()
            for what, seconds, per_mb, peak in measure(size, work, assets):
                if not seconds:
                    print(what)
                    continue
                print(f"  {what:<16} {seconds:>9.1f} {per_mb:>8.4f} {peak:>13,.0f}", flush=True)
            print(f"  (tree {size} MB done in {time.perf_counter() - started:,.0f} s)", flush=True)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
