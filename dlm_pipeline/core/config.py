"""`.dlm/training.yaml` and `.dlm/ignore`: strict parsing with errors that name file, line and field.

YAML is read with the safe loader only. Tag keys and values are canonicalised to strings
(`true` -> "true", `1` -> "1") before validation, so `generated: true` and
`generated: "true"` are the same tag everywhere downstream.
"""

from __future__ import annotations

import math
import reprlib
from dataclasses import dataclass
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from dlm_pipeline.core.globs import glob_errors

ANCHOR_DIR = ".dlm"
TRAINING_FILE = "training.yaml"
IGNORE_FILE = "ignore"
SUPPORTED_VERSION = 1
DEFAULT_MAX_WEIGHT = 100.0
# Tags are copied onto every row below the anchor: bounded so a config cannot multiply memory by
# thousands (2,000 keys on 5,000 files took 3.1 GB). Far above what a tag scheme needs.
MAX_METADATA_KEYS = 64
MAX_TAG_CHARS = 256
# Far deeper than the schema goes (3 levels), far below the depth that exhausts Python's recursion limit.
MAX_YAML_DEPTH = 32


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in one config file, printable as `path:line: field: message`."""

    path: str
    line: int | None
    field: str | None
    message: str

    def __str__(self) -> str:
        path, field = printable(self.path), printable(self.field or "")
        where = f"{path}:{self.line}" if self.line else path
        return f"{where}: {field}: {self.message}" if field else f"{where}: {self.message}"


def printable(text: str) -> str:
    """`text` with each non-printable character escaped (`\\n`, `\\r`, `\\x00`): a key or folder name
    holding a newline made one error two lines, the second forged (`evil\\nx.yaml:1: ...`)."""
    return text if text.isprintable() else "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


class ConfigInvalid(Exception):
    """A config file could not be accepted; `issues` lists every problem found in it."""

    def __init__(self, issues: list[ConfigIssue]):
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist, _short.maxdict, _short.maxlevel = 60, 60, 4, 4, 2


def short_repr(value: Any) -> str:
    """repr() bounded in size: error messages quote the offending value, never all of it."""
    return _short.repr(value)


def canonical_tag(value: Any) -> str:
    """YAML scalar -> tag string: bools as true/false, integers in decimal, strings as-is."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return value
    if value is None:
        raise ValueError('null is not a tag; write a string (quote it: "null") or remove the entry')
    if isinstance(value, float):
        raise ValueError(f'{short_repr(value)} is a float; quote it to keep it exact (e.g. "{value}")')
    if isinstance(value, (list, dict)):
        raise ValueError(f"tags are strings, got a {type(value).__name__}")
    raise ValueError(f"tags are strings, got {type(value).__name__} {short_repr(value)}; quote it")


def _check_weight(value: Any, info: ValidationInfo) -> float:
    max_weight = (info.context or {}).get("max_weight", DEFAULT_MAX_WEIGHT)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"weight must be a number, got {type(value).__name__} {short_repr(value)}")
    try:
        weight = float(value)
    except OverflowError:  # an integer beyond float's range
        weight = math.inf
    if not math.isfinite(weight):
        raise ValueError(f"weight must be finite, got {short_repr(value)}")
    if weight < 0:
        raise ValueError(f"weight must be >= 0 (0 drops the rows), got {short_repr(value)}")
    if weight > max_weight:
        raise ValueError(
            f"weight {short_repr(value)} is above max_weight {max_weight:g}; lower it or raise DLM_MAX_WEIGHT"
        )
    return weight


def _canonical_mapping(value: Any) -> Any:
    """Canonicalise the keys of a tag mapping, refusing two keys that become the same tag."""
    if not isinstance(value, dict):
        return value
    out: dict[str, Any] = {}
    for key, item in value.items():
        name = canonical_tag(key)
        if name in out:
            raise ValueError(f'keys {name!r} appear twice once canonicalised (e.g. true and "true")')
        out[name] = item
    return out


