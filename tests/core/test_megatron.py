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


@pytest.mark.parametrize("which", ["idx", "bin"])
def test_a_symlinked_index_or_token_file_is_never_followed(tmp_path, which):
    prefix = written(tmp_path, 8192, [[1, 2, 3]], eos=0)
    outside = tmp_path / "outside"
    outside.mkdir()
    real = Path(f"{prefix}.{which}")
    target = outside / real.name
    real.rename(target)
    real.symlink_to(target)
    with pytest.raises(MegatronFormatError, match="symlink"):
        read_indexed(prefix)


@pytest.mark.parametrize("which", ["idx", "bin"])
def test_a_fifo_at_the_index_or_token_file_is_refused_without_waiting(tmp_path, which):
    """Run in a subprocess: reading a FIFO nobody writes to would block for ever."""
    import os
    import subprocess
    import sys

    prefix = written(tmp_path, 8192, [[1, 2, 3]], eos=0)
    Path(f"{prefix}.{which}").unlink()
    os.mkfifo(f"{prefix}.{which}")
    code = (
        "import sys\nfrom dlm_pipeline.core.megatron import MegatronFormatError, read_indexed\n"
        "try:\n    read_indexed(sys.argv[1])\nexcept MegatronFormatError as exc:\n    print(exc)\n"
    )
    try:
        done = subprocess.run(
            [sys.executable, "-c", code, str(prefix)], capture_output=True, text=True, timeout=60, check=True
        )
    except subprocess.TimeoutExpired:
        pytest.fail("read_indexed waited on a FIFO")
    assert "not a regular file" in done.stdout


@pytest.mark.parametrize("count", ["sequences", "documents"])
def test_counts_that_do_not_fit_the_index_size_are_refused_before_any_array_is_read(tmp_path, count):
    prefix = written(tmp_path, 8192, [[1, 2, 3]], eos=0)
    idx = Path(f"{prefix}.idx")
    data = bytearray(idx.read_bytes())
    data[18 + (0 if count == "sequences" else 8) : 26 + (0 if count == "sequences" else 8)] = struct.pack("<Q", 2**62)
    idx.write_bytes(bytes(data))
    with pytest.raises(MegatronFormatError, match="size does not match its counts"):
        read_indexed(prefix)


def test_a_huge_index_is_mapped_never_read_whole(tmp_path):
    """An .idx of 2^26 empty sequences (a sparse file of ~800 MB): its arrays stay on disk."""
    import tracemalloc

    prefix = tmp_path / "huge"
    sequences = 2**26
    header = b"MMIDIDX\x00\x00" + struct.pack("<QBQQ", 1, 8, sequences, sequences + 1)
    with open(f"{prefix}.idx", "wb") as fh:
        fh.write(header)
        fh.truncate(len(header) + 12 * sequences + 8 * (sequences + 1))
    Path(f"{prefix}.bin").write_bytes(b"")
    tracemalloc.start()
    try:
        dataset = read_indexed(prefix)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(dataset) == sequences and dataset[sequences - 1].tolist() == [] and peak < 16 * 2**20


def test_a_pointer_outside_the_token_file_is_refused(tmp_path):
    prefix = written(tmp_path, 8192, [[1, 2, 3], [4]], eos=0)
    idx = Path(f"{prefix}.idx")
    data = bytearray(idx.read_bytes())
    data[34 + 2 * 4 + 8 : 34 + 2 * 4 + 16] = struct.pack("<q", 2**40)  # the second sequence's pointer
    idx.write_bytes(bytes(data))
    dataset = read_indexed(prefix)
    assert dataset[0].tolist() == [1, 2, 3, 0]
    with pytest.raises(MegatronFormatError, match="outside"):
        dataset[1]
