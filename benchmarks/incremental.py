"""Cost follows change: `dlm-pipeline materialize` on a generated tree beside a plain script, same run.

    python benchmarks/incremental.py [--files 5000] [--keep DIR]

The tree: `--files` text files (about 4 KiB each) under five anchors with tags and weights. The
plain script is what a user would write without the pipeline: walk, read, expand by the weights,
tokenize with the same bundled tokenizer, write one Parquet file, in one fresh process. The CLI
runs, on one fresh DAGSTER_HOME: cold (seed 1), nothing changed, one file edited, a new seed (2),
and a weights edit. Each line gives the wall time (process start to exit) and its ratio to the plain
script; the start-up (process start to the run's first step) and the run time (Dagster's run start
to end, the issue's "run time"); how many steps were computed (the others re-recorded an unchanged
output, or a check's passed evaluation of it); and how many files raw_corpus read. Then storage: seeds 1 to 8
on another fresh DAGSTER_HOME, the bytes on disk (each inode once, as `du` counts) of the outputs
and the token store after one seed and after eight, per asset.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = "def return import class self value index tree file seed weight token corpus path text for in if else".split()
ANCHORS = {"": "core", "docs": "docs", "src": "src", "tests": "tests", "notes": "notes"}

PLAIN = r"""
import os, sys, pyarrow as pa, pyarrow.parquet as pq
from tokenizers import Tokenizer
root, out, weights = sys.argv[1], sys.argv[2], {"docs": 2, "src": 1, "tests": 1, "notes": 1, "": 1}
texts = []
for folder, dirs, files in os.walk(root):
    dirs[:] = sorted(d for d in dirs if d != ".dlm")
    top = os.path.relpath(folder, root).split(os.sep)[0]
    for name in sorted(files):
        with open(os.path.join(folder, name), "rb") as fh:
            text = fh.read().decode("utf-8").replace("\r\n", "\n")
        texts += [text] * weights.get(top if top != "." else "", 1)
tokenizer = Tokenizer.from_file(sys.argv[3])
ids = [e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=False)]
pq.write_table(pa.table({"text": texts, "input_ids": ids}), out)
"""


def generate(root: Path, n_files: int) -> Path:
    rng = random.Random(11)
    for anchor, kind in ANCHORS.items():
        weight = "2.0" if kind == "docs" else "1.0"
        config = f"dlm_training_version: 1\nmetadata: {{kind: {kind}}}\nweights: {{kind: {{{kind}: {weight}}}}}\n"
        (root / anchor / ".dlm").mkdir(parents=True, exist_ok=True)
        (root / anchor / ".dlm" / "training.yaml").write_text(config)
    tops = [a for a in ANCHORS if a]
    for i in range(n_files):
        folder = root / tops[i % len(tops)] / f"pkg{i % 50:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        lines = (" ".join(rng.choices(WORDS, k=8)) for _ in range(100))
        (folder / f"m{i:05d}.py").write_text("\n".join(lines) + "\n")
    return root


def workspace(base: Path, n_files: int, home_name: str = "dagster_home") -> tuple[Path, Path, dict]:
    """(generated tree, a fresh DAGSTER_HOME, the environment of a CLI run on them)."""
    root = base / "tree" if (base / "tree").exists() else generate(base / "tree", n_files)
    home = base / home_name
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").touch()
    time.sleep(0.1)  # past the racy window of the files just written
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLM_")}
    env.update(DAGSTER_HOME=str(home), PYTHONPATH=str(REPO))
    return root, home, env


def workspace_parser(doc: str) -> argparse.ArgumentParser:
    """The options of every benchmark on this generated tree: its size and where to keep it."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--keep", type=Path, help="build the tree and the DAGSTER_HOMEs here (default: a temp folder)")
    return parser


def disk_usage(*paths: Path) -> int:
    """Bytes allocated under `paths`, each inode counted once (hard links shared by seeds count once)."""
    seen, total = set(), 0
    for folder in paths:
        for dirpath, dirnames, filenames in os.walk(folder):
            for name in [".", *dirnames, *filenames]:
                info = os.lstat(os.path.join(dirpath, name))
                if (info.st_dev, info.st_ino) not in seen:
                    seen.add((info.st_dev, info.st_ino))
                    total += info.st_blocks * 512
    return total


