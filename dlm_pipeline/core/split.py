"""The train/validation split and the document order of a training dataset (SPEC §7).

The split is decided per raw row *before* expansion and keyed on the text's content, so every
copy of an upsampled file, and every file with the same text wherever it lies, lands on one side:
the side never depends on the expansion seed, the weights, the path or the other files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dlm_pipeline.core.arrow_utils import string_offsets
from dlm_pipeline.core.corpus import content_key


def _digest64(message: str) -> int:
    return int.from_bytes(hashlib.blake2b(message.encode(), digest_size=8).digest(), "big")


def content_keys(texts: pa.ChunkedArray | pa.Array) -> list[str]:
    """`content_key` of each text, hashed from the Arrow buffer in place (its UTF-8 bytes are what
    `str.encode` gives): no text becomes a Python string."""
    keys: list[str] = []
    for chunk in texts.chunks if isinstance(texts, pa.ChunkedArray) else [texts]:
        if chunk.null_count:  # no text of ours is null: fail as content_key does
            keys.extend(content_key(text) for text in chunk.to_pylist())
            continue
        offsets = string_offsets(chunk).tolist()
        data = memoryview(chunk.buffers()[2] or b"")
        keys.extend(
            hashlib.sha256(data[start:end]).hexdigest() for start, end in zip(offsets, offsets[1:], strict=False)
        )
    return keys


def validation_side(keys: Iterable[str], split_seed: int, val_fraction: float) -> np.ndarray:
    """bool per content key: True when blake2b-64(f"split:{split_seed}:{key}") / 2**64 < val_fraction."""
    return np.fromiter((_digest64(f"split:{split_seed}:{key}") / 2**64 < val_fraction for key in keys), dtype=bool)


def _ranks(values: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Rank of each string in byte order (equal strings share a rank), for numeric sort keys."""
    return pc.rank(values, sort_keys="ascending", tiebreaker="min").to_numpy(zero_copy_only=False)


def train_order(seed: int, section_ids: pa.Array, copies: np.ndarray) -> np.ndarray:
    """Permutation of the train documents: by the bytes of blake2b-64(f"order:{seed}:{section_id}:{copy}"),
    then section_id, then copy. Big-endian uint64 compares exactly as the digest bytes do."""
    ids = section_ids.to_pylist()
    digests = np.fromiter(
        (_digest64(f"order:{seed}:{sid}:{copy}") for sid, copy in zip(ids, copies.tolist(), strict=False)),
        dtype=np.uint64,
        count=len(ids),
    )
    return np.lexsort((copies, _ranks(section_ids), digests)).astype(np.int64)


def validation_order(keys: list[str], section_ids: pa.Array) -> np.ndarray:
    """Permutation of the validation documents: by content key, then section_id."""
    return np.lexsort((_ranks(section_ids), _ranks(pa.array(keys, pa.string())))).astype(np.int64)
