"""What the asset checks cost next to the assets they check, in runs that compute them.

    python benchmarks/checks.py [--files 5000] [--keep DIR] [--profile]

Runs `dlm-pipeline materialize` on benchmarks/incremental.py's generated tree: cold (seed 1), one
file edited (seed 1), then NEW_SEEDS new seeds (2, 3, ...), and reads the step times of each run from
the instance's event log: per check step, its time as a ratio of its asset's step time in the same
run (the issue's target: at most 0.2); for new seeds, the fastest of them. Unchanged re-runs are not
measured: their check steps re-record the passed evaluations and do no work of their own.
`--profile` runs each CLI under cProfile and adds the checks' own work: the cumulative time of each
check function's body (reading, recomputing, comparing; not Dagster's cost per step), profiled.
"""

from __future__ import annotations

import os
import pstats
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from incremental import REPO, workspace, workspace_parser  # noqa: E402

ASSETS = ["training_configs", "weights_map", "raw_corpus", "expanded_corpus", "tokenized_cache", "training_dataset"]
NEW_SEEDS = 3
# The bodies of the check steps (file, function), for --profile.
CHECK_BODIES = {
    "expanded_corpus_checks": ("defs/corpus/checks.py", "expanded_corpus_checks"),
    "tokenized_cache_tokens_match_tokenizer": ("defs/tokens/checks.py", "tokens_match_tokenizer"),
    "training_dataset_checks": ("defs/dataset/checks.py", "training_dataset_checks"),
}


def step_times(home: Path) -> list[dict[str, float]]:
    """Per run, oldest first: {step key: seconds}."""
    sys.path.insert(0, str(REPO))
    os.environ["DAGSTER_HOME"] = str(home)
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        return [
            {s.step_key: s.end_time - s.start_time for s in instance.get_run_step_stats(run.run_id)}
            for run in reversed(instance.get_runs())
        ]


def own_work(profile: Path) -> dict[str, float]:
    """Cumulative seconds of each check body in a cProfile output (0.0 when it did not run)."""
    stats = pstats.Stats(str(profile)).stats
    found = dict.fromkeys(CHECK_BODIES, 0.0)
    for (filename, _, function), (_, _, _, cumulative, _) in stats.items():
        for step, (suffix, name) in CHECK_BODIES.items():
            if function == name and filename.endswith(suffix):
                found[step] += cumulative
    return found


def checked_asset(step: str) -> str | None:
    """The asset a check step checks: its key starts with the asset's name (`<asset>_<check>` for a
    check of its own, `<asset>_checks` for the checks of an asset that share a step)."""
    return next((a for a in sorted(ASSETS, key=len, reverse=True) if step.startswith(a + "_")), None)


def main() -> None:
    parser = workspace_parser(__doc__)
    parser.add_argument("--profile", action="store_true", help="also report the checks' own work (cProfile)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        root, home, env = workspace(base, args.files)
        edited = root / "src" / "pkg01" / "m00001.py"
        runs = [("cold", lambda: None, "1"), ("one edit", lambda: edited.write_text(edited.read_text() + "x\n"), "1")]
        runs += [("new seed", lambda: None, str(seed)) for seed in range(2, 2 + NEW_SEEDS)]
        own = []
        for number, (_, change, seed) in enumerate(runs):
            change()
            profile = base / f"run{number}.prof"
            runner = ["-m", "cProfile", "-o", str(profile)] if args.profile else []
            command = [sys.executable, *runner, "-m", "dlm_pipeline.cli", "materialize", "--source", str(root)]
            done = subprocess.run([*command, "--seed", seed], env=env, capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"materialize failed:\n{done.stderr[-2000:]}")
            own.append(own_work(profile) if args.profile else {})
        times = step_times(home)
        print(f"{args.files:,} files; new seed: the fastest of {NEW_SEEDS} new-seed runs")
        own_header = f" {'own s':>6s}" if args.profile else ""
        for kind in ("cold", "one edit", "new seed"):
            picked = [i for i, (name, _, _) in enumerate(runs) if name == kind]
            print(f"  {kind:10s} {'check step':40s} {'step s':>7s} {'asset s':>7s} {'ratio':>6s}{own_header}")
            for step in sorted(s for s in times[picked[0]] if checked_asset(s)):
                asset = checked_asset(step)
                best = min(picked, key=lambda i, step=step: times[i][step])
                seconds, asset_seconds = times[best][step], min(times[i][asset] for i in picked)
                extra = f" {own[best][step]:6.2f}" if args.profile else ""
                print(
                    f"  {'':10s} {step:40s} {seconds:7.2f} {asset_seconds:7.2f} {seconds / asset_seconds:6.2f}{extra}"
                )


if __name__ == "__main__":
    main()
