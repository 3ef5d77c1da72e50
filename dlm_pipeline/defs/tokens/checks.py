"""The token check, per seed: a sample of stored token rows equals a fresh encode with the live tokenizer.

The sample is seeded by the partition seed (so seeds cover different sections) and bounded by the
text it re-tokenizes (CHECK_SAMPLE_BYTES), not only by rows: a few large files would otherwise make
the check cost as much as the asset. Each stored file is read once, a row group at a time: the sample
order needs only the section ids; the texts of the first CHECK_CANDIDATES sections in that order
are kept from the one pass over `raw_corpus` (only theirs become Python strings), and the stored
rows of the chosen sections from the one pass over `tokenized_cache`.
"""

import dagster as dg
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dlm_pipeline.core.parquet_io import ParquetRows
from dlm_pipeline.core.tokenize import mismatched_sections
from dlm_pipeline.defs.checked_output import stored_rows
from dlm_pipeline.defs.constants import TOKENS_MATCH_TOKENIZER
from dlm_pipeline.defs.partitions import parse_seed_or_fail, seed_check
from dlm_pipeline.defs.resources import ParquetIOManager, SourceTree, TokenizerResource
from dlm_pipeline.defs.reuse import unchanged_check_results
from dlm_pipeline.defs.tokens.assets import tokenized_cache

# Sections at most. A fault in a share p of the sections is missed with probability (1 - p)**n for
# n sampled: with 64, under 4% for p = 5%; a changed tokenizer (most texts differ) is always caught.
CHECK_SAMPLE = 64
CHECK_SAMPLE_BYTES = 64 * 1024  # text bytes re-tokenized at most; the first sampled section always is
CHECK_CANDIDATES = 4 * CHECK_SAMPLE  # sections in sample order whose texts are considered for the budget


def sample_order(section_ids: pa.ChunkedArray, seed: int) -> list[str]:
    """The first CHECK_CANDIDATES distinct section_ids in the check's seeded order (numpy's PCG64
    seeded with the partition seed, over the distinct ids in stored order): deterministic per seed."""
    distinct = pc.unique(section_ids)
    picked = np.random.default_rng(seed).permutation(len(distinct))[:CHECK_CANDIDATES]
    return distinct.take(pa.array(picked, pa.int64())).to_pylist()


def candidate_texts(raw: ParquetRows, candidates: list[str]) -> tuple[dict[str, int], dict[str, str]]:
    """(text bytes, text) of the candidates `raw_corpus` holds, from one pass over it; a text longer
    than the budget is kept only for the first candidate (the one always checked)."""
    wanted = pa.array(candidates, pa.string())
    sizes, texts = {}, {}
    for batch in raw.batches(["section_id", "text"]):
        rows = pa.array(np.flatnonzero(pc.is_in(batch["section_id"], wanted)), pa.int64())
        found = batch.take(rows)
        for section, size in zip(
            found["section_id"].to_pylist(), pc.binary_length(found["text"]).to_pylist(), strict=True
        ):
            sizes[section] = size
        keep = pc.or_(
            pc.less_equal(pc.binary_length(found["text"]), CHECK_SAMPLE_BYTES),
            pc.equal(found["section_id"], candidates[0]),
        )
        kept = found.filter(keep)
        texts.update(zip(kept["section_id"].to_pylist(), kept["text"].to_pylist(), strict=True))
    return sizes, texts


def bounded_sample(candidates: list[str], sizes: dict[str, int]) -> list[str]:
    """The candidates, in order, while their texts fit the byte budget (ones that do not fit are
    passed over), at most CHECK_SAMPLE; the first is always chosen. A section without a text costs
    nothing and is chosen (it is reported as mismatched)."""
    chosen, used = [], 0
    for section in candidates:
        size = sizes.get(section) or 0
        if chosen and used + size > CHECK_SAMPLE_BYTES:
            continue
        chosen.append(section)
        used += size
        if len(chosen) == CHECK_SAMPLE:
            break
    return chosen


def rows_of(stored: ParquetRows, sections: list[str]) -> pa.Table:
    """The stored rows of `sections`, in stored order, from one pass over the file."""
    wanted = pa.array(sections, pa.string())
    parts = [
        batch.filter(pc.is_in(batch["section_id"], wanted))
        for batch in stored.batches(["section_id", "input_ids", "truncated"])
    ]
    return (
        pa.concat_tables(parts)
        if parts
        else stored.schema.empty_table().select(["section_id", "input_ids", "truncated"])
    )


@seed_check(
    asset=tokenized_cache,
    name=TOKENS_MATCH_TOKENIZER,
    additional_deps=["raw_corpus"],
    description="A seeded sample of cached token rows (at most 64 sections and 64 KiB of text), re-tokenized with "
    "the live tokenizer, equals what is stored.",
)
def tokens_match_tokenizer(
    context: dg.AssetCheckExecutionContext,
    io_manager: dg.ResourceParam[ParquetIOManager],
    tokenizer: TokenizerResource,
    source: SourceTree,
) -> dg.AssetCheckResult:
    seed = parse_seed_or_fail(context)  # first: a hostile partition key names no file to read
    same = unchanged_check_results(context, "tokenized_cache", [TOKENS_MATCH_TOKENIZER], source)
    if same is not None:
        return same[0]
    loaded = tokenizer.load()
    stored = stored_rows(io_manager, context, "tokenized_cache", ["section_id", "input_ids", "truncated"])
    stored_ids = stored.read(["section_id"])["section_id"]
    raw_corpus = stored_rows(io_manager, context, "raw_corpus", ["section_id", "text"])
    candidates = sample_order(stored_ids, seed)
    sizes, texts = candidate_texts(raw_corpus, candidates) if candidates else ({}, {})
    sample = bounded_sample(candidates, sizes)
    texts = {section: texts[section] for section in sample if section in texts}
    sampled, bad = mismatched_sections(loaded, rows_of(stored, sample), texts, CHECK_SAMPLE)
    return dg.AssetCheckResult(
        passed=not bad,
        description=None
        if not bad
        else f"{len(bad)} sampled section(s) differ from the live tokenizer: {', '.join(bad[:10])}",
        metadata={
            "sampled": sampled,
            "sampled_text_bytes": sum(sizes[section] for section in texts),
            "sample_budget_bytes": CHECK_SAMPLE_BYTES,
            "sample_seed": seed,
            "sections_stored": len(pc.unique(stored_ids)),
            "mismatched": len(bad),
            "mismatched_section_ids": dg.MetadataValue.json(bad[:100]),
            "tokenizer_fingerprint": loaded.fingerprint,
        },
    )
