"""What the asset checks cost next to the assets they check, and how long the CLI takes to start.

    python benchmarks/checks.py [--files 5000] [--keep DIR]

Runs `dlm-pipeline materialize` on benchmarks/incremental.py's generated tree (cold, then three
unchanged re-runs) and reads the step times of each run from the instance's event log: per check
step, its time as a ratio of its asset's step time in the same kind of run (the issue's target: at
most 0.2). Start-up is the time from the command to the first step's start event.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from incremental import REPO, workspace, workspace_parser  # noqa: E402

ASSETS = ["training_configs", "weights_map", "raw_corpus", "expanded_corpus", "tokenized_cache", "training_dataset"]
WARM_RUNS = 3


def step_times(home: Path) -> list[tuple[float, dict[str, float]]]:
    """Per run, oldest first: (start of the first step, {step key: seconds})."""
    sys.path.insert(0, str(REPO))
    os.environ["DAGSTER_HOME"] = str(home)
    import dagster as dg

    out = []
    with dg.DagsterInstance.get() as instance:
        for run in reversed(instance.get_runs()):
            stats = instance.get_run_step_stats(run.run_id)
            first = min(s.start_time for s in stats if s.start_time)
            out.append((first, {s.step_key: s.end_time - s.start_time for s in stats}))
    return out


def checked_asset(step: str) -> str | None:
    """The asset a check step checks: its key starts with the asset's name (`<asset>_<check>` for a
    check of its own, `<asset>_checks` for the checks of an asset that share a step)."""
    return next((a for a in sorted(ASSETS, key=len, reverse=True) if step.startswith(a + "_")), None)


def main() -> None:
    args = workspace_parser(__doc__).parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        root, home, env = workspace(base, args.files)
        command = [sys.executable, "-m", "dlm_pipeline.cli", "materialize", "--source", str(root), "--seed", "1"]
        starts = []
        for _ in range(1 + WARM_RUNS):
            starts.append(time.time())
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"materialize failed:\n{done.stderr[-2000:]}")
        runs = step_times(home)
        cold, warm = runs[0][1], runs[1:]
        print(f"{args.files:,} files; warm: the fastest of {WARM_RUNS} unchanged re-runs")
        print(
            f"  {'check step':42s} {'cold s':>7s} {'asset':>7s} {'ratio':>6s} {'warm s':>7s} {'asset':>7s} {'ratio':>6s}"
        )
        for step in sorted(s for s in cold if checked_asset(s)):
            asset = checked_asset(step)
            best = min(w[1][step] for w in warm)
            best_asset = min(w[1][asset] for w in warm)
            print(
                f"  {step:42s} {cold[step]:7.2f} {cold[asset]:7.2f} {cold[step] / cold[asset]:6.2f} "
                f"{best:7.2f} {best_asset:7.2f} {best / best_asset:6.2f}"
            )
        startup = [first_step - start for start, (first_step, _) in zip(starts, runs, strict=True)]
        print(
            f"  CLI start-up, command to first step: cold {startup[0]:.2f} s, warm {min(startup[1:]):.2f} s "
            f"(fastest of {WARM_RUNS})"
        )


if __name__ == "__main__":
    main()
