"""What a check reads of the stored outputs: only the columns it needs, without an input per asset.

Dagster refuses input metadata (`AssetIn(metadata={"columns": ...})`) in a check that evaluates
several checks in one step, and on a check's own asset, so such a check declares its upstream assets
as dependencies and reads their stored files itself, where the IO manager stores them, with the
same refusals as the IO manager. (It also saves Dagster's per-input events, a good part of a small
check's cost.)
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pyarrow as pa

from dlm_pipeline.core.parquet_io import ParquetRows
from dlm_pipeline.defs.resources import ParquetIOManager, read_stored


def _stored_path(io_manager: ParquetIOManager, context: dg.AssetCheckExecutionContext, asset: str) -> Path:
    return io_manager.root(context.instance) / asset / f"{context.partition_key}.parquet"


def stored_rows(
    io_manager: ParquetIOManager, context: dg.AssetCheckExecutionContext, asset: str, columns: list[str]
) -> ParquetRows:
    """A lazy reader of the stored output of `asset` for this check's seed (columns and row groups
    are read as asked, so a check holds no more than it needs), once `columns` are known to be there."""
    return read_stored(_stored_path(io_manager, context, asset), asset, context.partition_key, columns, stream=True)


def stored_columns(
    io_manager: ParquetIOManager, context: dg.AssetCheckExecutionContext, asset: str, columns: list[str] | None = None
) -> pa.Table:
    """`columns` (None: all) of the stored output of `asset` for this check's seed, whole."""
    return read_stored(_stored_path(io_manager, context, asset), asset, context.partition_key, columns)
