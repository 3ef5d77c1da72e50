"""A hostile user against unchanged steps (defs/reuse.py): whatever changed what a step would compute,
or what a check would say, must not be answered with the old output or the old verdict."""

from __future__ import annotations

import ast
import importlib.metadata
import sys
from pathlib import Path

import dagster as dg
import pyarrow.parquet as pq

from dlm_pipeline.definitions import CORPUS_JOB
from dlm_pipeline.defs.reuse import SHAPING_DISTRIBUTIONS
from tests.conftest import check_evaluations
from tests.defs.test_unchanged_steps import FILES, trusted_timestamps, unchanged  # noqa: F401 (fixture)

CORE = Path(__file__).resolve().parents[2] / "dlm_pipeline" / "core"
NOT_SHAPING = {"ray"}  # runs the same code elsewhere; what it computes does not depend on its version


def run_assets(pipe, seed: str, *assets: str):
    """Only the named assets (their inputs as stored), as the UI's "Materialize selected" or a
    re-execution from failure runs them."""
    subset = pipe.defs.resolve_job_def(CORPUS_JOB).get_subset(asset_selection={dg.AssetKey(a) for a in assets})
    return subset.execute_in_process(instance=pipe.instance, partition_key=seed, raise_on_error=False)


def test_an_input_rewritten_since_its_materialization_makes_the_step_compute(tree, pipeline):
    """The key names an input by the fingerprint its materialization recorded; a stored input
    rewritten since (its own step not run again) is another input, whatever its record says."""
    pipe = pipeline(tree(FILES), max_seq_len=64)
    pipe.run("3")
    expanded = pipe.output("expanded_corpus", "3")
    rows = pq.read_table(expanded).num_rows
    pq.write_table(pq.read_table(expanded).slice(1), expanded)  # a row lost since
    assert run_assets(pipe, "3", "tokenized_cache").success
    assert not unchanged(pipe, "tokenized_cache")
    assert pq.read_table(pipe.output("tokenized_cache", "3")).num_rows == rows - 1  # what the input now holds


def test_a_check_that_failed_since_is_evaluated_again(tree, pipeline, monkeypatch):
    """A check run alone after the output was computed failed: the next run that finds the output
    unchanged evaluates it again instead of re-recording the older pass."""
    from dlm_pipeline.defs.tokens import checks

    pipe = pipeline(tree(FILES), max_seq_len=64)
    pipe.run("3")
    monkeypatch.setattr(checks, "mismatched_sections", lambda loaded, rows, texts, n: (1, ["forced"]))
    assert not check_evaluations(pipe.run_checks("3", "tokens_match_tokenizer"))["tokens_match_tokenizer"].passed
    evaluation = check_evaluations(pipe.run("3", raise_on_error=False))["tokens_match_tokenizer"]
    assert unchanged(pipe, "tokenized_cache")
    assert not evaluation.passed and "evaluated_in_run" not in evaluation.metadata
    monkeypatch.undo()
    evaluation = check_evaluations(pipe.run("3"))["tokens_match_tokenizer"]
    assert evaluation.passed and "evaluated_in_run" not in evaluation.metadata  # the pass came from this run


def test_every_library_the_core_computes_with_is_in_the_code_fingerprint():
    """A new detect-secrets (say) may skip other files as secrets: its version is part of every step key."""
    modules = set()
    for path in CORE.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    third_party = modules - set(sys.stdlib_module_names) - {"dlm_pipeline", "__future__"} - NOT_SHAPING
    distributions = importlib.metadata.packages_distributions()
    missing = {m for m in third_party if not set(distributions.get(m, [])) & set(SHAPING_DISTRIBUTIONS)}
    assert not missing


def test_an_output_folder_swapped_for_a_symlink_is_not_an_unchanged_output(tree, pipeline, tmp_path):
    """The same files (same inodes), moved and reached through a symlink where their folder was: the
    pipeline never reads through one, so the step computes as it would (and says what is wrong)."""
    pipe = pipeline(tree(FILES), max_seq_len=64)
    pipe.run("3")
    dataset = pipe.out / "training_dataset" / "3"
    dataset.rename(tmp_path / "moved_dataset")
    dataset.symlink_to(tmp_path / "moved_dataset")
    tokens = pipe.out / "tokenized_cache"
    tokens.rename(tmp_path / "moved_tokens")
    tokens.symlink_to(tmp_path / "moved_tokens")
    result = pipe.run("3", raise_on_error=False)
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert [e.step_key for e in failures] == ["tokenized_cache"]
    assert "not a plain folder (a symlink" in failures[0].event_specific_data.error.message
    assert not unchanged(pipe, "tokenized_cache")

    tokens.unlink()
    (tmp_path / "moved_tokens").rename(tokens)
    assert pipe.run("3").success
    assert unchanged(pipe, "tokenized_cache") and not unchanged(pipe, "training_dataset")
    assert dataset.is_dir() and not dataset.is_symlink()  # written again, as a folder of its own


