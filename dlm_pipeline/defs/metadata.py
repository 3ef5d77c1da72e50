"""Turning core results into Dagster metadata: numbers stay numbers (plotted), tables are tables."""

from __future__ import annotations

from collections.abc import Mapping

import dagster as dg
import pyarrow as pa

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
