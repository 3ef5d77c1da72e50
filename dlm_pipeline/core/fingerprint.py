"""Content fingerprints of Arrow tables: sha256 over a canonical byte encoding of every column.

Independent of chunking, slicing, Parquet encoding and library versions: two tables with the
same schema and the same values have the same fingerprint.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dlm_pipeline.core.arrow_utils import map_as_list, one_chunk, string_offsets

FINGERPRINT_VERSION = b"dlm-fingerprint-v1\n"


def _feed(h: hashlib._Hash, array: pa.Array) -> None:
    h.update(len(array).to_bytes(8, "little"))
    if array.null_count:
        h.update(b"V" + np.packbits(array.is_null().to_numpy(zero_copy_only=False)).tobytes())
    array = map_as_list(array)
    kind = array.type
    if (
        pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
        or pa.types.is_binary(kind)
        or pa.types.is_large_binary(kind)
    ):
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
        values = array.fill_null(0).to_numpy(zero_copy_only=False)
        h.update(b"N" + values.astype(values.dtype.newbyteorder("<")).tobytes())
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
