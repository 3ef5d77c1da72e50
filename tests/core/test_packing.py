"""Packing: one stream of EOS-ended documents cut into seq_len sequences, nothing dropped or moved."""

import numpy as np
import pyarrow as pa
import pytest

from dlm_pipeline.core.packing import SequencePacker, document_batches, document_lengths

EOS = 7


def documents(seed: int, n: int = 60) -> tuple[pa.Array, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, 90, size=n)
    lengths[::9] = 0  # empty documents are an EOS alone
    ids = pa.array([rng.integers(100, 1000, size=k).tolist() for k in lengths], pa.list_(pa.int32()))
    rows = rng.integers(0, n, size=2 * n)  # documents may repeat (copies)
    return ids, rows


def plain_stream(ids: pa.Array, rows: np.ndarray) -> list[int]:
    stream = []
    for row in rows.tolist():
        stream += ids[row].as_py() + [EOS]
    return stream


@pytest.mark.parametrize("batch_tokens", [1, 50, 1 << 20])
def test_batches_are_whole_documents_in_order(batch_tokens):
    ids, rows = documents(1)
    batches = list(document_batches(ids, rows, EOS, batch_tokens))
    assert np.concatenate([t for t, _ in batches]).tolist() == plain_stream(ids, rows)
    assert np.concatenate([n for _, n in batches]).tolist() == document_lengths(ids, rows).tolist()
    assert all(len(t) == int(n.sum()) for t, n in batches)


@pytest.mark.parametrize("seq_len,group,batch_tokens", [(16, 3, 40), (64, 1, 1), (5, 256, 1 << 20), (2048, 2, 100)])
def test_sequences_are_the_stream_cut_at_seq_len(seq_len, group, batch_tokens):
    ids, rows = documents(seq_len)
    stream = plain_stream(ids, rows)
    packer = SequencePacker(seq_len, group_sequences=group)
    groups = []
    for tokens, lengths in document_batches(ids, rows, EOS, batch_tokens):
        groups += list(packer.add(tokens, lengths))
    groups += list(packer.finish())
    table = pa.concat_tables(groups)
    sequences = table["input_ids"].to_pylist()
    assert [i for s in sequences for i in s] == stream  # no id dropped, none moved
    assert all(len(s) == seq_len for s in sequences[:-1]) and 0 < len(sequences[-1]) <= seq_len
    assert table["n_tokens"].to_pylist() == [len(s) for s in sequences]
    assert all(g.num_rows == group for g in groups[:-1])  # row groups do not depend on batching
    starts = np.cumsum(document_lengths(ids, rows)) - document_lengths(ids, rows)
    found = [i * seq_len + s for i, row in enumerate(table["doc_starts"].to_pylist()) for s in row]
    assert found == starts.tolist()


def test_an_empty_stream_has_no_sequences():
    packer = SequencePacker(8)
    assert list(packer.add(np.zeros(0, np.int32), np.zeros(0, np.int64))) == []
    assert list(packer.finish()) == []
