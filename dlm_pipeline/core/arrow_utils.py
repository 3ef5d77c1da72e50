"""Small Arrow helpers the core shares.

Map columns are seen as list<struct<key, value>>, which the compute kernels handle: pyarrow's
list kernels refuse (or abort on) map arrays, and a map is physically a list of key/value
structs, so a zero-copy view gives the same data in a type they accept.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


def map_as_list(array: pa.Array) -> pa.Array:
    kind = array.type
    if not pa.types.is_map(kind):
        return array
    entries = pa.struct([kind.key_field, kind.item_field])
    return array.view(pa.list_(pa.field("entries", entries, nullable=False)))


def map_entries(array: pa.Array) -> tuple[pa.Array, pa.Array, pa.Array]:
    """(parent row index, keys, values) of a map array, honouring slices."""
    listed = map_as_list(array)
    keys, values = listed.flatten().flatten()
    return pc.list_parent_indices(listed), keys, values


def one_chunk(column: pa.ChunkedArray | pa.Array) -> pa.Array:
    """A column as one contiguous array; a single chunk is used as is (combining would copy it)."""
    if isinstance(column, pa.Array):
        return column
    if column.num_chunks == 1:
        return column.chunk(0)
    return column.combine_chunks() if column.num_chunks else pa.array([], column.type)


def representative_rows(codes: np.ndarray, size: int) -> np.ndarray:
    """One row index per code 0..size-1 (which one is unspecified: use it where rows sharing a
    code are interchangeable)."""
    rows = np.empty(size, dtype=np.int64)
    rows[codes] = np.arange(len(codes), dtype=np.int64)
    return rows


def string_offsets(array: pa.Array) -> np.ndarray:
    """The offsets of a string/binary array as a zero-copy view (int32, or int64 for large types),
    `len(array) + 1` of them, honouring slices: item i is data[offsets[i]:offsets[i+1]]."""
    large = pa.types.is_large_string(array.type) or pa.types.is_large_binary(array.type)
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64 if large else np.int32)
    return offsets[array.offset : array.offset + len(array) + 1]


def first_difference(a: pa.Table, b: pa.Table) -> int | None:
    """First row where (section_id, copy) differ, or where the shorter table ends (None: equal)."""
    pairs = zip(
        zip(a["section_id"].to_pylist(), a["copy"].to_pylist(), strict=True),
        zip(b["section_id"].to_pylist(), b["copy"].to_pylist(), strict=True),
        strict=False,
    )
    for i, (x, y) in enumerate(pairs):
        if x != y:
            return i
    return None if a.num_rows == b.num_rows else min(a.num_rows, b.num_rows)
