"""Checks on the expanded corpus, per seed: it is reproducible, and it honours the weights.

Both run in one step (`expanded_corpus_checks`): Dagster's cost per step (events, input loads) was
most of what each check cost. The step loads no `text` column: the expansion decides copies per
row, so the checks recompute those decisions independently and compare them with the stored row
identities (`section_id`, `copy`) and weights. Either check can still be run alone.
"""

import dagster as dg
import numpy as np
import pyarrow as pa

from dlm_pipeline.core.arrow_utils import first_difference
from dlm_pipeline.core.config_records import anchors_from_table
from dlm_pipeline.core.expansion import (
    EXPANSION_EXACT,
    ExpansionPlan,
    plain_plan,
    plan_corpus,
    realized_copies,
    table_mode,
    verify_weights,
)
from dlm_pipeline.core.fingerprint import table_fingerprint
from dlm_pipeline.core.weights import unmatched_weights
from dlm_pipeline.defs.checked_output import stored_columns
from dlm_pipeline.defs.constants import EXPANSION_DETERMINISTIC, EXPANSION_MATCHES_WEIGHTS
from dlm_pipeline.defs.corpus.assets import expanded_corpus
from dlm_pipeline.defs.metadata import table_metadata, text_block
from dlm_pipeline.defs.partitions import parse_seed_or_fail, seed_check_spec
from dlm_pipeline.defs.resources import ParquetIOManager, SourceTree
from dlm_pipeline.defs.reuse import REUSE_KEY, unchanged_check_results

# Up to this many raw rows the recomputation uses the plain row-by-row implementation (independent
# of the vectorised one the asset uses); above it, the vectorised one.
PLAIN_RECOMPUTE_MAX_ROWS = 200_000
# What the checks read: the row identity and weight, never the text.
EXPANDED_COLUMNS = ["section_id", "copy", "weight"]
RAW_COLUMNS = ["section_id", "path", "tags"]
INPUTS = ["raw_corpus", "weights_map", "training_configs"]

DETERMINISTIC_SPEC = seed_check_spec(
    EXPANSION_DETERMINISTIC,
    asset=expanded_corpus,
    additional_deps=INPUTS,
    description="Recomputing the copy decisions from the stored raw corpus and weights gives the stored rows "
    "(section_id, copy, weight, in order); an earlier materialization from the same inputs, settings and code has "
    "the same fingerprint.",
)
WEIGHTS_SPEC = seed_check_spec(
    EXPANSION_MATCHES_WEIGHTS,
    asset=expanded_corpus,
    additional_deps=INPUTS,
    description="Per row, copies are int(weight) or int(weight)+1; per tag, realized copies stay within "
    "4 standard deviations (+1) of the expected sum of weights; in exact mode each weight group holds "
    "exactly floor(n*f + 0.5) extra copies. Weights that no metadata can match are reported.",
)


def _recorded(context, limit: int = 2) -> list[dict]:
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=expanded_corpus.key, asset_partitions=[context.partition_key]), limit=limit
    ).records
    return [{k: v.value for k, v in r.asset_materialization.metadata.items()} for r in records]


def _rows(plan: ExpansionPlan, section_ids: pa.ChunkedArray) -> pa.Table:
    """The row identities and weights a plan gives, in the stored column order."""
    return pa.table(
        {
            "section_id": section_ids.take(pa.array(plan.source_rows)),
            "copy": pa.array(plan.copy_index, pa.int32()),
            "weight": pa.array(plan.weights[plan.source_rows], pa.float64()),
        }
    )


