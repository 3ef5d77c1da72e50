"""Checks on the expanded corpus, per seed: it is reproducible, and it honours the weights."""

import dagster as dg
import numpy as np
import pyarrow as pa

from dlm_pipeline.core.arrow_utils import first_difference
from dlm_pipeline.core.config_records import anchors_from_table
from dlm_pipeline.core.expansion import (
    EXPANSION_EXACT,
    apply_plan,
    composed_row_weights,
    expand_corpus,
    plain_plan,
    realized_copies,
    table_mode,
    verify_weights,
)
from dlm_pipeline.core.fingerprint import table_fingerprint
from dlm_pipeline.core.weights import unmatched_weights
from dlm_pipeline.defs.constants import (
    EXPANSION_DETERMINISTIC,
    EXPANSION_MATCHES_WEIGHTS,
)
from dlm_pipeline.defs.corpus.assets import expanded_corpus
from dlm_pipeline.defs.metadata import table_metadata, text_block
from dlm_pipeline.defs.partitions import parse_seed_or_fail, seed_check
from dlm_pipeline.defs.resources import SourceTree

# Up to this many raw rows the determinism check recomputes with the plain row-by-row
# implementation (independent of the vectorised one); above it, with the vectorised one.
PLAIN_RECOMPUTE_MAX_ROWS = 200_000
WEIGHTS_MAP = dg.AssetIn("weights_map")
# The weights check needs no text: load only what identifies and tags a row.
RAW_WITHOUT_TEXT = dg.AssetIn("raw_corpus", metadata={"columns": ["section_id", "path", "tags"]})


def _recorded(context, limit: int = 2) -> list[dict]:
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=expanded_corpus.key, asset_partitions=[context.partition_key]), limit=limit
    ).records
    return [{k: v.value for k, v in r.asset_materialization.metadata.items()} for r in records]


@seed_check(
    asset=expanded_corpus,
    name=EXPANSION_DETERMINISTIC,
    additional_ins={"raw_corpus": dg.AssetIn("raw_corpus"), "weights_map": WEIGHTS_MAP},
    description="Recomputing the expansion from the stored raw corpus and weights gives the stored rows; "
    "an earlier materialization from the same inputs has the same fingerprint.",
)
def expansion_deterministic(
    context: dg.AssetCheckExecutionContext,
    source: SourceTree,
    expanded_corpus: pa.Table,
    raw_corpus: pa.Table,
    weights_map: pa.Table,
) -> dg.AssetCheckResult:
    seed = parse_seed_or_fail(context)
    mode = table_mode(expanded_corpus)  # the rule that made the stored rows, recorded with them
    if raw_corpus.num_rows <= PLAIN_RECOMPUTE_MAX_ROWS:
        recomputed, method = (
            apply_plan(raw_corpus, plain_plan(raw_corpus, weights_map, seed, mode)),
            "row by row (hashlib)",
        )
    else:
        recomputed, _ = expand_corpus(raw_corpus, weights_map, seed, mode, source.max_expanded_bytes)
        method = "vectorised"
    stored_fp, recomputed_fp = table_fingerprint(expanded_corpus), table_fingerprint(recomputed)
    recorded = _recorded(context)
    metadata = {
        "method": method,
        "expansion_mode": mode,
        "stored_fingerprint": stored_fp,
        "recomputed_fingerprint": recomputed_fp,
        "rows_stored": expanded_corpus.num_rows,
        "rows_recomputed": recomputed.num_rows,
    }
    problems = []
    if stored_fp != recomputed_fp:
        first = first_difference(expanded_corpus, recomputed)
        metadata["first_differing_row"] = -1 if first is None else first
        problems.append(f"stored rows differ from a recomputation (first difference at row {first})")
    if recorded and recorded[0].get("fingerprint") not in (None, stored_fp):
        problems.append("the stored file does not match the fingerprint recorded at materialization")
        metadata["recorded_fingerprint"] = recorded[0]["fingerprint"]
    if len(recorded) == 2 and recorded[0].get("input_fingerprints") == recorded[1].get("input_fingerprints"):
        metadata["previous_fingerprint"] = recorded[1].get("fingerprint")
        if recorded[1].get("fingerprint") != recorded[0].get("fingerprint"):
            problems.append("the previous materialization from the same inputs has another fingerprint")
    return dg.AssetCheckResult(passed=not problems, description="; ".join(problems) or None, metadata=metadata)


