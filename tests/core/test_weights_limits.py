"""Memory bombs in the weights: the weights map grows with its entries, and weight products are
bounded in bytes before anything is gathered."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pytest

from dlm_pipeline import settings
from dlm_pipeline.core.config import TrainingConfig
from dlm_pipeline.core.corpus import rows_table
from dlm_pipeline.core.expansion import (
    ExpansionTooLarge,
    composed_row_weights,
    expand_corpus,
    plan_from_weights,
)
from dlm_pipeline.core.rules import Anchor
from dlm_pipeline.core.weights import (
    SCOPE_GLOBAL,
    SCOPE_NEAREST,
    unmatched_weights,
    weights_table,
)


def many_anchors(n_anchors: int, n_values: int):
    """A root map with `n_values` values and `n_anchors` subtrees with a one-entry map each, and one
    file per subtree whose tags match the root map and its own anchor's map."""
    root = Anchor("", TrainingConfig(dlm_training_version=1, weights={"lang": {f"v{j}": 1.5 for j in range(n_values)}}))
    subtrees = [
        Anchor(f"d{i}", TrainingConfig(dlm_training_version=1, weights={"kind": {"x": 2.0}})) for i in range(n_anchors)
    ]
    paths = sorted((f"d{i}/f.txt" for i in range(n_anchors)), key=str.encode)
    tags = [{"kind": "x", "lang": f"v{int(p[1:].split('/')[0]) % n_values}"} for p in paths]
    raw = rows_table([f"{i:016x}" for i in range(len(paths))], paths, ["t"] * len(paths), tags)
    return [root, *subtrees], raw


def test_weights_map_rows_grow_with_the_entries_not_anchors_times_entries():
    anchors, raw = many_anchors(1000, 1000)
    table = weights_table(anchors, SCOPE_NEAREST)
    # global merge (1,000 lang values + kind.x) + the root's own 1,000 + one entry per subtree
    assert table.num_rows == (1000 + 1) + 1000 + 1000
    expanded, plan = expand_corpus(raw, table, seed=0)
    assert plan.weights.tolist() == [3.0] * 1000 and expanded.num_rows == 3000
    assert composed_row_weights(raw, table).tolist() == [3.0] * 1000


def _peak_python_bytes(n: int) -> int:
    anchors, raw = many_anchors(n, n)
    tracemalloc.start()
    try:
        for scope in (SCOPE_NEAREST, SCOPE_GLOBAL):
            table = weights_table(anchors, scope)
            composed_row_weights(raw, table)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_weights_map_and_resolution_memory_grow_linearly():
    _peak_python_bytes(10)  # first calls allocate caches once: keep them out of the comparison
    small, large = _peak_python_bytes(300), _peak_python_bytes(600)
    # twice the anchors and twice the values: linear is ~2x, anchors x values would be ~4x
    assert large < 3 * small, (small, large)


BOMB = """
import json, sys
from pathlib import Path
from dlm_pipeline.core.config import TrainingConfig
from dlm_pipeline.core.corpus import rows_table
from dlm_pipeline.core.expansion import ExpansionTooLarge, expand_corpus
from dlm_pipeline.core.rules import Anchor
from dlm_pipeline.core.weights import weights_table

def hwm():
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024

raw = rows_table(["0123456789abcdef"], ["big.txt"], ["x" * 630_000], [{"a": "1", "b": "1"}])
anchor = Anchor("", TrainingConfig(dlm_training_version=1, weights={"a": {"1": 100.0}, "b": {"1": 100.0}}))
table = weights_table([anchor], "nearest")
before = hwm()
try:
    expand_corpus(raw, table, seed=0)
    message = None
except ExpansionTooLarge as exc:
    message = str(exc)
print(json.dumps({"growth": hwm() - before, "message": message}))
"""


def test_a_100_by_100_product_on_one_630_kb_file_is_refused_with_small_memory_growth():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    out = subprocess.run([sys.executable, "-c", BOMB], capture_output=True, text=True, env=env, timeout=120, check=True)
    result = json.loads(out.stdout)
    assert result["message"] is not None, "the 6.3 GB expansion was not refused"
    assert "6,300,000,000 bytes of text (limit 4,294,967,296 bytes)" in result["message"]
    assert "big.txt: 10,000 copies of 630,000 bytes" in result["message"]
    assert result["growth"] < 64 << 20, result  # nothing of the 6.3 GB was gathered


def test_the_byte_limit_is_a_parameter_and_counts_copies_times_text_bytes():
    raw = rows_table(["a1", "b2"], ["a.txt", "b.txt"], ["x" * 1000, "y" * 10], [{"k": "v"}, {"k": "v"}])
    table = weights_table(
        [Anchor("", TrainingConfig(dlm_training_version=1, weights={"k": {"v": 5.0}}))], SCOPE_NEAREST
    )
    assert expand_corpus(raw, table, 0, max_bytes=5050)[0].num_rows == 10
    with pytest.raises(
        ExpansionTooLarge, match=r"5,050 bytes of text \(limit 5,049 bytes\); the largest part is a\.txt"
    ):
        expand_corpus(raw, table, 0, max_bytes=5049)


def test_products_beyond_any_integer_width_are_refused_not_wrapped():
    with pytest.raises(ExpansionTooLarge, match="lower the weights"):
        plan_from_weights(np.array([1e20]), ["a1"], 0)


def test_max_expanded_bytes_setting(monkeypatch):
    monkeypatch.delenv(settings.ENV_MAX_EXPANDED_BYTES, raising=False)
    assert settings.max_expanded_bytes() == 4 << 30
    monkeypatch.setenv(settings.ENV_MAX_EXPANDED_BYTES, "1000")
    assert settings.max_expanded_bytes() == 1000
    for bad in ("abc", "0", "-5", "1.5"):
        monkeypatch.setenv(settings.ENV_MAX_EXPANDED_BYTES, bad)
        with pytest.raises(settings.SettingsError, match="DLM_MAX_EXPANDED_BYTES must be a whole number"):
            settings.max_expanded_bytes()


def test_weights_that_no_metadata_sets_are_listed():
    anchors = [
        Anchor(
            "",
            TrainingConfig(
                dlm_training_version=1, metadata={"kind": "code"}, weights={"kind": {"code": 2.0, "dcos": 3.0}}
            ),
        ),
        Anchor(
            "docs", TrainingConfig(dlm_training_version=1, metadata={"kind": "docs"}, weights={"lang": {"md": 0.5}})
        ),
    ]
    assert unmatched_weights(anchors) == [
        ".dlm/training.yaml: weights.kind.dcos: no anchor's metadata sets kind: dcos, so this weight never applies",
        "docs/.dlm/training.yaml: weights.lang.md: no anchor's metadata sets lang: md, so this weight never applies",
    ]


def test_validate_warns_about_weights_no_metadata_sets_without_changing_the_exit_code(tree, tmp_path):
    root = tree(
        {
            ".dlm/training.yaml": "dlm_training_version: 1\nmetadata: {kind: docs}\nweights: {kind: {docs: 2, dosc: 3}}\n",
            "a.md": "a\n",
        }
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "DAGSTER_HOME": str(tmp_path / "home")}
    cli = [sys.executable, "-m", "dlm_pipeline.cli", "validate", "--source", str(root)]
    out = subprocess.run(cli, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert out.returncode == 0, out.stderr
    assert out.stderr.splitlines() == [
        "warning: .dlm/training.yaml: weights.kind.dosc: no anchor's metadata sets kind: dosc, so this weight never applies"
    ]
    assert "1 config file(s) valid, 0 invalid" in out.stdout
