"""Why a file is, or is not, in the corpus (`dlm-pipeline explain`): `git check-ignore -v` for training data.

Every verdict comes from the code ingestion runs, not from a copy of it: the walk (`scan_tree`),
the path rules with their trace (`PathRules.is_included`), the content rules (`content_outcome`),
the tags (`PathRules.tag_sources`) and the copies (`plan_corpus`). What is added here is only
where each rule came from (file and line), so the two cannot disagree.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import yaml

from dlm_pipeline.core.config import ANCHOR_DIR, IGNORE_FILE, TRAINING_FILE, _line_of, decode_config_bytes
from dlm_pipeline.core.config_records import STATUS_ERROR, anchors_from_table, load_configs, records_table
from dlm_pipeline.core.corpus import (
    DEFAULT_MAX_FILE_BYTES,
    admitted,
    build_raw_corpus,
    content_key,
    content_outcome,
    rows_table,
    section_id,
)
from dlm_pipeline.core.expansion import (
    EXPANSION_BERNOULLI,
    EXPANSION_EXACT,
    ExpansionTooLarge,
    exact_quotas,
    plan_corpus,
    split_weights,
)
from dlm_pipeline.core.fraction_hash import section_rolls
from dlm_pipeline.core.rules import (
    DEFAULT_EXCLUDES,
    DEFAULTS,
    IGNORE,
    Anchor,
    PathRules,
    RuleHit,
    ancestor_dirs,
    parent_dir,
)
from dlm_pipeline.core.safe_read import read_regular_file
from dlm_pipeline.core.secrets import secret_scanner
from dlm_pipeline.core.split import validation_side
from dlm_pipeline.core.tree import resolve_root, scan_tree
from dlm_pipeline.core.weights import (
    SCOPE_GLOBAL,
    SCOPE_NEAREST,
    chain_factor,
    maps_from_table,
    resolve_weights,
    weights_table,
)

MAX_CONFIG_BYTES = 1 << 20


class ExplainError(ValueError):
    """The question cannot be asked: the path is not a file under the source root."""


@dataclass
class Explanation:
    path: str
    in_raw_corpus: bool = False
    lines: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.lines.append(line)

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def root_relative(root: Path, given: str, cwd: str | None = None) -> str:
    """`given` (absolute, or relative to the root or else to `cwd`) as a POSIX path relative to the
    root. The file itself is not resolved: a symlink is explained as the link the walk meets."""
    candidates = [given] if os.path.isabs(given) else [str(root / given), os.path.join(cwd or os.getcwd(), given)]
    placed = []
    for candidate in candidates:
        absolute = os.path.abspath(candidate)
        full = os.path.join(os.path.realpath(os.path.dirname(absolute)), os.path.basename(absolute))
        if full != str(root) and full.startswith(str(root) + os.sep):
            placed.append(full)
            if os.path.lexists(full):
                return Path(full).relative_to(root).as_posix()
    if not placed:
        raise ExplainError(f"{given} is not under the source root {root}")
    raise ExplainError(f"{given}: no such file under the source root {root}")


def _label(directory: str) -> str:
    return directory or "."


def _config_path(directory: str, name: str) -> str:
    return f"{directory}/{ANCHOR_DIR}/{name}" if directory else f"{ANCHOR_DIR}/{name}"


def _yaml_line(root: Path, directory: str, loc: tuple) -> int | None:
    """1-based line of `loc` in the anchor's training.yaml (None when it cannot be read again)."""
    try:
        text = decode_config_bytes(
            read_regular_file(str(root / _config_path(directory, TRAINING_FILE)), MAX_CONFIG_BYTES), ""
        )
        loader = yaml.SafeLoader(text)
        try:
            return _line_of(loader.get_single_node(), loc, loader)
        finally:
            loader.dispose()
    except (OSError, ValueError, yaml.YAMLError):
        return None


