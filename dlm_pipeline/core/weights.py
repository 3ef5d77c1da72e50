"""Weights maps: the global merge (the reference's view) and each anchor's own map.

A map is {tag_key: {tag_value: weight}}. Merging goes shallowest -> deepest and overrides at
the (tag_key, tag_value) grain. In `nearest` scope a row uses the merge of its own ancestor
anchors, so a subtree's weights apply only inside that subtree. That merge is never stored: the
table keeps each anchor's own map once, and a row's chain of ancestor maps is resolved where it
is used (a lookup from the deepest map up gives the merged map's factor), so storage and memory
grow with the number of map entries, not with anchors x entries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dlm_pipeline.core.arrow_utils import one_chunk
from dlm_pipeline.core.rules import Anchor, ancestor_dirs

WeightsMap = dict[str, dict[str, float]]
Chain = tuple[WeightsMap, ...]  # the maps that apply to a row, shallowest first
SCOPE_NEAREST = "nearest"
SCOPE_GLOBAL = "global"
SCOPES = (SCOPE_NEAREST, SCOPE_GLOBAL)
GLOBAL_ANCHOR = "*"
SCOPE_METADATA_KEY = b"dlm.weights_scope"

WEIGHTS_SCHEMA = pa.schema(
    [
        ("scope", pa.string()),
        ("anchor", pa.string()),
        ("tag_key", pa.string()),
        ("tag_value", pa.string()),
        ("weight", pa.float64()),
    ]
)


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise ValueError(f"weights scope must be one of {', '.join(SCOPES)}; got {scope!r}")
    return scope


def merge_weight_maps(maps: Iterable[Mapping[str, Mapping[str, float]]]) -> WeightsMap:
    merged: WeightsMap = {}
    for weights in maps:
        for tag_key, inner in weights.items():
            merged.setdefault(tag_key, {}).update(inner)
    return merged


def _weights_of(anchor: Anchor) -> WeightsMap:
    return anchor.config.weights if anchor.config is not None else {}


def global_weights(anchors: Sequence[Anchor]) -> WeightsMap:
    """All anchors' maps merged, ordered by depth then directory path (the reference's view)."""
    ordered = sorted(anchors, key=lambda a: (a.depth, a.dir.encode()))
    return merge_weight_maps(_weights_of(a) for a in ordered)


def own_weights(anchors: Sequence[Anchor]) -> dict[str, WeightsMap]:
    """Per anchor directory: its own map, as written in its config (empty maps left out)."""
    return {a.dir: _weights_of(a) for a in sorted(anchors, key=lambda a: a.dir.encode()) if _weights_of(a)}


def _columns(scope: str, anchor: str, weights: WeightsMap, columns: dict[str, list]) -> None:
    for tag_key in sorted(weights):
        for tag_value in sorted(weights[tag_key]):
            for name, value in zip(
                WEIGHTS_SCHEMA.names,
                (scope, anchor, tag_key, tag_value, float(weights[tag_key][tag_value])),
                strict=False,
            ):
                columns[name].append(value)


def weights_table(anchors: Sequence[Anchor], active_scope: str) -> pa.Table:
    """The global merge (scope `global`, anchor `*`) and each anchor's own map (scope `nearest`),
    in one table; the scope the expansion will use is in the schema metadata."""
    columns: dict[str, list] = {name: [] for name in WEIGHTS_SCHEMA.names}
    _columns(SCOPE_GLOBAL, GLOBAL_ANCHOR, global_weights(anchors), columns)
    for directory, weights in own_weights(anchors).items():
        _columns(SCOPE_NEAREST, directory or ".", weights, columns)
    table = pa.Table.from_pydict(columns, schema=WEIGHTS_SCHEMA)
    return table.replace_schema_metadata({SCOPE_METADATA_KEY: check_scope(active_scope).encode()})


def table_scope(table: pa.Table) -> str:
    return check_scope((table.schema.metadata or {}).get(SCOPE_METADATA_KEY, SCOPE_NEAREST.encode()).decode())


def maps_from_table(table: pa.Table, scope: str) -> dict[str, WeightsMap]:
    """{anchor dir ("" root): its own map} for `nearest`, {GLOBAL_ANCHOR: the merged map} for `global`."""
    maps: dict[str, WeightsMap] = {}
    selected = table.filter(pc.equal(table["scope"], scope)).to_pydict()
    for anchor, key, value, weight in zip(
        selected["anchor"], selected["tag_key"], selected["tag_value"], selected["weight"], strict=False
    ):
        directory = "" if anchor == "." else anchor
        maps.setdefault(directory, {}).setdefault(key, {})[value] = weight
    return maps


def chain_factor(chain: Chain, tag_key: str, tag_value: str) -> float | None:
    """The factor the merge of `chain` (shallowest -> deepest) gives (tag_key, tag_value): the
    deepest map's entry, as in the merged map; None when no map has it."""
    for weights in reversed(chain):
        factor = weights.get(tag_key, {}).get(tag_value)
        if factor is not None:
            return factor
    return None


