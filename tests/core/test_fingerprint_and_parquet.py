"""Fingerprints follow content only; Parquet writes are atomic and byte-deterministic."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dlm_pipeline.core.corpus import rows_table
from dlm_pipeline.core.fingerprint import table_fingerprint
from dlm_pipeline.core.parquet_io import write_parquet_atomic


def sample() -> pa.Table:
    table = rows_table(["a1", "b2", "c3"], ["a", "b", "c"], ["x", "", "zz"], [{"k": "v"}, {}, {"k": "w", "l": "u"}])
    return table.append_column("copy", pa.array([0, 1, 0], pa.int32())).append_column(
        "weight", pa.array([1.0, 0.5, 2.0])
    )


def test_fingerprint_ignores_chunking_and_slicing():
    table = sample()
    rechunked = pa.concat_tables([table.slice(0, 1), table.slice(1, 2)])
    assert rechunked.column(0).num_chunks == 2
    assert table_fingerprint(rechunked) == table_fingerprint(table)
    padded = pa.concat_tables([sample(), sample()]).slice(3, 3)
    assert table_fingerprint(padded) == table_fingerprint(table)


def test_fingerprint_changes_with_any_value_or_order():
    base = table_fingerprint(sample())
    table = sample()
    assert table_fingerprint(table.take([1, 0, 2])) != base
    assert table_fingerprint(table.set_column(2, "text", pa.array(["x", "", "zy"]))) != base
    assert table_fingerprint(table.set_column(4, "copy", pa.array([0, 1, 1], pa.int32()))) != base
    tags = rows_table(["a1", "b2", "c3"], ["a", "b", "c"], ["x", "", "zz"], [{"k": "v"}, {}, {"k": "w", "l": "U"}])[
        "tags"
    ]
    assert table_fingerprint(table.set_column(3, "tags", tags)) != base
    # moving a character between adjacent strings changes the fingerprint (lengths are hashed)
    moved = table.set_column(2, "text", pa.array(["x", "z", "z"]))
    assert table_fingerprint(moved) != base


def test_fingerprint_survives_a_parquet_round_trip(tmp_path):
    table = sample()
    path = write_parquet_atomic(table, tmp_path / "t" / "0.parquet")
    assert table_fingerprint(pq.read_table(path)) == table_fingerprint(table)


def test_parquet_bytes_are_deterministic(tmp_path):
    a = write_parquet_atomic(sample(), tmp_path / "a.parquet").read_bytes()
    b = write_parquet_atomic(
        pa.concat_tables([sample().slice(0, 2), sample().slice(2)]), tmp_path / "b.parquet"
    ).read_bytes()
    assert a == b


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "x.parquet"
    write_parquet_atomic(sample(), target)
    before = target.read_bytes()
    with pytest.raises((TypeError, AttributeError)):
        write_parquet_atomic("not a table", target)  # type: ignore[arg-type]
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["x.parquet"]
