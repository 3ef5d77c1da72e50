"""A step whose inputs, settings and code are those of its seed's latest materialization, and whose
stored output is untouched, re-records that output instead of computing it (issue 11: cost follows
change); its checks re-record their passed evaluations. Anything that could change the output, or
the output's own files, makes the step compute again."""

from __future__ import annotations

import os
import shutil
import time

import pyarrow.parquet as pq
import pytest

import dlm_pipeline.core.tree_signature as tree_signature_module
from tests.conftest import check_evaluations

PER_SEED = ("weights_map", "expanded_corpus", "tokenized_cache", "training_dataset")
CHECKS = ("expansion_deterministic", "expansion_matches_weights", "tokens_match_tokenizer")
DATASET_CHECKS = ("split_is_leak_free", "packing_conserves_tokens")
FILES = {
    ".dlm/training.yaml": "dlm_training_version: 1\nmetadata: {kind: doc}\nweights: {kind: {doc: 1.5}}\n",
    **{f"docs/f{i:02d}.md": f"document {i}\n" + "words and more words\n" * (1 + i % 9) for i in range(40)},
}


@pytest.fixture(autouse=True)
def trusted_timestamps(monkeypatch):
    """Files written by the test just before a run count as settled (the racy rule has its own tests)."""
    monkeypatch.setattr(tree_signature_module, "RACY_WINDOW_NS", 0)


def unchanged(pipe, asset: str, seed: str = "3") -> bool:
    return str(pipe.metadata(asset, seed).get("reuse", "")).startswith("unchanged")


def dataset_stats(pipe, seed: str = "3") -> dict[str, tuple[int, int]]:
    folder = pipe.out / "training_dataset" / seed
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def test_an_unchanged_rerun_rerecords_every_output_and_its_passed_checks(tree, pipeline):
    pipe = pipeline(tree(FILES), max_seq_len=64)
    first = pipe.run("3")
    before = {a: pipe.metadata(a, "3") for a in PER_SEED}
    files_before = {a: os.stat(pipe.output(a, "3")).st_ino for a in PER_SEED if a != "training_dataset"}
    dataset_before = dataset_stats(pipe)
    second = pipe.run("3")
    for asset in PER_SEED:
        after = pipe.metadata(asset, "3")
        assert unchanged(pipe, asset), asset
        assert after["computed_in_run"] == first.run_id
        assert after["fingerprint"] == before[asset]["fingerprint"]
        assert after["dagster/row_count"] == before[asset]["dagster/row_count"]
        assert after["input_fingerprints"] == before[asset]["input_fingerprints"]
    assert {a: os.stat(pipe.output(a, "3")).st_ino for a in files_before} == files_before
    assert dataset_stats(pipe) == dataset_before
    tokens = pipe.metadata("tokenized_cache", "3")
    assert tokens["cache_misses"] == 0 and tokens["hit_rate"] == 1.0
    assert tokens["cache_hits"] == before["tokenized_cache"]["unique_texts"] > 0
    assert tokens["tokenized_by_reason"] == {}
    evaluations = check_evaluations(second)
    for name in CHECKS + DATASET_CHECKS:
        assert evaluations[name].passed, name
        assert evaluations[name].metadata["evaluated_in_run"].value == first.run_id
    third = pipe.run("3")  # still the first run's results, not the second's re-recording
    assert pipe.metadata("expanded_corpus", "3")["computed_in_run"] == first.run_id
    assert check_evaluations(third)["packing_conserves_tokens"].metadata["evaluated_in_run"].value == first.run_id


def test_what_could_change_an_output_makes_its_step_compute(tree, pipeline):
    root = tree(FILES)
    pipe = pipeline(root, max_seq_len=64)
    pipe.run("3")

    # The stored file was replaced (same bytes, another inode): computed again, and checked again.
    expanded = pipe.output("expanded_corpus", "3")
    shutil.copyfile(expanded, expanded.with_suffix(".tmp"))
    os.replace(expanded.with_suffix(".tmp"), expanded)
    result = pipe.run("3")
    assert not unchanged(pipe, "expanded_corpus") and unchanged(pipe, "tokenized_cache")
    assert "evaluated_in_run" not in check_evaluations(result)["expansion_deterministic"].metadata

    # A dataset file is missing: the dataset is written again.
    (pipe.out / "training_dataset" / "3" / "train.idx").unlink()
    pipe.run("3")
    assert not unchanged(pipe, "training_dataset")
    assert (pipe.out / "training_dataset" / "3" / "train.idx").is_file()

    # The token store changed (here: cleared): both steps that read it compute again, and the texts
    # are put back; so would ids planted in it be read, and caught by tokens_match_tokenizer.
    shutil.rmtree(pipe.cache)
    pipe.run("3")
    assert not unchanged(pipe, "tokenized_cache") and not unchanged(pipe, "training_dataset")
    assert pipe.metadata("tokenized_cache", "3")["cache_misses"] > 0
    assert unchanged(pipe, "expanded_corpus")

    # A weights edit changes the inputs of everything after weights_map.
    config = root / ".dlm" / "training.yaml"
    config.write_text(config.read_text().replace("1.5", "2.5"))
    pipe.run("3")
    assert not any(unchanged(pipe, a) for a in PER_SEED)

    # A setting the output depends on (max_seq_len): the token rows and the dataset are computed again.
    pipeline(root, max_seq_len=32).run("3")
    assert unchanged(pipe, "expanded_corpus")
    assert not unchanged(pipe, "tokenized_cache") and not unchanged(pipe, "training_dataset")

    # Another seed never reuses this seed's per-seed outputs.
    pipe.run("4")
    assert not unchanged(pipe, "expanded_corpus", "4")


