"""The dataset checks' comparison with the store, on hand-made files: texts arrive from the store in
several batches, a text's documents lie anywhere in either split, and one wrong id anywhere is found."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from dlm_pipeline.core.dataset import (
    DatasetPlan,
    DatasetSettings,
    conservation_problems,
    leak_report,
    parquet_problems,
    plan_leak_report,
    write_dataset,
)
from dlm_pipeline.core.megatron import index_bytes, read_indexed

EOS, SEQ_LEN = 0, 8
TEXT_IDS = [[5, 6, 7], [8, 9, 10, 11, 12], [13, 14], [15, 16, 17, 18], [], [19]]  # text 4 is empty
# Text 2 twice and text 0 twice in train (copies, spread apart); texts 3 and 4 (a document of the EOS
# id alone) in validation; text 5 is in no document (the store is not asked for it).
TRAIN_ROWS, VALIDATION_ROWS = [2, 0, 1, 2, 0], [3, 4]


def _plan() -> DatasetPlan:
    n = len(TEXT_IDS)
    return DatasetPlan(
        content_keys=[f"k{i}" for i in range(n)],
        text_bytes=np.full(n, 10, np.int64),
        validation=np.array([False, False, False, True, True, False]),
        text_index=np.arange(n, dtype=np.int64),
        unique_keys=[f"k{i}" for i in range(n)],
        unique_rows=np.arange(n, dtype=np.int64),
        train_rows=np.array(TRAIN_ROWS, np.int64),
        validation_rows=np.array(VALIDATION_ROWS, np.int64),
    )


def _batches(groups=((0, 1), (2, 3, 4))) -> list[tuple[np.ndarray, pa.Table]]:
    """What `used_text_ids` yields: ascending texts, a batch at a time, with the store's rows."""
    return [
        (
            np.array(group, np.int64),
            pa.table({"input_ids": pa.array([TEXT_IDS[t] for t in group], pa.list_(pa.int32()))}),
        )
        for group in groups
    ]


@pytest.fixture
def written(tmp_path):
    settings = DatasetSettings(0, 0, 0.5, SEQ_LEN, "bernoulli", "fp", EOS, 100)
    write_dataset(tmp_path / "ds", _plan(), pa.array(TEXT_IDS, pa.list_(pa.int32())), settings)
    return tmp_path / "ds"


def _problems(folder, batches=None) -> list[str]:
    return conservation_problems(folder, _plan(), batches or _batches(), EOS, parquet_problems(folder, SEQ_LEN))


@pytest.mark.parametrize("groups", [((0, 1), (2, 3, 4)), ((0, 1, 2, 3, 4),), ((0,), (1,), (2,), (3,), (4,))])
def test_good_files_pass_whatever_the_batches(written, groups):
    assert _problems(written, _batches(groups)) == []
    assert leak_report(written, _plan(), _batches(groups), EOS, np.dtype(np.uint16)) == plan_leak_report(_plan())


def _flip(folder, split: str, position: int) -> None:
    path = folder / f"{split}.bin"
    tokens = np.fromfile(path, "<u2")
    tokens[position] += 1
    path.write_bytes(tokens.tobytes())


def test_one_flipped_id_in_a_later_copy_is_found_at_its_position(written):
    # train: doc0 = text 2 (3 ids), doc1 = text 0 (4), doc2 = text 1 (6), doc3 = text 2 again at 13..15
    _flip(written, "train", 14)
    assert _problems(written) == ["train: Megatron id 14 differs from the token store"]
    report = leak_report(written, _plan(), _batches(), EOS, np.dtype(np.uint16))
    assert report["unknown"] == 1


def test_a_wrong_end_of_document_id_is_found(written):
    _flip(written, "validation", 4)  # text 3's EOS
    assert _problems(written) == ["validation: Megatron id 4 is not the end-of-document id"]


def test_pointers_that_do_not_lay_documents_back_to_back_are_refused(written):
    idx = written / "train.idx"
    data = bytearray(idx.read_bytes())
    lengths = read_indexed(written / "train").lengths
    good = index_bytes(lengths, np.dtype(np.uint16))
    assert bytes(data) == good
    pointers_at = len(good) - (len(lengths) + 1) * 8 - len(lengths) * 8
    for shift in (2, 1):  # document 1 starts one id later; half an id later
        changed = bytearray(data)
        changed[pointers_at + 8] += shift
        idx.write_bytes(bytes(changed))
        assert _problems(written) == ["train: the Megatron index's pointers do not lay the documents back to back"]


def test_a_flipped_parquet_id_is_found_when_the_megatron_files_are_right(written):
    import pyarrow.parquet as pq

    table = pq.read_table(written / "train.parquet")
    ids = table["input_ids"].to_pylist()
    ids[1][2] += 1
    pq.write_table(table.set_column(0, "input_ids", pa.array(ids, pa.list_(pa.int32()))), written / "train.parquet")
    assert _problems(written) == [f"train: train.parquet: id {SEQ_LEN + 2} differs from the Megatron documents"]


def test_comparison_in_small_chunks_finds_the_same(written, monkeypatch):
    from dlm_pipeline.core import dataset

    monkeypatch.setattr(dataset, "CHECK_CHUNK_TOKENS", 8)  # chunks of 2 documents, or fewer ids
    monkeypatch.setattr(dataset, "CHECK_CHUNK_DOCUMENTS", 2)
    assert _problems(written) == []
    _flip(written, "train", 14)
    _flip(written, "train", 17)  # two faults: the first by position is named
    assert _problems(written) == ["train: Megatron id 14 differs from the token store"]
