"""What makes the graph run itself: a sensor on config changes, an (opt-in) sensor on source content
changes and an (opt-in) nightly schedule.

Their timing comes from settings (DLM_SENSOR_INTERVAL, DLM_NIGHTLY_CRON) read when the definitions are
built, never at import: `config_change_sensor`, `source_change_sensor` and `nightly_all_seeds` carry the defaults.
"""

import dagster as dg

from dlm_pipeline import settings
from dlm_pipeline.core.config_records import anchors_from_table, load_configs, records_table, tree_configs_fingerprint
from dlm_pipeline.core.ingest_index import source_fingerprint
from dlm_pipeline.core.rules import PathRules
from dlm_pipeline.core.tree import SourceTreeError
from dlm_pipeline.defs.constants import (
    CONFIG_CHANGE_SENSOR,
    CORPUS_JOB,
    FULL_RESCAN_TAG,
    NIGHTLY_SCHEDULE,
    SOURCE_CHANGE_SENSOR,
)
from dlm_pipeline.defs.partitions import registered_seeds
from dlm_pipeline.defs.resources import SourceTree


def parse_cursor(cursor: str | None) -> tuple[str | None, int]:
    """(config fingerprint, number of changes seen) from `<fingerprint>:<changes>`; a bare
    fingerprint (the cursor before the counter existed) counts as 0 changes."""
    if not cursor:
        return None, 0
    fingerprint, _, changes = cursor.partition(":")
    return fingerprint, int(changes) if changes.isdigit() else 0


def _requests_on_change(
    context: dg.SensorEvaluationContext, fingerprint: str, what: str, prefix: str, trigger: str
) -> dg.SkipReason | list[dg.RunRequest]:
    """One run request per registered seed when `fingerprint` differs from the cursor's.

    Dagster never reuses a run key, so the key carries the change counter: going back to an earlier
    state (A -> B -> A -> B) is a new change and requests runs again."""
    previous, changes = parse_cursor(context.cursor)
    if previous == fingerprint:
        return dg.SkipReason(f"no {prefix} change ({what}, fingerprint {fingerprint[:12]})")
    if previous is None:
        context.update_cursor(f"{fingerprint}:{changes}")
        return dg.SkipReason(f"baseline recorded: {what}, fingerprint {fingerprint[:12]}")
    changes += 1
    context.update_cursor(f"{fingerprint}:{changes}")
    seeds = registered_seeds(context.instance)[0]
    if not seeds:
        return dg.SkipReason(f"{prefix}s changed, but no seed is registered (dlm-pipeline seeds add N)")
    return [
        dg.RunRequest(
            run_key=f"{prefix}s-{fingerprint[:16]}-change-{changes}-seed-{seed}",
            partition_key=seed,
            tags={f"dlm/{prefix}_fingerprint": fingerprint, "dlm/trigger": trigger},
        )
        for seed in seeds
    ]


def _config_change(context: dg.SensorEvaluationContext, source: SourceTree):
    try:
        fingerprint, n_files = tree_configs_fingerprint(source.scan(context.instance, files=False))
    except SourceTreeError as exc:
        return dg.SkipReason(f"cannot read the source tree: {exc}")
    return _requests_on_change(context, fingerprint, f"{n_files} config file(s)", "config", CONFIG_CHANGE_SENSOR)


def build_config_change_sensor(interval_seconds: int) -> dg.SensorDefinition:
    return dg.sensor(
        name=CONFIG_CHANGE_SENSOR,
        job_name=CORPUS_JOB,
        minimum_interval_seconds=interval_seconds,
        default_status=dg.DefaultSensorStatus.RUNNING,
        description="Re-materializes every registered seed when a .dlm/training.yaml or .dlm/ignore "
        "changes (content hashes: a touch is not a change).",
    )(_config_change)


def _source_change(context: dg.SensorEvaluationContext, source: SourceTree):
    """Stat-only walk; only files whose stat changed since the ingest index saw them are read, and
    their content keys compared, so a touch is not a change."""
    try:
        scan = source.scan(context.instance)
    except SourceTreeError as exc:
        return dg.SkipReason(f"cannot read the source tree: {exc}")
    try:
        anchors = anchors_from_table(records_table(load_configs(scan, max_weight=source.max_weight)))
    except ValueError:
        return dg.SkipReason(f"invalid configs: left to {CONFIG_CHANGE_SENSOR} and the configs_valid check")
    index = source.ingest_index(context.instance, scan, source.full_rescan)
    fingerprint, n_files = source_fingerprint(scan, PathRules(anchors), index)
    what = f"{n_files} included file(s), {index.files_read} read"
    return _requests_on_change(context, fingerprint, what, "source", SOURCE_CHANGE_SENSOR)


def build_source_change_sensor(interval_seconds: int) -> dg.SensorDefinition:
    return dg.sensor(
        name=SOURCE_CHANGE_SENSOR,
        job_name=CORPUS_JOB,
        minimum_interval_seconds=interval_seconds,
        default_status=dg.DefaultSensorStatus.STOPPED,
        description="Re-materializes every registered seed when the content of an included file changes "
        "(off until switched on; reads only files whose stat changed, a touch is not a change).",
    )(_source_change)


def _nightly(context: dg.ScheduleEvaluationContext):
    seeds = registered_seeds(context.instance)[0]
    if not seeds:
        return dg.SkipReason("no seed is registered")
    tick = context.scheduled_execution_time.strftime("%Y%m%dT%H%M")
    # Nightly runs trust nothing remembered (what stats cannot see, an mtime set back, is caught here).
    tags = {FULL_RESCAN_TAG: "1"}
    return [dg.RunRequest(run_key=f"nightly-{tick}-seed-{seed}", partition_key=seed, tags=tags) for seed in seeds]


def build_nightly_schedule(cron: str) -> dg.ScheduleDefinition:
    return dg.schedule(
        name=NIGHTLY_SCHEDULE,
        job_name=CORPUS_JOB,
        cron_schedule=cron,
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Re-materializes every registered seed once a night, computing every step and reading "
        "every file again (off until switched on).",
    )(_nightly)


config_change_sensor = build_config_change_sensor(settings.DEFAULT_SENSOR_INTERVAL)
source_change_sensor = build_source_change_sensor(settings.DEFAULT_SENSOR_INTERVAL)
nightly_all_seeds = build_nightly_schedule(settings.DEFAULT_NIGHTLY_CRON)
