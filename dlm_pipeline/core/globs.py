"""Gitignore-style glob sets matched in linear time, however many patterns and however hostile.

pathspec's own default engine is Python's backtracking `re` (or re2 only when it happens to be
installed): `*a*a*a*a*a*b` against a long name of `a`s then never finishes. We always ask for the
re2 backend (google-re2, a dependency), whose matching is linear in the path and pattern.

One re2 set cannot hold a 20,000-line ignore file (re2's memory budget is exceeded, and a huge set
matches slowly), so the patterns are compiled in sets of `CHUNK` and the matches of all sets are
combined with the rule of pathspec's reference (pure Python) gitignore backend: the last pattern
that matches the file itself wins; only when none does, the last one that matches a parent folder.
This is order-free, so splitting into sets cannot change a verdict.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from functools import lru_cache

import pathspec
from pathspec.patterns.gitignore.spec import GitIgnoreSpecPattern

BACKEND = "re2"
CHUNK = 256


def glob_errors(lines: Sequence[str]) -> list[tuple[int, str]]:
    """(0-based line index, reason) for each pattern pathspec or re2 refuses. The whole list is
    compiled once (and kept: the rules reuse it); line by line only when that fails."""
    try:
        glob_set(tuple(lines))
        return []
    except Exception:  # pathspec and re2 raise several types for bad patterns
        pass
    errors = []
    for index, line in enumerate(lines):
        try:
            pathspec.GitIgnoreSpec.from_lines([line], backend=BACKEND)
        except Exception as exc:
            errors.append((index, _reason(exc)))
    if not errors:  # each pattern compiles alone, yet a set of them exceeds re2's memory budget
        start = next(i for i in range(0, len(lines), CHUNK) if not _compiles(lines[i : i + CHUNK]))
        errors.append((start, f"patterns from here on are too large together for re2 (sets of {CHUNK}); simplify them"))
    return errors


def _reason(exc: Exception) -> str:
    """Why a pattern is refused, in at most ~200 characters (pathspec quotes the whole pattern)."""
    reason = str(exc) or type(exc).__name__
    if reason == "failed to compile Set":  # re2's memory budget, for one pattern alone
        return "too long or complex for linear-time matching (re2); shorten it"
    return reason if len(reason) <= 200 else f"{reason[:150]}...{reason[-40:]}"


def _compiles(lines: Sequence[str]) -> bool:
    try:
        GlobSet(lines)
    except Exception:  # pathspec and re2 raise several types for bad patterns
        return False
    return True


class _RegexSource:
    """Stands in for a compiled `re` pattern: the re2 backend reads only `.pattern`. Compiling each
    pattern with Python's `re` as well (which never matches here) was 90 % of building a set:
    7 s for a 20,000-line ignore file, in every process that reads it."""

    __slots__ = ("pattern",)
    match = None  # what pathspec looks for to take an object as a compiled pattern

    def __init__(self, pattern: str):
        self.pattern = pattern


def _pattern(line: str, flags: str = "s") -> GitIgnoreSpecPattern:
    regex, include = GitIgnoreSpecPattern.pattern_to_regex(line)
    # (?s): `**` becomes `.+`, and `.` stops at a newline unless told otherwise, so a folder named
    # "a\nb" slipped past every rule below it (`a\nb/.env` was not a default exclude). Git's
    # wildmatch treats a newline like any other character.
    return GitIgnoreSpecPattern(_RegexSource(f"(?{flags}){regex}") if include is not None else None, include)


class GlobSet:
    """Patterns in gitignore syntax (`!` negation, last match wins), matched by re2 sets."""

    def __init__(self, lines: Iterable[str], *, ignore_case: Collection[str] = ()):
        """`ignore_case`: the lines that match in any case (the others match as git does)."""
        patterns = [_pattern(line, "si" if line in ignore_case else "s") for line in lines]
        self._sets = [
            (start, pathspec.GitIgnoreSpec(patterns[start : start + CHUNK], backend=BACKEND)._backend)
            for start in range(0, len(patterns), CHUNK)
        ]

    def check(self, path: str) -> bool | None:
        """True: a pattern selects `path`; False: a `!pattern` re-includes it; None: no pattern matches."""
        decided = self.decide(path)
        return None if decided is None else decided[1]

    def decide(self, path: str) -> tuple[int, bool] | None:
        """(index of the pattern that decides `path`, what `check` answers), or None: no pattern matches."""
        matched: dict[int, tuple[bool, bool]] = {}  # pattern index -> (include, matched only as a folder)
        for start, backend in self._sets:
            for regex_id in backend._set.Match(path) or ():
                data = backend._regex_data[regex_id]
                index = start + data.index
                include, only_dir = matched.get(index, (data.include, True))
                matched[index] = (include, only_dir and data.is_dir_pattern)
        if not matched:
            return None
        # The last pattern that matches the file itself wins; failing that, the last that matches
        # one of its parent folders.
        winner = max(matched, key=lambda index: (not matched[index][1], index))
        return winner, matched[winner][0]

    def matches(self, path: str) -> bool:
        return bool(self.check(path))


@lru_cache(maxsize=256)
def glob_set(lines: tuple[str, ...]) -> GlobSet:
    """The compiled set for `lines`, shared by validation and matching within a process."""
    return GlobSet(lines)
