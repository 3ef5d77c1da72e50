"""The four assets materialized through Dagster into a temporary instance, read back from Parquet."""

from __future__ import annotations

import random

import dagster as dg
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import EXAMPLE, check_evaluations

from dlm_pipeline.core.fingerprint import table_fingerprint
from dlm_pipeline.core.rules import ancestor_dirs
from dlm_pipeline.definitions import build_defs
from dlm_pipeline.defs.constants import CONFIGS_VALID, CORPUS_JOB
from dlm_pipeline.defs.resources import ParquetIOManager

ASSETS = ["training_configs", "weights_map", "raw_corpus", "expanded_corpus", "tokenized_cache"]


def test_example_materializes_for_two_seeds_with_metadata(pipeline):
    pipe = pipeline(EXAMPLE)
    for seed in ("0", "7"):
        result = pipe.run(seed)
        assert result.success
        assert check_evaluations(result)[CONFIGS_VALID].passed
        for asset in ASSETS:
            assert pipe.output(asset, seed).exists()

    raw = pq.read_table(pipe.output("raw_corpus", "0"))
    assert raw.schema.names == ["section_id", "path", "text", "tags"]
    assert raw["path"].to_pylist() == [
        "README.md",
        "docs/api.md",
        "docs/drafts/keep.md",
        "docs/guide.md",
        "notes/2024-01.txt",
        "notes/ideas.md",
        "pyproject.toml",
        "src/acme/__init__.py",
        "src/acme/_generated/record_pb2.py",
        "src/acme/_generated/version.py",
        "src/acme/core.py",
        "src/acme/report.py",
    ]
    version = raw.to_pylist()[9]
    assert version["text"].startswith('"""Generated constants') and "\r" not in version["text"]
    assert dict(version["tags"]) == {"generated": "true", "kind": "code", "lang": "python", "project": "acme"}

    import json

    assert json.loads(raw.schema.metadata[b"dlm.skip_counts"])["binary"] == 1
    raw_meta = pipe.metadata("raw_corpus", "0")
    assert raw_meta["seed"] == 0
    assert raw_meta["dagster/row_count"] == 12
    assert raw_meta["skipped/binary"] == 1 and raw_meta["skipped/encoding"] == 1
    assert raw_meta["fingerprint"] == table_fingerprint(raw)
    configs_meta = pipe.metadata("training_configs", "0")
    assert configs_meta["configs_valid"] == 6 and configs_meta["configs_invalid"] == 0
    assert raw_meta["input_fingerprint/training_configs"] == configs_meta["fingerprint"]

    expanded = pq.read_table(pipe.output("expanded_corpus", "7"))
    meta = pipe.metadata("expanded_corpus", "7")
    assert meta["seed"] == 7
    assert meta["rows_in"] == 12 and meta["rows_out"] == expanded.num_rows
    assert meta["fingerprint"] == table_fingerprint(expanded)
    assert meta["input_fingerprint/raw_corpus"] == raw_meta["fingerprint"]  # raw corpus is seed-independent
    assert meta["input_fingerprint/weights_map"] == pipe.metadata("weights_map", "7")["fingerprint"]
    realized = {(r.data["tag_key"], r.data["tag_value"]): r.data for r in meta["expected_vs_realized"].records}
    assert realized[("kind", "docs")]["expected"] == pytest.approx(3 * 2.5)
    assert realized[("kind", "docs")]["realized"] == sum(
        1 for t in expanded["tags"].to_pylist() if ("kind", "docs") in t
    )
    distribution = {
        (r.data["tag_key"], r.data["tag_value"]): r.data["rows"] for r in meta["weight_distribution"].records
    }
    assert distribution[("project", "acme")] == 12 and distribution[("kind", "docs")] == 3


def yaml_weights(weights: dict) -> str:
    return yaml.safe_dump({"dlm_training_version": 1, "weights": weights, "metadata": {}}, sort_keys=True)


