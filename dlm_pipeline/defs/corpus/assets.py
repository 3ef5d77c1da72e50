"""The corpus asset graph, one partition per seed.

training_configs -> weights_map ─┐
        └────────> raw_corpus ───┴─> expanded_corpus
"""

import json
from collections.abc import Iterator
from contextlib import ExitStack

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from dlm_pipeline.core.compute import RunStats
from dlm_pipeline.core.config_records import (
    STATUS_ERROR,
    anchors_from_table,
    load_configs,
    records_source,
    records_table,
    table_configs_fingerprint,
)
from dlm_pipeline.core.corpus import ROW_SCHEMA, SKIP_REASONS, stream_raw_corpus
from dlm_pipeline.core.expansion import ExpansionTooLarge, stream_expansion, tag_stats
from dlm_pipeline.core.parquet_io import RowStream
from dlm_pipeline.core.tree import SourceTreeError
from dlm_pipeline.core.weights import SCOPE_NEAREST, table_scope, weights_table
from dlm_pipeline.defs.checked_output import input_fingerprints, stored_columns, stored_rows
from dlm_pipeline.defs.compute import ComputeResource
from dlm_pipeline.defs.constants import CONFIGS_VALID
from dlm_pipeline.defs.metadata import (
    ProgressLog,
    config_lineage,
    streamed_output,
    table_metadata,
    text_block,
    versioned_output,
)
from dlm_pipeline.defs.partitions import parse_seed_or_fail, seeds_partitions
from dlm_pipeline.defs.resources import ParquetIOManager, SourceTree
from dlm_pipeline.defs.reuse import (
    computed_metadata,
    full_rescan,
    raw_corpus_reuse,
    step_key,
    stored_output_path,
    unchanged_output,
)

GROUP = "corpus"
SKIP_COUNTS_KEY = b"dlm.skip_counts"


def _scan(context: dg.AssetExecutionContext, source: SourceTree, files: bool = True):
    try:
        scan = source.scan(context.instance, files=files)
    except SourceTreeError as exc:
        raise dg.Failure(description=str(exc)) from None
    if scan.own_dirs:
        context.log.info(f"passed over the pipeline's own folders inside the source root: {', '.join(scan.own_dirs)}")
    return scan


@dg.asset(
    partitions_def=seeds_partitions,
    group_name=GROUP,
    kinds={"python", "yaml", "parquet"},
    code_version="1",
    check_specs=[
        dg.AssetCheckSpec(
            CONFIGS_VALID,
            asset="training_configs",
            blocking=True,
            description="Every .dlm/training.yaml and .dlm/ignore parses and validates; blocks everything downstream otherwise.",
        )
    ],
)
def training_configs(
    context: dg.AssetExecutionContext, source: SourceTree, io_manager: dg.ResourceParam[ParquetIOManager]
):
    """Every `.dlm/training.yaml` and `.dlm/ignore` under the source root: parsed config, status, error, sha256.
    Every run reads them all (the proof of the tree state); when they are the bytes its last valid
    output was parsed from, that output is kept (parsing loads the credential scanner, ~0.2 s)."""
    seed = parse_seed_or_fail(context)
    scan = _scan(context, source, files=False)

    def key_of(records: str | None) -> str | None:
        inputs = {"configs": records, "own_dirs": json.dumps(scan.own_dirs)}
        return step_key(context, inputs, {"max_weight": source.max_weight}) if records is not None else None

    if key := key_of(records_source(scan)):
        path = stored_output_path(context, io_manager)
        if same := unchanged_output(context, key, [], [path], source, still={"configs_invalid": 0}):
            yield same
            yield dg.AssetCheckResult(
                check_name=CONFIGS_VALID,
                passed=True,
                metadata={"configs_invalid": 0, "reuse": same.metadata["reuse"]},
            )
            return
    table = records_table(load_configs(scan, max_weight=source.max_weight))
    key = key_of(records_source(scan, table["sha256"].to_pylist()))  # the bytes parsed, not those hashed before
    errors = [
        e for e, s in zip(table["error"].to_pylist(), table["status"].to_pylist(), strict=False) if s == STATUS_ERROR
    ]
    n_invalid = len(errors)
    yield versioned_output(
        table,
        seed,
        {},
        {
            **(computed_metadata(context, key) if key else {}),
            "source_root": dg.MetadataValue.path(str(scan.root)),
            "config_fingerprint": dg.MetadataValue.text(table_configs_fingerprint(table)),
            "configs_valid": dg.MetadataValue.int(table.num_rows - n_invalid),
            "configs_invalid": dg.MetadataValue.int(n_invalid),
            "own_folders_excluded": dg.MetadataValue.json(scan.own_dirs),
            "errors": text_block(errors),
            "configs": table_metadata(table.select(["path", "kind", "status", "sha256"])),
        },
    )
    yield dg.AssetCheckResult(
        check_name=CONFIGS_VALID,
        passed=n_invalid == 0,
        description=None if not errors else f"{n_invalid} invalid config file(s); fix them and re-materialize",
        metadata={"configs_invalid": n_invalid, "errors": text_block(errors)},
    )