def _rule_line(root: Path, anchors: dict[str, Anchor], hit: RuleHit) -> str:
    effect = "included" if hit.included else "excluded"
    if hit.kind == DEFAULTS:
        return f"  built-in default exclude {DEFAULT_EXCLUDES[hit.index]!r} -> {effect}"
    anchor = anchors[hit.anchor]
    if hit.kind == IGNORE:
        where, pattern = f"{_config_path(hit.anchor, IGNORE_FILE)}:{hit.index + 1}", anchor.ignore[hit.index]
    else:
        patterns = anchor.config.include if hit.kind == "include" else anchor.config.exclude
        line = (
            _yaml_line(root, hit.anchor, (hit.kind, hit.index))
            if hit.index is not None
            else _yaml_line(root, hit.anchor, (hit.kind,))
        )
        where = f"{_config_path(hit.anchor, TRAINING_FILE)}:{line or '?'}"
        if hit.index is None:
            return f"  {where}  {hit.kind}: no pattern matches -> {effect}"
        pattern = patterns[hit.index]
    return f"  {where}  {hit.kind} {pattern!r} -> {effect}"


def _walk_skip(scan, path: str) -> tuple[str, str] | None:
    """(path, reason) when the walk passed over `path` or a folder holding it."""
    skipped = dict(scan.skipped)
    for prefix in [*ancestor_dirs(parent_dir(path))[1:], path]:
        if prefix in skipped:
            return prefix, skipped[prefix]
        if prefix in scan.own_dirs:
            return prefix, "the pipeline's own folder"
    return None


def explain(
    root: str | os.PathLike,
    given: str,
    seed: int | None = None,
    *,
    scope: str = SCOPE_NEAREST,
    mode: str = EXPANSION_BERNOULLI,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_weight: float | None = None,
    secret_entropy: bool = False,
    exclude_dirs: tuple[str, ...] | list[str] = (),
    cwd: str | None = None,
    split_seed: int = 0,
    val_fraction: float = 0.0,
    tokenizer=None,
) -> Explanation:
    """What ingestion does with `given`; ExplainError when it is not a file under the root."""
    root_path = resolve_root(root)
    path = root_relative(root_path, given, cwd)
    scan = scan_tree(root_path, exclude_dirs=exclude_dirs)
    result = Explanation(path)
    result.add(f"{path}  (source root {root_path})")
    entry = next((f for f in scan.files if f.path == path), None)
    if entry is None:
        skip = _walk_skip(scan, path)
        misplaced = next((c.problem for c in scan.config_files if c.path == path and c.problem), None)
        if skip is None and misplaced is not None:  # a file the walk took for a config (a file named .dlm)
            skip = path, f"config error: {misplaced}"
        if skip is None:
            raise ExplainError(f"{given} is a folder, not a file; explain takes a file")
        where = "" if skip[0] == path else f" (the folder {skip[0]})"
        result.add(f"walk: passed over{where}: {skip[1]}")
        result.add("not in raw_corpus")
        return result
    records = load_configs(scan, **({"max_weight": max_weight} if max_weight is not None else {}))
    errors = [r.error for r in records if r.status == STATUS_ERROR]
    if errors:
        result.add("configs: invalid, so raw_corpus is not built until they are fixed:")
        result.lines += [f"  {line}" for error in errors for line in error.splitlines()]
        result.add("not in raw_corpus")
        return result
    anchors = anchors_from_table(records_table(records))
    rules = PathRules(anchors)
    trace: list[RuleHit] = []
    included = admitted(rules, entry, trace)
    result.add("rules:")
    by_dir = {a.dir: a for a in anchors}
    result.lines += [f"  {hit}" if isinstance(hit, str) else _rule_line(root_path, by_dir, hit) for hit in trace] or [
        "  no rule touched it -> included"
    ]
    if not included:
        result.add("not in raw_corpus")
        return result
    outcome = content_outcome(entry, rules, secret_scanner(secret_entropy), max_file_bytes)
    if isinstance(outcome, tuple):
        reason, detail = outcome
        result.add(f"content: skipped: {reason}" + (f" ({detail})" if detail else ""))
        result.add("not in raw_corpus")
        return result
    result.in_raw_corpus = True
    result.add(f"content: text, {len(outcome.encode()):,} bytes")
    directory = parent_dir(path)
    sources = rules.tag_sources(directory)
    tags = rules.tags(directory)
    result.add("tags:" if tags else "tags: none")
    result.lines += [f"  {key}={value}  (from {_label(sources[key][1])})" for key, value in tags.items()]
    _explain_weights(
        result, root_path, anchors, scan, path, outcome, tags, seed, scope, mode, max_file_bytes, secret_entropy
    )
    _explain_dataset(result, outcome, split_seed, val_fraction, tokenizer)
    result.add("in raw_corpus")
    return result