def _directories(paths: pa.ChunkedArray | pa.Array) -> pa.Array:
    has_dir = pc.match_substring(paths, "/")
    dirs = pc.replace_substring_regex(paths, r"/[^/]*$", "")
    return pc.if_else(has_dir, dirs, "")


def row_chains(
    paths: pa.ChunkedArray | pa.Array, maps: dict[str, WeightsMap], scope: str
) -> tuple[np.ndarray, list[Chain]]:
    """Chain index per row (-1: no weights apply) and the distinct chains it indexes.

    A chain is the maps that apply to a row, shallowest first: the global map alone, or in
    `nearest` scope the own maps of the row's ancestor anchors. Chains are found once per
    distinct directory, so the cost is directories x depth.
    """
    n = len(paths)
    if scope == SCOPE_GLOBAL:
        global_map = maps.get(GLOBAL_ANCHOR, {})
        return (np.zeros(n, dtype=np.int32), [(global_map,)]) if global_map else (np.full(n, -1, np.int32), [])
    if n == 0 or not maps:
        return np.full(n, -1, dtype=np.int32), []
    encoded = pc.dictionary_encode(_directories(one_chunk(paths)))
    chain_index: dict[tuple[str, ...], int] = {}
    per_directory = np.full(len(encoded.dictionary), -1, dtype=np.int32)
    for i, directory in enumerate(encoded.dictionary.to_pylist()):
        dirs = tuple(d for d in ancestor_dirs(directory) if d in maps)
        if dirs:
            per_directory[i] = chain_index.setdefault(dirs, len(chain_index))
    chains = [tuple(maps[d] for d in dirs) for dirs in chain_index]
    return per_directory[encoded.indices.to_numpy(zero_copy_only=False)], chains


def resolve_weights(paths: pa.ChunkedArray | pa.Array, weights_map_table: pa.Table) -> tuple[np.ndarray, list[Chain]]:
    """Row chains for a corpus's paths, in the scope the `weights_map` table records."""
    scope = table_scope(weights_map_table)
    return row_chains(paths, maps_from_table(weights_map_table, scope), scope)


def unmatched_weights(anchors: Sequence[Anchor]) -> list[str]:
    """One line per weight whose (tag_key, tag_value) no anchor's `metadata` sets: rows only carry
    tags from metadata, so such a weight can never apply (a typo, or a value written differently)."""
    defined = {(k, v) for a in anchors if a.config is not None for k, v in a.config.metadata.items()}
    lines = []
    for directory, weights in own_weights(anchors).items():
        config = f"{directory}/.dlm/training.yaml" if directory else ".dlm/training.yaml"
        for tag_key in sorted(weights):
            for tag_value in sorted(weights[tag_key]):
                if (tag_key, tag_value) not in defined:
                    lines.append(
                        f"{config}: weights.{tag_key}.{tag_value}: no anchor's metadata sets "
                        f"{tag_key}: {tag_value}, so this weight never applies"
                    )
    return lines
