"""Tokenized cache: per seed, token ids for every expanded row, gathered from a store shared by all seeds.

The store is keyed by content (the sha256 of each text) and keeps full ids; `max_seq_len` is
applied here, when reading. Each distinct text the seed needs is looked up once: the texts of its
expanded rows and of its validation set (SPEC §7, so `training_dataset`, which runs after this,
finds every text it needs in the store). A text no seed needs is never tokenized; a text any seed
or path needed before is never tokenized again, so a renamed or copied file or a new `max_seq_len`
tokenizes nothing, and a weights edit or a new seed only the texts no seed needed before. The
metadata lists what was tokenized and why.
"""

import functools

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dlm_pipeline import settings
from dlm_pipeline.core.compute import RunStats
from dlm_pipeline.core.dataset import held_out_among
from dlm_pipeline.core.expansion import composed_row_weights
from dlm_pipeline.core.token_store import TOKENIZED_SCHEMA, TokenStore, tokenized_rows
from dlm_pipeline.core.tokenize import length_histogram
from dlm_pipeline.defs.checked_output import input_fingerprints
from dlm_pipeline.defs.compute import ComputeResource
from dlm_pipeline.defs.constants import TOKEN_STORE_MARK
from dlm_pipeline.defs.dataset.assets import INPUTS, checked_split_settings, read_inputs, token_settings
from dlm_pipeline.defs.metadata import (
    ProgressLog,
    config_lineage,
    streamed_output,
    table_metadata,
)
from dlm_pipeline.defs.partitions import parse_seed_or_fail, seeds_partitions
from dlm_pipeline.defs.resources import (
    DatasetResource,
    ParquetIOManager,
    SourceTree,
    TokenCacheResource,
    TokenizerResource,
    writes_into,
)
from dlm_pipeline.defs.reuse import computed_metadata, step_key, stored_output_path, unchanged_output

GROUP = "tokens"
TOKENIZED_LISTED = 20  # texts listed by name in the metadata; all are counted


def _counts(values: pa.ChunkedArray) -> dict[str, int]:
    counted = pc.value_counts(values)
    return dict(sorted(zip(counted.field(0).to_pylist(), counted.field(1).to_pylist(), strict=True)))


def _nothing_tokenized(store: TokenStore):
    """What an unchanged output records of its run's work: nothing looked up or tokenized, every text
    it holds counts as a hit."""

    def metadata(recorded: dict) -> dict:
        return {
            "cache_hits": dg.MetadataValue.int(recorded["unique_texts"]),
            "cache_misses": dg.MetadataValue.int(0),
            "hit_rate": dg.MetadataValue.float(1.0),
            "tokenized_by_reason": dg.MetadataValue.json({}),
            "tokenized_by_need": dg.MetadataValue.json({}),
            "tokenized_sections": table_metadata(TOKENIZED_SCHEMA.empty_table()),
            "shard_bytes_read": dg.MetadataValue.int(0),
            "cache_repaired_shards": dg.MetadataValue.int(0),
            "cache_ignored_entries": dg.MetadataValue.int(0),
            "cache_bytes": dg.MetadataValue.int(store.stats()["bytes"]),
            "tokens_per_second": dg.MetadataValue.float(0.0),
            "tokenize_seconds": dg.MetadataValue.float(0.0),
        }

    return metadata


