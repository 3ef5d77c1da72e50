"""Seeded per-section rolls in [0, 1) that decide fractional copies.

roll(seed, section_id) = BLAKE2b-64(f"{seed}:{section_id}") read big-endian / 2**64, the
reference's definition. The compiled kernel hashes a whole batch with the GIL released
(split over the cores); without it (no C compiler at install time) hashlib gives the same
numbers one call at a time.
"""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa

from dlm_pipeline.core.arrow_utils import one_chunk, string_offsets

try:
    from dlm_pipeline.core import _blake2b
except ImportError:  # pragma: no cover - exercised only on machines without a compiler
    _blake2b = None

HAS_COMPILED_KERNEL = _blake2b is not None
_TWO_POW_MINUS_64 = 2.0**-64
_MIN_ROWS_PER_THREAD = 50_000


def _digests_hashlib(prefix: bytes, items: list[str]) -> np.ndarray:
    out = np.empty(len(items), dtype=np.uint64)
    for i, item in enumerate(items):
        digest = hashlib.blake2b(prefix + item.encode(), digest_size=8).digest()
        out[i] = int.from_bytes(digest, "big")
    return out


def _digests_compiled(prefix: bytes, items: pa.Array, rows: np.ndarray) -> np.ndarray:
    """Hash items[rows] straight from the Arrow buffers, split over the cores (the GIL is released)."""
    offsets = string_offsets(items)
    width = offsets.dtype.itemsize
    data_buf = items.buffers()[2]
    data = data_buf if data_buf is not None else b""
    rows = np.ascontiguousarray(rows, dtype=np.int64)
    out = np.empty(len(rows), dtype=np.uint64)
    workers = max(1, min(os.cpu_count() or 1, len(rows) // _MIN_ROWS_PER_THREAD))
    bounds = np.linspace(0, len(rows), workers + 1).astype(np.int64).tolist()

    def run(span: tuple[int, int]) -> None:
        _blake2b.hash_items(prefix, data, offsets, width, rows, out, *span)

    if workers == 1:
        run((0, len(rows)))
    else:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(run, zip(bounds[:-1], bounds[1:], strict=False)))
    return out


def section_digests(seed: int, section_ids: pa.Array | list[str], rows: np.ndarray | None = None) -> np.ndarray:
    """BLAKE2b-64 of f"{seed}:{section_id}" as big-endian uint64, for `rows` (default: all)."""
    prefix = f"{seed}:".encode()
    if isinstance(section_ids, list):
        section_ids = pa.array(section_ids, type=pa.string())
    section_ids = one_chunk(section_ids)
    if not (pa.types.is_string(section_ids.type) or pa.types.is_large_string(section_ids.type)):
        section_ids = section_ids.cast(pa.string())
    if section_ids.null_count:
        raise ValueError("section_id must not be null")
    if rows is None:
        rows = np.arange(len(section_ids), dtype=np.int64)
    if _blake2b is None:
        return _digests_hashlib(prefix, section_ids.take(pa.array(rows, pa.int64())).to_pylist())
    return _digests_compiled(prefix, section_ids, rows)


def section_rolls(seed: int, section_ids: pa.Array | list[str], rows: np.ndarray | None = None) -> np.ndarray:
    """Rolls in [0, 1]: the uint64 digest rounded to float64 (as Python's int/float does), / 2**64."""
    return section_digests(seed, section_ids, rows).astype(np.float64) * _TWO_POW_MINUS_64
