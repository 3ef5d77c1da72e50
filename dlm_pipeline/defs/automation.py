"""What makes the graph run itself: a sensor on config changes and an (opt-in) nightly schedule.

Their timing comes from settings (DLM_SENSOR_INTERVAL, DLM_NIGHTLY_CRON) read when the definitions are
built, never at import: `config_change_sensor` and `nightly_all_seeds` carry the defaults.
"""

import dagster as dg

from dlm_pipeline import settings
from dlm_pipeline.core.anchors import tree_configs_fingerprint
from dlm_pipeline.core.tree import SourceTreeError
from dlm_pipeline.defs.constants import CONFIG_CHANGE_SENSOR, CORPUS_JOB, NIGHTLY_SCHEDULE
from dlm_pipeline.defs.partitions import registered_seeds
from dlm_pipeline.defs.resources import SourceTree


def parse_cursor(cursor: str | None) -> tuple[str | None, int]:
    """(config fingerprint, number of changes seen) from `<fingerprint>:<changes>`; a bare
    fingerprint (the cursor before the counter existed) counts as 0 changes."""
    if not cursor:
        return None, 0
    fingerprint, _, changes = cursor.partition(":")
    return fingerprint, int(changes) if changes.isdigit() else 0


def _config_change(context: dg.SensorEvaluationContext, source: SourceTree):
    """Dagster never reuses a run key, so the key carries the change counter: going back to an earlier
    config (A -> B -> A -> B) is a new change and requests runs again."""
    try:
        fingerprint, n_files = tree_configs_fingerprint(source.scan(context.instance, files=False))
    except SourceTreeError as exc:
        return dg.SkipReason(f"cannot read the source tree: {exc}")
    previous, changes = parse_cursor(context.cursor)
    if previous == fingerprint:
        return dg.SkipReason(f"no config change ({n_files} config file(s), fingerprint {fingerprint[:12]})")
    if previous is None:
        context.update_cursor(f"{fingerprint}:{changes}")
        return dg.SkipReason(f"baseline recorded: {n_files} config file(s), fingerprint {fingerprint[:12]}")
    changes += 1
    context.update_cursor(f"{fingerprint}:{changes}")
    seeds = registered_seeds(context.instance)[0]
    if not seeds:
        return dg.SkipReason("configs changed, but no seed is registered (dlm-pipeline seeds add N)")
    return [
        dg.RunRequest(
            run_key=f"configs-{fingerprint[:16]}-change-{changes}-seed-{seed}",
            partition_key=seed,
            tags={"dlm/config_fingerprint": fingerprint, "dlm/trigger": CONFIG_CHANGE_SENSOR},
        )
        for seed in seeds
    ]


def build_config_change_sensor(interval_seconds: int) -> dg.SensorDefinition:
    return dg.sensor(
        name=CONFIG_CHANGE_SENSOR,
        job_name=CORPUS_JOB,
        minimum_interval_seconds=interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Re-materializes every registered seed when a .dlm/training.yaml or .dlm/ignore "
        "changes (content hashes: a touch is not a change).",
    )(_config_change)


def _nightly(context: dg.ScheduleEvaluationContext):
    seeds = registered_seeds(context.instance)[0]
    if not seeds:
        return dg.SkipReason("no seed is registered")
    tick = context.scheduled_execution_time.strftime("%Y%m%dT%H%M")
    return [dg.RunRequest(run_key=f"nightly-{tick}-seed-{seed}", partition_key=seed) for seed in seeds]


def build_nightly_schedule(cron: str) -> dg.ScheduleDefinition:
    return dg.schedule(
        name=NIGHTLY_SCHEDULE,
        job_name=CORPUS_JOB,
        cron_schedule=cron,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Re-materializes every registered seed once a night (off until switched on).",
    )(_nightly)


config_change_sensor = build_config_change_sensor(settings.DEFAULT_SENSOR_INTERVAL)
nightly_all_seeds = build_nightly_schedule(settings.DEFAULT_NIGHTLY_CRON)