def _explain_dataset(result, text: str, split_seed: int, val_fraction: float, tokenizer) -> None:
    """The training_dataset side (SPEC §7: by content, whatever the seed) and the document's length."""
    key = content_key(text)
    side = "validation" if validation_side([key], split_seed, val_fraction)[0] else "train"
    held = " (held out once when its composed weight is > 0)" if side == "validation" else ""
    result.add(
        f"split (split seed {split_seed}, validation fraction {val_fraction:g}): {side}{held}, content key {key[:16]}"
    )
    if tokenizer is not None:
        n_tokens = int(tokenizer.encode([text])["n_tokens"][0].as_py())
        result.add(f"tokens: {n_tokens:,} + 1 EOS per document")


def _factor_origin(anchors: list[Anchor], maps: dict, directory: str, scope: str, key: str, value: str) -> str | None:
    """The anchor whose own map gives (key, value) its factor: the deepest that has it, among the
    file's ancestors (nearest) or all anchors in merge order (global)."""
    if scope == SCOPE_GLOBAL:
        candidates = [a.dir for a in sorted(anchors, key=lambda a: (a.depth, a.dir.encode()))]
    else:
        candidates = ancestor_dirs(directory)
    for candidate in reversed(candidates):
        if maps.get(candidate, {}).get(key, {}).get(value) is not None:
            return candidate
    return None


def _explain_weights(result, root, anchors, scan, path, text, tags, seed, scope, mode, max_file_bytes, secret_entropy):
    table = weights_table(anchors, scope)
    row_chain, chains = resolve_weights(pa.array([path]), table)
    chain = chains[row_chain[0]] if row_chain[0] >= 0 else ()
    own = maps_from_table(table, SCOPE_NEAREST)
    result.add(f"weights (scope {scope}):")
    for key in sorted(tags):
        factor = chain_factor(chain, key, tags[key])
        origin = _factor_origin(anchors, own, parent_dir(path), scope, key, tags[key])
        if factor is None or origin is None:
            result.add(f"  {key}={tags[key]}  no factor")
            continue
        line = _yaml_line(root, origin, ("weights", key, tags[key]))
        result.add(f"  {key}={tags[key]}  x{factor:g}  ({_config_path(origin, TRAINING_FILE)}:{line or '?'})")
    shown_seed = 0 if seed is None else seed
    sid = section_id(path, text)
    if mode == EXPANSION_EXACT:  # the extra copies are shared out over the whole corpus
        raw = build_raw_corpus(scan, anchors, max_file_bytes=max_file_bytes, secret_entropy=secret_entropy).table
        row = raw["path"].to_pylist().index(path)
    else:
        raw, row = rows_table([sid], [path], [text], [tags]), 0
    try:
        plan = plan_corpus(raw, table, shown_seed, mode, max_bytes=float("inf"))
    except ExpansionTooLarge as exc:  # weights of 100 on five tags: 10**10 copies of this one file
        result.add(f"  expanded_corpus refuses it: {exc}")
        return
    weight, copies = float(plan.weights[row]), int(plan.copies[row])
    whole, fraction = (float(v[0]) for v in split_weights(np.array([weight])))
    result.add(f"  composed weight {weight:g}")
    label = f"seed {shown_seed}" + (" (default; --seed N for another)" if seed is None else "")
    outcome = f"{copies} cop{'y' if copies == 1 else 'ies'}"
    if fraction == 0.0:
        result.add(f"{label}, {mode}: {int(whole)} whole, no fractional part, no roll -> {outcome}")
        return
    roll = float(section_rolls(shown_seed, [sid])[0])
    if mode == EXPANSION_EXACT:
        peers = np.flatnonzero(plan.weights == weight)
        quota = int(exact_quotas(np.array([len(peers)]), np.array([fraction]))[0])
        peer_ids = raw["section_id"].take(pa.array(peers)).to_pylist()
        rolls = section_rolls(shown_seed, peer_ids)
        rank = sum(1 for r, i in zip(rolls.tolist(), peer_ids, strict=True) if (r, i) < (roll, sid))
        decision = (
            f"roll {roll:.6f} ranks {rank + 1} of {len(peers)} rows of weight {weight:g}; "
            f"the {quota} lowest get one more"
        )
    else:
        decision = f"roll {roll:.6f} {'<' if roll < fraction else '>='} fraction {fraction:g}"
    result.add(f"{label}, {mode}: {int(whole)} whole + {decision} -> {outcome}")