@dg.asset(
    partitions_def=seeds_partitions,
    group_name=GROUP,
    kinds={"python", "parquet"},
    code_version="2",
    deps=["training_configs"],
)
def weights_map(
    context: dg.AssetExecutionContext,
    source: SourceTree,
    io_manager: dg.ResourceParam[ParquetIOManager],
) -> dg.Output:
    """The merged weights map (global view) and each anchor's own map; the scope in use is recorded."""
    seed = parse_seed_or_fail(context)
    scope = source.scope()
    inputs = input_fingerprints(io_manager, context, ["training_configs"])
    key = step_key(context, inputs, {"scope": scope})
    if same := unchanged_output(context, key, inputs, [stored_output_path(context, io_manager)], source):
        return same
    table = weights_table(anchors_from_table(stored_columns(io_manager, context, "training_configs")), scope)
    active = table.filter(pc.equal(table["scope"], scope))
    own = table.filter(pc.equal(table["scope"], SCOPE_NEAREST))
    return versioned_output(
        table,
        seed,
        inputs,
        {
            **config_lineage(context),
            **computed_metadata(context, key),
            "weights_scope": dg.MetadataValue.text(scope),
            "anchors_with_weights": dg.MetadataValue.int(len(pc.unique(own["anchor"]))),
            "weights": table_metadata(active.select(["anchor", "tag_key", "tag_value", "weight"])),
        },
    )


@dg.asset(
    partitions_def=seeds_partitions,
    group_name=GROUP,
    kinds={"python", "parquet"},
    code_version="1",
    deps=["training_configs"],
)
def raw_corpus(
    context: dg.AssetExecutionContext,
    source: SourceTree,
    compute: ComputeResource,
    io_manager: dg.ResourceParam[ParquetIOManager],
) -> dg.Output:
    """One row per included text file (section_id, path, text, tags), ordered by path; skips counted by reason."""
    seed = parse_seed_or_fail(context)
    scan = _scan(context, source)
    anchors, inputs = (
        anchors_from_table(stored_columns(io_manager, context, "training_configs")),
        input_fingerprints(io_manager, context, ["training_configs"]),
    )
    reuse = raw_corpus_reuse(context, source, scan, anchors, inputs, seed, stored_output_path(context, io_manager))
    if reuse.output is not None:
        return reuse.output
    index = source.ingest_index(context.instance, scan, full_rescan(context, source))
    compute_stats = RunStats()
    # The rows are read while the IO manager writes them, after this function returns: the compute
    # backend's reader stays open until the last batch was read.
    reading = ExitStack()
    corpus, tables = stream_raw_corpus(
        scan,
        anchors,
        max_file_bytes=source.max_file_bytes,
        secret_entropy=source.secret_entropy,
        progress=ProgressLog(context, "raw_corpus files read"),
        index=index,
        read_batch=reading.enter_context(
            compute.reader(context, source.max_file_bytes, source.secret_entropy, compute_stats)
        ),
    )

    def rows_read() -> Iterator[pa.Table]:
        with reading:
            yield from tables

    def skip_counts() -> dict[str, int]:
        return {reason: corpus.skips.get(reason, 0) for reason in SKIP_REASONS}

    def late_metadata() -> dict:
        """What is known once every file was read (the IO manager asks after writing the rows)."""
        context.log.info(
            f"ingest index {index.status}: {corpus.files_read:,} file(s) read, "
            f"{corpus.files_from_index:,} from the index"
        )
        skips = skip_counts()
        skipped = pa.table(
            {"path": [p for p, _ in corpus.skipped], "reason": [r for _, r in corpus.skipped]},
            schema=pa.schema([("path", pa.string()), ("reason", pa.string())]),
        )
        return {
            "files_read": dg.MetadataValue.int(corpus.files_read),
            "files_from_index": dg.MetadataValue.int(corpus.files_from_index),
            "ingest_index": dg.MetadataValue.text(index.status),
            "text_bytes": dg.MetadataValue.int(corpus.bytes_read),
            "skipped_total": dg.MetadataValue.int(sum(corpus.skips.values())),
            "skip_counts": dg.MetadataValue.json(skips),
            **{f"skipped/{reason}": dg.MetadataValue.int(count) for reason, count in skips.items()},
            "skipped_files": table_metadata(skipped),
            "own_folders_excluded": dg.MetadataValue.json(scan.own_dirs),
            "compute": dg.MetadataValue.text(compute.backend),
            **(ComputeResource.metadata(compute_stats) if compute_stats.tasks else {}),
        }

    # The skip counts travel with the file too (schema metadata), for readers outside Dagster.
    rows = RowStream(
        ROW_SCHEMA, rows_read(), late_metadata=lambda: {SKIP_COUNTS_KEY: json.dumps(skip_counts(), sort_keys=True)}
    )
    return streamed_output(
        rows,
        seed,
        inputs,
        {
            **config_lineage(context),
            **reuse.metadata,
            "files_seen": dg.MetadataValue.int(corpus.files_seen),
            "files_excluded": dg.MetadataValue.int(corpus.files_excluded),
        },
        late_metadata,
    )


