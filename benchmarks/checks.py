"""What the asset checks cost next to the assets they check, and how long the CLI takes to start.

    python benchmarks/checks.py [--files 5000] [--keep DIR]

Runs `dlm-pipeline materialize` on benchmarks/incremental.py's generated tree (cold, then nothing
changed) and reads the step times of each run from the instance's event log: per check, its step
time as a ratio of its asset's step time in the same run (the issue's target: at most 0.2). A check
whose asset was reused in the warm run is compared with the asset's cold time too. Start-up is the
time from the command to the first step's start event.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from incremental import REPO, generate  # noqa: E402

# check -> the asset it checks
CHECKS = {
    "expansion_deterministic": "expanded_corpus",
    "expansion_matches_weights": "expanded_corpus",
    "tokens_match_tokenizer": "tokenized_cache",
    "split_is_leak_free": "training_dataset",
    "packing_conserves_tokens": "training_dataset",
}


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


def seconds_of(steps: dict[str, float], name: str) -> float:
    """A step's time: a check's step key ends with its name (`<asset>_<check>` for a check of its own)."""
    matches = [t for key, t in steps.items() if key == name or key.endswith("_" + name)]
    return matches[0] if matches else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--keep", type=Path, help="build the tree and DAGSTER_HOME here (default: a temp folder)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        root, home = generate(base / "tree", args.files), base / "dagster_home"
        home.mkdir(parents=True, exist_ok=True)
        (home / "dagster.yaml").touch()
        time.sleep(0.1)
        env = {k: v for k, v in os.environ.items() if not k.startswith("DLM_")}
        env.update(DAGSTER_HOME=str(home), PYTHONPATH=str(REPO))
        command = [sys.executable, "-m", "dlm_pipeline.cli", "materialize", "--source", str(root), "--seed", "1"]
        starts = []
        for _ in ("cold", "warm"):
            starts.append(time.time())
            done = subprocess.run(command, env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"materialize failed:\n{done.stderr[-2000:]}")
        runs = step_times(home)
        print(f"{args.files:,} files")
        print(f"  {'check':28s} {'run':5s} {'check s':>8s} {'asset s':>8s} {'ratio':>6s} {'vs cold asset':>13s}")
        cold_steps = runs[0][1]
        for label, (_, steps) in zip(("cold", "warm"), runs, strict=True):
            for check, asset in CHECKS.items():
                spent, of = seconds_of(steps, check), seconds_of(steps, asset)
                cold_of = seconds_of(cold_steps, asset)
                print(f"  {check:28s} {label:5s} {spent:8.2f} {of:8.2f} {spent / of:6.2f} {spent / cold_of:13.2f}")
        for label, start, (first_step, _) in zip(("cold", "warm"), starts, runs, strict=True):
            print(f"  CLI start-up ({label}): {first_step - start:.2f} s from the command to the first step")


if __name__ == "__main__":
    main()