def bounded_tag(value: Any) -> str:
    """canonical_tag, refusing tags longer than MAX_TAG_CHARS characters."""
    tag = canonical_tag(value)
    if len(tag) > MAX_TAG_CHARS:
        raise ValueError(f"tag of {len(tag)} characters {short_repr(tag)}; at most {MAX_TAG_CHARS} are allowed")
    return tag


TagKey = Annotated[str, BeforeValidator(bounded_tag)]
TagValue = Annotated[str, BeforeValidator(bounded_tag)]
Weight = Annotated[float, BeforeValidator(_check_weight)]
Globs = tuple[StrictStr, ...]


class TrainingConfig(BaseModel):
    """Schema of `.dlm/training.yaml` (version 1). Unknown fields are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    dlm_training_version: int
    include: Globs | None = None
    exclude: Globs = ()
    exclude_defaults: StrictBool | None = Field(default=None, description="None: inherit")
    scan_secrets: StrictBool | None = Field(default=None, description="None: inherit")
    metadata: dict[TagKey, TagValue] = Field(default_factory=dict)
    weights: dict[TagKey, dict[TagKey, Weight]] = Field(default_factory=dict)

    @field_validator("dlm_training_version", mode="before")
    @classmethod
    def _known_version(cls, value: Any) -> int:
        if type(value) is not int or value != SUPPORTED_VERSION:  # not 1.0 or true: a version is a whole number
            raise ValueError(f"only version {SUPPORTED_VERSION} is known, got {short_repr(value)}")
        return value

    @field_validator("include", "exclude", mode="before")
    @classmethod
    def _globs_are_valid(cls, value: Any) -> Any:
        if isinstance(value, list) and all(isinstance(glob, str) for glob in value):
            for i, reason in glob_errors(value):
                raise ValueError(f"glob #{i} {short_repr(value[i])} is not a valid pattern: {reason}")
        return value

    @field_validator("metadata", mode="before")
    @classmethod
    def _metadata_keys(cls, value: Any) -> Any:
        if isinstance(value, dict) and len(value) > MAX_METADATA_KEYS:
            raise ValueError(f"{len(value)} tags; at most {MAX_METADATA_KEYS} per config are allowed")
        return _canonical_mapping(value)

    @field_validator("weights", mode="before")
    @classmethod
    def _weights_keys(cls, value: Any) -> Any:
        value = _canonical_mapping(value)
        if isinstance(value, dict):
            value = {k: _canonical_mapping(v) for k, v in value.items()}
        return value


def _line_of(root: yaml.Node | None, loc: tuple, loader: yaml.SafeLoader) -> int | None:
    """1-based line of the deepest YAML node that `loc` (a pydantic error location) reaches."""
    node, line = root, (root.start_mark.line + 1 if root is not None else None)
    for part in loc:
        if part == "[key]" or node is None:
            continue
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                try:
                    key = canonical_tag(loader.construct_object(key_node, deep=True))
                except (ValueError, yaml.YAMLError):
                    continue
                if key == (canonical_tag(part) if isinstance(part, (bool, int)) else str(part)):
                    node, line = value_node, key_node.start_mark.line + 1
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _duplicate_keys(node: yaml.Node | None, loader: yaml.SafeLoader, path: str) -> list[ConfigIssue]:
    """YAML silently keeps the last of two equal keys; a config that says a thing twice is an error."""
    issues: list[ConfigIssue] = []
    stack: list[tuple[yaml.Node, str]] = [(node, "")] if node is not None else []
    seen_nodes: set[int] = set()  # aliases share nodes: visit each once (no exponential blow-up)
    while stack:
        current, where = stack.pop()
        if id(current) in seen_nodes:
            continue
        seen_nodes.add(id(current))
        if isinstance(current, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in current.value:
                try:
                    key = canonical_tag(loader.construct_object(key_node, deep=True))
                except (ValueError, yaml.YAMLError):
                    key = key_node.value if isinstance(key_node, yaml.ScalarNode) else "?"
                field = f"{where}.{key}" if where else key
                if key in seen:
                    issues.append(ConfigIssue(path, key_node.start_mark.line + 1, field, "key appears twice; keep one"))
                seen.add(key)
                stack.append((value_node, field))
        elif isinstance(current, yaml.SequenceNode):
            stack.extend((item, f"{where}[{i}]") for i, item in enumerate(current.value))
    return sorted(issues, key=lambda i: i.line or 0)


def _message(error: dict) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        known = ", ".join(TrainingConfig.model_fields)
        return f"unknown field; known fields are: {known}"
    if kind == "missing":
        return "required field is missing"
    if kind == "value_error":
        return str(error["ctx"]["error"])
    got = error.get("input")
    if kind in ("tuple_type", "list_type"):
        return f"expected a list of glob strings, got {type(got).__name__} {short_repr(got)}"
    if kind == "dict_type":
        return f"expected a mapping, got {type(got).__name__} {short_repr(got)}"
    return f"{error['msg'].lower()}, got {type(got).__name__} {short_repr(got)}"


def _field(loc: tuple) -> str:
    return ".".join(str(p) for p in loc if p != "[key]")


def decode_config_bytes(data: bytes, path: str) -> str:
    """UTF-8 text of a config file (BOM tolerated), or ConfigInvalid saying it is not text."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigInvalid(
            [ConfigIssue(path, None, None, f"not UTF-8 text (byte {exc.start}); save it as UTF-8")]
        ) from None


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader, made to refuse with a line what would otherwise escape as a Python error:
    nesting deep enough to exhaust the recursion limit (its composer recurses per level), integers
    past Python's 4,300-digit conversion limit, and strings holding a lone surrogate (`"\\ud800"`),
    which no output could store."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise yaml.composer.ComposerError(None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_scalar(self, node):
        value = super().construct_scalar(node)
        if isinstance(value, str) and not is_utf8(value):
            raise yaml.constructor.ConstructorError(
                None, None, "a lone surrogate escape (like \\ud800) is not text", node.start_mark
            )
        return value

    def construct_yaml_int(self, node):
        try:
            return super().construct_yaml_int(node)
        except ValueError:  # more digits than int() converts
            raise yaml.constructor.ConstructorError(
                None, None, f"integer of {len(node.value)} characters is too large", node.start_mark
            ) from None


