"""Tag-weighted expansion, vectorised, giving exactly the reference's rows for the same inputs.

Per row: weight = product of matching weights[key][value] in sorted tag-key order starting
from 1.0; weight <= 0 drops the row; otherwise int(weight) copies plus one more when the
fractional part f > 0 and roll(seed, section_id) < f (`bernoulli`, the reference), or, in
`exact` mode, for exactly floor(n*f + 0.5) of the n rows sharing the composed weight: those
with the smallest rolls (ties by section_id). Copies are adjacent, in row order.
Weights are composed once per distinct (tag set, chain of weights maps), in the reference's
order (so the floats are bit-identical), and spread back to the rows; rolls come from the
batched BLAKE2b kernel, for every row at once on large tables, else only for fractional rows.
Before anything is gathered, the expanded size is bounded in rows and in text bytes.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dlm_pipeline.core.arrow_utils import (
    map_as_list,
    map_entries,
    one_chunk,
    representative_rows,
    string_offsets,
)
from dlm_pipeline.core.fraction_hash import section_rolls
from dlm_pipeline.core.parquet_io import ROW_GROUP_BYTES, ParquetRows, byte_bounded_slices, row_bytes
from dlm_pipeline.core.weights import Chain, chain_factor, resolve_weights

EXPANSION_BERNOULLI = "bernoulli"
EXPANSION_EXACT = "exact"
EXPANSION_MODES = (EXPANSION_BERNOULLI, EXPANSION_EXACT)
MODE_METADATA_KEY = b"dlm.expansion_mode"
MAX_EXPANDED_ROWS = 500_000_000
DEFAULT_MAX_EXPANDED_BYTES = 4 << 30
SPECULATIVE_HASH_MIN_ROWS = 100_000
# The hash tables of the tag-set encodes and the gathered columns are large and short-lived; the
# system allocator reuses them from call to call, where Arrow's default pool (mimalloc) measured
# 1.4-4x slower here.
_ARROW_POOL = pa.system_memory_pool()


class ExpansionTooLarge(ValueError):
    """Composed weights would produce more rows, or more text, than the limits allow."""


def check_mode(mode: str) -> str:
    if mode not in EXPANSION_MODES:
        raise ValueError(f"expansion mode must be one of {', '.join(EXPANSION_MODES)}, got {mode!r}")
    return mode


@dataclass(frozen=True)
class TagEntries:
    """The tags column flattened: one entry per (row, tag_key, tag_value), rows in order."""

    row: np.ndarray  # int64 row index per entry
    keys: pa.Array
    values: pa.Array

    @classmethod
    def of(cls, tags: pa.ChunkedArray | pa.Array) -> TagEntries:
        row, keys, values = map_entries(one_chunk(tags))
        return cls(row.to_numpy(zero_copy_only=False).astype(np.int64), keys, values)


def _dense_codes(values: pa.Array | np.ndarray) -> tuple[np.ndarray, int]:
    """Codes 0..k-1 in first-occurrence order (hash-based, no sort) and k."""
    encoded = pc.dictionary_encode(values, memory_pool=_ARROW_POOL)
    return encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), len(encoded.dictionary)


def _blob(data_buf: pa.Buffer | None, bounds: np.ndarray) -> pa.Array:
    """Zero-copy binary array whose item i is data[bounds[i]:bounds[i+1]]."""
    kind = pa.large_binary() if bounds[-1] > np.iinfo(np.int32).max else pa.binary()
    width = np.int64 if kind == pa.large_binary() else np.int32
    data = data_buf if data_buf is not None else pa.py_buffer(b"")
    return pa.Array.from_buffers(kind, len(bounds) - 1, [None, pa.py_buffer(bounds.astype(width)), data])


def tag_set_groups(tags: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, int]:
    """(group per row, number of groups): rows in one group hold exactly the same tags.

    Each row's tags are seen as three byte strings laid over the map's own buffers (key bytes,
    value bytes, and the key/value lengths that delimit them), so grouping is three hash
    encodes of zero-copy views, whatever the number of rows.
    """
    listed = map_as_list(one_chunk(tags))
    n = len(listed)
    if n == 0:
        return np.zeros(0, np.int64), 0
    entry_bounds = listed.offsets.to_numpy().astype(np.int64)  # absolute into the child struct
    struct = listed.values
    keys, values = struct.flatten()
    if values.null_count:
        raise ValueError("tag values must not be null")
    key_offsets, value_offsets = string_offsets(keys).astype(np.int64), string_offsets(values).astype(np.int64)
    lengths = np.empty((len(key_offsets) - 1, 2), dtype="<i4")  # (key length, value length) per entry
    np.subtract(key_offsets[1:], key_offsets[:-1], out=lengths[:, 0], casting="unsafe")
    np.subtract(value_offsets[1:], value_offsets[:-1], out=lengths[:, 1], casting="unsafe")
    views = [
        _blob(pa.py_buffer(lengths), entry_bounds * 8),
        _blob(keys.buffers()[2], key_offsets[entry_bounds]),
        _blob(values.buffers()[2], value_offsets[entry_bounds]),
    ]
    with ThreadPoolExecutor(len(views)) as pool:  # Arrow releases the GIL: encode the views side by side
        (group, size), *rest = pool.map(_dense_codes, views)
    for codes, view_size in rest:
        group, size = _dense_codes(group * view_size + codes)
    return group, size


def weight_of_tags(tags: dict[str, str], chain: Chain) -> float:
    """The reference's composition: factors of matching (key, value) multiplied in sorted key order
    from 1.0, each factor the one the merge of `chain` holds."""
    weight = 1.0
    for key in sorted(tags):
        factor = chain_factor(chain, key, tags[key])
        if factor is not None:
            weight *= factor
    return weight


def composed_weights(tags: pa.ChunkedArray | pa.Array, row_chain: np.ndarray, chains: list[Chain]) -> np.ndarray:
    """float64 weight per row; rows with row_chain == -1 (or no matching tag) get 1.0.

    Rows are grouped by (their chain, their exact tag set); each group's weight is composed
    once, in Python, exactly as the reference composes it, then spread back to the rows.
    """
    n = len(row_chain)
    if not chains or n == 0:
        return np.ones(n, dtype=np.float64)
    group, size = tag_set_groups(tags)
    if np.any(row_chain != row_chain[0]):  # several chains in play: a group is (tag set, chain)
        group, size = _dense_codes(group * (len(chains) + 1) + (row_chain.astype(np.int64) + 1))
    first = representative_rows(group, size)
    representatives = one_chunk(tags).take(pa.array(first)).to_pylist()
    group_weight = np.array(
        [
            weight_of_tags(dict(rep), chains[row_chain[row]]) if row_chain[row] >= 0 else 1.0
            for rep, row in zip(representatives, first.tolist(), strict=False)
        ],
        dtype=np.float64,
    )
    return group_weight[group]


def composed_row_weights(raw: pa.Table, weights_map_table: pa.Table) -> np.ndarray:
    """The composed weight (float64) of every row of a raw corpus (needs its `path` and `tags`)."""
    row_chain, chains = resolve_weights(raw["path"], weights_map_table)
    return composed_weights(raw["tags"], row_chain, chains)


def split_weights(weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(whole copies, fractional part) per weight, both 0 where the weight drops the row."""
    positive = weights > 0.0
    whole = np.where(positive, np.trunc(weights), 0.0)
    return whole, np.where(positive, weights - whole, 0.0)


