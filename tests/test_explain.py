"""`dlm-pipeline explain` agrees with what the pipeline materializes, for every path of the example tree."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from conftest import EXAMPLE, REPO

from dlm_pipeline.core.explain import ExplainError, explain

SEED = 3
AWS_KEY = "aws_key = 'AKIA" + "Q3EGRYMNHCZ7XWPA'\n"


@pytest.fixture
def example(tmp_path) -> Path:
    """The example tree plus one file for each skip the example lacks: a credential, a file too
    large, a symlink leaving the root, a broken symlink, a symlinked folder."""
    root = tmp_path / "corpus"
    shutil.copytree(EXAMPLE, root, symlinks=True)
    (root / "src" / "acme" / "settings_local.py").write_text(AWS_KEY)
    (root / "notes" / "huge.txt").write_text("x" * 2048)
    (tmp_path / "outside.py").write_text("print('outside')\n")
    os.symlink(tmp_path / "outside.py", root / "src" / "escape.py")
    os.symlink(root / "missing.py", root / "src" / "broken.py")
    os.symlink(root / "docs", root / "docs_link")
    (root / "src" / "inside.py").write_text("print('inside')\n")
    os.symlink(root / "src" / "inside.py", root / "src" / "inside_link.py")
    os.symlink("../.env", root / "notes" / "env_link.txt")  # a link never re-admits a default-excluded target
    return root


def every_path(root: Path) -> list[str]:
    found = []
    for directory, dirs, files in os.walk(root):
        for name in files + [d for d in dirs if os.path.islink(os.path.join(directory, d))]:
            found.append(Path(directory, name).relative_to(root).as_posix())
    return sorted(found)


def test_every_path_agrees_with_raw_corpus_and_copies(example, pipeline):
    run = pipeline(example, max_file_bytes=1024)
    run.run(str(SEED))
    raw_paths = set(pq.read_table(run.output("raw_corpus", str(SEED)))["path"].to_pylist())
    expanded = pq.read_table(run.output("expanded_corpus", str(SEED)))
    copies = Counter(expanded["path"].to_pylist())
    paths = every_path(example)
    excluded_texts = []
    for path in paths:
        result = explain(example, path, SEED, max_file_bytes=1024)
        assert result.in_raw_corpus == (path in raw_paths), result.text()
        if result.in_raw_corpus:
            shown = int(re.search(r"-> (\d+) cop", result.text()).group(1))
            assert shown == copies[path], result.text()
        else:
            excluded_texts.append(result.text())
    assert raw_paths <= set(paths)
    # The tree exercises every kind of verdict explain reports.
    everything = "\n".join(excluded_texts)
    for kind in (
        "built-in default exclude",
        "ignore '",
        "exclude '",
        "skipped: secret",
        "skipped: too_large",
        "skipped: binary",
        "skipped: encoding",
        "symlink_escape",
        "broken_symlink",
        "symlink_dir",
    ):
        assert kind in everything, kind


def test_secret_value_is_never_printed(example):
    text = explain(example, "src/acme/settings_local.py").text()
    assert "skipped: secret (AWS Access Key)" in text
    assert "AKIA" not in text


def test_paths_outside_or_missing_are_refused(example, tmp_path):
    with pytest.raises(ExplainError, match="not under the source root"):
        explain(example, str(tmp_path / "outside.py"))
    with pytest.raises(ExplainError, match="no such file"):
        explain(example, "src/nope.py")
    with pytest.raises(ExplainError, match="is a folder"):
        explain(example, "src")
    # Relative to the current folder when the root has no such path.
    assert explain(example, "core.py", cwd=str(example / "src" / "acme")).path == "src/acme/core.py"


def cli(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("DLM_SOURCE_ROOT", None)
    return subprocess.run(
        [sys.executable, "-m", "dlm_pipeline.cli", "explain", *args], capture_output=True, text=True, cwd=cwd, env=env
    )


def test_cli_output_and_exit_codes(example):
    included = cli("src/acme/core.py", "--seed", "5", "--source", str(example))
    assert included.returncode == 0, included.stderr
    assert ".dlm/training.yaml:3  include '**/*.py' -> included" in included.stdout
    assert "kind=code  (from src/acme)" in included.stdout
    assert "lang=python  x1.5  (src/acme/.dlm/training.yaml:4)" in included.stdout
    assert "composed weight 1.5" in included.stdout
    assert re.search(r"seed 5, bernoulli: 1 whole \+ roll 0\.\d+ [<>=]+ fraction 0\.5 -> [12] cop", included.stdout)
    assert re.search(r"split \(split seed 0, validation fraction 0\.1\): (train|validation)", included.stdout)
    assert re.search(r"tokens: \d+ \+ 1 EOS per document", included.stdout)
    assert included.stdout.rstrip().endswith("in raw_corpus")

    ignored = cli("docs/drafts/wip.md", "--source", str(example))
    assert ignored.returncode == 1
    assert "docs/.dlm/ignore:2  ignore 'drafts/' -> excluded" in ignored.stdout

    exact = cli("notes/ideas.md", "--expansion-mode", "exact", "--source", str(example))
    assert exact.returncode == 0
    assert re.search(
        r"exact: 0 whole \+ roll 0\.\d+ ranks \d of 3 rows of weight 0\.5; the 2 lowest get one more -> [01] cop",
        exact.stdout,
    )

    relative = cli("core.py", "--source", str(example), cwd=example / "src" / "acme")
    assert relative.returncode == 0 and relative.stdout.startswith("src/acme/core.py")

    for args in (["nope.py"], ["src"], ["x", "--seed", "-1"]):
        bad = cli(*args, "--source", str(example))
        assert bad.returncode == 2 and bad.stdout == "" and len(bad.stderr.strip().splitlines()) == 1, bad.stderr


def test_explain_loads_no_dagster(example):
    """`explain` runs nothing in Dagster: importing it (~1 s, only to check the nightly schedule's cron)
    was most of what an `explain` took."""
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['dlm-pipeline', 'explain', 'src/acme/core.py', '--source', {str(example)!r}]\n"
        "try:\n    runpy.run_module('dlm_pipeline.cli', run_name='__main__')\n"
        "except SystemExit as exc:\n    assert exc.code == 0, exc.code\n"
        "print('dagster' in sys.modules)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "False"