def test_full_rescan_computes_every_step_and_evaluates_every_check(tree, pipeline):
    root = tree(FILES)
    pipeline(root, max_seq_len=64).run("3")
    pipe = pipeline(root, max_seq_len=64, full_rescan=True)
    result = pipe.run("3")
    assert not any(unchanged(pipe, a) for a in PER_SEED)
    assert not any("evaluated_in_run" in e.metadata for e in check_evaluations(result).values())


def test_checks_run_alone_evaluate_what_is_stored(tree, pipeline):
    """A re-recorded evaluation is only ever given in the run that re-recorded its output: checks
    run alone afterwards read the stored files, which may have changed since."""
    pipe = pipeline(tree(FILES), max_seq_len=64)
    pipe.run("3")
    pipe.run("3")
    expanded = pipe.output("expanded_corpus", "3")
    table = pq.read_table(expanded)
    pq.write_table(table.slice(1), expanded)  # a row lost since the run
    result = pipe.run_checks("3", "expansion_deterministic")
    evaluation = check_evaluations(result)["expansion_deterministic"]
    assert not evaluation.passed and "evaluated_in_run" not in evaluation.metadata


def test_a_failed_check_is_evaluated_again(tree, pipeline, monkeypatch):
    from dlm_pipeline.defs.tokens import checks

    pipe = pipeline(tree(FILES), max_seq_len=64)
    monkeypatch.setattr(checks, "mismatched_sections", lambda loaded, rows, texts, n: (1, ["forced"]))
    first = pipe.run("3", raise_on_error=False)
    assert not check_evaluations(first)["tokens_match_tokenizer"].passed
    monkeypatch.undo()
    second = pipe.run("3")
    evaluation = check_evaluations(second)["tokens_match_tokenizer"]
    assert evaluation.passed and "evaluated_in_run" not in evaluation.metadata
    assert unchanged(pipe, "tokenized_cache")


def test_the_cli_reruns_compute_nothing(tmp_path, monkeypatch):
    """Through the CLI, in fresh processes (where the code fingerprint is computed anew): the second
    run computes nothing; training_configs reads every config (the proof of the tree state) and keeps
    its output, and raw_corpus is re-used."""
    import subprocess
    import sys

    import dagster as dg

    from tests.conftest import write_tree

    root = write_tree(tmp_path / "tree", FILES)
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLM_")} | {"DAGSTER_HOME": str(home)}
    time.sleep(tree_signature_module.RACY_WINDOW_NS / 1e9)  # settled: ctime cannot be set back
    command = [sys.executable, "-m", "dlm_pipeline.cli", "materialize", "--source", str(root), "--seed", "3"]
    for _ in range(2):
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-2000:]
        assert "Warning" not in done.stderr  # no Dagster preview warnings about our partitioned checks
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    with dg.DagsterInstance.get() as instance:
        run = instance.get_run_records(limit=1)[0].dagster_run.run_id
        computed = set()
        for entry in instance.all_logs(run, of_type=dg.DagsterEventType.ASSET_MATERIALIZATION):
            metadata = entry.dagster_event.event_specific_data.materialization.metadata
            reuse = str(metadata["reuse"].value) if "reuse" in metadata else ""
            if not (reuse.startswith("unchanged") or reuse.startswith("reused")):
                computed.add(entry.step_key)
    assert computed == set()