# YAML 1.1 meanings stay what the safe loader gives (`yes`/`no` booleans, `017` octal, `1:30`
# sexagesimal), canonicalised as SPEC §1 says: the spec's own loader, and any reader of these files.
_BoundedLoader.add_constructor("tag:yaml.org,2002:int", _BoundedLoader.construct_yaml_int)


def is_utf8(text: str) -> bool:
    """Whether `text` can be stored as UTF-8: no lone surrogate (an undecodable file name's bytes,
    a YAML `"\\ud800"` escape)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _yaml_issue(exc: yaml.YAMLError, text: str, path: str) -> ConfigIssue:
    """One line for a YAML error, with its line when the error has one."""
    if isinstance(exc, yaml.reader.ReaderError):  # a control character: raised before any parsing
        line = text.count("\n", 0, exc.position) + 1
        return ConfigIssue(path, line, None, f"malformed YAML: character {exc.character:#06x} is not allowed")
    mark = getattr(exc, "problem_mark", None)
    line = mark.line + 1 if mark is not None else None
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return ConfigIssue(path, line, None, f"malformed YAML: {problem}")


def _credential_issues(root: yaml.Node, data: dict, loader: yaml.SafeLoader, path: str) -> list[ConfigIssue]:
    """An issue for each key or value of the config in which the file-content scanner finds a
    credential (SPEC §1: the corpus never holds a secret, and tags are copied onto every row). Every
    string is scanned, whatever the field, and whatever `scan_secrets` says (that setting is about
    file contents). The issue names the detector, never the value; a flagged key is not shown either."""
    from dlm_pipeline.core.secrets import secret_scanner  # detect-secrets: imported once a config is read

    scanner = secret_scanner()
    verdicts: dict[str, list[str]] = {}

    def kinds(text: Any) -> list[str]:
        if not isinstance(text, str):
            return []
        if text not in verdicts:
            verdicts[text] = scanner.findings(text)
        return verdicts[text]

    def issue(loc: tuple, field: str, what: str, found: list[str]) -> ConfigIssue:
        message = f"{what} holds a credential ({', '.join(found)}), which would be copied into the outputs; remove it"
        return ConfigIssue(path, _line_of(root, loc, loader), field or None, message)

    issues: list[ConfigIssue] = []
    seen: set[int] = set()  # aliases share objects: visit each once (no exponential walk)
    stack: list[tuple[Any, tuple, str]] = [(data, (), "")]
    while stack:
        value, loc, field = stack.pop()
        if isinstance(value, (dict, list)):
            if id(value) in seen:
                continue
            seen.add(id(value))
        if isinstance(value, dict):
            for key, item in value.items():
                if found := kinds(key):
                    issues.append(issue((*loc, key), field, "a key", found))
                    continue
                name = canonical_tag(key) if isinstance(key, (bool, int)) else str(key)
                stack.append((item, (*loc, key), f"{field}.{name}" if field else name))
        elif isinstance(value, list):
            stack.extend((item, (*loc, i), f"{field}[{i}]") for i, item in enumerate(value))
        elif found := kinds(value):
            issues.append(issue(loc, field, "the value", found))
    return sorted(issues, key=lambda i: (i.line or 0, i.field or ""))


def parse_training_config(text: str, path: str, *, max_weight: float = DEFAULT_MAX_WEIGHT) -> TrainingConfig:
    """Validate one `.dlm/training.yaml`; raise ConfigInvalid listing every problem with its line."""
    loader = None
    try:
        loader = _BoundedLoader(text)  # its reader refuses NUL and other control characters here
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        raise ConfigInvalid([_yaml_issue(exc, text, path)]) from None
    finally:
        if loader is not None:
            loader.dispose()
    if data is None:
        raise ConfigInvalid(
            [ConfigIssue(path, 1, "dlm_training_version", "file is empty; it needs at least `dlm_training_version: 1`")]
        )
    if not isinstance(data, dict):
        raise ConfigInvalid(
            [ConfigIssue(path, 1, None, f"top level must be a mapping of fields, got {type(data).__name__}")]
        )
    credentials = _credential_issues(root, data, loader, path)
    if credentials:  # alone: the other messages quote values, and could quote the secret
        raise ConfigInvalid(credentials)
    issues = _duplicate_keys(root, loader, path)
    try:
        config = TrainingConfig.model_validate(data, context={"max_weight": max_weight})
    except ValidationError as exc:
        issues += [
            ConfigIssue(path, _line_of(root, tuple(e["loc"]), loader), _field(tuple(e["loc"])), _message(e))
            for e in exc.errors()
        ]
        config = None
    if issues:
        raise ConfigInvalid(issues)
    return config


def parse_ignore_file(text: str, path: str) -> tuple[str, ...]:
    """Patterns of a `.dlm/ignore` (gitignore syntax); ConfigInvalid names each line pathspec refuses."""
    # Lines end at "\n" only, as in git: str.splitlines also splits at \f, \x1c, \u2028 and friends,
    # turning `a\u2028*.py` into a second pattern `*.py` that git never sees.
    lines = tuple(line.removesuffix("\r") for line in text.split("\n"))
    lines = lines[:-1] if lines and not lines[-1] else lines
    issues = [
        ConfigIssue(path, i + 1, None, f"invalid pattern {short_repr(lines[i])}: {reason}")
        for i, reason in glob_errors(lines)
    ]
    if issues:
        raise ConfigInvalid(issues)
    return lines
