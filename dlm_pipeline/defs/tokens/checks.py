"""The token check, per seed: a sample of stored token rows equals a fresh encode with the live tokenizer."""

import dagster as dg
import pyarrow as pa

from dlm_pipeline.core.tokenize import mismatched_sections
from dlm_pipeline.defs.constants import TOKENS_MATCH_TOKENIZER
from dlm_pipeline.defs.partitions import seed_check
from dlm_pipeline.defs.resources import TokenizerResource
from dlm_pipeline.defs.tokens.assets import tokenized_cache

CHECK_SAMPLE = 64


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
    texts = dict(zip(raw_corpus["section_id"].to_pylist(), raw_corpus["text"].to_pylist(), strict=False))
    sampled, bad = mismatched_sections(loaded, tokenized_cache, texts, CHECK_SAMPLE)
    return dg.AssetCheckResult(
        passed=not bad,
        description=None
        if not bad
        else f"{len(bad)} sampled section(s) differ from the live tokenizer: {', '.join(bad[:10])}",
        metadata={
            "sampled": sampled,
            "mismatched": len(bad),
            "mismatched_section_ids": dg.MetadataValue.json(bad[:100]),
            "tokenizer_fingerprint": loaded.fingerprint,
        },
    )