def exact_quotas(sizes: np.ndarray, fractions: np.ndarray) -> np.ndarray:
    """Rows that get the extra copy in a group of `sizes` rows with fractional part `fractions`:
    floor(n*f + 0.5), in float64 as Python computes it."""
    return np.floor(sizes * fractions + 0.5).astype(np.int64)


def _exact_extra(weights: np.ndarray, fractions: np.ndarray, rolls: np.ndarray, section_ids: pa.Array) -> np.ndarray:
    """Per fractional row, whether it is among its weight group's quota of smallest (roll, section_id)."""
    values, group = np.unique(weights, return_inverse=True)
    sizes = np.bincount(group, minlength=len(values))
    quota = exact_quotas(sizes, fractions[representative_rows(group, len(values))])
    order = np.lexsort((rolls, group))
    _break_ties_by_id(order, group, rolls, section_ids)
    position = np.arange(len(order), dtype=np.int64) - (np.cumsum(sizes) - sizes)[group[order]]
    extra = np.empty(len(order), dtype=bool)
    extra[order] = position < quota[group[order]]
    return extra


def _break_ties_by_id(order: np.ndarray, group: np.ndarray, rolls: np.ndarray, section_ids: pa.Array) -> None:
    """Reorder, in place, each run of rows with equal (group, roll) by section_id. Equal float64
    rolls are rare, so sorting every id (seconds per million strings) would be wasted."""
    g, r = group[order], rolls[order]
    tied = np.flatnonzero((g[1:] == g[:-1]) & (r[1:] == r[:-1]))
    if not len(tied):
        return
    starts = tied[np.r_[True, np.diff(tied) > 1]]
    ends = np.r_[tied[np.r_[np.diff(tied) > 1, False]], tied[-1]] + 2  # exclusive
    for start, end in zip(starts.tolist(), ends.tolist(), strict=False):
        run = order[start:end]
        ids = section_ids.take(pa.array(run)).to_pylist()
        order[start:end] = run[sorted(range(len(run)), key=ids.__getitem__)]


