"""What a step reads of the stored outputs it depends on: only the columns it needs, when it needs them.

Assets and checks declare the assets they read as dependencies (`deps=`), not as inputs, and read
the stored files themselves, where the IO manager stores them, with the same refusals as the IO
manager. Dagster refuses input metadata (`AssetIn(metadata={"columns": ...})`) in a check that
evaluates several checks in one step and on a check's own asset; and an input costs Dagster two
events and a partition lookup per step whether or not the step reads it, which was most of what an
unchanged step cost. A dependency read here costs nothing until it is read, so a step that finds
its output unchanged reads none of its inputs.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pyarrow as pa

from dlm_pipeline.core.config_records import CONFIGS_SCHEMA
from dlm_pipeline.core.fingerprint import parquet_fingerprint
from dlm_pipeline.core.parquet_io import ParquetRows
from dlm_pipeline.core.weights import WEIGHTS_SCHEMA
from dlm_pipeline.defs.metadata import loaded_metadata
from dlm_pipeline.defs.resources import STORED_FILES, ParquetIOManager, read_stored, stored_file, stored_files

StepContext = dg.AssetExecutionContext | dg.AssetCheckExecutionContext
# What a whole stored output read here must have (else one clear Failure, not a KeyError from deep inside).
WHOLE_COLUMNS = {"training_configs": CONFIGS_SCHEMA.names, "weights_map": WEIGHTS_SCHEMA.names}


def stored_path(io_manager: ParquetIOManager, context: StepContext, asset: str) -> Path:
    """Where the IO manager stores `asset` for this step's seed."""
    return io_manager.output_path(context.instance, asset, context.partition_key)


def stored_rows(io_manager: ParquetIOManager, context: StepContext, asset: str, columns: list[str]) -> ParquetRows:
    """A lazy reader of the stored output of `asset` for this step's seed (columns and row groups
    are read as asked, so a step holds no more than it needs), once `columns` are known to be there."""
    return read_stored(stored_path(io_manager, context, asset), asset, context.partition_key, columns, stream=True)


def stored_columns(
    io_manager: ParquetIOManager, context: StepContext, asset: str, columns: list[str] | None = None
) -> pa.Table:
    """`columns` (None: all those of WHOLE_COLUMNS) of the stored output of `asset` for this step's seed, whole."""
    columns = columns if columns is not None else WHOLE_COLUMNS.get(asset)
    return read_stored(stored_path(io_manager, context, asset), asset, context.partition_key, columns)


def input_fingerprints(io_manager: ParquetIOManager, context: dg.AssetExecutionContext, assets: list[str]) -> dict:
    """Fingerprints of the stored outputs this step depends on (each must be there: else one clear
    Failure), as the materializations it loaded recorded them (a few instance queries instead of
    hashing large files); one whose loaded materialization cannot be identified, or whose file is no
    longer the one it recorded (rewritten by hand), is hashed from its file: lineage names what is read."""
    for asset in assets:
        stored_file(stored_path(io_manager, context, asset), asset, context.partition_key)
    return {
        asset: _recorded_fingerprint(context, asset)
        or parquet_fingerprint(stored_rows(io_manager, context, asset, []).path)
        for asset in assets
    }


def _recorded_fingerprint(context: dg.AssetExecutionContext, asset: str) -> str | None:
    return loaded_metadata(context, asset, "fingerprint") if input_untouched(context, asset) else None


def input_untouched(context: dg.AssetExecutionContext, asset: str) -> bool:
    """Whether the stored files of the materialization of `asset` this step loaded still have the
    stats it recorded (none rewritten since, by hand, with its step not run again)."""
    files = loaded_metadata(context, asset, STORED_FILES)
    return bool(files) and files == stored_files(files)
