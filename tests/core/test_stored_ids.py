"""The dataset's spilled ids read back: one read per run of back-to-back texts gives what one read per text gave."""

from __future__ import annotations

import tempfile

import numpy as np

from dlm_pipeline.core.dataset import StoredIds, _first_difference


def test_fetch_in_any_order_is_each_texts_own_ids():
    rng = np.random.default_rng(5)
    lengths = rng.integers(0, 7, size=40)
    lengths[::6] = 0  # texts without ids (empty, or no document uses them)
    positions = np.cumsum(lengths) - lengths
    with tempfile.TemporaryFile() as spill:
        spill.write(np.arange(int(lengths.sum()), dtype="<i4").tobytes())
        spill.flush()
        ids = StoredIds(lengths, positions, spill)
        own = [list(range(int(p), int(p + n))) for p, n in zip(positions, lengths, strict=True)]
        for texts in (np.arange(40), np.arange(40)[::-1], rng.permutation(40)[:25], np.array([3, 4, 9, 10, 11]), []):
            texts = np.asarray(texts, np.int64)
            assert ids.fetch(texts).to_pylist() == [own[t] for t in texts.tolist()]


def test_ids_compared_across_dtypes_find_the_first_difference():
    stored = np.array([1, 2, 65535, 4], np.uint16)
    assert _first_difference(stored, np.array([1, 2, 65535, 4], np.int32)) is None
    assert _first_difference(stored, np.array([1, 2, -1, 4], np.int32)) == 2
    assert _first_difference(stored, np.array([1, 2, 65535], np.int32)) == 3
