"""The token check, per seed: a sample of stored token rows equals a fresh encode with the live tokenizer.

The sample is bounded by the text it re-tokenizes (CHECK_SAMPLE_BYTES), not only by rows: a few
large files would otherwise make the check cost as much as the asset. Only the sampled texts are
turned into Python strings.
"""

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dlm_pipeline.core.tokenize import mismatched_sections
from dlm_pipeline.defs.checked_output import stored_rows
from dlm_pipeline.defs.constants import TOKENS_MATCH_TOKENIZER
from dlm_pipeline.defs.partitions import seed_check
from dlm_pipeline.defs.resources import ParquetIOManager, SourceTree, TokenizerResource
from dlm_pipeline.defs.reuse import unchanged_check_results
from dlm_pipeline.defs.tokens.assets import tokenized_cache

CHECK_SAMPLE = 64  # sections at most
CHECK_SAMPLE_BYTES = 64 * 1024  # text bytes re-tokenized at most; the first sampled section always is


def bounded_sample(section_ids: pa.ChunkedArray, raw_ids: pa.ChunkedArray, text_bytes: pa.ChunkedArray) -> list[str]:
    """The smallest distinct section_ids of the stored rows, in order, while their texts fit the byte
    budget (ones that do not fit are passed over), at most CHECK_SAMPLE: deterministic, and the
    smallest id is always checked."""
    sizes = dict(zip(raw_ids.to_pylist(), text_bytes.to_pylist(), strict=True))
    chosen, used = [], 0
    for section in sorted(pc.unique(section_ids).to_pylist()):
        size = sizes.get(section) or 0
        if chosen and used + size > CHECK_SAMPLE_BYTES:
            continue
        chosen.append(section)
        used += size
        if len(chosen) == CHECK_SAMPLE:
            break
    return chosen


@seed_check(
    asset=tokenized_cache,
    name=TOKENS_MATCH_TOKENIZER,
    additional_deps=["raw_corpus"],
    description="A sample of cached token rows (at most 64 sections and 64 KiB of text), re-tokenized with the "
    "live tokenizer, equals what is stored.",
)
def tokens_match_tokenizer(
    context: dg.AssetCheckExecutionContext,
    io_manager: dg.ResourceParam[ParquetIOManager],
    tokenizer: TokenizerResource,
    source: SourceTree,
) -> dg.AssetCheckResult:
    same = unchanged_check_results(context, "tokenized_cache", [TOKENS_MATCH_TOKENIZER], source)
    if same is not None:
        return same[0]
    loaded = tokenizer.load()
    stored = stored_rows(io_manager, context, "tokenized_cache", ["section_id", "input_ids", "truncated"])
    stored_ids = stored.read(["section_id"])["section_id"]
    raw_corpus = stored_rows(io_manager, context, "raw_corpus", ["section_id", "text"])
    raw_ids, text_bytes = [], []
    for batch in raw_corpus.batches(["section_id", "text"]):  # texts one stored batch at a time
        raw_ids.append(batch["section_id"])
        text_bytes.append(pc.binary_length(batch["text"]))
    raw_ids = pa.chunked_array([c for ids in raw_ids for c in ids.chunks], pa.string())
    sample = bounded_sample(stored_ids, raw_ids, pa.chunked_array(text_bytes, pa.int32()))
    wanted = pa.array(sample, pa.string())
    sampled_raw = raw_corpus.take(np.flatnonzero(pc.is_in(raw_ids, wanted)), ["section_id", "text"])
    texts = dict(zip(sampled_raw["section_id"].to_pylist(), sampled_raw["text"].to_pylist(), strict=True))
    rows = stored.take(np.flatnonzero(pc.is_in(stored_ids, wanted)), ["section_id", "input_ids", "truncated"])
    sampled, bad = mismatched_sections(loaded, rows, texts, CHECK_SAMPLE)
    return dg.AssetCheckResult(
        passed=not bad,
        description=None
        if not bad
        else f"{len(bad)} sampled section(s) differ from the live tokenizer: {', '.join(bad[:10])}",
        metadata={
            "sampled": sampled,
            "sampled_text_bytes": sum(len(t.encode()) for t in texts.values()),
            "sample_budget_bytes": CHECK_SAMPLE_BYTES,
            "sections_stored": len(pc.unique(stored_ids)),
            "mismatched": len(bad),
            "mismatched_section_ids": dg.MetadataValue.json(bad[:100]),
            "tokenizer_fingerprint": loaded.fingerprint,
        },
    )