def storage(base: Path, n_files: int) -> None:
    """Outputs and token store after seed 1, then after seeds 1-8, per asset folder."""
    root, home, env = workspace(base, n_files, "storage_home")
    materialize = [sys.executable, "-m", "dlm_pipeline.cli", "materialize", "--source", str(root), "--seed"]

    def folders() -> list[Path]:
        return sorted((home / "storage").iterdir()) + [home / "token_cache"]

    timed([*materialize, "1"], env)
    one, total_one = {p.name: disk_usage(p) for p in folders()}, disk_usage(*folders())
    timed([*materialize, *[str(s) for s in range(2, 9)]], env)
    eight, total_eight = {p.name: disk_usage(p) for p in folders()}, disk_usage(*folders())
    print(
        f"storage (outputs + token store): 1 seed {total_one / 1e6:.1f} MB, 8 seeds {total_eight / 1e6:.1f} MB "
        f"({total_eight / total_one:.2f}x)"
    )
    for name in sorted(eight):
        print(f"  {name:18s} {one.get(name, 0) / 1e6:7.2f} MB -> {eight[name] / 1e6:7.2f} MB")


def timed(args: list[str], env: dict) -> float:
    start = time.perf_counter()
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:4])} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


@dataclass
class RunFacts:
    startup: float  # process start to the first step's start
    run: float  # the run record's start to end
    computed: int  # steps that computed (not re-recorded an unchanged output or evaluation)
    steps: int
    files_read: int  # raw_corpus's files_read


def run_facts(home: Path, spawned: list[float]) -> list[RunFacts]:
    """What each run did, oldest first, from the instance's run and event records; `spawned`: the
    wall-clock time each CLI process was started, in the same order."""
    sys.path.insert(0, str(REPO))
    os.environ["DAGSTER_HOME"] = str(home)
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        records = list(reversed(instance.get_run_records(limit=len(spawned))))
        facts = []
        for record, start in zip(records, spawned, strict=True):
            run_id = record.dagster_run.run_id
            steps = instance.get_run_step_stats(run_id)
            events = instance.all_logs(
                run_id, of_type={dg.DagsterEventType.ASSET_MATERIALIZATION, dg.DagsterEventType.ASSET_CHECK_EVALUATION}
            )
            reused, files_read = set(), -1
            for entry in events:
                data = entry.dagster_event.event_specific_data
                metadata = data.materialization.metadata if hasattr(data, "materialization") else data.metadata
                if (
                    "reused_from_seed" in metadata
                    or "evaluated_in_run" in metadata
                    or ("reuse" in metadata and str(metadata["reuse"].value).startswith("unchanged"))
                ):
                    reused.add(entry.step_key)
                if entry.step_key == "raw_corpus" and hasattr(data, "materialization"):
                    files_read = metadata["files_read"].value
            facts.append(
                RunFacts(
                    startup=min(s.start_time for s in steps) - start,
                    run=record.end_time - record.start_time,
                    computed=len(steps) - len(reused),
                    steps=len(steps),
                    files_read=files_read,
                )
            )
        return facts


def main() -> None:
    args = workspace_parser(__doc__).parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        root, home, env = workspace(base, args.files)
        tokenizer = REPO / "dlm_pipeline" / "data" / "dlm-bpe-8k.json"
        plain = timed([sys.executable, "-c", PLAIN, str(root), str(base / "plain.parquet"), str(tokenizer)], env)
        materialize = [sys.executable, "-m", "dlm_pipeline.cli", "materialize", "--source", str(root), "--seed"]
        edited = root / "src" / "pkg01" / "m00001.py"
        config = root / ".dlm" / "training.yaml"
        steps = [
            ("cold run, seed 1", lambda: None, "1"),
            ("nothing changed", lambda: None, "1"),
            ("one file edited", lambda: edited.write_text(edited.read_text() + "one more line\n"), "1"),
            ("new seed 2", lambda: None, "2"),
            ("weights edit", lambda: config.write_text(config.read_text().replace("core: 1.0", "core: 1.5")), "1"),
        ]
        times, spawned = [], []
        for _, change, seed in steps:
            change()
            time.sleep(0.1)
            spawned.append(time.time())
            times.append(timed([*materialize, seed], env))
        print(f"{args.files:,} files; plain script (read + expand + tokenize): {plain:.2f} s")
        print(f"  {'':18s} {'wall':>7s}  {'/ plain':>7s}  {'start-up':>8s}  {'run':>6s}  computed  raw_corpus")
        for (name, _, _), seconds, facts in zip(steps, times, run_facts(home, spawned), strict=True):
            print(
                f"  {name:18s} {seconds:6.2f}s  {seconds / plain:6.2f}x  {facts.startup:7.2f}s  {facts.run:5.2f}s  "
                f"{facts.computed:>2d} of {facts.steps}  read {facts.files_read:,} file(s)"
            )
        storage(base, args.files)


if __name__ == "__main__":
    main()
