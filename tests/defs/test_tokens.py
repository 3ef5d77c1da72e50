"""tokenized_cache through Dagster: cold/warm, weights-only edits, tokenizer swaps, the check."""

from __future__ import annotations

import shutil

import pyarrow as pa
import pyarrow.parquet as pq
from conftest import EXAMPLE, check_evaluations, small_tokenizer

from dlm_pipeline.core.token_store import EXPANDED, NOT_IN_STORE, VALIDATION_ONLY, TokenStore
from dlm_pipeline.core.tokenize import load_tokenizer
from dlm_pipeline.defs.constants import TOKENS_MATCH_TOKENIZER
from dlm_pipeline.defs.resources import DatasetResource


def copy_example(tmp_path):
    return shutil.copytree(EXAMPLE, tmp_path / "corpus", symlinks=True)


def test_cold_then_warm_is_all_hits_and_byte_identical(pipeline, tmp_path):
    pipe = pipeline(copy_example(tmp_path))
    assert pipe.run("0").success
    cold = pipe.metadata("tokenized_cache", "0")
    first = pipe.output("tokenized_cache", "0").read_bytes()
    assert cold["cache_misses"] == cold["unique_texts"] > 0 and cold["cache_hits"] == 0
    assert cold["tokenizer_truncation_disabled"] is False and cold["tokenizer_padding_disabled"] is False
    result = pipe.run("0")
    assert check_evaluations(result)[TOKENS_MATCH_TOKENIZER].passed
    warm = pipe.metadata("tokenized_cache", "0")
    assert warm["cache_misses"] == 0 and warm["hit_rate"] == 1.0
    assert pipe.output("tokenized_cache", "0").read_bytes() == first


def test_output_equals_uncached_tokenization(pipeline, tmp_path):
    pipe = pipeline(copy_example(tmp_path), max_seq_len=32)
    assert pipe.run("3").success
    tokens = pq.read_table(pipe.output("tokenized_cache", "3"))
    expanded = pq.read_table(pipe.output("expanded_corpus", "3"))
    assert tokens.schema.names == ["section_id", "copy", "input_ids", "n_tokens", "truncated"]
    assert str(tokens.schema.field("input_ids").type) == "list<element: int32>"
    assert tokens["section_id"].to_pylist() == expanded["section_id"].to_pylist()
    assert tokens["copy"].to_pylist() == expanded["copy"].to_pylist()
    tokenizer = load_tokenizer().tokenizer
    direct = [e.ids for e in tokenizer.encode_batch(expanded["text"].to_pylist(), add_special_tokens=False)]
    assert tokens["input_ids"].to_pylist() == [ids[:32] for ids in direct]
    assert tokens["truncated"].to_pylist() == [len(ids) > 32 for ids in direct]
    assert tokens["n_tokens"].to_pylist() == [min(len(ids), 32) for ids in direct]
    meta = pipe.metadata("tokenized_cache", "3")
    assert meta["tokens_total"] == sum(tokens["n_tokens"].to_pylist())
    assert meta["truncated_rows"] == sum(tokens["truncated"].to_pylist()) > 0
    assert meta["cache_bytes"] > 0


def expanded_texts(pipe, seed: str) -> set[str]:
    return set(pq.read_table(pipe.output("expanded_corpus", seed))["text"].to_pylist())


