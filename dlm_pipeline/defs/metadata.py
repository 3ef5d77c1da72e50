"""What materializations report: metadata (numbers stay numbers, so the UI plots them; tables are
tables), data versions, lineage to inputs and configs, and progress in the run log."""

from __future__ import annotations

import hashlib
import time
import warnings
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field

import dagster as dg
import pyarrow as pa

from dlm_pipeline.core.fingerprint import table_fingerprint
from dlm_pipeline.core.parquet_io import RowStream

DATA_VERSION_TAG = "dagster/data_version"  # where Dagster keeps an event's data version

PROGRESS_EVERY_SECONDS = 5.0

MAX_TABLE_ROWS = 200

_TYPES = {
    pa.types.is_integer: "int",
    pa.types.is_floating: "float",
    pa.types.is_boolean: "bool",
}


def _column_type(kind: pa.DataType) -> str:
    return next((name for test, name in _TYPES.items() if test(kind)), "string")


def table_metadata(table: pa.Table, limit: int = MAX_TABLE_ROWS) -> dg.TableMetadataValue:
    """A (possibly truncated) Arrow table as a Dagster table, typed per column."""
    schema = dg.TableSchema(columns=[dg.TableColumn(f.name, _column_type(f.type)) for f in table.schema])
    records = [dg.TableRecord(row) for row in table.slice(0, limit).to_pylist()]
    return dg.MetadataValue.table(records=records, schema=schema)


def base_metadata(seed: int, table: pa.Table | int, fingerprint: str, inputs: Mapping[str, str]) -> dict:
    """What every materialization records (SPEC §5): seed, row count, its own and its inputs' fingerprints."""
    metadata = {
        "seed": dg.MetadataValue.int(seed),
        "dagster/row_count": dg.MetadataValue.int(table if isinstance(table, int) else table.num_rows),
        "fingerprint": dg.MetadataValue.text(fingerprint),
        "input_fingerprints": dg.MetadataValue.json(dict(inputs)),
    }
    for name, value in inputs.items():
        metadata[f"input_fingerprint/{name}"] = dg.MetadataValue.text(value)
    return metadata


def text_block(lines: list[str], empty: str = "none") -> dg.MarkdownMetadataValue:
    """Lines shown verbatim (error messages may hold any character)."""
    if not lines:
        return dg.MetadataValue.md(empty)
    body = "\n".join(lines).replace("```", "` ` `")
    return dg.MetadataValue.md(f"```\n{body}\n```")


def versioned_output(table: pa.Table, seed: int, inputs: dict[str, str], extra: dict) -> dg.Output:
    fingerprint = table_fingerprint(table)
    base = base_metadata(seed, table, fingerprint, inputs)
    metadata = {"seed": base.pop("seed"), **extra, **base}  # what users read first, lineage last
    with warnings.catch_warnings():  # data versions are beta in Dagster 1.13; we rely on them knowingly
        warnings.simplefilter("ignore", dg.BetaWarning)
        return dg.Output(table, metadata=metadata, data_version=dg.DataVersion(fingerprint))


@dataclass
class StreamedOutput:
    """An output written batch by batch by the IO manager, which then fingerprints the stored file
    and records what `versioned_output` records (row count, fingerprint, data version) plus
    `late_metadata()`: what the asset only knows once its rows were consumed."""

    rows: RowStream
    seed: int
    inputs: dict[str, str]
    late_metadata: Callable[[], dict] = field(default=dict)

    def metadata(self, num_rows: int, fingerprint: str) -> dict:
        return {**self.late_metadata(), **base_metadata(self.seed, num_rows, fingerprint, self.inputs)}


def streamed_output(rows: RowStream, seed: int, inputs: dict[str, str], extra: dict, late_metadata=dict) -> dg.Output:
    """Like `versioned_output`, for rows that are never one table: the IO manager writes them and
    adds the fingerprint, row count and data version once they are stored."""
    return dg.Output(
        StreamedOutput(rows, seed, inputs, late_metadata), metadata={"seed": dg.MetadataValue.int(seed), **extra}
    )


