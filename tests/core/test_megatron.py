"""Megatron indexed datasets, read back with a reader written here from Megatron-LM's published layout
(megatron/core/datasets/indexed_dataset.py), and with megatron-core itself when it is installed."""

import struct
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from dlm_pipeline.core.dataset import write_split
from dlm_pipeline.core.megatron import MegatronFormatError, dtype_for_vocab, read_indexed

DTYPE_OF_CODE = {
    1: np.uint8,
    2: np.int8,
    3: np.int16,
    4: np.int32,
    5: np.int64,
    6: np.float64,
    7: np.float32,
    8: np.uint16,
}


def read_megatron(prefix: Path) -> tuple[type, list[list[int]], list[int]]:
    """(dtype, sequences, document indices), parsing the .idx field by field."""
    data = Path(f"{prefix}.idx").read_bytes()
    assert data[:9] == b"MMIDIDX\x00\x00"
    version, code, sequences, documents = struct.unpack_from("<QBQQ", data, 9)
    assert version == 1
    dtype = DTYPE_OF_CODE[code]
    at = 9 + 8 + 1 + 8 + 8
    lengths = struct.unpack_from(f"<{sequences}i", data, at)
    pointers = struct.unpack_from(f"<{sequences}q", data, at + 4 * sequences)
    doc_indices = struct.unpack_from(f"<{documents}q", data, at + 12 * sequences)
    assert at + 12 * sequences + 8 * documents == len(data)
    tokens = np.fromfile(f"{prefix}.bin", dtype=np.dtype(dtype).newbyteorder("<"))
    size = np.dtype(dtype).itemsize
    return (
        dtype,
        [tokens[p // size : p // size + n].tolist() for p, n in zip(pointers, lengths, strict=False)],
        list(doc_indices),
    )


def written(tmp_path: Path, vocab_size: int, docs: list[list[int]], eos: int) -> Path:
    ids = pa.array(docs, pa.list_(pa.int32()))
    write_split(tmp_path, "train", ids, np.arange(len(docs)), eos, 8, dtype_for_vocab(vocab_size))
    return tmp_path / "train"


@pytest.mark.parametrize(
    "vocab_size,dtype", [(8192, np.uint16), (65_535, np.uint16), (65_536, np.int32), (200_000, np.int32)]
)
def test_independent_reader_gets_every_document_back(tmp_path, vocab_size, dtype):
    docs = [[1, 2, 3], [], [min(vocab_size - 1, 65_535)] * 20, [vocab_size - 2]]
    prefix = written(tmp_path, vocab_size, docs, eos=vocab_size - 1)
    found_dtype, sequences, doc_indices = read_megatron(prefix)
    assert found_dtype is dtype
    assert sequences == [d + [vocab_size - 1] for d in docs]  # one sequence per document, EOS-ended
    assert doc_indices == list(range(len(docs) + 1))
    ours = read_indexed(prefix)
    assert [ours[i].tolist() for i in range(len(ours))] == sequences


def test_an_empty_split_is_a_valid_index(tmp_path):
    prefix = written(tmp_path, 8192, [], eos=0)
    assert read_megatron(prefix) == (np.uint16, [], [0])
    assert len(read_indexed(prefix)) == 0


def test_a_truncated_bin_is_refused(tmp_path):
    prefix = written(tmp_path, 8192, [[1, 2, 3]], eos=0)
    Path(f"{prefix}.bin").write_bytes(b"\x01\x00")
    with pytest.raises(MegatronFormatError, match="another size"):
        read_indexed(prefix)


def test_megatron_core_reads_it(tmp_path):
    indexed_dataset = pytest.importorskip(
        "megatron.core.datasets.indexed_dataset", reason="megatron-core is not installed (it needs torch)"
    )
    docs = [[5, 6, 7], [8], [9, 10]]
    prefix = written(tmp_path, 8192, docs, eos=0)
    dataset = indexed_dataset.IndexedDataset(str(prefix))
    assert len(dataset) == 3
    assert [dataset[i].tolist() for i in range(3)] == [d + [0] for d in docs]
