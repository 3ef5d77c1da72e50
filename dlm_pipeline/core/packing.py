"""Whole documents, each ended by the EOS id, concatenated into one token stream and cut into
sequences of exactly `seq_len` ids (the last may be shorter; no id is dropped).

The stream is produced one row group at a time (a fixed number of sequences), each id copied once
from the token store's arrays into its row group, so packing never holds a second copy of the
stream.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np
import pyarrow as pa

SEQUENCE_SCHEMA = pa.schema(
    [("input_ids", pa.list_(pa.int32())), ("n_tokens", pa.int32()), ("doc_starts", pa.list_(pa.int32()))]
)
ROW_GROUP_TOKENS = 1 << 19  # 256 sequences of 2,048 ids


def row_group_tokens(seq_len: int) -> int:
    """Ids per row group: whole sequences, about ROW_GROUP_TOKENS of them (at least one sequence)."""
    return seq_len * max(1, ROW_GROUP_TOKENS // seq_len)


def _list_parts(ids: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(int64 offsets, values) of a list<int32> array as zero-copy numpy views, honouring slices."""
    offsets = ids.offsets.to_numpy(zero_copy_only=False).astype(np.int64)
    values = ids.values.to_numpy(zero_copy_only=False)
    return offsets, values


def document_lengths(ids: pa.Array, rows: np.ndarray) -> np.ndarray:
    """int64 length of each document (its ids plus the EOS id)."""
    offsets, _ = _list_parts(ids)
    return (offsets[rows + 1] - offsets[rows]) + 1


def stream_groups(
    ids: pa.Array, rows: np.ndarray, eos_id: int, group_tokens: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The token stream (document i is `ids[rows[i]]` then `eos_id`) in consecutive pieces of exactly
    `group_tokens` ids (the last may be shorter), each with the offsets where documents begin in it.
    Every id is copied once, straight into its piece."""
    return stream_parts([(ids, rows)], eos_id, group_tokens)


def stream_parts(
    parts: Iterable[tuple[pa.Array, np.ndarray]], eos_id: int, group_tokens: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """`stream_groups` over documents given in consecutive parts `(ids, rows)` (document i of a part
    is `ids[rows[i]]`), so only one part's ids need be held: the pieces do not depend on the parts."""
    eos = np.array([eos_id], dtype=np.int32)
    buffer, fill, starts = np.empty(group_tokens, np.int32), 0, []
    for ids, rows in parts:
        offsets, values = _list_parts(ids)
        for first, last in zip(offsets[rows].tolist(), offsets[rows + 1].tolist(), strict=False):
            if fill == group_tokens:
                yield buffer, np.array(starts, np.int64)
                buffer, fill, starts = np.empty(group_tokens, np.int32), 0, []
            starts.append(fill)
            for piece in (values[first:last], eos):
                done = 0
                while done < len(piece):
                    if fill == group_tokens:
                        yield buffer, np.array(starts, np.int64)
                        buffer, fill, starts = np.empty(group_tokens, np.int32), 0, []
                    count = min(len(piece) - done, group_tokens - fill)
                    buffer[fill : fill + count] = piece[done : done + count]
                    fill, done = fill + count, done + count
    if fill:
        yield buffer[:fill], np.array(starts, np.int64)


def sequences_table(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> pa.Table:
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


def sequence_count(tokens: int, seq_len: int) -> int:
    return -(-tokens // seq_len)