@pytest.mark.parametrize("scope", ["nearest", "global"])
def test_expanded_corpus_equals_reference_on_a_generated_tree(reference, tree, pipeline, scope):
    rng = random.Random(11 if scope == "nearest" else 12)
    dirs = ["", "src", "src/gen", "docs", "docs/deep/er"]
    maps = {}
    files = {}
    for d in dirs:
        kinds = ["code", "docs", "notes"]
        maps[d] = {
            "kind": {k: rng.choice([0.0, 0.3, 1.0, 1.5, 2.75]) for k in rng.sample(kinds, 2)},
            "generated": {"true": rng.choice([0.1, 0.5, 4.2])},
        }
        meta = {"kind": rng.choice(kinds), "generated": rng.choice([True, False])}
        prefix = f"{d}/" if d else ""
        files[f"{prefix}.dlm/training.yaml"] = yaml.safe_dump(
            {"dlm_training_version": 1, "weights": maps[d], "metadata": meta}
        )
        for i in range(40):
            files[f"{prefix}f{i:02d}.txt"] = f"file {i} in {d or 'root'}\n" * rng.randint(1, 3)
    root = tree(files)
    pipe = pipeline(root, scope=scope)
    raw_rows = None
    for seed in ("0", "3"):
        assert pipe.run(seed).success
        raw = pq.read_table(pipe.output("raw_corpus", seed))
        raw_rows = raw.to_pylist()
        expected = []
        for row in raw_rows:
            chain = [d for d in ancestor_dirs(row["path"].rpartition("/")[0]) if d in maps]
            if scope == "global":
                ordered = sorted(maps, key=lambda d: (0 if not d else d.count("/") + 1, d))
                weights = reference.merge_weights_maps([maps[d] for d in ordered])
            else:
                weights = reference.merge_weights_maps([maps[d] for d in chain])
            ref_row = {"_dlm_row_tags": dict(row["tags"]), "_dlm_section_id": row["section_id"], "path": row["path"]}
            expected += [r["path"] for r in reference.expand_rows_by_weight([ref_row], weights, seed=int(seed))]
        expanded = pq.read_table(pipe.output("expanded_corpus", seed))
        assert expanded["path"].to_pylist() == expected
    assert len(raw_rows) == 200


def test_invalid_config_blocks_downstream_with_the_error_visible(tree, pipeline):
    root = tree(
        {
            ".dlm/training.yaml": "dlm_training_version: 1\nweights: {lang: {python: .nan}}\n",
            "a.py": "x = 1\n",
        }
    )
    pipe = pipeline(root)
    result = pipe.run("0", raise_on_error=False)
    assert not result.success
    evaluation = check_evaluations(result)[CONFIGS_VALID]
    assert not evaluation.passed
    assert ".dlm/training.yaml:2: weights.lang.python: weight must be finite" in evaluation.metadata["errors"].value
    materialized = {
        e.asset_key.path[-1]
        for e in result.get_asset_materialization_events()
        for e in [e.event_specific_data.materialization]
    }
    assert materialized == {"training_configs"}
    assert not pipe.output("weights_map", "0").exists() and not pipe.output("expanded_corpus", "0").exists()
    configs = pq.read_table(pipe.output("training_configs", "0")).to_pylist()
    assert configs[0]["status"] == "error"
    assert pipe.metadata("training_configs", "0")["configs_invalid"] == 1


def test_fixing_the_config_unblocks(tree, pipeline):
    root = tree({".dlm/training.yaml": "dlm_training_version: 2\n", "a.txt": "a\n"})
    pipe = pipeline(root)
    assert not pipe.run("0", raise_on_error=False).success
    (root / ".dlm/training.yaml").write_text("dlm_training_version: 1\n")
    assert pipe.run("0").success
    assert pq.read_table(pipe.output("expanded_corpus", "0"))["path"].to_pylist() == ["a.txt"]


def test_non_canonical_seed_partition_fails_with_a_clear_message(tree, pipeline):
    pipe = pipeline(tree({"a.txt": "a"}))
    with pytest.raises(dg.Failure, match="not a canonical non-negative decimal integer"):
        pipe.run("042")


