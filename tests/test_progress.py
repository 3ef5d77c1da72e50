"""`materialize` shows progress bars on a terminal and stays plain without one."""

from __future__ import annotations

import os
import pty
import subprocess
import sys

from conftest import EXAMPLE, REPO


def _env(home) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DLM_")}
    return {**env, "PYTHONPATH": str(REPO), "DAGSTER_HOME": str(home), "TERM": "xterm", "COLUMNS": "120"}


def _materialize_args(tmp_path) -> list[str]:
    return [sys.executable, "-m", "dlm_pipeline.cli", "materialize", "--source", str(EXAMPLE), "--seed", "4"]


def test_bars_on_a_terminal(tmp_path):
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        _materialize_args(tmp_path), stdin=slave, stdout=slave, stderr=slave, env=_env(tmp_path / "home")
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=120) == 0
    output = b"".join(chunks).decode(errors="replace")
    assert "seed 4: raw_corpus files read" in output
    assert "seed 4: texts tokenized" in output
    assert "\x1b[" in output and "━" in output  # rich's control sequences and bar
    assert "seed 4: ok" in output


def test_plain_without_a_terminal(tmp_path):
    result = subprocess.run(_materialize_args(tmp_path), capture_output=True, text=True, env=_env(tmp_path / "home"))
    assert result.returncode == 0, result.stderr
    assert "seed 4: ok" in result.stdout
    for stream in (result.stdout, result.stderr):
        assert "\x1b" not in stream and "\r" not in stream and "━" not in stream