@dg.asset(
    partitions_def=seeds_partitions,
    group_name=GROUP,
    kinds={"python", "parquet"},
    code_version="1",
    deps=INPUTS,
)
def tokenized_cache(
    context: dg.AssetExecutionContext,
    tokenizer: TokenizerResource,
    token_cache: TokenCacheResource,
    compute: ComputeResource,
    dataset: DatasetResource,
    source: SourceTree,
    io_manager: dg.ResourceParam[ParquetIOManager],
) -> dg.Output:
    """Per expanded row: section_id, copy, input_ids (list<int32>, cut to max_seq_len), n_tokens, truncated;
    each distinct text the seed needs (also for its validation set) is tokenized once, ever, per tokenizer."""
    seed = parse_seed_or_fail(context)
    loaded = tokenizer.load()
    store = token_cache.store(context.instance)
    inputs = input_fingerprints(io_manager, context, INPUTS)
    val_fraction, split_seed = checked_split_settings(dataset)
    key = step_key(context, inputs, token_settings(loaded, val_fraction, split_seed))
    same = unchanged_output(
        context,
        key,
        inputs,
        [stored_output_path(context, io_manager)],
        source,
        what_this_run_did=_nothing_tokenized(store),
        # the store it read is as it was: the texts it holds are there for the dataset
        still={TOKEN_STORE_MARK: store.namespace_mark(loaded.cache_namespace)},
    )
    if same:
        return same
    raw_corpus, expanded_corpus, weights_map = read_inputs(io_manager, context)
    progress = ProgressLog(context, "texts tokenized")
    compute_stats = RunStats()
    validation_rows, candidate_rows = None, None
    if not loaded.add_special_tokens:  # the dataset reads ids without specials: only then is it the same namespace
        weights = composed_row_weights(raw_corpus.read(["path", "tags"]), weights_map)
        candidate_rows = np.flatnonzero(weights > 0.0) if val_fraction else np.zeros(0, np.int64)
        validation_rows = functools.partial(
            held_out_among, weights=weights, split_seed=split_seed, val_fraction=val_fraction
        )
    with (
        writes_into(store.root, settings.ENV_CACHE_DIR),
        compute.writer(context, store, loaded, compute_stats) as write_elsewhere,
    ):
        result = tokenized_rows(
            store,
            loaded,
            raw_corpus,
            expanded_corpus["section_id"],
            expanded_corpus["copy"],
            progress,
            write_elsewhere,
            validation_rows,
            candidate_rows,
        )
    lookup, tokenized = result.lookup, result.tokenized
    mark = store.namespace_mark(loaded.cache_namespace)  # the store as read, with every text the seed needs
    unique_texts = lookup.hits + lookup.misses
    stats = store.stats()
    context.log.info(
        f"{unique_texts:,} distinct texts needed: {lookup.hits:,} from the store, {lookup.misses:,} tokenized "
        f"({lookup.shard_bytes_read:,} shard bytes read)"
    )
    if lookup.repaired:
        context.log.warning(
            f"token store: {len(lookup.repaired)} corrupt shard(s) deleted and re-tokenized: {lookup.repaired[:5]}"
        )
    if lookup.ignored:
        context.log.warning(f"token store: {len(lookup.ignored)} foreign entr(y/ies) left alone: {lookup.ignored[:5]}")

    def written_metadata() -> dict:
        """What is known once the rows (their ids read back from the store) were written."""
        n_tokens = np.concatenate(result.n_tokens) if result.n_tokens else np.zeros(0, np.int32)
        return {
            "tokens_total": dg.MetadataValue.int(int(n_tokens.sum())),
            "truncated_rows": dg.MetadataValue.int(result.truncated),
            "sequence_lengths": table_metadata(length_histogram(n_tokens, loaded.max_seq_len)),
        }

    return streamed_output(
        result.rows,
        seed,
        inputs,
        {
            **config_lineage(context),
            **computed_metadata(context, key),
            TOKEN_STORE_MARK: dg.MetadataValue.text(mark),
            "unique_sections": dg.MetadataValue.int(result.unique_sections),
            "unique_texts": dg.MetadataValue.int(unique_texts),
            "cache_hits": dg.MetadataValue.int(lookup.hits),
            "cache_misses": dg.MetadataValue.int(lookup.misses),
            "tokenized_by_reason": dg.MetadataValue.json(_counts(tokenized["reason"])),
            "tokenized_by_need": dg.MetadataValue.json(_counts(tokenized["needed_for"])),
            "tokenized_sections": table_metadata(tokenized, TOKENIZED_LISTED),
            "shard_bytes_read": dg.MetadataValue.int(lookup.shard_bytes_read),
            "hit_rate": dg.MetadataValue.float(lookup.hits / unique_texts if unique_texts else 1.0),
            "cache_repaired_shards": dg.MetadataValue.int(len(lookup.repaired)),
            "cache_ignored_entries": dg.MetadataValue.int(len(lookup.ignored)),
            "cache_bytes": dg.MetadataValue.int(stats["bytes"]),
            "tokens_per_second": dg.MetadataValue.float(
                lookup.encoded_tokens / lookup.encode_seconds if lookup.encode_seconds else 0.0
            ),
            "tokenize_seconds": dg.MetadataValue.float(lookup.encode_seconds),
            "tokenizer_fingerprint": dg.MetadataValue.text(loaded.fingerprint),
            "tokenizer_source": dg.MetadataValue.text(loaded.source),
            "max_seq_len": dg.MetadataValue.int(loaded.max_seq_len),
            "cache_namespace": dg.MetadataValue.text(loaded.cache_namespace),
            "tokenizer_truncation_disabled": dg.MetadataValue.bool(loaded.truncation_disabled),
            "tokenizer_padding_disabled": dg.MetadataValue.bool(loaded.padding_disabled),
            "compute": dg.MetadataValue.text(compute.backend),
            **(ComputeResource.metadata(compute_stats) if compute_stats.tasks else {}),
        },
        written_metadata,
    )