def test_the_full_rescan_tag_computes_every_step_and_the_nightly_runs_carry_it(tree, pipeline):
    """A run tagged `dlm/full_rescan=1` (what the nightly schedule requests, and what a UI user can
    add at launch) trusts nothing remembered, as --full-rescan does."""
    from datetime import datetime

    import dagster as dg

    from dlm_pipeline.defs.automation import nightly_all_seeds
    from dlm_pipeline.defs.constants import CORPUS_JOB, FULL_RESCAN_TAG
    from dlm_pipeline.defs.partitions import SEEDS_PARTITION

    pipe = pipeline(tree(FILES), max_seq_len=64)
    pipe.run("3")
    job = pipe.defs.resolve_job_def(CORPUS_JOB)
    result = job.execute_in_process(instance=pipe.instance, partition_key="3", tags={FULL_RESCAN_TAG: "1"})
    assert not any(unchanged(pipe, a) for a in PER_SEED)
    assert pipe.metadata("raw_corpus", "3")["files_read"] > 0 and "reused_from_seed" not in pipe.metadata(
        "raw_corpus", "3"
    )
    assert not any("evaluated_in_run" in e.metadata for e in check_evaluations(result).values())
    with dg.instance_for_test() as instance:
        instance.add_dynamic_partitions(SEEDS_PARTITION, ["3"])
        with dg.build_schedule_context(instance=instance, scheduled_execution_time=datetime(2026, 1, 2)) as context:
            (request,) = nightly_all_seeds(context)
    assert request.tags[FULL_RESCAN_TAG] == "1"


def test_a_mistyped_full_rescan_tag_fails_the_run_with_one_line_instead_of_meaning_off(tree, pipeline):
    """A tag typed in the UI is free text: `ture` must not silently run as if it were off."""
    from dlm_pipeline.defs.constants import CORPUS_JOB, FULL_RESCAN_TAG

    pipe = pipeline(tree(FILES), max_seq_len=64)
    pipe.run("3")
    job = pipe.defs.resolve_job_def(CORPUS_JOB)
    result = job.execute_in_process(
        instance=pipe.instance, partition_key="3", tags={FULL_RESCAN_TAG: "ture"}, raise_on_error=False
    )
    assert not result.success
    failures = [
        e.step_failure_data.user_failure_data for e in result.all_events if e.event_type_value == "STEP_FAILURE"
    ]
    assert failures and all(f is not None for f in failures)
    assert "the run tag dlm/full_rescan must be 1 or 0, got 'ture'" in failures[0].description


def test_training_configs_keeps_its_output_only_for_the_same_bytes_and_limits(tree, pipeline):
    """The configs are read on every run; their last valid output is kept only while every config has
    the same bytes and the weight limit is the same. A config an edit made invalid, or one a lower
    `DLM_MAX_WEIGHT` now refuses, is parsed again and fails its check, on every run."""
    root = tree(FILES)
    pipe = pipeline(root, max_seq_len=64)
    pipe.run("3")
    assert not unchanged(pipe, "training_configs")
    pipe.run("3")
    assert unchanged(pipe, "training_configs")
    assert check_evaluations(pipe.run("3"))["configs_valid"].passed

    strict = pipeline(root, max_seq_len=64, max_weight=1.0)  # the config's weight 1.5 is now refused
    for _ in range(2):
        result = strict.run("3", raise_on_error=False)
        assert not check_evaluations(result)["configs_valid"].passed
        assert not unchanged(strict, "training_configs")

    config = root / ".dlm" / "training.yaml"
    config.write_text(config.read_text() + "# a comment is new bytes\n")
    result = pipe.run("3")
    assert check_evaluations(result)["configs_valid"].passed and not unchanged(pipe, "training_configs")
    config.write_text("dlm_training_version: 1\nweights: {kind: {doc: -1}}\n")
    for _ in range(2):
        result = pipe.run("3", raise_on_error=False)
        assert not check_evaluations(result)["configs_valid"].passed
        assert not unchanged(pipe, "training_configs")


def test_training_configs_records_the_bytes_it_parsed_when_a_config_changes_during_the_step(
    tree, pipeline, monkeypatch
):
    """A config edited between the step's first read (the lookup) and its parse: the output holds what
    was parsed, so its key must name those bytes. Restoring the first bytes is then a change to parse,
    never a reuse of records made from the others."""
    import dlm_pipeline.defs.corpus.assets as corpus_assets

    root = tree(FILES)
    config = root / ".dlm" / "training.yaml"
    first = config.read_text()
    real_load = corpus_assets.load_configs

    def edited_meanwhile(scan, **options):
        config.write_text(first.replace("doc: 1.5", "doc: 3.0"))
        return real_load(scan, **options)

    pipe = pipeline(root, max_seq_len=64)
    monkeypatch.setattr(corpus_assets, "load_configs", edited_meanwhile)
    pipe.run("3")
    monkeypatch.undo()
    config.write_text(first)
    pipe.run("3")
    assert not unchanged(pipe, "training_configs")
    assert pipe.metadata("weights_map", "3")["weights"].records[0].data["weight"] == 1.5
