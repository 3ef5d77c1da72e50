"""What materializations report: metadata (numbers stay numbers, so the UI plots them; tables are
tables), data versions, lineage to inputs and configs, and progress in the run log."""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping

import dagster as dg
import pyarrow as pa

from dlm_pipeline.core.fingerprint import table_fingerprint

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
    schema = dg.TableSchema(
        columns=[dg.TableColumn(f.name, _column_type(f.type)) for f in table.schema]
    )
    records = [dg.TableRecord(row) for row in table.slice(0, limit).to_pylist()]
    return dg.MetadataValue.table(records=records, schema=schema)


def base_metadata(seed: int, table: pa.Table, fingerprint: str, inputs: Mapping[str, str]) -> dict:
    """What every materialization records (SPEC §5): seed, row count, its own and its inputs' fingerprints."""
    metadata = {
        "seed": dg.MetadataValue.int(seed),
        "dagster/row_count": dg.MetadataValue.int(table.num_rows),
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


def recorded_metadata(context: dg.AssetExecutionContext, asset: str, key: str):
    """A metadata value of the latest materialization of `asset` for this seed (None if absent)."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[context.partition_key]), limit=1
    ).records
    value = records[0].asset_materialization.metadata.get(key) if records else None
    return value.value if value is not None else None


def input_fingerprints(context: dg.AssetExecutionContext, **inputs: pa.Table) -> dict[str, str]:
    """Fingerprints of the loaded inputs, as their own materializations recorded them.

    Reading the recorded value (one instance query) instead of re-hashing keeps large inputs
    cheap; an input with no recorded fingerprint is hashed.
    """
    return {
        name: recorded_metadata(context, name, "fingerprint") or table_fingerprint(table)
        for name, table in inputs.items()
    }


def config_lineage(context: dg.AssetExecutionContext) -> dict:
    """Which configs this output came from: the training_configs fingerprint of this seed's run."""
    return {"config_fingerprint": dg.MetadataValue.text(recorded_metadata(context, "training_configs", "config_fingerprint") or "")}


class ProgressLog:
    """Logs `done/total` at most every few seconds, with a rate."""

    def __init__(self, context: dg.AssetExecutionContext, what: str):
        self.context, self.what = context, what
        self.start = self.last = time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY_SECONDS or done == total:
            self.last = now
            rate = done / max(now - self.start, 1e-9)
            self.context.log.info(f"{self.what}: {done:,}/{total:,} ({rate:,.0f}/s)")
