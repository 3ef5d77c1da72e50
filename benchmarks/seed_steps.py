"""Per-step seconds of `dlm-pipeline materialize` for a NEW seed, on the tree `incremental.py` generates.

    python benchmarks/seed_steps.py [--files 5000] [--seeds 3] [--baseline PATH] [--keep DIR]

Seed 1 runs first (cold: it fills the token store); seeds 2, 3, ... are each a new seed (raw_corpus
reused, every text already in the store). With `--baseline` (another checkout of the repository,
e.g. main's), every seed also runs on it, alternating with this checkout, each on its own
DAGSTER_HOME, and every output file (Parquet, .bin/.idx, dataset.json) is compared byte for byte.
Per step: the minimum over the new seeds of Dagster's step time (start to end: inputs, compute and
the IO manager), since other jobs on a shared machine only ever add time.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from incremental import REPO, workspace, workspace_parser  # noqa: E402


def step_seconds(home: Path) -> dict[str, float]:
    """Step key -> seconds of the newest run on `home`."""
    import dagster as dg

    with dg.DagsterInstance.from_config(str(home)) as instance:
        run = instance.get_run_records(limit=1)[0].dagster_run
        return {s.step_key: s.end_time - s.start_time for s in instance.get_run_step_stats(run.run_id)}


def materialize(root: Path, env: dict, seed: int) -> float:
    start = time.perf_counter()
    args = [sys.executable, "-m", "dlm_pipeline.cli", "materialize", "--source", str(root), "--seed", str(seed)]
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"seed {seed} failed:\n{done.stderr[-2000:]}")
    return time.perf_counter() - start


def outputs(home: Path, seed: int) -> dict[str, bytes]:
    storage = home / "storage"
    files = [p for p in storage.glob(f"*/{seed}.parquet")] + sorted(
        (storage / "training_dataset" / str(seed)).iterdir()
    )
    return {str(p.relative_to(storage)): p.read_bytes() for p in files}


def main() -> None:
    parser = workspace_parser(__doc__)
    parser.add_argument("--seeds", type=int, default=3, help="new seeds after the cold seed 1")
    parser.add_argument("--baseline", type=Path, help="another checkout to run beside this one")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        sides = {"this": REPO} | ({"baseline": args.baseline.resolve()} if args.baseline else {})
        homes, envs = {}, {}
        for name, code in sides.items():
            root, homes[name], envs[name] = workspace(base, args.files, f"home_{name}")
            envs[name]["PYTHONPATH"] = str(code)
        steps: dict[str, dict[str, list[float]]] = {name: {} for name in sides}
        walls: dict[str, list[float]] = {name: [] for name in sides}
        for seed in range(1, args.seeds + 2):
            for name in sides:
                wall = materialize(root, envs[name], seed)
                if seed > 1:
                    walls[name].append(wall)
                    for step, seconds in step_seconds(homes[name]).items():
                        steps[name].setdefault(step, []).append(seconds)
            if args.baseline and outputs(homes["this"], seed) != outputs(homes["baseline"], seed):
                raise SystemExit(f"seed {seed}: the outputs differ from the baseline's")
        names = list(sides)
        print(f"{args.files:,} files; a new seed, min over {args.seeds} seeds (s): " + "  ".join(names))
        for step in steps["this"]:
            cells = [min(steps[name].get(step, [float("nan")])) for name in names]
            ratio = f"  {cells[0] / cells[1]:.2f}x" if len(cells) == 2 and cells[1] else ""
            print(f"  {step:40s} " + "  ".join(f"{c:6.2f}" for c in cells) + ratio)
        print(f"  {'whole run (wall)':40s} " + "  ".join(f"{min(walls[n]):6.2f}" for n in names))
        if args.baseline:
            print("outputs byte-identical to the baseline's for every seed")


if __name__ == "__main__":
    main()
