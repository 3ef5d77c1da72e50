"""Fingerprints follow content only; Parquet writes are atomic and byte-deterministic."""

from __future__ import annotations

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dlm_pipeline.core import parquet_io
from dlm_pipeline.core.corpus import rows_table
from dlm_pipeline.core.fingerprint import parquet_fingerprint, table_fingerprint
from dlm_pipeline.core.parquet_io import RowStream, write_parquet_atomic, write_parquet_stream


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


def test_fingerprint_taken_while_writing_a_stream_is_the_stored_files(tmp_path, monkeypatch):
    """The fingerprint `write_parquet_stream` computes from the row groups it wrote (so the IO manager
    need not read the file back) is the stored file's, over one or many row groups, with nulls,
    maps, id lists and numbers; past the held budget (two row groups' bytes) it gives none and the file is read instead."""
    n = 400
    ids = pa.array([None if i % 7 == 3 else list(range(i % 9)) for i in range(n)], pa.list_(pa.int32()))
    table = pa.concat_tables([sample()] * (n // 3 + 1)).slice(0, n)
    table = table.append_column("input_ids", ids).append_column(
        "n", pa.array([None if i % 5 == 0 else i for i in range(n)], pa.int64())
    )
    table = table.append_column("cut", pa.array([i % 3 == 0 for i in range(n)]))
    table = table.append_column("full_ids", pa.array([list(range(i % 5)) for i in range(n)], pa.list_(pa.int32())))
    cases = [(32 << 20, 1024 * 1024, True), (32 << 20, 150, True), (4_000, 1024 * 1024, False)]
    for row_group_bytes, row_group_rows, expect_held in cases:  # one group, groups cut by rows, by bytes
        monkeypatch.setattr(parquet_io, "ROW_GROUP_BYTES", row_group_bytes)
        monkeypatch.setattr(parquet_io, "ROW_GROUP_ROWS", row_group_rows)
        stream = RowStream(table.schema, table.to_batches(max_chunksize=37))
        path = tmp_path / f"{row_group_bytes}-{row_group_rows}.parquet"
        with open(path, "wb") as fh:
            write_parquet_stream(stream, fh)
        assert (stream.fingerprint is not None) == expect_held
        assert parquet_fingerprint(path) == table_fingerprint(table)
        assert (pq.ParquetFile(path).num_row_groups > 1) == (row_group_bytes == 4_000 or row_group_rows == 150)
        if expect_held:
            assert stream.fingerprint == parquet_fingerprint(path)
