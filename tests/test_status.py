"""`dlm-pipeline status` on a real DAGSTER_HOME: nothing, then current, then stale after a config edit."""

from __future__ import annotations

import os
import shutil

import pytest
from conftest import EXAMPLE, small_tokenizer

from dlm_pipeline import settings
from dlm_pipeline.cli import main

ASSETS = ["training_configs", "weights_map", "raw_corpus", "expanded_corpus", "tokenized_cache"]


@pytest.fixture
def home(tmp_path, monkeypatch):
    home = tmp_path / "dagster_home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    names = {getattr(settings, n) for n in dir(settings) if n.startswith("ENV_")}
    for var in names | {v for v in os.environ if v.startswith("DLM_")}:
        monkeypatch.setenv(var, "")
        monkeypatch.delenv(var)
    return home


def status(capsys, *args: str) -> str:
    assert main(["status", *args]) == 0
    return capsys.readouterr().out


def asset_line(out: str, asset: str) -> str:
    return next(line for line in out.splitlines() if line.strip().startswith(asset + " "))


def test_status_fresh_current_stale(tmp_path, home, capsys):
    root = tmp_path / "corpus"
    shutil.copytree(EXAMPLE, root)
    assert "no seeds registered: nothing materialized" in status(capsys, "--source", str(root))
    assert "seed 5: nothing materialized" in status(capsys, "--source", str(root), "--seed", "5")

    assert main(["materialize", "--source", str(root), "--seed", "5"]) == 0
    capsys.readouterr()
    out = status(capsys, "--source", str(root))
    for asset in ASSETS:
        line = asset_line(out, asset)
        assert line.endswith("current") and " UTC " in line, line
    assert "12 rows" in asset_line(out, "raw_corpus")
    assert "check configs_valid: succeeded" in out and "check tokens_match_tokenizer: succeeded" in out

    config = root / "notes" / ".dlm" / "training.yaml"
    config.write_text(config.read_text() + "\n# edited\n")
    out = status(capsys, "--source", str(root))
    for asset in ("training_configs", "weights_map", "raw_corpus", "expanded_corpus"):
        assert "STALE: configs changed" in asset_line(out, asset), out
    assert "STALE" in asset_line(out, "tokenized_cache")

    # Materializing again makes everything current; a later upstream run makes its dependants stale.
    assert main(["materialize", "--source", str(root), "--seed", "5"]) == 0
    capsys.readouterr()
    out = status(capsys, "--source", str(root))
    assert all(asset_line(out, asset).endswith("current") for asset in ASSETS), out


def test_status_reports_a_changed_setting(tmp_path, home, capsys, monkeypatch):
    root = tmp_path / "corpus"
    shutil.copytree(EXAMPLE, root)
    assert main(["materialize", "--source", str(root), "--seed", "1"]) == 0
    capsys.readouterr()
    monkeypatch.setenv(settings.ENV_WEIGHTS_SCOPE, "global")
    out = status(capsys, "--source", str(root))
    assert asset_line(out, "raw_corpus").endswith("current")
    assert "setting weights_scope changed (nearest -> global)" in asset_line(out, "weights_map")
    assert "upstream weights_map is stale" in asset_line(out, "expanded_corpus")


def test_status_sees_a_tokenizer_changed_in_place_and_an_eos_token_it_lacks(tmp_path, home, capsys, monkeypatch):
    """DLM_TOKENIZER names the same file before and after, so only the loaded tokenizer's fingerprint
    can tell that the token ids on disk came from another tokenizer."""
    root = tmp_path / "corpus"
    shutil.copytree(EXAMPLE, root)
    texts = [p.read_text(errors="replace") for p in root.rglob("*") if p.is_file()]
    path = small_tokenizer(tmp_path / "tok" / "tokenizer.json", texts, vocab_size=300)
    monkeypatch.setenv(settings.ENV_TOKENIZER, str(path))
    assert main(["materialize", "--source", str(root), "--seed", "1"]) == 0
    capsys.readouterr()
    out = status(capsys, "--source", str(root))
    assert asset_line(out, "tokenized_cache").endswith("current"), out
    assert asset_line(out, "training_dataset").endswith("current"), out

    small_tokenizer(path, texts, vocab_size=400)  # same file, other merges
    out = status(capsys, "--source", str(root))
    assert asset_line(out, "raw_corpus").endswith("current")
    assert "setting tokenizer_fingerprint changed" in asset_line(out, "tokenized_cache")
    assert "setting tokenizer_fingerprint changed" in asset_line(out, "training_dataset")

    monkeypatch.setenv(settings.ENV_EOS_TOKEN, "<|no such token|>")
    out = status(capsys, "--source", str(root))
    assert "setting eos_id cannot be read now: EOS token '<|no such token|>' is not in" in asset_line(
        out, "training_dataset"
    )
