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

from dlm_pipeline.core.parquet_io import ParquetRows, read_parquet
from dlm_pipeline.defs.resources import ParquetIOManager


def _stored_path(io_manager: ParquetIOManager, context: dg.AssetCheckExecutionContext, asset: str) -> Path:
    path = io_manager.root(context.instance) / asset / f"{context.partition_key}.parquet"
    if path.is_symlink():
        raise dg.Failure(
            description=f"{path} is a symlink, not a file the pipeline wrote: remove it and re-materialize"
        )
    if not path.exists():
        raise dg.Failure(description=f"{path} is missing: materialize {asset} for seed {context.partition_key} first")
    return path


def stored_rows(io_manager: ParquetIOManager, context: dg.AssetCheckExecutionContext, asset: str) -> ParquetRows:
    """A lazy reader of the stored output of `asset` for this check's seed (columns and row groups
    are read as asked, so a check holds no more than it needs)."""
    return ParquetRows(_stored_path(io_manager, context, asset))


def stored_columns(
    io_manager: ParquetIOManager, context: dg.AssetCheckExecutionContext, asset: str, columns: list[str] | None = None
) -> pa.Table:
    """`columns` (None: all) of the stored output of `asset` for this check's seed, whole."""
    return read_parquet(_stored_path(io_manager, context, asset), columns=columns)
