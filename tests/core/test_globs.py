"""Glob matching in linear time (issue 9 item 3): re2 always, large pattern files in re2 sets."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap

import pathspec
import pytest

from dlm_pipeline.core import globs
from dlm_pipeline.core.config import ConfigInvalid, parse_ignore_file
from dlm_pipeline.core.globs import GlobSet
from tests.core.test_tree_and_rules import V1, corpus

EVIL = "*a*a*a*a*a*b"
LONG_NAME = "a" * 200


def run_python(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Run code in a fresh interpreter; a hang fails the test at `timeout` instead of hanging it."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    "files",
    [
        {".dlm/ignore": EVIL + "\n"},
        {".dlm/training.yaml": V1 + f'include: ["{EVIL}", "**"]\n'},
        {".dlm/training.yaml": V1 + f'exclude: ["{EVIL}"]\n'},
    ],
    ids=["ignore", "include", "exclude"],
)
def test_backtracking_pattern_against_a_long_name_finishes(tree, files):
    root = tree({**files, LONG_NAME: "x\n", "keep.py": "y\n"})
    out = run_python(
        f"""
        from tests.core.test_tree_and_rules import paths
        print(paths({str(root)!r}))
        """
    )
    assert out.returncode == 0, out.stderr
    assert LONG_NAME in out.stdout and "keep.py" in out.stdout


def test_without_re2_the_pipeline_refuses_to_start_rather_than_backtrack(tree):
    """Today's code silently fell back to Python's `re` when google-re2 was missing, and hung."""
    root = tree({".dlm/ignore": EVIL + "\n", LONG_NAME: "x\n"})
    out = run_python(
        f"""
        import sys
        sys.modules["re2"] = None  # as on an install without google-re2
        try:
            from tests.core.test_tree_and_rules import paths
            paths({str(root)!r})
        except Exception as exc:
            print("refused:", type(exc).__name__)
        """,
        timeout=30,
    )
    assert "refused:" in out.stdout, out.stdout + out.stderr


def test_every_glob_set_uses_re2():
    from pathspec._backends.re2.gitignore import Re2GiBackend

    from dlm_pipeline.core.rules import _DEFAULT_SPEC

    for spec in (_DEFAULT_SPEC, GlobSet(["*.py", "!keep.py", "docs/"])):
        assert spec._sets and all(isinstance(backend, Re2GiBackend) for _, backend in spec._sets)


def test_twenty_thousand_patterns_compile_in_chunks_and_match(tree):
    """One re2 set of 20,000 patterns exceeds re2's memory budget (today: an error); chunks do not."""
    lines = [f"gen{i}/*.tmp{i}" if i % 3 else f"!keep{i}*" for i in range(20_000)] + ["*.log", "!important.log"]
    spec = GlobSet(lines)
    assert len(spec._sets) == -(-len(lines) // globs.CHUNK)
    assert spec.check("gen1/x.tmp1") is True
    assert spec.check("keep3.py") is False
    assert spec.check("src/a.py") is None
    assert spec.check("a.log") is True and spec.check("important.log") is False
    root = tree({".dlm/ignore": "\n".join(lines) + "\n", "gen1/x.tmp1": "1\n", "a.log": "1\n", "a.py": "1\n"})
    assert corpus(root).table["path"].to_pylist() == ["a.py"]


PATTERN_POOL = [
    "*.py",
    "!*.py",
    "docs/",
    "!docs/",
    "docs/**",
    "!docs/keep.md",
    "a/**/b",
    "**/tmp/",
    "!**/tmp/x",
    "/root.txt",
    "*.md",
    "!README.md",
    "build",
    "!build/",
    "x/*",
    "!x/y",
    "**/*.txt",
    "src/",
    "!src/**/*.py",
    "a*",
    "!a?c",
    "[ab]*.md",
    "**/c",
    "c/",
    "!c/d",
    "\\!bang",
    "#comment",
    "",
    "deep/**/leaf/",
    "*/*/z",
]
PATH_POOL = [
    "a.py",
    "docs/a.md",
    "docs/keep.md",
    "docs/sub/a.py",
    "a/b",
    "a/x/b",
    "a/x/y/b/c",
    "tmp/x",
    "q/tmp/x",
    "q/tmp/y",
    "root.txt",
    "sub/root.txt",
    "README.md",
    "x/README.md",
    "build/a",
    "build",
    "x/y",
    "x/z",
    "src/a.py",
    "src/m/a.txt",
    "abc",
    "acc",
    "ab.md",
    "c",
    "c/d",
    "c/e",
    "!bang",
    "deep/a/leaf/f",
    "p/q/z",
]


@pytest.mark.parametrize("seed", range(40))
def test_chunked_sets_agree_with_pathspec_reference_backend(monkeypatch, seed):
    """Split into sets of 3, the verdict is that of pathspec's reference (pure Python) backend."""
    rng = random.Random(seed)
    lines = rng.sample(PATTERN_POOL, rng.randint(1, len(PATTERN_POOL)))
    expected = pathspec.GitIgnoreSpec.from_lines(lines, backend="simple")
    monkeypatch.setattr(globs, "CHUNK", 3)
    chunked = GlobSet(lines)
    for path in PATH_POOL:
        assert chunked.check(path) == expected.check_file(path).include, (lines, path)


def test_validation_refuses_what_re2_cannot_match():
    with pytest.raises(ConfigInvalid) as caught:
        parse_ignore_file("ok/\n[[:alpha:]]x\n", "d/.dlm/ignore")  # fine for Python's re, not for re2
    assert "d/.dlm/ignore:2:" in str(caught.value)