@dg.asset(
    partitions_def=seeds_partitions,
    group_name=GROUP,
    kinds={"python", "parquet"},
    code_version="2",
    deps=["raw_corpus", "weights_map"],
)
def expanded_corpus(
    context: dg.AssetExecutionContext,
    source: SourceTree,
    io_manager: dg.ResourceParam[ParquetIOManager],
) -> dg.Output:
    """Each raw row repeated or dropped by its composed weight; fractional copies decided by a seeded hash."""
    seed = parse_seed_or_fail(context)
    mode = source.mode()
    inputs = input_fingerprints(io_manager, context, ["raw_corpus", "weights_map"])
    key = step_key(context, inputs, {"mode": mode, "max_expanded_bytes": source.max_expanded_bytes})
    if same := unchanged_output(context, key, inputs, [stored_output_path(context, io_manager)], source):
        return same
    raw_corpus = stored_rows(io_manager, context, "raw_corpus", ROW_SCHEMA.names)
    weights_map = stored_columns(io_manager, context, "weights_map")
    scope = table_scope(weights_map)
    try:
        expansion = stream_expansion(raw_corpus, weights_map, seed, mode, source.max_expanded_bytes)
    except ExpansionTooLarge as exc:
        raise dg.Failure(
            description=f"{exc} (DLM_MAX_EXPANDED_BYTES, or the source resource's max_expanded_bytes; "
            f"now {source.max_expanded_bytes:,})"
        ) from None
    plan = expansion.plan
    stats = tag_stats(expansion.rows["tags"], plan.weights, plan.copies)
    rows_out = len(plan.source_rows)
    context.log.info(
        f"expanded {raw_corpus.num_rows:,} rows into {rows_out:,} (scope {scope}, mode {mode}, seed {seed})"
    )
    return streamed_output(
        RowStream(expansion.schema, expansion.batches()),
        seed,
        inputs,
        {
            **config_lineage(context),
            **computed_metadata(context, key),
            "rows_in": dg.MetadataValue.int(raw_corpus.num_rows),
            "rows_out": dg.MetadataValue.int(rows_out),
            "rows_dropped": dg.MetadataValue.int(int((plan.copies == 0).sum())),
            "weights_scope": dg.MetadataValue.text(scope),
            "expansion_mode": dg.MetadataValue.text(mode),
            "weight_distribution": table_metadata(stats.select(["tag_key", "tag_value", "rows"])),
            "expected_vs_realized": table_metadata(
                stats.select(["tag_key", "tag_value", "rows", "expected", "realized"])
            ),
        },
    )
