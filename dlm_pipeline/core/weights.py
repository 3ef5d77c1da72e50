"""Weights maps: the global merge (the reference's view) and nearest-ancestor scoped maps.

A map is {tag_key: {tag_value: weight}}. Merging goes shallowest -> deepest and overrides at
the (tag_key, tag_value) grain. In `nearest` scope a row uses the merge of its own ancestor
anchors, so a subtree's weights apply only inside that subtree.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from dlm_pipeline.core.arrow_maps import one_chunk
from dlm_pipeline.core.rules import Anchor, ancestor_dirs

WeightsMap = dict[str, dict[str, float]]
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


def scoped_weights(anchors: Sequence[Anchor]) -> dict[str, WeightsMap]:
    """Per anchor directory: its ancestors' maps merged down to it (empty maps left out)."""
    by_dir = {a.dir: a for a in anchors}
    scoped = {}
    for anchor in sorted(anchors, key=lambda a: a.dir.encode()):
        chain = [by_dir[d] for d in ancestor_dirs(anchor.dir) if d in by_dir]
        merged = merge_weight_maps(_weights_of(a) for a in chain)
        if merged:
            scoped[anchor.dir] = merged
    return scoped


def _rows(scope: str, anchor: str, weights: WeightsMap) -> Iterable[tuple]:
    for tag_key in sorted(weights):
        for tag_value in sorted(weights[tag_key]):
            yield scope, anchor, tag_key, tag_value, float(weights[tag_key][tag_value])


def weights_table(anchors: Sequence[Anchor], active_scope: str) -> pa.Table:
    """Both views in one table; the scope the expansion will use is in the schema metadata."""
    rows = list(_rows(SCOPE_GLOBAL, GLOBAL_ANCHOR, global_weights(anchors)))
    for directory, weights in scoped_weights(anchors).items():
        rows.extend(_rows(SCOPE_NEAREST, directory or ".", weights))
    columns = list(zip(*rows)) if rows else [[] for _ in WEIGHTS_SCHEMA]
    table = pa.Table.from_arrays([pa.array(c, type=f.type) for c, f in zip(columns, WEIGHTS_SCHEMA)], schema=WEIGHTS_SCHEMA)
    return table.replace_schema_metadata({SCOPE_METADATA_KEY: check_scope(active_scope).encode()})


def table_scope(table: pa.Table) -> str:
    return check_scope((table.schema.metadata or {}).get(SCOPE_METADATA_KEY, SCOPE_NEAREST.encode()).decode())


def maps_from_table(table: pa.Table, scope: str) -> dict[str, WeightsMap]:
    """{anchor dir ("" root, GLOBAL_ANCHOR for the global map): map} for one scope."""
    maps: dict[str, WeightsMap] = {}
    selected = table.filter(pc.equal(table["scope"], scope)).to_pydict()
    for anchor, key, value, weight in zip(
        selected["anchor"], selected["tag_key"], selected["tag_value"], selected["weight"]
    ):
        directory = "" if anchor == "." else anchor
        maps.setdefault(directory, {}).setdefault(key, {})[value] = weight
    return maps


def _directories(paths: pa.ChunkedArray | pa.Array) -> pa.Array:
    has_dir = pc.match_substring(paths, "/")
    dirs = pc.replace_substring_regex(paths, r"/[^/]*$", "")
    return pc.if_else(has_dir, dirs, "")


def row_maps(paths: pa.ChunkedArray | pa.Array, maps: dict[str, WeightsMap], scope: str) -> tuple[np.ndarray, list[WeightsMap]]:
    """Map index per row (-1: no weights apply) and the list of maps it indexes."""
    n = len(paths)
    if scope == SCOPE_GLOBAL:
        global_map = maps.get(GLOBAL_ANCHOR, {})
        return (np.zeros(n, dtype=np.int32), [global_map]) if global_map else (np.full(n, -1, np.int32), [])
    anchor_dirs = sorted(maps)
    index_of = {d: i for i, d in enumerate(anchor_dirs)}
    if n == 0 or not anchor_dirs:
        return np.full(n, -1, dtype=np.int32), [maps[d] for d in anchor_dirs]
    paths = one_chunk(paths)
    encoded = pc.dictionary_encode(_directories(paths))
    nearest = np.full(len(encoded.dictionary), -1, dtype=np.int32)
    for i, directory in enumerate(encoded.dictionary.to_pylist()):
        for candidate in reversed(ancestor_dirs(directory)):
            if candidate in index_of:
                nearest[i] = index_of[candidate]
                break
    indices = encoded.indices.to_numpy(zero_copy_only=False)
    return nearest[indices], [maps[d] for d in anchor_dirs]
