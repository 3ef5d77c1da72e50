"""Content fingerprints of Arrow tables: sha256 over a canonical byte encoding of every column.

Independent of chunking, slicing, Parquet encoding and library versions: two tables with the
same schema and the same values have the same fingerprint. A stored table is fingerprinted from
its file with the same definition, its string columns streamed row group by row group.
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from dlm_pipeline.core.arrow_utils import map_as_list, one_chunk, string_offsets

FINGERPRINT_VERSION = b"dlm-fingerprint-v1\n"


def _is_bytes(kind: pa.DataType) -> bool:
    return (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
    )


def _little_endian(values: np.ndarray) -> memoryview:
    """The bytes of `values` as little-endian, without a copy when they already are (hashing a
    view, not `tobytes()`, keeps a large id column from being copied twice)."""
    values = np.ascontiguousarray(values.astype(values.dtype.newbyteorder("<"), copy=False))
    return memoryview(values).cast("B")


def _feed(h: hashlib._Hash, array: pa.Array) -> None:
    h.update(len(array).to_bytes(8, "little"))
    if array.null_count:
        h.update(b"V" + np.packbits(array.is_null().to_numpy(zero_copy_only=False)).tobytes())
    array = map_as_list(array)
    kind = array.type
    if _is_bytes(kind):
        offsets = string_offsets(array).astype("<i8")  # the same bytes whatever the offset width
        data_buf = array.buffers()[2]
        h.update(b"S" + (offsets - offsets[0]).tobytes())
        if data_buf is not None:
            h.update(memoryview(data_buf)[offsets[0] : offsets[-1]])
    elif pa.types.is_list(kind) or pa.types.is_large_list(kind):
        lengths = pc.list_value_length(array).fill_null(0).to_numpy(zero_copy_only=False)
        h.update(b"L" + lengths.astype("<i8").tobytes())
        _feed(h, array.flatten())
    elif pa.types.is_struct(kind):
        h.update(b"T")
        for child in array.flatten():
            _feed(h, child)
    elif pa.types.is_boolean(kind):
        h.update(b"B" + array.fill_null(False).to_numpy(zero_copy_only=False).astype(np.uint8).tobytes())
    elif pa.types.is_integer(kind) or pa.types.is_floating(kind):
        h.update(b"N")
        h.update(_little_endian((array.fill_null(0) if array.null_count else array).to_numpy(zero_copy_only=False)))
    else:
        raise TypeError(f"no canonical encoding for column type {kind}")


def _type_name(kind: pa.DataType) -> str:
    """The type without child field names, which Parquet round trips do not preserve."""
    if pa.types.is_map(kind):
        return f"map<{_type_name(kind.key_type)},{_type_name(kind.item_type)}>"
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return f"list<{_type_name(kind.value_type)}>"
    if pa.types.is_struct(kind):
        return "struct<" + ",".join(f"{f.name}:{_type_name(f.type)}" for f in kind) + ">"
    return str(kind)


def table_fingerprint(table: pa.Table) -> str:
    h = hashlib.sha256(FINGERPRINT_VERSION)
    for field_, column in zip(table.schema, table.columns, strict=False):
        h.update(f"{field_.name}:{_type_name(field_.type)}\n".encode())
        _feed(h, one_chunk(column))
    return h.hexdigest()


def _feed_count_and_nulls(h: hashlib._Hash, lengths: list[np.ndarray], nulls: list[np.ndarray]) -> np.ndarray:
    """The row count and null bitmap `_feed` hashes first, from per-chunk lengths and null flags;
    returns the lengths of all rows."""
    sizes = np.concatenate(lengths) if lengths else np.zeros(0, "<i8")
    h.update(len(sizes).to_bytes(8, "little"))
    is_null = np.concatenate(nulls) if nulls else np.zeros(0, bool)
    if is_null.any():
        h.update(b"V" + np.packbits(is_null).tobytes())
    return sizes


def _feed_strings(h: hashlib._Hash, chunks: Callable[[], Iterator[pa.Array]]) -> None:
    """What `_feed` hashes for the concatenation of `chunks()` (a string or binary column), in two
    passes over it: lengths and nulls first, then the bytes, so no more than one chunk is held."""
    lengths, nulls = [], []
    for chunk in chunks():
        lengths.append(pc.binary_length(chunk).fill_null(0).to_numpy(zero_copy_only=False).astype("<i8"))
        nulls.append(chunk.is_null().to_numpy(zero_copy_only=False))
    sizes = _feed_count_and_nulls(h, lengths, nulls)
    h.update(b"S" + np.concatenate([np.zeros(1, "<i8"), np.cumsum(sizes, dtype="<i8")]).tobytes())
    for chunk in chunks():
        offsets = string_offsets(chunk)
        if chunk.buffers()[2] is not None:
            h.update(memoryview(chunk.buffers()[2])[offsets[0] : offsets[-1]])


def _is_numeric_list(kind: pa.DataType) -> bool:
    return (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and (
        pa.types.is_integer(kind.value_type) or pa.types.is_floating(kind.value_type)
    )


def _feed_numeric_lists(h: hashlib._Hash, chunks: Callable[[], Iterator[pa.Array]]) -> bool:
    """What `_feed` hashes for the concatenation of `chunks()` (a list column of numbers without
    null values, e.g. token ids), in two passes holding one chunk; False (nothing hashed) when a
    value is null, which only the whole column can encode."""
    lengths, nulls = [], []
    for chunk in chunks():
        if chunk.flatten().null_count:
            return False
        lengths.append(pc.list_value_length(chunk).fill_null(0).to_numpy(zero_copy_only=False).astype("<i8"))
        nulls.append(chunk.is_null().to_numpy(zero_copy_only=False))
    sizes = _feed_count_and_nulls(h, lengths, nulls)
    h.update(b"L" + sizes.tobytes())
    h.update(int(sizes.sum()).to_bytes(8, "little") + b"N")
    for chunk in chunks():
        h.update(_little_endian(chunk.flatten().to_numpy(zero_copy_only=False)))
    return True


def _fingerprint(schema: pa.Schema, column: Callable[[str], Iterator[pa.Array]]) -> str:
    """`table_fingerprint` of the table of `schema` whose column `name` is the concatenation of
    `column(name)` (called again for each pass): string and numeric list columns are hashed one
    chunk at a time, the others (small per row) are combined whole."""
    h = hashlib.sha256(FINGERPRINT_VERSION)
    for field_ in schema:
        h.update(f"{field_.name}:{_type_name(field_.type)}\n".encode())
        chunks = functools.partial(column, field_.name)
        if _is_bytes(field_.type):
            _feed_strings(h, chunks)
        elif not (_is_numeric_list(field_.type) and _feed_numeric_lists(h, chunks)):
            _feed(h, one_chunk(pa.chunked_array(list(chunks()), field_.type)))
    return h.hexdigest()


def parquet_fingerprint(path: str | os.PathLike) -> str:
    """`table_fingerprint` of the table stored at `path`, holding one row group of a string or
    numeric list column at a time (other columns, small per row, are read whole)."""
    file = pq.ParquetFile(path)

    @functools.lru_cache(maxsize=1)  # a column's two passes over a file of one row group read it once
    def read(group: int, name: str) -> list[pa.Array]:
        return file.read_row_group(group, columns=[name])[name].chunks

    def column(name: str) -> Iterator[pa.Array]:
        for i in range(file.num_row_groups):
            yield from read(i, name)

    return _fingerprint(file.schema_arrow, column)


def tables_fingerprint(schema: pa.Schema, tables: list[pa.Table]) -> str:
    """`table_fingerprint` of the concatenation of `tables` (of `schema`), without combining their
    large columns: what a stream's writer holds gives the fingerprint of the file it wrote."""
    return _fingerprint(schema, lambda name: (chunk for table in tables for chunk in table[name].chunks))
