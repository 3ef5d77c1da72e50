"""Atomic, deterministic Parquet files: write to a temp file beside the target, fsync, rename."""

from __future__ import annotations

import base64
import os
import re
import secrets
import stat
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dlm_pipeline.core.fingerprint import tables_fingerprint

PARQUET_OPTIONS = {"compression": "zstd", "write_statistics": True}


def _dictionary_columns(schema: pa.Schema) -> list[str]:
    """Leaf columns worth dictionary-encoding: all but numeric lists (token ids), where building
    the dictionary costs a third of the write and rarely pays."""
    leaves = []
    for field in schema:
        kind = field.type
        if pa.types.is_list(kind) or pa.types.is_large_list(kind):
            if not (pa.types.is_integer(kind.value_type) or pa.types.is_floating(kind.value_type)):
                leaves.append(f"{field.name}.list.element")
        elif pa.types.is_map(kind):
            leaves += [f"{field.name}.key_value.key", f"{field.name}.key_value.value"]
        else:
            leaves.append(field.name)
    return leaves


STALE_TEMP_SECONDS = 3600.0  # a temp file no writer touched this long was left by a killed run


def temp_name(name: str) -> str:
    """The temp file a write of `name` goes through (hidden, random, beside it)."""
    return f".{name}.{secrets.token_hex(8)}.tmp"


def delete_stale_temps(dir_fd: int, name: str, stale_after: float = STALE_TEMP_SECONDS) -> int:
    """Delete the temp files of `name` in the folder `dir_fd` that no writer touched for `stale_after`
    seconds (a run killed mid-write leaves its temp file: a whole output's bytes); only regular
    files, never through a symlink. Returns how many were deleted."""
    pattern = re.compile(rf"\.{re.escape(name)}\.[0-9a-f]{{16}}\.tmp")
    now, deleted = time.time(), 0
    for entry in os.scandir(dir_fd):
        if not pattern.fullmatch(entry.name):
            continue
        try:
            info = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(info.st_mode) and now - info.st_mtime >= stale_after:
                os.unlink(entry.name, dir_fd=dir_fd)
                deleted += 1
        except FileNotFoundError:  # its writer finished or cleaned up meanwhile
            pass
    return deleted


def write_bytes_atomic(dir_fd: int, name: str, write: Callable[[BinaryIO], object]) -> None:
    """Write `name` in the folder `dir_fd` through a temp file beside it (fsync, rename), so readers
    see the old file or the new one. The temp file is created exclusively, never through a
    symlink, with mode 0666 & ~umask (mkstemp would make it 0600)."""
    tmp = temp_name(name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o666, dir_fd=dir_fd)
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except FileNotFoundError:
            pass
        raise


def write_parquet(table: pa.Table, fh: BinaryIO) -> None:
    """The table's Parquet bytes: the same table gives the same bytes (outputs are deduplicated on them)."""
    pq.write_table(table, fh, use_dictionary=_dictionary_columns(table.schema), **PARQUET_OPTIONS)


def write_parquet_atomic(table: pa.Table, path: str | os.PathLike) -> Path:
    """Readers see the old file or the new one, never a torn one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    dir_fd = os.open(target.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        write_bytes_atomic(dir_fd, target.name, lambda fh: write_parquet(table, fh))
    finally:
        os.close(dir_fd)
    return target


def error_line(exc: BaseException) -> str:
    """The first line of a reader's error (at most 200 characters), for a one-line message about a
    file that is not what the pipeline wrote."""
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]


def read_parquet(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(path, columns=columns)


# -- streaming -------------------------------------------------------------------------------
# A row group holds at most this many rows (pyarrow's default, so a small table streamed gives the
# bytes `write_parquet` gives) and is cut once its string data reach ROW_GROUP_BYTES: the cut is
# decided by the rows alone, never by how they arrived in batches, so the file is deterministic.
ROW_GROUP_ROWS = 1024 * 1024
ROW_GROUP_BYTES = 32 << 20
# A stream whose row groups (their Arrow bytes) fit this many ROW_GROUP_BYTES is fingerprinted from
# them once written, so the file is not read back for it (a larger one is): a one-group output is
# held no longer than its write needs it, a larger one holds at most this budget besides one group.
FINGERPRINT_HELD_GROUPS = 2
_ARROW_SCHEMA_KEY = b"ARROW:schema"


@dataclass
class RowStream:
    """Rows handed over batch by batch instead of as one table: `batches` yields tables or record
    batches of `schema`; `late_metadata`, called once they are all consumed, gives schema metadata
    only known then (e.g. counts), merged over the schema's own."""

    schema: pa.Schema
    batches: Iterable[pa.Table | pa.RecordBatch]
    late_metadata: Callable[[], dict[bytes, bytes]] | None = None
    fingerprint: str | None = None  # set by `write_parquet_stream` when it could hold every row group


