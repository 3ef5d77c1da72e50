"""Atomic, deterministic Parquet files: write to a temp file beside the target, fsync, rename."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.parquet as pq

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


def write_bytes_atomic(dir_fd: int, name: str, write: Callable[[BinaryIO], object]) -> None:
    """Write `name` in the folder `dir_fd` through a temp file beside it (fsync, rename), so readers
    see the old file or the new one. The temp file is created exclusively, never through a
    symlink, with mode 0666 & ~umask (mkstemp would make it 0600)."""
    tmp = f".{name}.{secrets.token_hex(8)}.tmp"
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


def read_parquet(path: str | os.PathLike, columns: list[str] | None = None) -> pa.Table:
    return pq.read_table(path, columns=columns)