def _check_whole_copies(whole: np.ndarray) -> None:
    """Refuse before int64 conversion: a product of per-key weights can exceed any integer width."""
    total = float(whole.sum())
    if total > MAX_EXPANDED_ROWS:
        raise ExpansionTooLarge(
            f"the composed weights would produce {total:,.0f} rows (limit {MAX_EXPANDED_ROWS:,}); "
            "multi-key products multiply, so lower the weights"
        )


def copies_per_row(
    weights: np.ndarray,
    section_ids: pa.Array,
    seed: int,
    mode: str = EXPANSION_BERNOULLI,
    rolls: np.ndarray | None = None,
) -> np.ndarray:
    """int64 number of copies per row (0 = dropped). `rolls`: every row's roll, if already computed."""
    whole, fraction = split_weights(weights)
    _check_whole_copies(whole)
    copies = whole.astype(np.int64)
    if rolls is not None and check_mode(mode) == EXPANSION_BERNOULLI:  # rows without a fraction never pass roll < 0
        copies += rolls < fraction
        return copies
    fractional_rows = np.flatnonzero(fraction > 0.0)
    if not len(fractional_rows):
        return copies
    section_ids = one_chunk(section_ids)
    row_rolls = rolls[fractional_rows] if rolls is not None else section_rolls(seed, section_ids, fractional_rows)
    if check_mode(mode) == EXPANSION_EXACT:
        ids = section_ids.take(pa.array(fractional_rows))
        copies[fractional_rows] += _exact_extra(weights[fractional_rows], fraction[fractional_rows], row_rolls, ids)
    else:
        copies[fractional_rows] += row_rolls < fraction[fractional_rows]
    return copies


@dataclass(frozen=True)
class ExpansionPlan:
    """Which rows to emit, in order: the reference's output as indices into the input rows."""

    weights: np.ndarray  # float64 composed weight per input row
    copies: np.ndarray  # int64 copies per input row (0 = dropped)
    source_rows: np.ndarray  # int64 input row per output row
    copy_index: np.ndarray  # int32 0-based copy number per output row


def plan_from_weights(
    weights: np.ndarray,
    section_ids: pa.Array,
    seed: int,
    mode: str = EXPANSION_BERNOULLI,
    rolls: np.ndarray | None = None,
) -> ExpansionPlan:
    return _plan_from_copies(weights, copies_per_row(weights, section_ids, seed, mode, rolls))


