"""What Dagster itself costs per run of this graph, beside the pipeline's nothing-changed run, same session.

    python benchmarks/dagster_floor.py [--files 5000] [--runs 5] [--keep DIR]

The floor: the real definitions (`definitions.ASSETS`, `definitions.CHECKS`) with bodies that do
nothing. Each asset becomes an asset with the same key, dependencies, seed partitions and checks;
each check step a step that passes the same checks; the IO manager stores nothing. It runs in
process on a fresh SQLite DAGSTER_HOME, as `dlm-pipeline materialize` runs a seed. The pipeline:
`dlm-pipeline materialize` on benchmarks/incremental.py's generated tree, cold once, then `--runs`
times with nothing changed. Printed for each: the run record's start-to-end time (median of the
runs, the issue's "run time") and the events a run writes; then the pipeline over the floor.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from incremental import run_facts, timed, workspace, workspace_parser

REPO = Path(__file__).resolve().parents[1]
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}  # as the CLI runs a seed


def floor_definitions(dg):
    """No-op copies of the pipeline's assets and check steps: same keys, dependencies, partitions, checks."""
    from dlm_pipeline.definitions import ASSETS, CHECKS

    seeds = dg.DynamicPartitionsDefinition(name="seeds")

    def passing(specs):
        return [dg.AssetCheckResult(asset_key=s.asset_key, check_name=s.name, passed=True) for s in specs]

    def noop_asset(original):
        (spec,) = original.specs
        check_specs = list(original.check_specs)

        @dg.multi_asset(
            specs=[dg.AssetSpec(spec.key, deps=spec.deps, partitions_def=seeds)],
            check_specs=check_specs or None,
            name=spec.key.to_python_identifier(),
        )
        def body():
            yield dg.MaterializeResult(asset_key=spec.key)
            yield from passing(check_specs)

        return body

    def noop_checks(original):
        specs = list(original.check_specs)

        @dg.multi_asset_check(specs=specs, name=original.node_def.name)
        def body():
            yield from passing(specs)

        return body

    class Nothing(dg.ConfigurableIOManager):
        def handle_output(self, context, obj):
            pass

        def load_input(self, context):
            return None

    return dg.Definitions(
        assets=[noop_asset(a) for a in ASSETS],
        asset_checks=[noop_checks(c) for c in CHECKS],
        jobs=[dg.define_asset_job("floor", partitions_def=seeds)],
        resources={"io_manager": Nothing()},
    )


def floor_run(home: Path) -> None:
    """One run of the no-op graph in this (fresh) process; prints its run time and events."""
    os.environ["DAGSTER_HOME"] = str(home)
    sys.path.insert(0, str(REPO))
    import dagster as dg

    job = floor_definitions(dg).resolve_job_def("floor")
    with dg.DagsterInstance.get() as instance:
        if not instance.has_dynamic_partition("seeds", "1"):
            instance.add_dynamic_partitions("seeds", ["1"])
        result = job.execute_in_process(instance=instance, partition_key="1", run_config=QUIET)
        record = instance.get_run_record_by_id(result.run_id)
        print(record.end_time - record.start_time, len(instance.all_logs(result.run_id)))


def floor_runs(home: Path, runs: int) -> tuple[list[float], int]:
    """Run record times and events per run of the no-op graph, each in a fresh process (as each
    `materialize` is), after one run that creates the storage."""
    (home / "dagster.yaml").touch()
    env = {**os.environ, "DAGSTER_HOME": str(home)}
    times, events = [], 0
    for i in range(runs + 1):
        done = subprocess.run(
            [sys.executable, __file__, "--floor-run", str(home)], env=env, capture_output=True, text=True
        )
        if done.returncode != 0:
            raise SystemExit(f"the no-op graph failed:\n{done.stderr[-2000:]}")
        seconds, events = done.stdout.split()[-2:]
        if i:
            times.append(float(seconds))
    return times, int(events)


def pipeline_runs(base: Path, files: int, runs: int) -> tuple[list[float], int]:
    """Run record times and events per run of `dlm-pipeline materialize` with nothing changed."""
    root, home, env = workspace(base, files, "floor_pipeline_home")
    materialize = [sys.executable, "-m", "dlm_pipeline.cli", "materialize", "--source", str(root), "--seed", "1"]
    timed(materialize, env)  # cold
    spawned = []
    for _ in range(runs):
        spawned.append(time.time())
        timed(materialize, env)
    facts = run_facts(home, [0.0, *spawned])[1:]
    events = subprocess.run(
        [
            sys.executable,
            "-c",
            "import dagster as dg; i = dg.DagsterInstance.get(); "
            "print(len(i.all_logs(i.get_run_records(limit=1)[0].dagster_run.run_id)))",
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return [f.run for f in facts], int(events)


def main() -> None:
    parser = workspace_parser(__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--floor-run", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor_run:
        floor_run(args.floor_run)
        return
    with tempfile.TemporaryDirectory() as tmp:
        base = args.keep or Path(tmp)
        ours, our_events = pipeline_runs(base, args.files, args.runs)
        floor_home = base / "floor_home"
        floor_home.mkdir(parents=True, exist_ok=True)
        floor, floor_events = floor_runs(floor_home, args.runs)
    ours_median, floor_median = statistics.median(ours), statistics.median(floor)
    print(f"{args.files:,} files, {args.runs} runs each; run record start to end (median, all runs):")
    print(
        f"  no-op graph (Dagster alone)   {floor_median:5.2f} s  {floor_events} events  {[round(t, 2) for t in floor]}"
    )
    print(f"  pipeline, nothing changed     {ours_median:5.2f} s  {our_events} events  {[round(t, 2) for t in ours]}")
    print(f"  pipeline / floor              {ours_median / floor_median:5.2f}x")


if __name__ == "__main__":
    main()
