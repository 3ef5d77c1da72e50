"""Gitignore-style glob sets matched in linear time, however many patterns and however hostile.

pathspec's own default engine is Python's backtracking `re` (or re2 only when it happens to be
installed): `*a*a*a*a*a*b` against a long name of `a`s then never finishes. We always ask for the
re2 backend (google-re2, a dependency), whose matching is linear in the path and pattern.

One re2 set cannot hold a 20,000-line ignore file (re2's memory budget is exceeded, and a huge set
matches slowly), so the patterns are compiled in sets of `CHUNK` and the matches of all sets are
combined with the very rule pathspec's re2 gitignore backend applies within one set: a file match
outranks a directory match, the later pattern wins among equals, and a re-including directory
pattern wins over any earlier one. For up to `CHUNK` patterns the verdict is therefore pathspec's
own, and for more it is the same rule over all matches.
"""

from __future__ import annotations

from collections.abc import Iterable

import pathspec
from pathspec.patterns.gitignore.spec import GitIgnoreSpecPattern

BACKEND = "re2"
CHUNK = 256


def compile_glob(pattern: str) -> None:
    """Raise (ValueError or pathspec's/re2's own error) when `pattern` cannot be matched by re2."""
    pathspec.GitIgnoreSpec.from_lines([pattern], backend=BACKEND)


class GlobSet:
    """Patterns in gitignore syntax (`!` negation, last match wins), matched by re2 sets."""

    def __init__(self, lines: Iterable[str]):
        patterns = [GitIgnoreSpecPattern(line) for line in lines]
        self._sets = [
            (start, pathspec.GitIgnoreSpec(patterns[start : start + CHUNK], backend=BACKEND)._backend)
            for start in range(0, len(patterns), CHUNK)
        ]

    def check(self, path: str) -> bool | None:
        """True: a pattern selects `path`; False: a `!pattern` re-includes it; None: no pattern matches."""
        out_include, out_index, out_priority = None, -1, -1
        for start, backend in self._sets:
            for regex_id in backend._set.Match(path) or ():
                data = backend._regex_data[regex_id]
                index, priority = start + data.index, 1 if data.is_dir_pattern else 2
                if (
                    (data.include and data.is_dir_pattern and index > out_index)
                    or (priority == out_priority and index > out_index)
                    or priority > out_priority
                ):
                    out_include, out_index, out_priority = data.include, index, priority
        return out_include

    def matches(self, path: str) -> bool:
        return bool(self.check(path))
