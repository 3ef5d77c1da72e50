"""Tag-weighted expansion, vectorised, giving exactly the reference's rows for the same inputs.

Per row: weight = product of matching weights[key][value] in sorted tag-key order starting
from 1.0; weight <= 0 drops the row; otherwise int(weight) copies plus one more when the
fractional part f > 0 and roll(seed, section_id) < f. Copies are adjacent, in row order.
Weights are resolved once per distinct (map, key, value), the product is taken in the same
order as the reference (so the floats are bit-identical), and only rows with a fractional
part are hashed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dlm_pipeline.core.arrow_maps import map_entries
from dlm_pipeline.core.fraction_hash import section_rolls
from dlm_pipeline.core.weights import WeightsMap

MAX_EXPANDED_ROWS = 500_000_000


class ExpansionTooLarge(ValueError):
    """Composed weights would produce more rows than any corpus should hold."""


@dataclass(frozen=True)
class TagEntries:
    """The tags column flattened: one entry per (row, tag_key, tag_value), rows in order."""

    row: np.ndarray  # int64 row index per entry
    keys: pa.Array
    values: pa.Array

    @classmethod
    def of(cls, tags: pa.ChunkedArray | pa.Array) -> "TagEntries":
        if isinstance(tags, pa.ChunkedArray):
            tags = tags.combine_chunks() if tags.num_chunks else pa.array([], tags.type)
        row, keys, values = map_entries(tags)
        return cls(row.to_numpy(zero_copy_only=False).astype(np.int64), keys, values)


def _codes(array: pa.Array) -> tuple[np.ndarray, list[str]]:
    encoded = pc.dictionary_encode(array)
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), encoded.dictionary.to_pylist()


def _entry_factors(entries: TagEntries, row_map: np.ndarray, maps: list[WeightsMap]) -> np.ndarray:
    """Factor per tag entry (NaN where its row's map has no weight for that key/value).

    Each (map, key, value) is encoded as one int64; the few codes the maps define are sorted
    once and every entry is looked up with a binary search, so no per-row Python runs.
    """
    key_codes, key_names = _codes(entries.keys)
    value_codes, value_names = _codes(entries.values)
    n_keys, n_values = max(len(key_names), 1), max(len(value_names), 1)
    key_index = {name: i for i, name in enumerate(key_names)}
    value_index = {name: i for i, name in enumerate(value_names)}
    defined_codes, defined_factors = [], []
    for m, weights in enumerate(maps):
        for key, inner in weights.items():
            if key in key_index:
                for value, factor in inner.items():
                    if value in value_index:
                        defined_codes.append((m * n_keys + key_index[key]) * n_values + value_index[value])
                        defined_factors.append(factor)
    factors = np.full(len(key_codes), np.nan)
    if not defined_codes:
        return factors
    order = np.argsort(defined_codes)
    codes_sorted = np.asarray(defined_codes, dtype=np.int64)[order]
    factors_sorted = np.asarray(defined_factors, dtype=np.float64)[order]
    entry_map = row_map[entries.row].astype(np.int64)
    entry_codes = (entry_map * n_keys + key_codes) * n_values + value_codes
    slot = np.minimum(np.searchsorted(codes_sorted, entry_codes), len(codes_sorted) - 1)
    hit = (entry_map >= 0) & (codes_sorted[slot] == entry_codes)
    factors[hit] = factors_sorted[slot[hit]]
    return factors


def composed_weights(entries: TagEntries, n_rows: int, row_map: np.ndarray, maps: list[WeightsMap]) -> np.ndarray:
    """float64 weight per row; rows with row_map == -1 (or no matching tag) get 1.0."""
    weights = np.ones(n_rows, dtype=np.float64)
    if not maps or len(entries.row) == 0:
        return weights
    entry_factor = _entry_factors(entries, row_map, maps)
    matched = np.flatnonzero(~np.isnan(entry_factor))
    if len(matched) == 0:
        return weights
    rows, factor = entries.row[matched], entry_factor[matched]
    # The reference multiplies in tag-key order; rows from the corpus already hold sorted keys,
    # anything else is put in that order first (stable, so the row order is kept).
    key_order = pc.sort_indices(entries.keys.take(pa.array(matched))).to_numpy()
    rank = np.empty(len(matched), dtype=np.int64)
    rank[key_order] = np.arange(len(matched))
    same_row = rows[1:] == rows[:-1]
    if np.any(same_row & (rank[1:] < rank[:-1])):
        order = np.lexsort((rank, rows))
        rows, factor = rows[order], factor[order]
    # Multiply one "column" of factors at a time so each row's product is formed exactly as
    # ((1.0 * f1) * f2) * ..., the reference's float operations in the reference's order.
    first = np.r_[True, rows[1:] != rows[:-1]]
    group_start = np.maximum.accumulate(np.where(first, np.arange(len(rows)), 0))
    position = np.arange(len(rows)) - group_start
    for p in range(int(position.max()) + 1):
        at = position == p
        weights[rows[at]] *= factor[at]
    return weights


def copies_per_row(weights: np.ndarray, section_ids: pa.Array, seed: int) -> np.ndarray:
    """int64 number of copies per row (0 = dropped)."""
    positive = weights > 0.0
    whole = np.where(positive, np.trunc(weights), 0.0)
    fraction = np.where(positive, weights - whole, 0.0)
    copies = whole.astype(np.int64)
    fractional_rows = np.flatnonzero(fraction > 0.0)
    if len(fractional_rows):
        rolls = section_rolls(seed, section_ids.take(pa.array(fractional_rows)))
        copies[fractional_rows] += rolls < fraction[fractional_rows]
    return copies


def expand_table(table: pa.Table, weights: np.ndarray, seed: int) -> tuple[pa.Table, np.ndarray]:
    """Rows repeated per their copies, plus `weight` (float64) and `copy` (int32, 0-based)."""
    section_ids = table["section_id"].combine_chunks() if table.num_rows else pa.array([], pa.string())
    copies = copies_per_row(weights, section_ids, seed)
    total = int(copies.sum())
    if total > MAX_EXPANDED_ROWS:
        raise ExpansionTooLarge(
            f"the composed weights would produce {total:,} rows (limit {MAX_EXPANDED_ROWS:,}); "
            "multi-key products multiply, so lower the weights"
        )
    source = np.repeat(np.arange(len(copies), dtype=np.int64), copies)
    starts = np.cumsum(copies) - copies
    copy_index = (np.arange(total, dtype=np.int64) - np.repeat(starts, copies)).astype(np.int32)
    expanded = table.take(pa.array(source)) if total else table.slice(0, 0)
    expanded = expanded.append_column("weight", pa.array(weights[source], pa.float64()))
    expanded = expanded.append_column("copy", pa.array(copy_index, pa.int32()))
    return expanded, copies


def expand_rows(table: pa.Table, row_map: np.ndarray, maps: list[WeightsMap], seed: int) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """Weights, expansion, copies: (expanded table, weight per row, copies per row)."""
    entries = TagEntries.of(table["tags"])
    weights = composed_weights(entries, table.num_rows, row_map, maps)
    expanded, copies = expand_table(table, weights, seed)
    return expanded, weights, copies


def tag_stats(tags: pa.ChunkedArray | pa.Array, weights: np.ndarray, copies: np.ndarray) -> pa.Table:
    """Columns: tag_key, tag_value, rows, expected, realized, whole (sum of int parts), variance.

    `variance` is the Bernoulli variance of the fractional copies, for statistical bounds.
    """
    entries = TagEntries.of(tags)
    w = weights[entries.row]
    positive = w > 0
    whole = np.where(positive, np.trunc(w), 0.0)
    frac = np.where(positive, w - whole, 0.0)
    long = pa.table(
        {
            "tag_key": entries.keys,
            "tag_value": entries.values,
            "w": pa.array(w),
            "c": pa.array(copies[entries.row]),
            "whole": pa.array(whole),
            "var": pa.array(frac * (1.0 - frac)),
        }
    )
    grouped = long.group_by(["tag_key", "tag_value"]).aggregate(
        [("w", "count"), ("w", "sum"), ("c", "sum"), ("whole", "sum"), ("var", "sum")]
    )
    result = pa.table(
        {
            "tag_key": grouped["tag_key"],
            "tag_value": grouped["tag_value"],
            "rows": grouped["w_count"].cast(pa.int64()),
            "expected": grouped["w_sum"],
            "realized": grouped["c_sum"].cast(pa.int64()),
            "whole": grouped["whole_sum"],
            "variance": grouped["var_sum"],
        }
    )
    return result.sort_by([("tag_key", "ascending"), ("tag_value", "ascending")])