def test_only_newly_needed_texts_are_tokenized_after_a_new_seed_or_a_weights_edit(pipeline, tmp_path):
    root = copy_example(tmp_path)
    generated = root / "src" / "acme" / "_generated" / ".dlm" / "training.yaml"
    generated.write_text(generated.read_text().replace("generated: {true: 0.25}", "generated: {true: 0}"))
    pipe = pipeline(root, dataset=DatasetResource(val_fraction=0.0))  # needed = the expanded rows' texts
    assert pipe.run("0").success
    needed = expanded_texts(pipe, "0")
    raw_texts = set(pq.read_table(pipe.output("raw_corpus", "0"))["text"].to_pylist())
    cold = pipe.metadata("tokenized_cache", "0")
    assert cold["cache_misses"] == cold["unique_texts"] == len(needed) < len(raw_texts)  # not every raw text
    assert cold["tokenized_by_reason"] == {NOT_IN_STORE: len(needed)}
    assert cold["tokenized_by_need"] == {EXPANDED: len(needed)}
    assert len(cold["tokenized_sections"].records) == min(len(needed), 20)
    assert pipe.run("0").success and pipe.metadata("tokenized_cache", "0")["cache_misses"] == 0  # re-run

    assert pipe.run("11").success  # another seed keeps other fractional copies
    fresh = expanded_texts(pipe, "11") - needed
    assert pipe.metadata("tokenized_cache", "11")["cache_misses"] == len(fresh)
    needed |= fresh

    generated.write_text(generated.read_text().replace("generated: {true: 0}", "generated: {true: 2}"))
    assert pipe.run("0").success
    fresh = expanded_texts(pipe, "0") - needed
    assert len(fresh) == 2  # the edit made the two generated files needed, which no seed needed before
    meta = pipe.metadata("tokenized_cache", "0")
    assert meta["cache_misses"] == len(fresh) and meta["cache_hits"] == meta["unique_texts"] - len(fresh)
    listed = {r.data["path"] for r in meta["tokenized_sections"].records}
    assert listed and all("_generated" in path for path in listed)
    needed |= fresh

    config = root / "docs" / ".dlm" / "training.yaml"
    config.write_text(config.read_text().replace("docs: 2.5", "docs: 4.0"))  # whole copies only: nothing new
    assert pipe.run("0").success
    assert expanded_texts(pipe, "0") <= needed
    assert pipe.metadata("tokenized_cache", "0")["cache_misses"] == 0
    assert TokenStore(pipe.cache).stats()["rows"] == len(needed)  # each text stored once


def test_the_dataset_finds_every_text_in_the_store_and_nothing_is_tokenized_twice(tree, pipeline):
    config = "dlm_training_version: 1\ninclude: ['**/*.txt']\nmetadata: {kind: %s}\nweights:\n  kind: {%s: %s}\n"
    files = {f"few/{i}.txt": f"few_{i} = {i}\n" for i in range(40)}  # weight 0.3: most get no copy
    files |= {f"none/{i}.txt": f"none_{i} = {i}\n" for i in range(5)}  # weight 0: in neither set
    files |= {
        "few/.dlm/training.yaml": config % ("few", "few", 0.3),
        "none/.dlm/training.yaml": config % ("no", "no", 0),
    }
    pipe = pipeline(tree(files), dataset=DatasetResource(val_fraction=0.5))
    assert pipe.run("0").success
    meta = pipe.metadata("tokenized_cache", "0")
    assert meta["tokenized_by_need"][VALIDATION_ONLY] > 0  # validation rows no copy of this seed keeps
    expanded = expanded_texts(pipe, "0")
    assert meta["tokenized_by_need"][EXPANDED] == len(expanded)
    assert meta["unique_texts"] == meta["cache_misses"] == len(expanded) + meta["tokenized_by_need"][VALIDATION_ONLY]
    assert meta["unique_texts"] < 40  # train-side rows without a copy and weight-0 rows are not tokenized
    assert TokenStore(pipe.cache).stats()["rows"] == meta["cache_misses"]  # training_dataset added nothing
    dataset = pipe.metadata("training_dataset", "0")
    assert dataset["validation/documents"] >= meta["tokenized_by_need"][VALIDATION_ONLY]


def test_tokenizer_swap_at_the_same_path_misses_and_keeps_old_entries(pipeline, tmp_path):
    root = copy_example(tmp_path)
    texts = [p.read_text(errors="ignore") for p in root.rglob("*.py")] * 3
    path = small_tokenizer(tmp_path / "tok" / "tokenizer.json", texts, vocab_size=120)
    pipe = pipeline(root, tokenizer=str(path))
    assert pipe.run("0").success
    old = pq.read_table(pipe.output("tokenized_cache", "0"))["input_ids"].to_pylist()
    old_namespace = pipe.metadata("tokenized_cache", "0")["cache_namespace"]
    small_tokenizer(path, texts, vocab_size=300)  # same path, different content
    assert pipe.run("0").success
    meta = pipe.metadata("tokenized_cache", "0")
    assert meta["cache_hits"] == 0 and meta["cache_misses"] == meta["unique_texts"]
    assert meta["cache_namespace"] != old_namespace
    assert pq.read_table(pipe.output("tokenized_cache", "0"))["input_ids"].to_pylist() != old
    assert list((pipe.cache / old_namespace).glob("shard-*.parquet"))  # old entries untouched


