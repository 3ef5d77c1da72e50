"""Whole documents, each ended by the EOS id, concatenated into one token stream and cut into
sequences of exactly `seq_len` ids (the last may be shorter; no id is dropped).

The stream is produced in batches of whole documents and cut as it flows, so packing holds one
batch and one row group at a time, never a second copy of the stream. Row groups hold a fixed
number of sequences, so the Parquet layout does not depend on how the documents were batched.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pyarrow as pa

SEQUENCE_SCHEMA = pa.schema(
    [("input_ids", pa.list_(pa.int32())), ("n_tokens", pa.int32()), ("doc_starts", pa.list_(pa.int32()))]
)
ROW_GROUP_SEQUENCES = 256
BATCH_TOKENS = 1 << 20


def _list_parts(ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(int64 offsets, values) of a list<int32> array as zero-copy numpy views, honouring slices."""
    offsets = ids.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    values = ids.values.to_numpy(zero_copy_only=False)
    return offsets, values


def document_lengths(ids: pa.Array, rows: np.ndarray) -> np.ndarray:
    """int64 length of each document (its ids plus the EOS id)."""
    offsets, _ = _list_parts(ids)
    return (offsets[rows + 1] - offsets[rows]) + 1


def document_batches(ids: pa.Array, rows: np.ndarray, eos_id: int, batch_tokens: int = BATCH_TOKENS) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(int32 tokens, int64 document lengths) of consecutive batches of whole documents: document i
    is `ids[rows[i]]` followed by `eos_id`. A batch holds about `batch_tokens` ids (one long
    document may exceed it)."""
    offsets, values = _list_parts(ids)
    starts = offsets[rows]
    lengths = offsets[rows + 1] - starts
    ends = np.cumsum(lengths + 1)
    first = 0
    while first < len(rows):
        base = int(ends[first - 1]) if first else 0
        last = max(first + 1, int(np.searchsorted(ends, base + batch_tokens, side="right")))
        out = np.empty(int(ends[last - 1]) - base, dtype=np.int32)
        position = 0
        for start, length in zip(starts[first:last].tolist(), lengths[first:last].tolist()):
            out[position : position + length] = values[start : start + length]
            out[position + length] = eos_id
            position += length + 1
        yield out, lengths[first:last] + 1
        first = last


def _sequences(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> pa.Table:
    """Rows of `seq_len` ids (the last may be shorter) with the document starts that fall in each."""
    n = len(tokens)
    bounds = np.minimum(np.arange(0, n + seq_len, seq_len, dtype=np.int64), n)
    bounds = bounds[: int(np.searchsorted(bounds, n)) + 1]
    doc_bounds = np.searchsorted(starts, bounds)
    return pa.Table.from_arrays(
        [
            pa.ListArray.from_arrays(pa.array(bounds.astype(np.int32)), pa.array(tokens, pa.int32())),
            pa.array(np.diff(bounds).astype(np.int32)),
            pa.ListArray.from_arrays(
                pa.array(doc_bounds.astype(np.int32)),
                pa.array((starts - np.repeat(bounds[:-1], np.diff(doc_bounds))).astype(np.int32)),
            ),
        ],
        schema=SEQUENCE_SCHEMA,
    )


class SequencePacker:
    """Cuts a stream of document batches into row groups of `ROW_GROUP_SEQUENCES` sequences."""

    def __init__(self, seq_len: int, group_sequences: int = ROW_GROUP_SEQUENCES):
        if seq_len <= 0:
            raise ValueError(f"seq_len must be > 0, got {seq_len}")
        self.seq_len, self.group_tokens = seq_len, seq_len * group_sequences
        self._tokens = np.zeros(0, np.int32)
        self._starts = np.zeros(0, np.int64)  # document starts, relative to self._tokens

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> Iterator[pa.Table]:
        """Row groups completed by this batch of documents."""
        doc_starts = np.cumsum(lengths) - lengths + len(self._tokens)
        self._tokens = np.concatenate([self._tokens, tokens])
        self._starts = np.concatenate([self._starts, doc_starts])
        while len(self._tokens) >= self.group_tokens:
            cut = int(np.searchsorted(self._starts, self.group_tokens))
            yield _sequences(self._tokens[: self.group_tokens], self._starts[:cut], self.seq_len)
            self._tokens = self._tokens[self.group_tokens :].copy()  # release the emitted ids
            self._starts = self._starts[cut:] - self.group_tokens

    def finish(self) -> Iterator[pa.Table]:
        """The last (possibly partial) row group, if any ids remain."""
        if len(self._tokens):
            yield _sequences(self._tokens, self._starts, self.seq_len)
        self._tokens, self._starts = np.zeros(0, np.int32), np.zeros(0, np.int64)


def sequence_count(tokens: int, seq_len: int) -> int:
    return -(-tokens // seq_len)
