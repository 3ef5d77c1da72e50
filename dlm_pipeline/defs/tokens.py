"""Tokenized cache: per seed, token ids for every expanded row, gathered from a store shared by all seeds.

Every section of the raw corpus is looked up (not only those this seed keeps), and only
sections the store lacks are tokenized: adding a seed or editing weights tokenizes nothing.
"""

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dlm_pipeline.core.arrow_maps import one_chunk, representative_rows
from dlm_pipeline.core.token_store import gather_rows
from dlm_pipeline.core.tokenize import mismatched_sections
from dlm_pipeline.defs.constants import TOKENS_MATCH_TOKENIZER
from dlm_pipeline.defs.metadata import ProgressLog, config_lineage, input_fingerprints, table_metadata, versioned_output
from dlm_pipeline.defs.partitions import parse_seed_or_fail, seed_check, seeds_partitions
from dlm_pipeline.defs.resources import TokenCacheResource, TokenizerResource

GROUP = "tokens"
CHECK_SAMPLE = 64
LENGTH_BUCKETS = (0, 16, 64, 256, 1024, 4096, 16384)


def unique_sections(corpus: pa.Table) -> tuple[list[str], list[str]]:
    """Each section_id once, with its text (rows sharing a section_id share their text)."""
    ids = one_chunk(corpus["section_id"])
    encoded = pc.dictionary_encode(ids)
    rows = representative_rows(encoded.indices.to_numpy(zero_copy_only=False), len(encoded.dictionary))
    take = pa.array(rows, pa.int64())
    return encoded.dictionary.to_pylist(), corpus["text"].take(take).to_pylist()


def length_histogram(n_tokens: np.ndarray, max_seq_len: int) -> pa.Table:
    edges = [b for b in LENGTH_BUCKETS if b < max_seq_len] + [max_seq_len, max_seq_len + 1]
    counts, _ = np.histogram(n_tokens, bins=edges)
    labels = [f"{lo}-{hi - 1}" for lo, hi in zip(edges[:-2], edges[1:-1])] + [f"{max_seq_len} (full)"]
    return pa.table({"tokens": labels, "rows": counts.astype(np.int64)})


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
    raw_corpus: pa.Table,
    expanded_corpus: pa.Table,
) -> dg.Output:
    """Per expanded row: section_id, copy, input_ids (list<int32>), n_tokens, truncated; tokenized once per unique section."""
    seed = parse_seed_or_fail(context)
    loaded = tokenizer.load()
    store = token_cache.store(context.instance)
    ids, texts = unique_sections(raw_corpus)
    progress = ProgressLog(context, "sections tokenized")
    lookup = store.get_or_compute(loaded.cache_namespace, ids, texts, lambda t: loaded.encode(t, progress))
    table = gather_rows(lookup.table, expanded_corpus["section_id"], expanded_corpus["copy"])
    n_tokens = table["n_tokens"].to_numpy(zero_copy_only=False)
    tokens_total = int(n_tokens.sum())
    stats = store.stats()
    context.log.info(f"{len(ids):,} unique sections: {lookup.hits:,} from the store, {lookup.misses:,} tokenized")
    return versioned_output(
        table,
        seed,
        input_fingerprints(context, raw_corpus=raw_corpus, expanded_corpus=expanded_corpus),
        {
            **config_lineage(context),
            "tokens_total": dg.MetadataValue.int(tokens_total),
            "unique_sections": dg.MetadataValue.int(len(ids)),
            "cache_hits": dg.MetadataValue.int(lookup.hits),
            "cache_misses": dg.MetadataValue.int(lookup.misses),
            "hit_rate": dg.MetadataValue.float(lookup.hits / len(ids) if ids else 1.0),
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
            "sequence_lengths": table_metadata(length_histogram(n_tokens, loaded.max_seq_len)),
        },
    )


@seed_check(
    asset=tokenized_cache,
    name=TOKENS_MATCH_TOKENIZER,
    additional_ins={"raw_corpus": dg.AssetIn("raw_corpus", metadata={"columns": ["section_id", "text"]})},
    description="A sample of cached token rows, re-tokenized with the live tokenizer, equals what is stored.",
)
def tokens_match_tokenizer(
    context: dg.AssetCheckExecutionContext,
    tokenizer: TokenizerResource,
    tokenized_cache: pa.Table,
    raw_corpus: pa.Table,
) -> dg.AssetCheckResult:
    loaded = tokenizer.load()
    texts = dict(zip(raw_corpus["section_id"].to_pylist(), raw_corpus["text"].to_pylist()))
    sampled, bad = mismatched_sections(loaded, tokenized_cache, texts, CHECK_SAMPLE)
    return dg.AssetCheckResult(
        passed=not bad,
        description=None if not bad else f"{len(bad)} sampled section(s) differ from the live tokenizer: {', '.join(bad[:10])}",
        metadata={
            "sampled": sampled,
            "mismatched": len(bad),
            "mismatched_section_ids": dg.MetadataValue.json(bad[:100]),
            "tokenizer_fingerprint": loaded.fingerprint,
        },
    )
