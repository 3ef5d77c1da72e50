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
to exit); each time is also given as a ratio to the `import dagster` baseline. And Dagster's own
floor: the smallest Dagster program that runs a step (one asset that does nothing, run in process
on its own warm SQLite DAGSTER_HOME, as the CLI runs a seed), command to its first step.
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


SMALLEST_DAGSTER_RUN = """
import dagster as dg

@dg.asset
def nothing() -> None:
    return None

job = dg.Definitions(assets=[nothing], jobs=[dg.define_asset_job("only")]).resolve_job_def("only")
job.execute_in_process(
    instance=dg.DagsterInstance.get(), run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
)
"""


def smallest_dagster_run(home: Path, env: dict) -> float:
    """Command to first step of SMALLEST_DAGSTER_RUN on `home`."""
    spawned = time.time()
    subprocess.run([sys.executable, "-c", SMALLEST_DAGSTER_RUN], env={**env, "DAGSTER_HOME": str(home)}, check=True)
    import dagster as dg

    os.environ["DAGSTER_HOME"] = str(home)
    with dg.DagsterInstance.get() as instance:
        (record,) = instance.get_run_records(limit=1)
        return min(s.start_time for s in instance.get_run_step_stats(record.dagster_run.run_id)) - spawned


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
        floor_home = base / "smallest_dagster_home"
        floor_home.mkdir(exist_ok=True)
        (floor_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
        smallest_dagster_run(floor_home, env)  # creates its storage
        samples = {code: [] for code in codes}
        smallest = "one no-op asset: command to first step"
        baselines = {"python -c pass": [], "python -c 'import dagster'": [], smallest: []}
        for _ in range(args.runs):
            baselines["python -c pass"].append(wall([sys.executable, "-c", "pass"], env))
            baselines["python -c 'import dagster'"].append(wall([sys.executable, "-c", "import dagster"], env))
            baselines[smallest].append(smallest_dagster_run(floor_home, env))
            for code, home in zip(codes, homes, strict=True):
                spawned, exited, run_id = materialize(code, root, home, env)
                first, run = run_times(home, run_id)
                samples[code].append((first - spawned, run, exited - spawned))
        base_times = {name: statistics.median(times) for name, times in baselines.items()}
        dagster = base_times["python -c 'import dagster'"]
        print(f"{args.files:,} files, warm nothing-changed `materialize --seed 1`, median of {args.runs} runs")
        for name, seconds in base_times.items():
            print(f"  baseline {name:38s} {seconds:5.2f} s")
        for code in codes:
            to_step, run, to_exit = (statistics.median(column) for column in zip(*samples[code], strict=True))
            print(
                f"  {str(code):40s} command to first step {to_step:5.2f} s ({to_step / dagster:4.2f}x import dagster)"
                f"  run {run:5.2f} s  command to exit {to_exit:5.2f} s ({to_exit / dagster:4.2f}x)"
            )


if __name__ == "__main__":
    main()