def test_the_dataset_watches_the_namespace_it_reads_with_special_tokens_on(tree, pipeline):
    """With add_special_tokens the token rows live in the "-special" namespace, but the dataset reads
    ids without specials from the plain one: a shard lost there makes the dataset compute again."""
    from dlm_pipeline.definitions import build_defs
    from dlm_pipeline.defs.resources import TokenizerResource

    pipe = pipeline(tree(FILES), max_seq_len=64)
    pipe.defs = build_defs(
        {**pipe.defs.resources, "tokenizer": TokenizerResource(max_seq_len=64, add_special_tokens=True)}
    )
    pipe.run("3")
    plain = next(p for p in pipe.cache.iterdir() if p.is_dir() and not p.name.endswith("-special"))
    next(plain.glob("shard-*.parquet")).unlink()
    pipe.run("3")
    assert unchanged(pipe, "tokenized_cache") and not unchanged(pipe, "training_dataset")
    pipe.run("3")
    assert unchanged(pipe, "training_dataset")  # the mark it recorded is the plain namespace's


def test_an_output_made_unreadable_is_written_again(tree, pipeline):
    """chmod keeps size and mtime; a trainer (not root) could no longer read the file, so the step computes."""
    pipe = pipeline(tree(FILES), max_seq_len=64)
    pipe.run("3")
    (pipe.out / "training_dataset" / "3" / "train.bin").chmod(0)
    pipe.output("expanded_corpus", "3").chmod(0)
    pipe.run("3")
    assert not unchanged(pipe, "expanded_corpus") and not unchanged(pipe, "training_dataset")
    assert (pipe.out / "training_dataset" / "3" / "train.bin").stat().st_mode & 0o444
    assert pipe.output("expanded_corpus", "3").stat().st_mode & 0o444


def test_a_new_expansion_mode_is_not_reported_as_nondeterminism(tree, pipeline):
    """Same inputs, another setting (the mode): a different expansion is expected, not a failed
    expansion_deterministic; the earlier output it compares with must share inputs, settings and code."""
    root = tree(FILES)
    pipeline(root, max_seq_len=64).run("3")
    pipe = pipeline(root, max_seq_len=64, expansion_mode="exact")
    evaluation = check_evaluations(pipe.run("3", raise_on_error=False))["expansion_deterministic"]
    assert not unchanged(pipe, "expanded_corpus")
    assert evaluation.passed, evaluation.description
    # Computed again from the same inputs, settings and code: compared with the previous one.
    again = pipeline(root, max_seq_len=64, expansion_mode="exact", full_rescan=True).run("3")
    evaluation = check_evaluations(again)["expansion_deterministic"]
    assert evaluation.passed
    assert evaluation.metadata["previous_fingerprint"].value == pipe.metadata("expanded_corpus", "3")["fingerprint"]


def test_a_deleted_origin_run_leaves_the_checks_to_evaluate(tree, pipeline):
    """The run that computed the output is gone (its evaluations with it): nothing to re-record from."""
    pipe = pipeline(tree(FILES), max_seq_len=64)
    first = pipe.run("3")
    pipe.run("3")
    pipe.instance.delete_run(first.run_id)
    evaluations = check_evaluations(pipe.run("3"))
    assert unchanged(pipe, "tokenized_cache") and unchanged(pipe, "training_dataset")
    assert all(e.passed and "evaluated_in_run" not in e.metadata for e in evaluations.values())


def test_an_edited_dataset_json_or_a_broken_token_store_makes_the_steps_compute(tree, pipeline, tmp_path):
    pipe = pipeline(tree(FILES), max_seq_len=64)
    pipe.run("3")
    manifest = pipe.out / "training_dataset" / "3" / "dataset.json"
    manifest.write_text(manifest.read_text().replace('"seq_len": 64', '"seq_len": 65'))
    pipe.run("3")
    assert not unchanged(pipe, "training_dataset") and '"seq_len": 64' in manifest.read_text()

    (pipe.cache / "manifest.json").write_text("garbage")
    pipe.run("3")
    assert not unchanged(pipe, "tokenized_cache")  # its shards are adopted again: read, not re-tokenized

    namespace = next(p for p in pipe.cache.iterdir() if p.is_dir())  # swapped for a symlink: refused
    namespace.rename(tmp_path / "moved_namespace")
    namespace.symlink_to(tmp_path / "moved_namespace")
    assert not pipe.run("3", raise_on_error=False).success
    assert not unchanged(pipe, "tokenized_cache")
