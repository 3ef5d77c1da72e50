"""Megatron-LM's indexed dataset (`.bin` + `.idx`), the layout megatron-core's `IndexedDataset` reads.

`.bin`: the ids of every sequence back to back, in the dataset's dtype. `.idx` (little-endian):

    b"MMIDIDX\\x00\\x00"   magic
    <Q 1                  version
    <B code               dtype code (uint16 = 8, int32 = 4)
    <Q sequence count
    <Q document count     = number of documents + 1 (document indices start at 0)
    int32[sequences]      sequence lengths (ids)
    int64[sequences]      sequence pointers (byte offsets into .bin)
    int64[documents + 1]  document indices (sequence index where each document starts; last = count)

Here every document is one sequence, so the document indices are 0, 1, ..., n.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

INDEX_HEADER = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES = {np.dtype(np.uint16): 8, np.dtype(np.int32): 4}
UINT16_VOCAB_LIMIT = 65_536


class MegatronFormatError(ValueError):
    """An .idx/.bin pair that is not a well-formed indexed dataset."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (fewer than 65,536 ids), else int32."""
    return np.dtype(np.uint16) if vocab_size < UINT16_VOCAB_LIMIT else np.dtype(np.int32)


def index_bytes(lengths: np.ndarray, dtype: np.dtype) -> bytes:
    """The .idx content for documents of `lengths` ids each, one sequence per document."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.min() < 0 or lengths.max() > np.iinfo(np.int32).max):
        raise MegatronFormatError("a document is longer than the format's int32 lengths allow")
    count = len(lengths)
    pointers = np.zeros(count, dtype="<i8")
    if count:
        np.cumsum(lengths[:-1] * dtype.itemsize, out=pointers[1:])
    header = INDEX_HEADER + struct.pack("<Q", INDEX_VERSION) + struct.pack("<B", DTYPE_CODES[dtype])
    header += struct.pack("<Q", count) + struct.pack("<Q", count + 1)
    return b"".join(
        [header, lengths.astype("<i4").tobytes(), pointers.tobytes(), np.arange(count + 1, dtype="<i8").tobytes()]
    )


@dataclass(frozen=True)
class IndexedDataset:
    """A read-only view of an .idx/.bin pair; the ids stay memory-mapped."""

    dtype: np.dtype
    lengths: np.ndarray  # int32 per sequence
    pointers: np.ndarray  # int64 byte offset per sequence
    document_indices: np.ndarray  # int64, documents + 1
    tokens: np.ndarray  # the whole .bin, memory-mapped

    def __len__(self) -> int:
        return len(self.lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        start = int(self.pointers[i]) // self.dtype.itemsize
        return self.tokens[start : start + int(self.lengths[i])]


def read_indexed(prefix: str | Path) -> IndexedDataset:
    """Open `<prefix>.idx` and `<prefix>.bin`, validating the header and the sizes against each other."""
    idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    data = idx_path.read_bytes()
    fixed = len(INDEX_HEADER) + 8 + 1 + 8 + 8
    if len(data) < fixed or not data.startswith(INDEX_HEADER):
        raise MegatronFormatError(f"{idx_path}: not a Megatron index (bad header)")
    offset = len(INDEX_HEADER)
    (version,) = struct.unpack_from("<Q", data, offset)
    (code,) = struct.unpack_from("<B", data, offset + 8)
    sequences, documents = struct.unpack_from("<QQ", data, offset + 9)
    dtype = next((d for d, c in DTYPE_CODES.items() if c == code), None)
    if version != INDEX_VERSION or dtype is None:
        raise MegatronFormatError(f"{idx_path}: version {version}, dtype code {code} not supported")
    if len(data) != fixed + sequences * 12 + documents * 8:
        raise MegatronFormatError(f"{idx_path}: size does not match its counts")
    lengths = np.frombuffer(data, "<i4", sequences, fixed)
    pointers = np.frombuffer(data, "<i8", sequences, fixed + sequences * 4)
    document_indices = np.frombuffer(data, "<i8", documents, fixed + sequences * 12)
    size = bin_path.stat().st_size
    if size != int(lengths.astype(np.int64).sum()) * dtype.itemsize:
        raise MegatronFormatError(f"{bin_path}: {size} bytes, the index describes another size")
    tokens = np.memmap(bin_path, dtype=dtype.newbyteorder("<"), mode="r") if size else np.zeros(0, dtype)
    return IndexedDataset(dtype, lengths, pointers, document_indices, tokens)
