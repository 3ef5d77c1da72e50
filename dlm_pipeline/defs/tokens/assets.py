"""Tokenized cache: per seed, token ids for every expanded row, gathered from a store shared by all seeds.

The store is keyed by content (the sha256 of each text) and keeps full ids; each distinct text of
the rows this seed keeps is looked up once, and `max_seq_len` is applied here, when reading. A
weights edit, a new seed, a renamed or copied file or a new `max_seq_len` tokenizes nothing.
"""

import dagster as dg
import pyarrow as pa
import pyarrow.compute as pc

from dlm_pipeline.core.compute import RunStats
from dlm_pipeline.core.token_store import tokenized_rows
from dlm_pipeline.core.tokenize import length_histogram
from dlm_pipeline.defs.compute import ComputeResource
from dlm_pipeline.defs.metadata import (
    ProgressLog,
    config_lineage,
    input_fingerprints,
    table_metadata,
    versioned_output,
)
from dlm_pipeline.defs.partitions import parse_seed_or_fail, seeds_partitions
from dlm_pipeline.defs.resources import TokenCacheResource, TokenizerResource

GROUP = "tokens"

# Only the row identity is needed from the (large, text-carrying) expanded corpus.
EXPANDED_KEYS = dg.AssetIn("expanded_corpus", metadata={"columns": ["section_id", "copy"]})


@dg.asset(
    partitions_def=seeds_partitions,
    group_name=GROUP,
    kinds={"python", "parquet"},
    code_version="1",
    ins={"expanded_corpus": EXPANDED_KEYS},
)
def tokenized_cache(
    context: dg.AssetExecutionContext,
    tokenizer: TokenizerResource,
    token_cache: TokenCacheResource,
    compute: ComputeResource,
    raw_corpus: pa.Table,
    expanded_corpus: pa.Table,
) -> dg.Output:
    """Per expanded row: section_id, copy, input_ids (list<int32>, cut to max_seq_len), n_tokens, truncated;
    each distinct text is tokenized once, ever, per tokenizer."""
    seed = parse_seed_or_fail(context)
    loaded = tokenizer.load()
    store = token_cache.store(context.instance)
    progress = ProgressLog(context, "texts tokenized")
    compute_stats = RunStats()
    with compute.writer(context, store, loaded, compute_stats) as write_elsewhere:
        table, lookup = tokenized_rows(
            store, loaded, raw_corpus, expanded_corpus["section_id"], expanded_corpus["copy"], progress, write_elsewhere
        )
    n_tokens = table["n_tokens"].to_numpy(zero_copy_only=False)
    tokens_total = int(n_tokens.sum())
    unique_texts = lookup.hits + lookup.misses
    stats = store.stats()
    context.log.info(f"{unique_texts:,} distinct texts: {lookup.hits:,} from the store, {lookup.misses:,} tokenized")
    if lookup.repaired:
        context.log.warning(
            f"token store: {len(lookup.repaired)} corrupt shard(s) deleted and re-tokenized: {lookup.repaired[:5]}"
        )
    if lookup.ignored:
        context.log.warning(f"token store: {len(lookup.ignored)} foreign entr(y/ies) left alone: {lookup.ignored[:5]}")
    return versioned_output(
        table,
        seed,
        input_fingerprints(context, raw_corpus=raw_corpus, expanded_corpus=expanded_corpus),
        {
            **config_lineage(context),
            "tokens_total": dg.MetadataValue.int(tokens_total),
            "unique_sections": dg.MetadataValue.int(len(pc.unique(table["section_id"]))),
            "unique_texts": dg.MetadataValue.int(unique_texts),
            "cache_hits": dg.MetadataValue.int(lookup.hits),
            "cache_misses": dg.MetadataValue.int(lookup.misses),
            "hit_rate": dg.MetadataValue.float(lookup.hits / unique_texts if unique_texts else 1.0),
            "cache_repaired_shards": dg.MetadataValue.int(len(lookup.repaired)),
            "cache_ignored_entries": dg.MetadataValue.int(len(lookup.ignored)),
            "truncated_rows": dg.MetadataValue.int(int(pc.sum(table["truncated"]).as_py() or 0)),
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
            "sequence_lengths": table_metadata(length_histogram(n_tokens, loaded.max_seq_len)),
            "compute": dg.MetadataValue.text(compute.backend),
            **(ComputeResource.metadata(compute_stats) if compute_stats.tasks else {}),
        },
    )