def test_missing_source_root_fails_clearly(tmp_path, pipeline):
    pipe = pipeline(tmp_path / "gone")
    result = pipe.run("0", raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "does not exist; set DLM_SOURCE_ROOT" in failure.step_failure_data.user_failure_data.description


def test_rematerializing_gives_byte_identical_outputs(pipeline):
    pipe = pipeline(EXAMPLE)
    assert pipe.run("5").success
    first = {a: pipe.output(a, "5").read_bytes() for a in ASSETS}
    assert pipe.run("5").success
    assert {a: pipe.output(a, "5").read_bytes() for a in ASSETS} == first


def test_definitions_load_with_every_asset_and_the_job():
    from dlm_pipeline.definitions import CORPUS_JOB, defs

    dg.Definitions.validate_loadable(defs)
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} == {
        *ASSETS,
        "training_dataset",
    }  # a folder, not a table
    assert defs.resolve_job_def(CORPUS_JOB) is not None
    spec_names = {k.name for k in graph.asset_check_keys}
    assert CONFIGS_VALID in spec_names


class ConcurrentRunIOManager(ParquetIOManager):
    """The real IO manager; when a step first asks where `raw_corpus` is stored (the step has
    started: Dagster has fetched the versions of its inputs), another run of the same seed lands a
    newer materialization of it (what an overlapping run does), deterministically."""

    def output_path(self, instance, asset, partition):
        if asset == "raw_corpus" and not LANDED:
            LANDED.append(asset)
            instance.report_runless_asset_event(
                dg.AssetMaterialization(
                    "raw_corpus",
                    partition=partition,
                    metadata={"fingerprint": "f" * 64, "config_fingerprint": "c" * 64},
                )
            )
        return super().output_path(instance, asset, partition)


LANDED: list[str] = []


def test_lineage_names_the_input_version_loaded_not_the_latest(tree, pipeline):
    pipe = pipeline(tree({".dlm/training.yaml": "dlm_training_version: 1\nmetadata: {k: v}\n", "a.txt": "a\n"}))
    assert pipe.run("0").success
    configs = pipe.metadata("training_configs", "0")["config_fingerprint"]
    loaded = table_fingerprint(pq.read_table(pipe.output("raw_corpus", "0")))
    defs = build_defs({**pipe.defs.resources, "io_manager": ConcurrentRunIOManager(output_dir=str(pipe.out))})
    downstream_only = defs.resolve_job_def(CORPUS_JOB).get_subset(asset_selection={dg.AssetKey("expanded_corpus")})
    LANDED.clear()
    assert downstream_only.execute_in_process(instance=pipe.instance, partition_key="0").success
    assert pipe.metadata("raw_corpus", "0")["fingerprint"] == "f" * 64  # the latest is not what was loaded
    meta = pipe.metadata("expanded_corpus", "0")
    assert meta["input_fingerprint/raw_corpus"] == loaded
    assert meta["input_fingerprints"]["weights_map"] == pipe.metadata("weights_map", "0")["fingerprint"]
    assert meta["config_fingerprint"] == configs


def test_an_expansion_over_the_byte_limit_fails_clearly_and_writes_nothing(tree, pipeline):
    files = {
        ".dlm/training.yaml": "dlm_training_version: 1\nmetadata: {a: '1', b: '1'}\nweights: {a: {'1': 50}, b: {'1': 2}}\n"
    }
    pipe = pipeline(tree(files | {"big.txt": "x" * 1000}), max_expanded_bytes=50_000)
    result = pipe.run("0", raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    description = failure.step_failure_data.user_failure_data.description
    assert (
        "100,000 bytes of text (limit 50,000 bytes)" in description
        and "big.txt: 100 copies of 1,000 bytes" in description
    )
    assert "DLM_MAX_EXPANDED_BYTES" in description
    assert not pipe.output("expanded_corpus", "0").exists()