def _unmatched(training_configs: pa.Table) -> list[str]:
    try:
        return unmatched_weights(anchors_from_table(training_configs))
    except ValueError:  # configs invalid now: configs_valid reports them
        return []


@seed_check(
    asset=expanded_corpus,
    name=EXPANSION_MATCHES_WEIGHTS,
    additional_ins={
        "raw_corpus": RAW_WITHOUT_TEXT,
        "weights_map": WEIGHTS_MAP,
        "training_configs": dg.AssetIn("training_configs"),
    },
    description="Per row, copies are int(weight) or int(weight)+1; per tag, realized copies stay within "
    "4 standard deviations (+1) of the expected sum of weights; in exact mode each weight group holds "
    "exactly floor(n*f + 0.5) extra copies. Weights that no metadata can match are reported.",
)
def expansion_matches_weights(
    context: dg.AssetCheckExecutionContext,
    expanded_corpus: pa.Table,
    raw_corpus: pa.Table,
    weights_map: pa.Table,
    training_configs: pa.Table,
) -> dg.AssetCheckResult:
    mode = table_mode(expanded_corpus)
    weights = composed_row_weights(raw_corpus, weights_map)
    copies = realized_copies(raw_corpus["section_id"], expanded_corpus["section_id"])
    verdict = verify_weights(raw_corpus["tags"], weights, copies, mode)
    stored_weights = expanded_corpus["weight"].to_numpy(zero_copy_only=False)
    expected_weights = np.repeat(weights, copies)
    weight_mismatches = (
        int(np.count_nonzero(stored_weights != expected_weights))
        if len(stored_weights) == len(expected_weights)
        else expanded_corpus.num_rows
    )
    unmatched = _unmatched(training_configs)
    problems = []
    if verdict.rows_out_of_range:
        paths = raw_corpus["path"].take(pa.array(verdict.rows_out_of_range[:10])).to_pylist()
        problems.append(f"{len(verdict.rows_out_of_range)} row(s) with copies outside int(w)..int(w)+1, e.g. {paths}")
    if verdict.tags_out_of_bounds.num_rows:
        problems.append(f"{verdict.tags_out_of_bounds.num_rows} tag value(s) outside the binomial bound")
    if verdict.groups_off_quota.num_rows:
        problems.append(
            f"{verdict.groups_off_quota.num_rows} weight group(s) without exactly floor(n*f + 0.5) extra copies (exact mode)"
        )
    if weight_mismatches:
        problems.append(f"{weight_mismatches} row(s) whose stored weight differs from the composed weight")
    warning = f"warning: {len(unmatched)} weight(s) that no metadata sets can never apply" if unmatched else None
    metadata = {
        "expansion_mode": mode,
        "rows_out_of_range": len(verdict.rows_out_of_range),
        "tags_out_of_bounds": verdict.tags_out_of_bounds.num_rows,
        "weight_mismatches": weight_mismatches,
        "per_tag": table_metadata(
            verdict.stats.select(["tag_key", "tag_value", "rows", "expected", "realized", "deviation", "bound"])
        ),
        "unmatched_weights": len(unmatched),
        "unmatched_weight_list": text_block(unmatched),
    }
    if mode == EXPANSION_EXACT:
        metadata["groups_off_quota"] = verdict.groups_off_quota.num_rows
        metadata["exact_groups_off_quota"] = table_metadata(verdict.groups_off_quota)
    return dg.AssetCheckResult(
        passed=not problems,
        description="; ".join(problems + ([warning] if warning else [])) or None,
        metadata=metadata,
    )
