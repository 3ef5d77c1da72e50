"""CLI start-up: from the command to the run's first step, on a warm nothing-changed run.

    python benchmarks/startup.py [--files 5000] [--runs 5] [--compare DIR ...] [--keep DIR]

The tree is `benchmarks/incremental.py`'s (`--files` text files under five anchors). Each checkout
(this one, then every `--compare` checkout, e.g. an unpacked `git archive main` with the built
`dlm_pipeline/core/_blake2b*.so` copied in) gets its own
DAGSTER_HOME, warmed by one cold `materialize --seed 1`; then `--runs` rounds each run every
checkout once, interleaved so that a busy machine slows them alike. Per checkout, the median of:

- command to first step: a timestamp taken just before the subprocess is spawned, to the earliest
  step start the instance recorded for the run (`get_run_step_stats`);
- run: the run record's start to end (what Dagster itself takes);
- command to exit: the whole command.

Baselines in the same run: `python -c pass` and `python -c "import dagster"` (each process start
to exit); each time is also given as a ratio to the `import dagster` baseline.
"""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from incremental import workspace, workspace_parser  # noqa: E402  (the same generated tree)

RUN_ID = re.compile(r"seed 1: ok \(run ([0-9a-f-]+)\)")


def wall(args: list[str], env: dict) -> float:
    start = time.time()
    subprocess.run(args, env=env, check=True, capture_output=True)
    return time.time() - start


def materialize(code: Path, root: Path, home: Path, env: dict) -> tuple[float, float, str]:
    """(spawn and exit timestamps, run id) of one `materialize --seed 1` with `code` first on the path."""
    env = {**env, "PYTHONPATH": str(code), "DAGSTER_HOME": str(home)}
    args = [sys.executable, "-m", "dlm_pipeline.cli", "materialize", "--source", str(root), "--seed", "1"]
    spawned = time.time()
    done = subprocess.run(args, env=env, capture_output=True, text=True)
    exited = time.time()
    match = RUN_ID.search(done.stdout)
    if done.returncode != 0 or not match:
        raise SystemExit(f"materialize with {code} failed:\n{done.stderr[-2000:]}")
    return spawned, exited, match.group(1)


def run_times(home: Path, run_id: str) -> tuple[float, float]:
    """(first step start, run start to end) of a finished run, read from its instance."""
    import dagster as dg

    os.environ["DAGSTER_HOME"] = str(home)
    with dg.DagsterInstance.get() as instance:
        first = min(s.start_time for s in instance.get_run_step_stats(run_id) if s.start_time)
        record = instance.get_run_record_by_id(run_id)
        return first, record.end_time - record.start_time


def main() -> None:
    parser = workspace_parser(__doc__)
    parser.add_argument("--runs", type=int, default=5, help="warm runs per checkout (the median is shown)")
    parser.add_argument("--compare", type=Path, nargs="*", default=[], help="other checkouts to time alike")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        codes = [REPO, *[c.resolve() for c in args.compare]]
        homes = []
        for index, code in enumerate(codes):
            root, home, env = workspace(base, args.files, f"home{index}")
            materialize(code, root, home, env)  # cold: tokenizes, fills the home and the OS file cache
            homes.append(home)
        samples = {code: [] for code in codes}
        baselines = {"python -c pass": [], "python -c 'import dagster'": []}
        for _ in range(args.runs):
            baselines["python -c pass"].append(wall([sys.executable, "-c", "pass"], env))
            baselines["python -c 'import dagster'"].append(wall([sys.executable, "-c", "import dagster"], env))
            for code, home in zip(codes, homes, strict=True):
                spawned, exited, run_id = materialize(code, root, home, env)
                first, run = run_times(home, run_id)
                samples[code].append((first - spawned, run, exited - spawned))
        base_times = {name: statistics.median(times) for name, times in baselines.items()}
        dagster = base_times["python -c 'import dagster'"]
        print(f"{args.files:,} files, warm nothing-changed `materialize --seed 1`, median of {args.runs} runs")
        for name, seconds in base_times.items():
            print(f"  baseline {name:28s} {seconds:5.2f} s")
        for code in codes:
            to_step, run, to_exit = (statistics.median(column) for column in zip(*samples[code], strict=True))
            print(
                f"  {str(code):40s} command to first step {to_step:5.2f} s ({to_step / dagster:4.2f}x import dagster)"
                f"  run {run:5.2f} s  command to exit {to_exit:5.2f} s ({to_exit / dagster:4.2f}x)"
            )


if __name__ == "__main__":
    main()