def deterministic_result(
    context, stored: pa.Table, recomputed: pa.Table, method: str, mode: str
) -> dg.AssetCheckResult:
    stored = stored.select(EXPANDED_COLUMNS)
    stored_fp, recomputed_fp = table_fingerprint(stored), table_fingerprint(recomputed)
    metadata = {
        "method": method,
        "expansion_mode": mode,
        "compared_columns": ", ".join(EXPANDED_COLUMNS),
        "stored_rows_fingerprint": stored_fp,
        "recomputed_rows_fingerprint": recomputed_fp,
        "rows_stored": stored.num_rows,
        "rows_recomputed": recomputed.num_rows,
    }
    problems = []
    if stored_fp != recomputed_fp:
        first = first_difference(stored, recomputed)
        metadata["first_differing_row"] = -1 if first is None else first
        problems.append(f"stored rows differ from a recomputation (first difference at row {first})")
    recorded = _recorded(context)
    # The same work: the same inputs, settings (the mode) and code (defs/reuse.py's key), not only the same inputs.
    if len(recorded) == 2 and recorded[0].get(REUSE_KEY) == recorded[1].get(REUSE_KEY) is not None:
        metadata["previous_fingerprint"] = recorded[1].get("fingerprint")
        if recorded[1].get("fingerprint") != recorded[0].get("fingerprint"):
            problems.append(
                "the previous materialization from the same inputs, settings and code has another fingerprint"
            )
    return dg.AssetCheckResult(
        check_name=EXPANSION_DETERMINISTIC,
        passed=not problems,
        description="; ".join(problems) or None,
        metadata=metadata,
    )


def _unmatched(training_configs: pa.Table) -> list[str]:
    try:
        return unmatched_weights(anchors_from_table(training_configs))
    except ValueError:  # configs invalid now: configs_valid reports them
        return []


def weights_result(
    stored: pa.Table, raw: pa.Table, weights: np.ndarray, mode: str, training_configs: pa.Table
) -> dg.AssetCheckResult:
    copies = realized_copies(raw["section_id"], stored["section_id"])
    verdict = verify_weights(raw["tags"], weights, copies, mode)
    stored_weights = stored["weight"].to_numpy(zero_copy_only=False)
    expected_weights = np.repeat(weights, copies)
    weight_mismatches = (
        int(np.count_nonzero(stored_weights != expected_weights))
        if len(stored_weights) == len(expected_weights)
        else stored.num_rows
    )
    unmatched = _unmatched(training_configs)
    problems = []
    if verdict.rows_out_of_range:
        paths = raw["path"].take(pa.array(verdict.rows_out_of_range[:10])).to_pylist()
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
        check_name=EXPANSION_MATCHES_WEIGHTS,
        passed=not problems,
        description="; ".join(problems + ([warning] if warning else [])) or None,
        metadata=metadata,
    )


@dg.multi_asset_check(
    name="expanded_corpus_checks",
    specs=[DETERMINISTIC_SPEC, WEIGHTS_SPEC],
    can_subset=True,
)
def expanded_corpus_checks(
    context: dg.AssetCheckExecutionContext,
    io_manager: dg.ResourceParam[ParquetIOManager],
    source: SourceTree,
):
    """One recomputation of the copy decisions, shared by the selected checks."""
    seed = parse_seed_or_fail(context)
    selected = {key.name for key in context.selected_asset_check_keys}
    if (same := unchanged_check_results(context, "expanded_corpus", selected, source)) is not None:
        yield from same
        return
    stored = stored_columns(io_manager, context, "expanded_corpus", EXPANDED_COLUMNS)
    raw_corpus = stored_columns(io_manager, context, "raw_corpus", RAW_COLUMNS)
    weights_map = stored_columns(io_manager, context, "weights_map")
    mode = table_mode(stored)  # the rule that made the stored rows, recorded with them
    if raw_corpus.num_rows <= PLAIN_RECOMPUTE_MAX_ROWS:
        plan, method = plain_plan(raw_corpus, weights_map, seed, mode), "row by row (hashlib)"
    else:
        plan, method = plan_corpus(raw_corpus, weights_map, seed, mode), "vectorised"
    if EXPANSION_DETERMINISTIC in selected:
        yield deterministic_result(context, stored, _rows(plan, raw_corpus["section_id"]), method, mode)
    if EXPANSION_MATCHES_WEIGHTS in selected:
        yield weights_result(
            stored, raw_corpus, plan.weights, mode, stored_columns(io_manager, context, "training_configs")
        )
