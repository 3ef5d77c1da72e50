"""Packing: one stream of EOS-ended documents cut into seq_len sequences, nothing dropped or moved."""

import numpy as np
import pyarrow as pa
import pytest

from dlm_pipeline.core.packing import document_lengths, row_group_tokens, sequences_table, stream_groups

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


@pytest.mark.parametrize("group_tokens", [1, 5, 64, 1 << 20])
def test_groups_are_the_stream_in_pieces_with_document_starts(group_tokens):
    ids, rows = documents(group_tokens)
    groups = list(stream_groups(ids, rows, EOS, group_tokens))
    assert np.concatenate([t for t, _ in groups]).tolist() == plain_stream(ids, rows)
    assert all(len(t) == group_tokens for t, _ in groups[:-1])
    found = [i * group_tokens + s for i, (_, starts) in enumerate(groups) for s in starts.tolist()]
    lengths = document_lengths(ids, rows)
    assert found == (np.cumsum(lengths) - lengths).tolist()


@pytest.mark.parametrize("seq_len,sequences_per_group", [(16, 3), (64, 1), (5, 256), (2048, 2)])
def test_sequences_are_the_stream_cut_at_seq_len(seq_len, sequences_per_group):
    ids, rows = documents(seq_len)
    stream = plain_stream(ids, rows)
    tables = [sequences_table(t, s, seq_len) for t, s in stream_groups(ids, rows, EOS, seq_len * sequences_per_group)]
    table = pa.concat_tables(tables)
    sequences = table["input_ids"].to_pylist()
    assert [i for s in sequences for i in s] == stream  # no id dropped, none moved
    assert all(len(s) == seq_len for s in sequences[:-1]) and 0 < len(sequences[-1]) <= seq_len
    assert table["n_tokens"].to_pylist() == [len(s) for s in sequences]
    assert all(t.num_rows == sequences_per_group for t in tables[:-1])
    lengths = document_lengths(ids, rows)
    found = [i * seq_len + s for i, row in enumerate(table["doc_starts"].to_pylist()) for s in row]
    assert found == (np.cumsum(lengths) - lengths).tolist()


def test_an_empty_stream_has_no_groups():
    ids, _ = documents(0)
    assert list(stream_groups(ids, np.zeros(0, np.int64), EOS, 8)) == []


def test_row_groups_hold_whole_sequences_of_bounded_size():
    assert row_group_tokens(2048) == 2048 * 256
    assert row_group_tokens(3000) % 3000 == 0 and row_group_tokens(3000) <= 1 << 19
    assert row_group_tokens(1 << 22) == 1 << 22  # one sequence when a sequence is larger than the target


def test_documents_are_full_ids_without_special_tokens(tmp_path):
    from conftest import small_tokenizer
    from tokenizers import Tokenizer, processors

    from dlm_pipeline.core.dataset import full_token_ids
    from dlm_pipeline.core.token_store import TokenStore
    from dlm_pipeline.core.tokenize import load_tokenizer

    text = "alpha beta gamma delta epsilon alpha beta"
    path = small_tokenizer(tmp_path / "tokenizer.json", [text] * 5, 60)
    tokenizer = Tokenizer.from_file(str(path))
    eos = tokenizer.token_to_id("<|endoftext|>")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="$A <|endoftext|>", special_tokens=[("<|endoftext|>", eos)]
    )
    tokenizer.save(str(path))
    loaded = load_tokenizer(str(path), max_seq_len=3, add_special_tokens=True)  # cut at 3, specials on: neither applies
    ids = full_token_ids(TokenStore(tmp_path / "store"), loaded, ["key"], [text])
    assert ids[0].as_py() == tokenizer.encode(text, add_special_tokens=False).ids
    assert len(ids[0].as_py()) > 3 and eos not in ids[0].as_py()