def row_bytes(table: pa.Table | pa.RecordBatch) -> np.ndarray:
    """int64 size per row used to cut row groups and batches: the bytes of its string and binary
    values and of its numeric lists (token ids), what dominates a corpus, plus 8 per column."""
    sizes = np.full(table.num_rows, 8 * table.num_columns, dtype=np.int64)
    for column in table.columns:
        kind = column.type
        if pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind):
            sizes += pc.binary_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
        elif (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and (
            pa.types.is_integer(kind.value_type) or pa.types.is_floating(kind.value_type)
        ):
            lengths = pc.list_value_length(column).fill_null(0).to_numpy(zero_copy_only=False).astype(np.int64)
            sizes += lengths * (kind.value_type.bit_width // 8)
    return sizes


def byte_bounded_slices(sizes: np.ndarray, budget: int, carried: int = 0) -> list[int]:
    """Row positions where groups end so each holds about `budget` bytes: a group ends at the first
    row that brings it to `budget` (the first group already holds `carried`)."""
    cuts, cumulative, target = [], np.cumsum(sizes), budget - carried
    while (reach := int(np.searchsorted(cumulative, target, side="left"))) < len(sizes):
        cuts.append(reach + 1)
        target = int(cumulative[reach]) + budget
    return cuts


def _row_groups(batches: Iterable[pa.Table | pa.RecordBatch], schema: pa.Schema) -> Iterator[pa.Table]:
    """The rows regrouped into row groups of at most ROW_GROUP_ROWS rows and about ROW_GROUP_BYTES."""
    pending: list[pa.Table] = []
    rows = size = groups = 0
    for batch in batches:
        table = batch if isinstance(batch, pa.Table) else pa.Table.from_batches([batch])
        table = table.replace_schema_metadata(None)
        while table.num_rows:
            sizes = row_bytes(table)
            cuts = byte_bounded_slices(sizes, ROW_GROUP_BYTES, size)
            end = min(cuts[0] if cuts else table.num_rows, ROW_GROUP_ROWS - rows)
            pending.append(table.slice(0, end))
            rows, size = rows + end, size + int(sizes[:end].sum())
            table = table.slice(end)
            if rows == ROW_GROUP_ROWS or (cuts and end == cuts[0]):
                yield pa.concat_tables(pending).combine_chunks()
                pending, rows, size, groups = [], 0, 0, groups + 1
    if pending or not groups:  # an empty stream still gets its one empty row group, as write_table writes
        yield (pa.concat_tables(pending) if pending else schema.empty_table()).combine_chunks()


def write_parquet_stream(stream: RowStream, fh: BinaryIO) -> int:
    """Write the rows group by group (memory: one row group); returns the row count. A stream whose
    rows fit one row group gives exactly `write_parquet`'s bytes for the same table: the schema,
    with its late metadata, goes into the footer as pyarrow itself stores it. Sets `stream.fingerprint`
    (the stored table's `table_fingerprint`) when the row groups fit FINGERPRINT_HELD_GROUPS budgets."""
    schema = stream.schema.remove_metadata()
    rows = held_bytes = 0
    held: list[pa.Table] | None = []
    held_budget = FINGERPRINT_HELD_GROUPS * ROW_GROUP_BYTES
    writer = pq.ParquetWriter(
        fh, schema, store_schema=False, use_dictionary=_dictionary_columns(schema), **PARQUET_OPTIONS
    )
    try:
        for group in _row_groups(stream.batches, schema):
            held_bytes += group.nbytes  # dropped before the write, which is where memory peaks
            held = held + [group] if held is not None and held_bytes <= held_budget else None
            writer.write_table(group, row_group_size=ROW_GROUP_ROWS)
            rows += group.num_rows
        metadata = {**(stream.schema.metadata or {}), **(stream.late_metadata() if stream.late_metadata else {})}
        full = schema.with_metadata(metadata) if metadata else schema
        writer.add_key_value_metadata({**metadata, _ARROW_SCHEMA_KEY: base64.b64encode(full.serialize().to_pybytes())})
    finally:
        writer.close()
    stream.fingerprint = tables_fingerprint(schema, held) if held is not None else None
    return rows


class ParquetRows:
    """A stored table read lazily: its schema and row count at once, its rows row group by row
    group (files the pipeline streams have row groups of bounded bytes), only the columns asked."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.file = pq.ParquetFile(self.path)

    @property
    def schema(self) -> pa.Schema:
        return self.file.schema_arrow

    @property
    def num_rows(self) -> int:
        return self.file.metadata.num_rows

    def batches(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """One table per row group, in row order."""
        for i in range(self.file.num_row_groups):
            yield self.file.read_row_group(i, columns=columns)

    def read(self, columns: list[str] | None = None) -> pa.Table:
        """The columns asked whole (for the small per-row ones: ids, paths, tags)."""
        return self.file.read(columns=columns)

    def take(self, rows: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        """Rows `rows` (ascending positions), reading only the row groups that hold them, one at a time."""
        counts = [self.file.metadata.row_group(i).num_rows for i in range(self.file.num_row_groups)]
        starts = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        group_of = np.searchsorted(starts, rows, side="right") - 1
        parts = []
        for group in np.unique(group_of).tolist():
            local = rows[group_of == group] - starts[group]
            parts.append(self.file.read_row_group(group, columns=columns).take(pa.array(local, pa.int64())))
        schema = self.schema if columns is None else pa.schema([self.schema.field(c) for c in columns])
        return pa.concat_tables(parts).combine_chunks() if parts else schema.empty_table()


class TableRows:
    """A table in memory behind `ParquetRows`' reading interface (for callers that hold one)."""

    def __init__(self, table: pa.Table):
        self.table = table

    @property
    def schema(self) -> pa.Schema:
        return self.table.schema

    @property
    def num_rows(self) -> int:
        return self.table.num_rows

    def batches(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        yield self.read(columns)

    def read(self, columns: list[str] | None = None) -> pa.Table:
        return self.table if columns is None else self.table.select(columns)

    def take(self, rows: np.ndarray, columns: list[str] | None = None) -> pa.Table:
        return self.read(columns).take(pa.array(rows, pa.int64()))