def test_tampered_cache_rows_are_found_by_the_check_logic(pipeline, tmp_path):
    import pyarrow as pa

    from dlm_pipeline.core.tokenize import mismatched_sections

    pipe = pipeline(copy_example(tmp_path))
    result = pipe.run("0")
    evaluation = check_evaluations(result)[TOKENS_MATCH_TOKENIZER]
    assert evaluation.passed and evaluation.metadata["sampled"].value > 0
    table = pq.read_table(pipe.output("tokenized_cache", "0"))
    expanded = pq.read_table(pipe.output("expanded_corpus", "0"))
    texts = dict(zip(expanded["section_id"].to_pylist(), expanded["text"].to_pylist(), strict=False))
    loaded = load_tokenizer()
    assert mismatched_sections(loaded, table, texts, 64)[1] == []
    ids = table["input_ids"].to_pylist()
    victim = min(range(len(ids)), key=lambda i: table["section_id"][i].as_py())  # always sampled
    ids[victim] = [1, 2, 3]
    tampered = table.set_column(2, "input_ids", pa.array(ids, pa.list_(pa.int32())))
    assert mismatched_sections(loaded, tampered, texts, 64)[1] == [table["section_id"][victim].as_py()]


def test_max_seq_len_change_tokenizes_nothing_and_cuts_at_read_time(pipeline, tmp_path):
    root = copy_example(tmp_path)
    assert pipeline(root, max_seq_len=2048).run("0").success
    short = pipeline(root, max_seq_len=16)
    result = short.run("0")
    assert result.success and check_evaluations(result)[TOKENS_MATCH_TOKENIZER].passed
    meta = short.metadata("tokenized_cache", "0")
    assert meta["cache_misses"] == 0 and meta["cache_hits"] == meta["unique_texts"] > 0
    tokens = pq.read_table(short.output("tokenized_cache", "0"))
    expanded = pq.read_table(short.output("expanded_corpus", "0"))
    direct = [
        e.ids for e in load_tokenizer().tokenizer.encode_batch(expanded["text"].to_pylist(), add_special_tokens=False)
    ]
    assert tokens["input_ids"].to_pylist() == [ids[:16] for ids in direct]
    assert tokens["truncated"].to_pylist() == [len(ids) > 16 for ids in direct]


def test_renamed_and_copied_files_tokenize_nothing(pipeline, tmp_path):
    root = copy_example(tmp_path)
    pipe = pipeline(root)
    assert pipe.run("0").success
    (root / "src" / "acme" / "core.py").rename(root / "src" / "acme" / "renamed_core.py")
    elsewhere = root / "elsewhere" / "deeper"
    elsewhere.mkdir(parents=True)
    shutil.copy(root / "src" / "acme" / "report.py", elsewhere / "copy.py")
    result = pipe.run("0")
    assert result.success and check_evaluations(result)[TOKENS_MATCH_TOKENIZER].passed
    meta = pipe.metadata("tokenized_cache", "0")
    assert meta["cache_misses"] == 0 and meta["cache_hits"] == meta["unique_texts"]
    raw = pq.read_table(pipe.output("raw_corpus", "0"))["path"].to_pylist()
    assert "src/acme/renamed_core.py" in raw and "elsewhere/deeper/copy.py" in raw