def _same_version(recorded: str | None, version: str | None) -> bool:
    """Whether Dagster's recorded input data version names `version`: for a partitioned input it
    records sha256 of the partition's data version, for another the version itself."""
    if recorded is None or version is None:
        return False
    return recorded in (version, hashlib.sha256(version.encode()).hexdigest())


# (run, step, input asset) -> the record that step loaded; bounded, and never stale (see below).
_loaded_records: dict[tuple[str, str, str], dg.EventLogRecord | None] = {}
MAX_REMEMBERED_INPUTS = 256


def loaded_input_record(context: dg.AssetExecutionContext, asset: str) -> dg.EventLogRecord | None:
    """The materialization of input `asset`, for this seed, that this step loaded.

    Dagster fetches each input's version just before it loads the inputs and records it on the
    output (tags `dagster/input_event_pointer/<asset>` and `dagster/input_data_version/<asset>`).
    The pointer is the input asset's newest event of any partition at that moment, so this seed's
    newest materialization at or before it is the one loaded; its data version must match the
    recorded one. A run of the same seed that lands later cannot change the answer.
    """
    step = context.get_step_execution_context()
    memo = (context.run.run_id, step.step.key, asset)  # what a step loaded never changes: asked once
    if memo not in _loaded_records:
        if len(_loaded_records) >= MAX_REMEMBERED_INPUTS:
            _loaded_records.clear()
        _loaded_records[memo] = _loaded_input_record(context, step, asset)
    return _loaded_records[memo]


def _loaded_input_record(context: dg.AssetExecutionContext, step, asset: str) -> dg.EventLogRecord | None:
    key = dg.AssetKey(asset)
    info = step.maybe_fetch_and_get_input_asset_version_info(key)
    if info is None or info.storage_id is None:
        return None
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(
            asset_key=key, asset_partitions=[context.partition_key], before_storage_id=info.storage_id + 1
        ),
        limit=1,
    ).records
    if not records:
        return None
    record = records[0]
    version = record.asset_materialization.tags.get(DATA_VERSION_TAG) if record.asset_materialization else None
    recorded = info.data_version.value if info.data_version is not None else None
    return record if _same_version(recorded, version) else None


def loaded_metadata(context: dg.AssetExecutionContext, asset: str, key: str):
    """Metadata value `key` of the materialization of `asset` this step loaded (None when unknown)."""
    record = loaded_input_record(context, asset)
    value = record.asset_materialization.metadata.get(key) if record is not None else None
    return value.value if value is not None else None


def config_lineage(context: dg.AssetExecutionContext) -> dict:
    """Which configs this output came from: the config fingerprint recorded by the inputs it loaded
    (`training_configs`, or an asset that recorded its own lineage). An asset with no inputs
    (`training_configs` itself) records its own: nothing here."""
    if not context.assets_def.keys_by_input_name:
        return {}
    found = sorted(
        {
            value
            for key in context.assets_def.keys_by_input_name.values()
            if (value := loaded_metadata(context, key.to_user_string(), "config_fingerprint"))
        }
    )
    if len(found) > 1:
        context.log.warning(f"the inputs of this step were made from different configs: {', '.join(found)}")
    return {"config_fingerprint": dg.MetadataValue.text(", ".join(found))}


# Where progress also goes in this process: the CLI installs a terminal display (progress bars)
# around the runs it executes in process. A run elsewhere (a forked --parallel worker, a step
# process, the UI's run) has none and keeps the plain log lines.
_displays: list[Callable[[str, int, int], None]] = []


@contextmanager
def progress_display(display: Callable[[str, int, int], None]):
    """Send every ProgressLog update of this process to `display(what, done, total)` meanwhile."""
    _displays.append(display)
    try:
        yield display
    finally:
        _displays.remove(display)


class ProgressLog:
    """Logs `done/total` at most every few seconds, with a rate; every update also reaches the
    displays installed in this process (`progress_display`)."""

    def __init__(self, context: dg.AssetExecutionContext, what: str):
        self.context, self.what = context, what
        self.start = self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        for display in _displays:
            display(self.what, done, total)
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_SECONDS or done == total:
            self.last = now
            rate = done / max(now - self.start, 1e-9)
            self.context.log.info(f"{self.what}: {done:,}/{total:,} ({rate:,.0f}/s)")
