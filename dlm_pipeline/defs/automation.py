"""What makes the graph run itself: a sensor on config changes and an (opt-in) nightly schedule."""

import os

import dagster as dg

from dlm_pipeline.core.anchors import tree_configs_fingerprint
from dlm_pipeline.core.tree import SourceTreeError
from dlm_pipeline.defs.constants import CONFIG_CHANGE_SENSOR, CORPUS_JOB, NIGHTLY_SCHEDULE
from dlm_pipeline.defs.partitions import registered_seeds
from dlm_pipeline.defs.resources import SourceTree

ENV_SENSOR_INTERVAL = "DLM_SENSOR_INTERVAL"
ENV_NIGHTLY_CRON = "DLM_NIGHTLY_CRON"


@dg.sensor(
    name=CONFIG_CHANGE_SENSOR,
    job_name=CORPUS_JOB,
    minimum_interval_seconds=int(os.environ.get(ENV_SENSOR_INTERVAL, "30")),
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Re-materializes every registered seed when a .dlm/training.yaml or .dlm/ignore "
    "changes (content hashes: a touch is not a change).",
)
def config_change_sensor(context: dg.SensorEvaluationContext, source: SourceTree):
    try:
        fingerprint, n_files = tree_configs_fingerprint(source.scan(context.instance, files=False))
    except SourceTreeError as exc:
        return dg.SkipReason(f"cannot read the source tree: {exc}")
    previous = context.cursor
    if previous == fingerprint:
        return dg.SkipReason(f"no config change ({n_files} config file(s), fingerprint {fingerprint[:12]})")
    context.update_cursor(fingerprint)
    if previous is None:
        return dg.SkipReason(f"baseline recorded: {n_files} config file(s), fingerprint {fingerprint[:12]}")
    seeds = registered_seeds(context.instance)[0]
    if not seeds:
        return dg.SkipReason("configs changed, but no seed is registered (dlm-pipeline seeds add N)")
    return [
        dg.RunRequest(
            run_key=f"configs-{fingerprint[:16]}-seed-{seed}",
            partition_key=seed,
            tags={"dlm/config_fingerprint": fingerprint, "dlm/trigger": CONFIG_CHANGE_SENSOR},
        )
        for seed in seeds
    ]


@dg.schedule(
    name=NIGHTLY_SCHEDULE,
    job_name=CORPUS_JOB,
    cron_schedule=os.environ.get(ENV_NIGHTLY_CRON, "0 3 * * *"),
    default_status=dg.DefaultScheduleStatus.STOPPED,
    description="Re-materializes every registered seed once a night (off until switched on).",
)
def nightly_all_seeds(context: dg.ScheduleEvaluationContext):
    seeds = registered_seeds(context.instance)[0]
    if not seeds:
        return dg.SkipReason("no seed is registered")
    tick = context.scheduled_execution_time.strftime("%Y%m%dT%H%M")
    return [dg.RunRequest(run_key=f"nightly-{tick}-seed-{seed}", partition_key=seed) for seed in seeds]