def test_a_truncated_shard_is_repaired_and_the_output_is_unchanged(pipeline, tmp_path):
    pipe = pipeline(copy_example(tmp_path))
    assert pipe.run("0").success
    first = pipe.output("tokenized_cache", "0").read_bytes()
    (shard,) = pipe.cache.glob("*/shard-*.parquet")
    with open(shard, "r+b") as fh:  # truncated in place: same name, fewer bytes
        fh.truncate(shard.stat().st_size // 2)
    result = pipe.run("0")
    assert result.success and check_evaluations(result)[TOKENS_MATCH_TOKENIZER].passed
    meta = pipe.metadata("tokenized_cache", "0")
    assert meta["cache_repaired_shards"] == 1 and meta["cache_misses"] == meta["unique_texts"]
    assert pipe.output("tokenized_cache", "0").read_bytes() == first


def test_same_size_corruption_is_caught_by_the_checksum(pipeline, tmp_path):
    pipe = pipeline(copy_example(tmp_path))
    assert pipe.run("0").success
    first = pipe.output("tokenized_cache", "0").read_bytes()
    (shard,) = pipe.cache.glob("*/shard-*.parquet")
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    # Same size: only reading the shard can tell, so the next run that reads it repairs it. An
    # unchanged re-run reads nothing (its output is intact); --full-rescan reads everything again.
    assert pipe.run("0").success
    assert pipe.metadata("tokenized_cache", "0")["cache_repaired_shards"] == 0
    assert pipeline(pipe.root, full_rescan=True).run("0").success
    assert pipe.metadata("tokenized_cache", "0")["cache_repaired_shards"] == 1
    assert pipe.output("tokenized_cache", "0").read_bytes() == first


def test_a_tokenizer_s_own_truncation_and_padding_are_turned_off(pipeline, tmp_path):
    import json

    root = copy_example(tmp_path)
    spec = json.loads(load_tokenizer().tokenizer.to_str())
    spec["truncation"] = {"direction": "Right", "max_length": 4, "strategy": "LongestFirst", "stride": 0}
    spec["padding"] = {
        "strategy": {"Fixed": 64},
        "direction": "Right",
        "pad_to_multiple_of": None,
        "pad_id": 0,
        "pad_type_id": 0,
        "pad_token": "[PAD]",
    }
    path = tmp_path / "tok" / "tokenizer.json"
    path.parent.mkdir()
    path.write_text(json.dumps(spec))
    pipe = pipeline(root, tokenizer=str(path), max_seq_len=32)
    assert pipe.run("0").success
    meta = pipe.metadata("tokenized_cache", "0")
    assert meta["tokenizer_truncation_disabled"] is True and meta["tokenizer_padding_disabled"] is True
    assert meta["cache_namespace"] == load_tokenizer().cache_namespace  # same ids as the plain tokenizer
    tokens = pq.read_table(pipe.output("tokenized_cache", "0"))
    expanded = pq.read_table(pipe.output("expanded_corpus", "0"))
    direct = [
        e.ids for e in load_tokenizer().tokenizer.encode_batch(expanded["text"].to_pylist(), add_special_tokens=False)
    ]
    assert tokens["input_ids"].to_pylist() == [ids[:32] for ids in direct]  # neither 4 ids nor padded to 64
    assert tokens["n_tokens"].to_pylist() == [min(len(ids), 32) for ids in direct]


def test_the_check_samples_within_its_text_budget_and_still_fails_on_a_planted_fault(tree, pipeline):
    from dlm_pipeline.core.parquet_io import write_parquet_atomic
    from dlm_pipeline.defs.tokens.checks import CHECK_SAMPLE_BYTES, sample_order

    size = CHECK_SAMPLE_BYTES // 4 + 100  # at most 3 texts fit the budget beside the first
    files = {f"f{i:02d}.txt": f"file {i} " + "word " * (size // 5) for i in range(12)}
    pipe = pipeline(tree(files))
    evaluation = check_evaluations(pipe.run("0"))[TOKENS_MATCH_TOKENIZER]
    assert evaluation.passed and evaluation.metadata["sections_stored"].value == 12
    assert 1 <= evaluation.metadata["sampled"].value <= 3
    assert evaluation.metadata["sampled_text_bytes"].value <= CHECK_SAMPLE_BYTES
    path = pipe.output("tokenized_cache", "0")
    table = pq.read_table(path)
    ids = table["input_ids"].to_pylist()
    first = sample_order(table["section_id"], 0)[0]  # always sampled
    victim = table["section_id"].to_pylist().index(first)
    ids[victim] = ids[victim][:-1]
    write_parquet_atomic(table.set_column(2, "input_ids", pa.array(ids, pa.list_(pa.int32()))), path)
    evaluation = check_evaluations(pipe.run_checks("0", TOKENS_MATCH_TOKENIZER))[TOKENS_MATCH_TOKENIZER]
    assert not evaluation.passed and evaluation.metadata["mismatched"].value == 1


def test_the_sample_is_seeded_deterministic_and_within_its_budget():
    from dlm_pipeline.defs.tokens.checks import (
        CHECK_CANDIDATES,
        CHECK_SAMPLE,
        CHECK_SAMPLE_BYTES,
        bounded_sample,
        sample_order,
    )

    ids = pa.chunked_array([[f"s{i:04d}" for i in range(1000)], [f"s{i:04d}" for i in range(500)]])  # copies
    order = sample_order(ids, 3)
    assert order == sample_order(ids, 3) and order != sample_order(ids, 4)  # each seed its own sample
    assert len(order) == len(set(order)) == CHECK_CANDIDATES
    assert bounded_sample(order, {order[0]: 10 * CHECK_SAMPLE_BYTES}) == [order[0]]  # the first is always checked
    chosen = bounded_sample(order, {s: CHECK_SAMPLE_BYTES if s == order[1] else 100 for s in order})
    assert chosen[0] == order[0] and order[1] not in chosen and len(chosen) == CHECK_SAMPLE  # too big: passed over
