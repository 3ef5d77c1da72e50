"""Which files of the tree are in the corpus, and with which tags (SPEC §1).

Anchors are applied from the root down to the file's directory: default excludes first (final
unless the nearest anchor that sets `exclude_defaults` says false), then each anchor's include,
exclude and `.dlm/ignore` as a running verdict, so deeper rules can re-admit what shallower
ones excluded.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property, lru_cache

from dlm_pipeline.core.config import TrainingConfig
from dlm_pipeline.core.globs import GlobSet, glob_set

_LAYOUT_EXCLUDES: tuple[str, ...] = (
    # version control
    ".git/",
    ".hg/",
    ".svn/",
    # pipeline configs
    ".dlm/",
    # caches, environments, build and generated output, minified bundles and source maps
    "__pycache__/",
    "node_modules/",
    ".venv/",
    "venv/",
    "build/",
    "dist/",
    "target/",
    "generated/",
    "__generated__/",
    ".tox/",
    ".nox/",
    ".mypy_cache/",
    ".pytest_cache/",
    ".ruff_cache/",
    ".terraform/",
    "*.min.js",
    "*.min.css",
    "*.map",
    # lockfiles
    "*.lock",
    "package-lock.json",
    "npm-shrinkwrap.json",
    "pnpm-lock.yaml",
    "go.sum",
)
# Matched in any case: `.ENV`, `PROD.PEM`, `Credentials.json` hold what their lower-case names do
# (and are those very files on a case-insensitive file system); `.ENV` with `DB_PASSWORD=...` was
# ingested. The folders and lockfiles above match as git matches them: `Build/` is a source folder.
ANY_CASE_EXCLUDES: tuple[str, ...] = (
    # credentials: keys, tokens and the files tools keep them in (the content scan catches the rest)
    ".env*",
    "*.pem",
    "*.key",
    "*.p12",
    "*.pfx",
    "*.jks",
    "*.keystore",
    "*.ppk",
    "*.kdbx",
    "id_rsa*",
    "id_ed25519*",
    "id_ecdsa*",
    "id_dsa*",
    ".ssh/",
    ".gnupg/",
    ".aws/credentials",
    ".netrc",
    "_netrc",
    ".git-credentials",
    ".pypirc",
    ".npmrc",
    ".yarnrc.yml",
    ".pgpass",
    ".htpasswd",
    "credentials.json",
    "service-account*.json",
    ".docker/config.json",
    "kubeconfig",
    ".kube/config",
    "*.tfstate",
    "*.tfstate.backup",
    "*.tfvars",
    "secrets.toml",
    "secrets.yaml",
    "secrets.yml",
    "secrets.json",
    # binary media, archives and compiled code
    "*.png",
    "*.jpg",
    "*.jpeg",
    "*.gif",
    "*.bmp",
    "*.ico",
    "*.webp",
    "*.tif",
    "*.tiff",
    "*.psd",
    "*.mp3",
    "*.wav",
    "*.flac",
    "*.ogg",
    "*.m4a",
    "*.mp4",
    "*.mov",
    "*.avi",
    "*.mkv",
    "*.webm",
    "*.pdf",
    "*.zip",
    "*.tar",
    "*.gz",
    "*.tgz",
    "*.bz2",
    "*.xz",
    "*.zst",
    "*.7z",
    "*.rar",
    "*.jar",
    "*.whl",
    "*.so",
    "*.dylib",
    "*.dll",
    "*.exe",
    "*.bin",
    "*.o",
    "*.a",
    "*.pyc",
    "*.pyo",
    "*.class",
    "*.rlib",
    "*.wasm",
    "*.woff",
    "*.woff2",
    "*.ttf",
    "*.otf",
    "*.eot",
    "*.parquet",
    "*.sqlite",
    "*.db",
)
DEFAULT_EXCLUDES = _LAYOUT_EXCLUDES + ANY_CASE_EXCLUDES
_DEFAULT_SPEC = GlobSet(DEFAULT_EXCLUDES, ignore_case=frozenset(ANY_CASE_EXCLUDES))


def is_default_excluded(path: str) -> bool:
    return _DEFAULT_SPEC.matches(path)


DEFAULTS, INCLUDE, EXCLUDE, IGNORE = "default excludes", "include", "exclude", "ignore"


@dataclass(frozen=True)
class RuleHit:
    """One rule that touched a path's verdict: which anchor ("" root; None for the default
    excludes), which list, the index of the deciding pattern in it (None: an include list that
    no pattern matched), and the verdict after it."""

    anchor: str | None
    kind: str
    index: int | None
    included: bool


@dataclass(frozen=True)
class Anchor:
    """A directory with a `.dlm/` folder ("" is the root) and what it configures."""

    dir: str
    config: TrainingConfig | None = None
    ignore: tuple[str, ...] | None = None

    @property
    def depth(self) -> int:
        return 0 if not self.dir else self.dir.count("/") + 1

    def relative(self, path: str) -> str:
        return path[len(self.dir) + 1 :] if self.dir else path

    @cached_property
    def include_spec(self) -> GlobSet | None:
        if self.config is None or self.config.include is None:
            return None
        return glob_set(tuple(self.config.include))

    @cached_property
    def exclude_spec(self) -> GlobSet | None:
        if self.config is None or not self.config.exclude:
            return None
        return glob_set(tuple(self.config.exclude))

    @cached_property
    def ignore_spec(self) -> GlobSet | None:
        return glob_set(tuple(self.ignore)) if self.ignore else None

    def verdict(self, path: str, included: bool, trace: list[RuleHit] | None = None) -> bool:
        """Apply this anchor's rules to the running verdict for `path` (relative to the root);
        each rule that touched it is appended to `trace` (what `explain` prints)."""
        rel = self.relative(path)
        if self.include_spec is not None:
            decided = self.include_spec.decide(rel)
            included = decided is not None and decided[1]
            if trace is not None:
                trace.append(RuleHit(self.dir, INCLUDE, decided[0] if decided else None, included))
        if self.exclude_spec is not None:
            decided = self.exclude_spec.decide(rel)
            if decided is not None and decided[1]:
                included = False
                if trace is not None:
                    trace.append(RuleHit(self.dir, EXCLUDE, decided[0], included))
        if self.ignore_spec is not None:
            decided = self.ignore_spec.decide(rel)
            if decided is not None:
                included = not decided[1]
                if trace is not None:
                    trace.append(RuleHit(self.dir, IGNORE, decided[0], included))
        return included


def parent_dir(path: str) -> str:
    return path.rpartition("/")[0]


def ancestor_dirs(directory: str) -> list[str]:
    """ "" then each prefix of `directory`, shallowest first."""
    if not directory:
        return [""]
    parts = directory.split("/")
    return [""] + ["/".join(parts[: i + 1]) for i in range(len(parts))]


class PathRules:
    """Inclusion and tags for paths, given every valid anchor of the tree."""

    def __init__(self, anchors: list[Anchor]):
        self._anchors = {a.dir: a for a in anchors}
        self.chain = lru_cache(maxsize=None)(self._chain)
        self.tags = lru_cache(maxsize=None)(self._tags)

    def _chain(self, directory: str) -> tuple[Anchor, ...]:
        return tuple(self._anchors[d] for d in ancestor_dirs(directory) if d in self._anchors)

    def _tags(self, directory: str) -> dict[str, str]:
        return {key: value for key, (value, _) in sorted(self.tag_sources(directory).items())}

    def tag_sources(self, directory: str) -> dict[str, tuple[str, str]]:
        """{tag key: (value, anchor that set it)}: deeper anchors override shallower ones."""
        merged: dict[str, tuple[str, str]] = {}
        for anchor in self.chain(directory):
            if anchor.config is not None:
                merged.update((key, (value, anchor.dir)) for key, value in anchor.config.metadata.items())
        return merged

    @staticmethod
    def _nearest_setting(chain: tuple[Anchor, ...], name: str) -> bool:
        """The boolean `name` as the nearest anchor that sets it says; true when none does."""
        for anchor in reversed(chain):
            if anchor.config is not None and getattr(anchor.config, name) is not None:
                return getattr(anchor.config, name)
        return True

    def scans_secrets(self, directory: str) -> bool:
        """Whether files in `directory` get the content scan for credentials (`scan_secrets`)."""
        return self._nearest_setting(self.chain(directory), "scan_secrets")

    def is_default_excluded(self, path: str) -> bool:
        """Whether a default exclude drops `path` (unless its nearest `exclude_defaults` says false)."""
        return self._nearest_setting(self.chain(parent_dir(path)), "exclude_defaults") and is_default_excluded(path)

    def is_included(self, path: str, trace: list[RuleHit] | None = None) -> bool:
        """The path rules' verdict; with `trace`, every rule that touched it is appended there."""
        chain = self.chain(parent_dir(path))
        if self._nearest_setting(chain, "exclude_defaults"):
            decided = _DEFAULT_SPEC.decide(path)
            if decided is not None and decided[1]:
                if trace is not None:
                    trace.append(RuleHit(None, DEFAULTS, decided[0], False))
                return False
        included = True
        for anchor in chain:
            included = anchor.verdict(path, included, trace)
        return included


def unapplied_anchors(anchors: list[Anchor]) -> set[str]:
    """Directories of anchors that lie inside a folder the default excludes drop (`node_modules/pkg/`,
    `.git/`, `.venv/`), as the applied anchors above them say. Their settings are not applied: a
    config shipped in a dependency or planted in `.git/` lifted the default excludes and the
    credential scan over itself (`exclude_defaults: false`, `scan_secrets: false`), so keys kept
    there were read into the corpus. To take such a folder in, say `exclude_defaults: false` above it."""
    by_dir = {a.dir: a for a in anchors}
    unapplied: set[str] = set()
    for anchor in sorted(anchors, key=lambda a: a.depth):
        above = tuple(by_dir[d] for d in ancestor_dirs(parent_dir(anchor.dir)) if d in by_dir and d not in unapplied)
        if (
            anchor.dir
            and PathRules._nearest_setting(above, "exclude_defaults")
            and _DEFAULT_SPEC.matches(anchor.dir + "/")
        ):
            unapplied.add(anchor.dir)
    return unapplied
