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

import errno
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dlm_pipeline.core.safe_read import NotRegularFile, open_regular

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
        pointer, length = int(self.pointers[i]), int(self.lengths[i])
        start = pointer // self.dtype.itemsize
        if pointer < 0 or pointer % self.dtype.itemsize or start + length > len(self.tokens):
            raise MegatronFormatError(f"sequence {i} points outside the .bin")
        return self.tokens[start : start + length]


def _mapped(path: Path, what: str) -> tuple[np.ndarray, int]:
    """(the bytes of the regular file at `path` as a read-only memory map, its size), opened without
    following a symlink and without blocking (a FIFO is refused, never waited on)."""
    try:
        fd, info = open_regular(str(path), follow_symlinks=False)
    except NotRegularFile:
        raise MegatronFormatError(f"{path}: not a regular file; {what} must be one") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise MegatronFormatError(f"{path}: a symlink; {what} is never read through one") from None
        raise
    try:
        if not info.st_size:
            return np.zeros(0, np.uint8), 0
        return np.frombuffer(mmap.mmap(fd, 0, access=mmap.ACCESS_READ), np.uint8), info.st_size
    finally:
        os.close(fd)


def read_indexed(prefix: str | Path) -> IndexedDataset:
    """Open `<prefix>.idx` and `<prefix>.bin` (never through a symlink; both memory-mapped), validating
    the header's counts against the .idx size before any array is read, and the sizes against each other."""
    idx_path, bin_path = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    data, size = _mapped(idx_path, "a Megatron index")
    fixed = len(INDEX_HEADER) + 8 + 1 + 8 + 8
    if size < fixed or bytes(data[: len(INDEX_HEADER)]) != INDEX_HEADER:
        raise MegatronFormatError(f"{idx_path}: not a Megatron index (bad header)")
    offset = len(INDEX_HEADER)
    (version,) = struct.unpack_from("<Q", data, offset)
    (code,) = struct.unpack_from("<B", data, offset + 8)
    sequences, documents = struct.unpack_from("<QQ", data, offset + 9)
    dtype = next((d for d, c in DTYPE_CODES.items() if c == code), None)
    if version != INDEX_VERSION or dtype is None:
        raise MegatronFormatError(f"{idx_path}: version {version}, dtype code {code} not supported")
    if size != fixed + sequences * 12 + documents * 8:  # Python integers: a forged count cannot wrap
        raise MegatronFormatError(f"{idx_path}: size does not match its counts")
    lengths = np.frombuffer(data, "<i4", sequences, fixed)
    pointers = np.frombuffer(data, "<i8", sequences, fixed + sequences * 4)
    document_indices = np.frombuffer(data, "<i8", documents, fixed + sequences * 12)
    if sequences and lengths.min() < 0:
        raise MegatronFormatError(f"{idx_path}: a negative sequence length")
    tokens, bin_size = _mapped(bin_path, "a Megatron token file")
    if bin_size != int(lengths.sum(dtype=np.int64)) * dtype.itemsize:
        raise MegatronFormatError(f"{bin_path}: {bin_size} bytes, the index describes another size")
    return IndexedDataset(dtype, lengths, pointers, document_indices, tokens.view(dtype.newbyteorder("<")))