def text_bytes(text: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """int64 bytes of each row's text."""
    return pc.binary_length(text).to_numpy().astype(np.int64)


def check_expanded_bytes(
    table: pa.Table, copies: np.ndarray, max_bytes: int, lengths: np.ndarray | None = None
) -> None:
    """Refuse, before anything is gathered, an expansion whose text (copies x text bytes per row,
    `lengths` when the table does not hold the text) would exceed `max_bytes`, naming the row that
    contributes most."""
    if lengths is None and "text" in table.column_names:
        lengths = text_bytes(table["text"])
    if lengths is None or not len(copies):
        return
    per_row = copies * lengths  # copies are bounded by MAX_EXPANDED_ROWS, lengths by the file size cap
    total = int(per_row.sum())
    if total > max_bytes:
        top = int(np.argmax(per_row))
        path = table["path"][top].as_py() if "path" in table.column_names else f"row {top}"
        raise ExpansionTooLarge(
            f"the composed weights would expand the corpus to {total:,} bytes of text (limit {max_bytes:,} bytes); "
            f"the largest part is {path}: {int(copies[top]):,} copies of {int(lengths[top]):,} bytes. "
            "Multi-key products multiply: lower the weights, or raise the limit"
        )


def _plan_from_copies(weights: np.ndarray, copies: np.ndarray) -> ExpansionPlan:
    """The output row index (copies adjacent, in row order) for decided copies."""
    total = int(copies.sum())
    if total > MAX_EXPANDED_ROWS:
        raise ExpansionTooLarge(
            f"the composed weights would produce {total:,} rows (limit {MAX_EXPANDED_ROWS:,}); "
            "multi-key products multiply, so lower the weights"
        )
    source = np.repeat(np.arange(len(copies), dtype=np.int64), copies)
    starts = np.cumsum(copies) - copies
    copy_index = (np.arange(total, dtype=np.int64) - np.repeat(starts, copies)).astype(np.int32)
    return ExpansionPlan(weights, copies, source, copy_index)


def plan_expansion(
    table: pa.Table,
    row_chain: np.ndarray,
    chains: list[Chain],
    seed: int,
    mode: str = EXPANSION_BERNOULLI,
    max_bytes: int = DEFAULT_MAX_EXPANDED_BYTES,
    lengths: np.ndarray | None = None,
) -> ExpansionPlan:
    """Weights and copy decisions for every row of a corpus table (section_id, path, tags, and the
    text or its `lengths` in bytes for the size limit).

    On large tables every row's roll is hashed on another thread while the weights are composed
    (both release the GIL); which rows need one is only known afterwards, and hashing a few rows
    too many is cheaper than waiting.
    """
    section_ids = one_chunk(table["section_id"])
    if table.num_rows < SPECULATIVE_HASH_MIN_ROWS or not chains:
        weights, rolls = composed_weights(table["tags"], row_chain, chains), None
    else:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(section_rolls, seed, section_ids)
            weights = composed_weights(table["tags"], row_chain, chains)
            rolls = pending.result()
    copies = copies_per_row(weights, section_ids, seed, mode, rolls)
    check_expanded_bytes(table, copies, max_bytes, lengths)
    return _plan_from_copies(weights, copies)


def apply_plan(table: pa.Table, plan: ExpansionPlan) -> pa.Table:
    """The expanded table: input columns gathered per the plan, plus `weight` and `copy`."""
    rows = pa.array(plan.source_rows)
    expanded = pc.take(table, rows, memory_pool=_ARROW_POOL) if len(plan.source_rows) else table.slice(0, 0)
    expanded = expanded.append_column("weight", pa.array(plan.weights[plan.source_rows], pa.float64()))
    return expanded.append_column("copy", pa.array(plan.copy_index, pa.int32()))


def expand_rows(
    table: pa.Table, row_chain: np.ndarray, chains: list[Chain], seed: int, mode: str = EXPANSION_BERNOULLI
) -> tuple[pa.Table, ExpansionPlan]:
    plan = plan_expansion(table, row_chain, chains, seed, mode)
    return apply_plan(table, plan), plan


def with_mode(expanded: pa.Table, mode: str) -> pa.Table:
    """The expansion mode in the schema metadata, so checks and readers know which rule made the rows."""
    return expanded.replace_schema_metadata(
        {**(expanded.schema.metadata or {}), MODE_METADATA_KEY: check_mode(mode).encode()}
    )


def table_mode(table: pa.Table) -> str:
    return check_mode((table.schema.metadata or {}).get(MODE_METADATA_KEY, EXPANSION_BERNOULLI.encode()).decode())


def plan_corpus(
    raw: pa.Table,
    weights_map_table: pa.Table,
    seed: int,
    mode: str = EXPANSION_BERNOULLI,
    max_bytes: int = DEFAULT_MAX_EXPANDED_BYTES,
) -> ExpansionPlan:
    """The copy decisions (§3, or exact mode) for a raw corpus under a `weights_map` table.

    Raises ExpansionTooLarge when the result would exceed MAX_EXPANDED_ROWS rows or `max_bytes`
    bytes of text (when `raw` has its text).
    """
    row_chain, chains = resolve_weights(raw["path"], weights_map_table)
    return plan_expansion(raw, row_chain, chains, seed, mode, max_bytes)


def expand_corpus(
    raw: pa.Table,
    weights_map_table: pa.Table,
    seed: int,
    mode: str = EXPANSION_BERNOULLI,
    max_bytes: int = DEFAULT_MAX_EXPANDED_BYTES,
) -> tuple[pa.Table, ExpansionPlan]:
    """The expanded corpus and its plan; nothing is gathered when a limit refuses the plan."""
    plan = plan_corpus(raw, weights_map_table, seed, mode, max_bytes)
    return with_mode(apply_plan(raw, plan), mode), plan


PLAN_COLUMNS = ["section_id", "path", "tags"]  # what a plan needs besides the text's length


@dataclass(frozen=True)
class StreamedExpansion:
    """The expansion of a stored raw corpus: its plan (small, per row), the per-row columns it was
    made from (for statistics), and the expanded rows, produced batch by batch by `batches()`."""

    plan: ExpansionPlan
    rows: pa.Table  # the raw corpus's PLAN_COLUMNS
    schema: pa.Schema  # of the expanded rows, with the mode in its metadata
    raw: ParquetRows
    batch_bytes: int
    whole: pa.Table | None = None  # a raw corpus of one row group, already read for the plan

    def batches(self) -> Iterator[pa.Table]:
        """The expanded rows in order, one raw row group at a time, each cut into parts of about
        `batch_bytes` (a row of 100 copies must not multiply a row group's memory by 100)."""
        start = 0
        sources = self.plan.source_rows
        for table in [self.whole] if self.whole is not None else self.raw.batches():
            n = table.num_rows
            lo, hi = np.searchsorted(sources, [start, start + n], side="left").tolist()
            local = ExpansionPlan(
                self.plan.weights[start : start + n],
                self.plan.copies[start : start + n],
                sources[lo:hi] - start,
                self.plan.copy_index[lo:hi],
            )
            sizes = row_bytes(table)[local.source_rows]
            bounds = [0, *byte_bounded_slices(sizes, self.batch_bytes), len(sizes)]
            for a, b in zip(bounds[:-1], bounds[1:], strict=True):
                if b > a:
                    part = ExpansionPlan(local.weights, local.copies, local.source_rows[a:b], local.copy_index[a:b])
                    yield apply_plan(table, part)
            start += n


def stream_expansion(
    raw: ParquetRows,
    weights_map_table: pa.Table,
    seed: int,
    mode: str = EXPANSION_BERNOULLI,
    max_bytes: int = DEFAULT_MAX_EXPANDED_BYTES,
    batch_bytes: int | None = None,
) -> StreamedExpansion:
    """`expand_corpus` for a stored raw corpus, never holding more text than a row group: the plan
    is made from the small per-row columns and the texts' lengths (read row group by row group),
    the rows are gathered when `batches()` is consumed. Same rows, same schema. A raw corpus of one
    row group (the most a batch holds anyway) is read once, for the plan and the rows."""
    whole = raw.read() if raw.file.num_row_groups == 1 else None
    rows = whole.select(PLAN_COLUMNS) if whole is not None else raw.read(columns=PLAN_COLUMNS)
    texts = [whole] if whole is not None else raw.batches(columns=["text"])
    lengths = [text_bytes(table["text"]) for table in texts]
    row_chain, chains = resolve_weights(rows["path"], weights_map_table)
    plan = plan_expansion(
        rows, row_chain, chains, seed, mode, max_bytes, np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    )
    schema = raw.schema.append(pa.field("weight", pa.float64())).append(pa.field("copy", pa.int32()))
    schema = schema.with_metadata({**(schema.metadata or {}), MODE_METADATA_KEY: check_mode(mode).encode()})
    return StreamedExpansion(plan, rows, schema, raw, batch_bytes or ROW_GROUP_BYTES, whole)


def tag_stats(tags: pa.ChunkedArray | pa.Array, weights: np.ndarray, copies: np.ndarray) -> pa.Table:
    """Columns: tag_key, tag_value, rows, expected, realized, whole (sum of int parts), variance.

    `variance` is the Bernoulli variance of the fractional copies, for statistical bounds.
    """
    entries = TagEntries.of(tags)
    w = weights[entries.row]
    whole, frac = split_weights(w)
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


def plain_plan(raw: pa.Table, weights_map_table: pa.Table, seed: int, mode: str = EXPANSION_BERNOULLI) -> ExpansionPlan:
    """The same expansion computed row by row with hashlib: an independent second implementation
    that the determinism check compares the vectorised one against."""
    import hashlib
    import math

    row_chain, chains = resolve_weights(raw["path"], weights_map_table)
    weights, copies, candidates = [], [], {}
    for i, (tags, section, c) in enumerate(
        zip(raw["tags"].to_pylist(), raw["section_id"].to_pylist(), row_chain.tolist(), strict=False)
    ):
        weight = weight_of_tags(dict(tags), chains[c]) if c >= 0 else 1.0
        count = 0
        if weight > 0.0:
            count = int(weight)
            fraction = weight - count
            if fraction > 0.0:
                digest = hashlib.blake2b(f"{seed}:{section}".encode(), digest_size=8).digest()
                roll = int.from_bytes(digest, "big") / float(1 << 64)
                if check_mode(mode) == EXPANSION_BERNOULLI:
                    count += roll < fraction
                else:
                    candidates.setdefault(weight, []).append((roll, section, i))
        weights.append(weight)
        copies.append(count)
    for weight, group in candidates.items():
        quota = math.floor(len(group) * (weight - int(weight)) + 0.5)
        for _, _, i in sorted(group)[:quota]:
            copies[i] += 1
    return _plan_from_copies(np.asarray(weights, dtype=np.float64), np.asarray(copies, dtype=np.int64))


def realized_copies(
    raw_section_ids: pa.ChunkedArray | pa.Array, expanded_section_ids: pa.ChunkedArray | pa.Array
) -> np.ndarray:
    """Copies per raw row as found in a stored expanded table (rows whose id is unknown are ignored)."""
    index = pc.index_in(expanded_section_ids, value_set=raw_section_ids)
    positions = index.drop_null().to_numpy(zero_copy_only=False)
    return np.bincount(positions, minlength=len(raw_section_ids)).astype(np.int64)


@dataclass(frozen=True)
class WeightsVerdict:
    """Per-row integer parts, per-tag binomial bounds and, in exact mode, per-group exact counts."""

    rows_out_of_range: list[int]  # raw rows whose copies are not int(w) or int(w) + 1
    tags_out_of_bounds: pa.Table  # tag_key, tag_value, rows, expected, realized, deviation, bound
    stats: pa.Table
    groups_off_quota: pa.Table  # exact mode: weight, rows, quota, extra (realized extra copies)


def exact_groups(weights: np.ndarray, copies: np.ndarray) -> pa.Table:
    """Per composed weight with a fractional part: rows, the exact-mode quota and the extra copies realized."""
    whole, fraction = split_weights(weights)
    fractional = np.flatnonzero(fraction > 0.0)
    values, group = np.unique(weights[fractional], return_inverse=True)
    sizes = np.bincount(group, minlength=len(values))
    extra = np.bincount(group, weights=(copies[fractional] - whole[fractional]), minlength=len(values))
    return pa.table(
        {
            "weight": pa.array(values, pa.float64()),
            "rows": pa.array(sizes, pa.int64()),
            "quota": pa.array(exact_quotas(sizes, values - np.trunc(values)), pa.int64()),
            "extra": pa.array(extra.astype(np.int64), pa.int64()),
        }
    )


def verify_weights(
    tags: pa.ChunkedArray | pa.Array,
    weights: np.ndarray,
    copies: np.ndarray,
    mode: str = EXPANSION_BERNOULLI,
    false_alarm: float = 1e-9,
) -> WeightsVerdict:
    """Integer parts must match exactly; per (tag_key, tag_value) the extra copies may deviate from
    the sum of fractional parts by at most Bernstein's bound for sums of independent Bernoulli draws,
    taken so that a correct expansion fails with probability at most `false_alarm` over all tag values
    (a fixed 4 sigma + 1 failed about 1 correct seed in 2,000 per tag value with a small expected count,
    so `materialize` exited 1 on valid trees). In exact mode each weight group must also hold exactly
    its quota of extra copies."""
    whole, fraction = split_weights(weights)
    whole = whole.astype(np.int64)
    bad_rows = np.flatnonzero((copies < whole) | (copies > whole + (fraction > 0.0)))
    stats = tag_stats(tags, weights, copies)
    deviation = pc.abs(pc.subtract(pc.cast(stats["realized"], pa.float64()), stats["expected"]))
    # P(|S - E S| >= t) <= 2 exp(-t^2 / (2 (variance + t / 3))) for a sum of independent draws within 1 of
    # their means; solved for t at false_alarm / (number of tag values).
    log_term = float(np.log(2.0 * max(stats.num_rows, 1) / false_alarm))
    bound = pc.add(log_term / 3.0, pc.sqrt(pc.add(log_term**2 / 9.0, pc.multiply(stats["variance"], 2.0 * log_term))))
    stats = stats.append_column("deviation", deviation).append_column("bound", bound)
    outside = stats.filter(pc.greater(deviation, bound))
    groups = exact_groups(weights, copies)
    off_quota = (
        groups.filter(pc.not_equal(groups["extra"], groups["quota"]))
        if check_mode(mode) == EXPANSION_EXACT
        else groups.slice(0, 0)
    )
    return WeightsVerdict(bad_rows.tolist(), outside, stats, off_quota)
