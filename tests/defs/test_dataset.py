"""training_dataset through Dagster (SPEC §7): real tree, real tokenizer, real instance, real files."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import check_evaluations, small_tokenizer

from dlm_pipeline.core.dataset import MANIFEST, publish_folder
from dlm_pipeline.core.megatron import index_bytes, read_indexed
from dlm_pipeline.core.tokenize import load_tokenizer
from dlm_pipeline.defs.constants import PACKING_CONSERVES_TOKENS, SPLIT_IS_LEAK_FREE
from dlm_pipeline.defs.resources import DatasetResource

SEQ_LEN = 64
FILES = {"train.bin", "train.idx", "train.parquet", "validation.bin", "validation.idx", "validation.parquet", MANIFEST}


def source_files() -> dict[str, str]:
    files = {
        ".dlm/training.yaml": "dlm_training_version: 1\nmetadata: {lang: py}\nweights: {lang: {py: 2.5}}\n",
        "docs/.dlm/training.yaml": "dlm_training_version: 1\nmetadata: {kind: docs}\nweights: {kind: {docs: 0.5}}\n",
    }
    for i in range(40):
        body = "".join(f"value_{i}_{j} = compute({j}, 'item {i}')\n" for j in range(1 + 12 * (i % 4)))
        files[f"src/mod_{i:02d}.py"] = f"# module {i}\n{body}"
    for i in range(8):
        files[f"docs/page_{i}.md"] = f"# Page {i}\n\nSome prose about topic {i}.\n"
    for i in range(0, 40, 5):  # the same text at several paths: one content key, one side
        files[f"vendored/a/copy_{i}.py"] = files[f"src/mod_{i:02d}.py"]
        files[f"vendored/b/deep/copy_{i}.py"] = files[f"src/mod_{i:02d}.py"]
    return files


@pytest.fixture
def built(tree, pipeline):
    pipe = pipeline(tree(source_files()), max_seq_len=SEQ_LEN, dataset=DatasetResource(val_fraction=0.3))
    result = pipe.run("0")
    return pipe, result


def folder(pipe, seed: str) -> Path:
    return pipe.out / "training_dataset" / seed


def roll(message: str) -> bytes:
    return hashlib.blake2b(message.encode(), digest_size=8).digest()


def expected_documents(pipe, seed: str, split_seed: int = 0, fraction: float = 0.3) -> dict[str, list[str]]:
    """The texts of each split's documents, in order, computed here from SPEC §7's words."""
    raw = pq.read_table(pipe.output("raw_corpus", seed)).to_pylist()
    expanded = pq.read_table(pipe.output("expanded_corpus", seed)).to_pylist()

    def validation_side(text: str) -> bool:
        key = hashlib.sha256(text.encode()).hexdigest()
        return int.from_bytes(roll(f"split:{split_seed}:{key}"), "big") / 2**64 < fraction

    train = sorted(
        (r for r in expanded if not validation_side(r["text"])),
        key=lambda r: (roll(f"order:{seed}:{r['section_id']}:{r['copy']}"), r["section_id"], r["copy"]),
    )
    validation = sorted(
        (r for r in raw if validation_side(r["text"])),  # every weight here is > 0
        key=lambda r: (hashlib.sha256(r["text"].encode()).hexdigest(), r["section_id"]),
    )
    return {"train": [r["text"] for r in train], "validation": [r["text"] for r in validation]}


def test_files_round_trip_and_describe_themselves(built):
    pipe, result = built
    out = folder(pipe, "0")
    assert {p.name for p in out.iterdir()} == FILES
    manifest = json.loads((out / MANIFEST).read_text())
    tokenizer = load_tokenizer()
    eos = tokenizer.tokenizer.token_to_id("<|endoftext|>")
    assert {
        k: manifest[k] for k in ("seed", "split_seed", "val_fraction", "seq_len", "expansion_mode", "eos_id", "dtype")
    } == {
        "seed": 0,
        "split_seed": 0,
        "val_fraction": 0.3,
        "seq_len": SEQ_LEN,
        "expansion_mode": "bernoulli",
        "eos_id": eos,
        "dtype": "uint16",
    }
    assert manifest["tokenizer_fingerprint"] == tokenizer.fingerprint
    assert manifest["files"] == {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in FILES - {MANIFEST}}

    expected = expected_documents(pipe, "0")
    assert expected["train"] and expected["validation"]
    assert not set(expected["train"]) & set(expected["validation"])
    meta = pipe.metadata("training_dataset", "0")
    for split, texts in expected.items():
        megatron = read_indexed(out / split)
        documents = [megatron[i].tolist() for i in range(len(megatron))]
        assert all(d[-1] == eos for d in documents)
        # Whole documents (never truncated at seq_len), in the SPEC's order, decoding to their row's text.
        assert [tokenizer.tokenizer.decode(d[:-1], skip_special_tokens=False) for d in documents] == texts
        assert max(len(d) for d in documents) > SEQ_LEN
        sequences = pq.read_table(out / f"{split}.parquet")
        stream = [i for s in sequences["input_ids"].to_pylist() for i in s]
        assert stream == [i for d in documents for i in d]
        lengths = sequences["n_tokens"].to_pylist()
        assert all(n == SEQ_LEN for n in lengths[:-1]) and 0 < lengths[-1] <= SEQ_LEN
        counts = {"documents": len(documents), "tokens": len(stream), "sequences": len(lengths)}
        assert manifest["splits"][split] == counts
        assert {k: meta[f"{split}/{k}"] for k in counts} == counts
        assert meta[f"{split}/last_sequence_padding"] == SEQ_LEN - lengths[-1]
    train_tokens, validation_tokens = manifest["splits"]["train"]["tokens"], manifest["splits"]["validation"]["tokens"]
    assert meta["validation_fraction/tokens"] == pytest.approx(validation_tokens / (train_tokens + validation_tokens))
    by_tag = {(r["tag_key"], r["tag_value"]): r for r in _table_rows(meta["train_tokens_by_tag"])}
    assert by_tag[("lang", "py")]["train_tokens"] == train_tokens and by_tag[("lang", "py")]["share"] == 1.0
    assert 0 < by_tag[("kind", "docs")]["share"] < 0.5
    assert meta["path"] == str(out) and meta["fingerprint"] == hashlib.sha256((out / MANIFEST).read_bytes()).hexdigest()
    assert meta["dagster/row_count"] == sum(s["sequences"] for s in manifest["splits"].values())
    evaluations = check_evaluations(result)
    assert evaluations[SPLIT_IS_LEAK_FREE].passed and evaluations[PACKING_CONSERVES_TOKENS].passed


def _table_rows(table) -> list[dict]:
    return [record.data for record in table.records]


def test_hugging_face_datasets_loads_both_files(built):
    datasets = pytest.importorskip("datasets", reason="the `datasets` package (dev extra) is not installed")
    pipe, _ = built
    out = folder(pipe, "0")
    loaded = datasets.load_dataset(
        "parquet",
        data_files={split: str(out / f"{split}.parquet") for split in ("train", "validation")},
        cache_dir=str(pipe.out.parent / "hf_cache"),
    )
    for split in ("train", "validation"):
        table = pq.read_table(out / f"{split}.parquet")
        assert loaded[split].num_rows == table.num_rows
        assert loaded[split].column_names == ["input_ids", "n_tokens", "doc_starts"]
        assert loaded[split][0]["input_ids"] == table["input_ids"][0].as_py()


def test_validation_is_the_same_for_every_seed_and_files_are_deterministic(built):
    pipe, _ = built
    first = {n: (folder(pipe, "0") / n).read_bytes() for n in FILES}
    assert pipe.run("1").success
    assert pipe.run("0").success  # again: byte for byte the same
    assert {n: (folder(pipe, "0") / n).read_bytes() for n in FILES} == first
    other = {n: (folder(pipe, "1") / n).read_bytes() for n in FILES}
    assert all(other[n] == first[n] for n in FILES if n.startswith("validation"))
    assert other["train.bin"] != first["train.bin"]
    assert sorted(p.name for p in (pipe.out / "training_dataset").iterdir()) == ["0", "1"]  # no temp folder left


def _rewrite_megatron(prefix: Path, documents: list[np.ndarray]) -> None:
    dtype = read_indexed(prefix).dtype
    Path(f"{prefix}.bin").write_bytes(b"".join(d.astype(dtype).tobytes() for d in documents))
    Path(f"{prefix}.idx").write_bytes(index_bytes(np.array([len(d) for d in documents]), dtype))


def test_leak_check_fails_on_a_planted_leak(built):
    pipe, _ = built
    out = folder(pipe, "0")
    train, validation = read_indexed(out / "train"), read_indexed(out / "validation")
    planted = [np.array(train[i]) for i in range(len(train))] + [np.array(validation[0])]
    _rewrite_megatron(out / "train", planted)
    evaluations = check_evaluations(pipe.run_checks("0", SPLIT_IS_LEAK_FREE, PACKING_CONSERVES_TOKENS))
    leak = evaluations[SPLIT_IS_LEAK_FREE]
    assert not leak.passed and "1 text(s) on both sides" in leak.description
    assert leak.metadata["leaked"].value == 1 and leak.metadata["misplaced"].value == 1
    assert not evaluations[PACKING_CONSERVES_TOKENS].passed


def test_leak_check_alone_reads_the_files_and_finds_a_planted_leak(built):
    pipe, _ = built
    out = folder(pipe, "0")
    train, validation = read_indexed(out / "train"), read_indexed(out / "validation")
    _rewrite_megatron(out / "train", [np.array(train[i]) for i in range(len(train))] + [np.array(validation[0])])
    leak = check_evaluations(pipe.run_checks("0", SPLIT_IS_LEAK_FREE))[SPLIT_IS_LEAK_FREE]
    assert not leak.passed and leak.metadata["leaked"].value == 1
    assert leak.metadata["method"].value == "files read back"


def test_both_dataset_checks_share_one_step_and_the_leak_check_reuses_the_verified_plan(built):
    pipe, result = built
    evaluations = check_evaluations(result)
    steps = {e.step_key for e in result.all_events if e.event_type_value == "ASSET_CHECK_EVALUATION"}
    assert "training_dataset_checks" in steps and evaluations[PACKING_CONSERVES_TOKENS].passed
    leak = evaluations[SPLIT_IS_LEAK_FREE]
    assert leak.passed and leak.metadata["method"].value == "plan, files verified id for id"
    # the counts from the plan are those the files give when read back
    from_files = check_evaluations(pipe.run_checks("0", SPLIT_IS_LEAK_FREE))[SPLIT_IS_LEAK_FREE]
    assert from_files.metadata["method"].value == "files read back"
    counts = ["leaked", "misplaced", "unknown", "train_documents", "validation_documents"]
    assert {k: leak.metadata[k].value for k in counts} == {k: from_files.metadata[k].value for k in counts}


def test_packing_check_fails_on_a_changed_or_dropped_id(built):
    pipe, _ = built
    path = folder(pipe, "0") / "train.parquet"
    original = pq.read_table(path)
    ids = original["input_ids"].to_pylist()
    ids[1][3] = (ids[1][3] + 1) % 8000
    pq.write_table(original.set_column(0, "input_ids", pa.array(ids, pa.list_(pa.int32()))), path)
    evaluations = check_evaluations(pipe.run_checks("0", SPLIT_IS_LEAK_FREE, PACKING_CONSERVES_TOKENS))
    packing = evaluations[PACKING_CONSERVES_TOKENS]
    assert not packing.passed and f"id {SEQ_LEN + 3} differs" in packing.description
    assert evaluations[SPLIT_IS_LEAK_FREE].passed  # the Megatron documents are untouched
    pq.write_table(original.slice(0, original.num_rows - 1), path)  # the last sequence dropped
    assert not check_evaluations(pipe.run_checks("0", PACKING_CONSERVES_TOKENS))[PACKING_CONSERVES_TOKENS].passed


def test_packing_check_fails_on_one_flipped_id_in_the_megatron_bin(built):
    pipe, _ = built
    prefix = folder(pipe, "0") / "train"
    dataset = read_indexed(prefix)
    last = len(dataset) - 1  # a document far from the first, its id in the middle
    position = int(dataset.pointers[last]) // dataset.dtype.itemsize + int(dataset.lengths[last]) // 2
    tokens = np.fromfile(f"{prefix}.bin", dataset.dtype)
    tokens[position] = (int(tokens[position]) + 1) % 200
    Path(f"{prefix}.bin").write_bytes(tokens.tobytes())
    evaluations = check_evaluations(pipe.run_checks("0", SPLIT_IS_LEAK_FREE, PACKING_CONSERVES_TOKENS))
    packing = evaluations[PACKING_CONSERVES_TOKENS]
    assert not packing.passed and f"train: Megatron id {position} differs from the token store" in packing.description
    leak = evaluations[SPLIT_IS_LEAK_FREE]  # read back from the files: the changed document is no text's
    assert (
        not leak.passed and leak.metadata["method"].value == "files read back" and leak.metadata["unknown"].value == 1
    )


def _failure(result) -> str:
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    return failure.step_failure_data.user_failure_data.description


def test_eos_token_missing_or_named(tree, pipeline, tmp_path):
    root = tree({"a.txt": "alpha beta gamma", "b.txt": "delta epsilon"})
    tokenizer = small_tokenizer(
        tmp_path / "tok" / "tokenizer.json", ["alpha beta gamma delta epsilon"] * 5, 60, eos=False
    )
    result = pipeline(root, tokenizer=str(tokenizer)).run("0", raise_on_error=False)
    assert not result.success and "no end-of-document token" in _failure(result) and "DLM_EOS_TOKEN" in _failure(result)
    result = pipeline(root, tokenizer=str(tokenizer), dataset=DatasetResource(eos_token="<none>")).run(
        "0", raise_on_error=False
    )
    assert not result.success and "'<none>' is not in the tokenizer" in _failure(result)
    pipe = pipeline(root, tokenizer=str(tokenizer), dataset=DatasetResource(eos_token="[UNK]", val_fraction=0.0))
    assert pipe.run("0").success
    manifest = json.loads((folder(pipe, "0") / MANIFEST).read_text())
    assert manifest["eos_id"] == 0 and manifest["splits"]["validation"] == {"documents": 0, "tokens": 0, "sequences": 0}
    assert manifest["splits"]["train"]["documents"] == 2
    assert pq.read_table(folder(pipe, "0") / "validation.parquet").num_rows == 0


def test_bad_validation_fraction_fails_with_a_message(tree, pipeline):
    result = pipeline(tree({"a.txt": "x"}), dataset=DatasetResource(val_fraction=0.7)).run("0", raise_on_error=False)
    assert not result.success and "from 0 to 0.5" in _failure(result)


def test_a_failed_build_leaves_the_old_dataset_and_files_follow_the_umask(tmp_path):
    target = tmp_path / "training_dataset" / "0"
    old_umask = os.umask(0o027)
    try:
        publish_folder(target, lambda d: (d / "a").write_text("old"))

        def broken(d: Path) -> None:
            (d / "a").write_text("half")
            raise RuntimeError("killed")

        with pytest.raises(RuntimeError):
            publish_folder(target, broken)
    finally:
        os.umask(old_umask)
    assert (target / "a").read_text() == "old"
    assert [p.name for p in target.parent.iterdir()] == ["0"]
    assert target.stat().st_mode & 0o777 == 0o750 and (target / "a").stat().st_mode & 0o777 == 0o640


def _document_texts(out: Path, split: str) -> list[str]:
    tokenizer = load_tokenizer().tokenizer
    megatron = read_indexed(out / split)
    return [tokenizer.decode(megatron[i].tolist()[:-1], skip_special_tokens=False) for i in range(len(megatron))]


def test_adding_files_moves_no_text_across(tree, pipeline):
    files = source_files()
    root = tree(files)
    pipe = pipeline(root, max_seq_len=SEQ_LEN, dataset=DatasetResource(val_fraction=0.3))
    assert pipe.run("0").success
    before = {split: set(_document_texts(folder(pipe, "0"), split)) for split in ("train", "validation")}
    for i in range(30):
        (root / "added").mkdir(exist_ok=True)
        (root / "added" / f"new_{i}.py").write_text(f"new_value_{i} = {i}\n")
    assert pipe.run("0").success
    after = {split: set(_document_texts(folder(pipe, "0"), split)) for split in ("train", "validation")}
    assert before["validation"] <= after["validation"] and before["train"] <= after["train"]
    assert after["validation"] - before["validation"]  # some new files were held out, none of the old moved


def test_an_empty_tree_gives_empty_splits(tree, pipeline):
    pipe = pipeline(tree({"only.bin": b"\x00\x01"}))
    result = pipe.run("0")
    assert result.success and all(e.passed for e in check_evaluations(result).values())
    manifest = json.loads((folder(pipe, "0") / MANIFEST).read_text())
    assert all(counts == {"documents": 0, "tokens": 0, "sequences": 0} for counts in manifest["splits"].values())


def test_cli_writes_the_same_bytes_under_any_hash_seed(tmp_path):
    """What users run: `dlm-pipeline materialize` in fresh processes, different PYTHONHASHSEEDs."""
    import subprocess
    import sys

    from conftest import REPO

    datasets = []
    for i, hash_seed in enumerate(["0", "77"]):
        env = {k: v for k, v in os.environ.items() if not k.startswith("DLM_")}
        env.update(DAGSTER_HOME=str(tmp_path / f"home{i}"), PYTHONHASHSEED=hash_seed, DLM_VAL_FRACTION="0.4")
        (tmp_path / f"home{i}").mkdir()
        done = subprocess.run(
            [sys.executable, "-m", "dlm_pipeline.cli", "materialize", "--seed", "3"],
            env=env,
            capture_output=True,
            text=True,
            cwd=REPO,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        out = tmp_path / f"home{i}" / "storage" / "training_dataset" / "3"
        assert str(out) in done.stdout  # the CLI says where the dataset is
        datasets.append({p.name: p.read_bytes() for p in out.iterdir()})
    assert set(datasets[0]) == FILES and datasets[0] == datasets[1]
    assert json.loads(datasets[0][MANIFEST])["val_fraction"] == 0.4
