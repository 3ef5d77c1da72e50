"""Environment variables the pipeline reads, parsed once with messages that say how to fix them.

No Dagster import here: the CLI sets these from its flags before loading the definitions. No core
module at import either: the defaults they own are imported when first asked for, so that
`dlm-pipeline --help`, `seeds` and `validate` load no Arrow, tokenizer or Ray code.
"""

from __future__ import annotations

import importlib
import math
import os
import re
from pathlib import Path

# The choices `--help` lists, spelled here so that it imports no core module; a test checks that
# they equal the core modules' own (tests/test_cli_startup.py).
EXPANSION_BERNOULLI, EXPANSION_EXACT = "bernoulli", "exact"
EXPANSION_MODES = (EXPANSION_BERNOULLI, EXPANSION_EXACT)
COMPUTE_BACKENDS = ("local", "ray")
SCOPE_NEAREST, SCOPE_GLOBAL = "nearest", "global"
SCOPES = (SCOPE_NEAREST, SCOPE_GLOBAL)

# Defaults the core modules own: (module, name), read on first use.
_CORE_DEFAULTS = {
    "DEFAULT_RAY_BATCH_BYTES": ("dlm_pipeline.core.compute", "DEFAULT_BATCH_BYTES"),
    "DEFAULT_MAX_WEIGHT": ("dlm_pipeline.core.config", "DEFAULT_MAX_WEIGHT"),
    "DEFAULT_MAX_FILE_BYTES": ("dlm_pipeline.core.corpus", "DEFAULT_MAX_FILE_BYTES"),
    "DEFAULT_MAX_EXPANDED_BYTES": ("dlm_pipeline.core.expansion", "DEFAULT_MAX_EXPANDED_BYTES"),
    "DEFAULT_CACHE_MAX_BYTES": ("dlm_pipeline.core.token_store", "DEFAULT_MAX_BYTES"),
    "DEFAULT_MAX_SEQ_LEN": ("dlm_pipeline.core.tokenize", "DEFAULT_MAX_SEQ_LEN"),
}


def _core_default(name: str):
    module, attribute = _CORE_DEFAULTS[name]
    return getattr(importlib.import_module(module), attribute)


def __getattr__(name: str):
    """`settings.DEFAULT_*`: the core module's value, imported on first access."""
    if name in _CORE_DEFAULTS:
        return _core_default(name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


PROJECT_DIR = Path(__file__).resolve().parent.parent
EXAMPLE_ROOT = PROJECT_DIR / "examples" / "corpus"

ENV_SOURCE_ROOT = "DLM_SOURCE_ROOT"
ENV_WEIGHTS_SCOPE = "DLM_WEIGHTS_SCOPE"
ENV_MAX_FILE_BYTES = "DLM_MAX_FILE_BYTES"
ENV_MAX_WEIGHT = "DLM_MAX_WEIGHT"
ENV_OUTPUT_DIR = "DLM_OUTPUT_DIR"
ENV_DEPLOYMENT = "DLM_DEPLOYMENT"
ENV_TOKENIZER = "DLM_TOKENIZER"
ENV_MAX_SEQ_LEN = "DLM_MAX_SEQ_LEN"
ENV_CACHE_DIR = "DLM_CACHE_DIR"
ENV_CACHE_MAX_BYTES = "DLM_CACHE_MAX_BYTES"
ENV_VAL_FRACTION = "DLM_VAL_FRACTION"
ENV_SPLIT_SEED = "DLM_SPLIT_SEED"
ENV_EXPANSION_MODE = "DLM_EXPANSION_MODE"
ENV_EOS_TOKEN = "DLM_EOS_TOKEN"
ENV_SENSOR_INTERVAL = "DLM_SENSOR_INTERVAL"
ENV_NIGHTLY_CRON = "DLM_NIGHTLY_CRON"

DEPLOYMENTS = ("local", "shared", "k8s")
DEFAULT_SENSOR_INTERVAL = 30
DEFAULT_NIGHTLY_CRON = "0 3 * * *"

DEFAULT_VAL_FRACTION = 0.1
MAX_VAL_FRACTION = 0.5
MAX_SEED_DIGITS = 20


class SettingsError(ValueError):
    """An environment variable holds a value the pipeline cannot use."""


def source_root() -> str:
    return os.environ.get(ENV_SOURCE_ROOT) or str(EXAMPLE_ROOT)


def weights_scope() -> str:
    from dlm_pipeline.core.weights import check_scope

    value = os.environ.get(ENV_WEIGHTS_SCOPE) or SCOPE_NEAREST
    try:
        return check_scope(value)
    except ValueError as exc:
        raise SettingsError(f"{ENV_WEIGHTS_SCOPE}: {exc}") from None


# What a number may look like: ASCII digits only. int() and float() also take spaces, `1_000` and
# other scripts' digits ("٣"), so a typo or a pasted value would pass as some other number.
_WHOLE_NUMBER = re.compile(r"[-+]?[0-9]+")
_DECIMAL_NUMBER = re.compile(r"[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?")


def parse_whole(text: str) -> int:
    """int(text) for ASCII decimal digits with an optional sign; ValueError for anything else."""
    if not _WHOLE_NUMBER.fullmatch(text):
        raise ValueError(f"not a whole number: {text[:40]!r}")
    return int(text)


def parse_number(text: str) -> float:
    """float(text) for an ASCII decimal number (`0.5`, `1e9`); ValueError for anything else."""
    if not _DECIMAL_NUMBER.fullmatch(text):
        raise ValueError(f"not a number: {text[:40]!r}")
    return float(text)


def _positive(name: str, default, parse=parse_whole):
    """The variable as a finite number > 0 (`parse`: parse_whole or parse_number), or its default when unset."""
    raw = os.environ.get(name)
    if not raw:
        return default
    kind = "a whole number" if parse is parse_whole else "a number"
    try:
        value = parse(raw)
    except ValueError:
        raise SettingsError(f"{name} must be {kind}, got {raw[:40]!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise SettingsError(f"{name} must be {kind} > 0, got {raw[:40]!r}")
    return value


def _positive_int(name: str, default: int) -> int:
    return _positive(name, default, parse_whole)


def max_file_bytes() -> int:
    return _positive_int(ENV_MAX_FILE_BYTES, _core_default("DEFAULT_MAX_FILE_BYTES"))


def max_weight() -> float:
    return _positive(ENV_MAX_WEIGHT, _core_default("DEFAULT_MAX_WEIGHT"), parse_number)


def _path(name: str) -> str:
    """A path variable as given ("" when unset). Leading or trailing spaces are refused: `DLM_OUTPUT_DIR=" "`
    wrote every output into a folder named " " in the current directory, without a word."""
    raw = os.environ.get(name, "")
    if raw != raw.strip():
        raise SettingsError(f"{name} has leading or trailing spaces ({raw[:60]!r}); remove them, or unset it")
    return raw


def output_dir() -> str:
    """ "" means: the Dagster instance's storage directory ($DAGSTER_HOME/storage)."""
    return _path(ENV_OUTPUT_DIR)


def deployment() -> str:
    """Where steps run: `local` (in process), `shared` (one process per step) or `k8s` (one pod per step)."""
    value = os.environ.get(ENV_DEPLOYMENT) or DEPLOYMENTS[0]
    if value not in DEPLOYMENTS:
        raise SettingsError(f"{ENV_DEPLOYMENT} must be one of {', '.join(DEPLOYMENTS)}, got {value!r}")
    return value


def sensor_interval() -> int:
    """Seconds between two evaluations of the config change sensor."""
    return _positive_int(ENV_SENSOR_INTERVAL, DEFAULT_SENSOR_INTERVAL)


def nightly_cron() -> str:
    """The nightly schedule's cron expression, checked with the validator Dagster applies to schedules."""
    from dagster._utils.schedules import is_valid_cron_string  # croniter, as vendored by Dagster

    value = os.environ.get(ENV_NIGHTLY_CRON) or DEFAULT_NIGHTLY_CRON
    if not is_valid_cron_string(value):
        raise SettingsError(
            f"{ENV_NIGHTLY_CRON} must be a cron expression of 5 fields (minute hour day month weekday), "
            f"e.g. {DEFAULT_NIGHTLY_CRON!r}, got {value!r}"
        )
    return value


def tokenizer() -> str:
    """ "" means the bundled default tokenizer."""
    return _path(ENV_TOKENIZER)


MAX_SEQ_LEN_LIMIT = 2**31 - 1  # token counts and offsets are int32


def check_max_seq_len(value: int) -> int:
    """1 up to MAX_SEQ_LEN_LIMIT; shared by the variable and the flag (a larger one failed deep in
    the run with an OverflowError)."""
    if not 1 <= value <= MAX_SEQ_LEN_LIMIT:
        raise SettingsError(
            f"the maximum sequence length must be a whole number from 1 to {MAX_SEQ_LEN_LIMIT}, got {value}"
        )
    return value


def max_seq_len() -> int:
    value = _positive_int(ENV_MAX_SEQ_LEN, _core_default("DEFAULT_MAX_SEQ_LEN"))
    try:
        return check_max_seq_len(value)
    except SettingsError as exc:
        raise SettingsError(f"{ENV_MAX_SEQ_LEN}: {exc}") from None


def cache_dir() -> str:
    """ "" means $DAGSTER_HOME/token_cache."""
    return _path(ENV_CACHE_DIR)


TOKEN_CACHE_DIR = "token_cache"
STORAGE_DIR = "storage"


def pipeline_dirs(home: str | None) -> list[str]:
    """Folders the pipeline writes ($DAGSTER_HOME, the outputs, the token store): never part of the
    corpus (SPEC §1). `home` is the instance root, or None when no instance is involved."""
    dirs = [output_dir(), cache_dir()]
    if home:
        dirs += [
            home,
            output_dir() or os.path.join(home, STORAGE_DIR),
            cache_dir() or os.path.join(home, TOKEN_CACHE_DIR),
        ]
    return [d for d in dict.fromkeys(dirs) if d]


def cache_max_bytes() -> int:
    return _positive_int(ENV_CACHE_MAX_BYTES, _core_default("DEFAULT_CACHE_MAX_BYTES"))


def check_val_fraction(value: float) -> float:
    """0 (no validation set) up to MAX_VAL_FRACTION; shared by the variable, the flag and the resource."""
    if not (math.isfinite(value) and 0 <= value <= MAX_VAL_FRACTION):
        raise SettingsError(f"the validation fraction must be a number from 0 to {MAX_VAL_FRACTION}, got {value!r}")
    return value


def val_fraction() -> float:
    raw = os.environ.get(ENV_VAL_FRACTION)
    if not raw:
        return DEFAULT_VAL_FRACTION
    try:
        return check_val_fraction(parse_number(raw))
    except (ValueError, SettingsError):  # SettingsError is a ValueError; one message for both
        raise SettingsError(
            f"{ENV_VAL_FRACTION} must be a number from 0 to {MAX_VAL_FRACTION}, got {raw[:40]!r}"
        ) from None


def check_seed_text(name: str, raw: str) -> int:
    """A canonical non-negative decimal of at most MAX_SEED_DIGITS digits."""
    if not (raw.isascii() and raw.isdigit() and len(raw) <= MAX_SEED_DIGITS and (raw == "0" or raw[0] != "0")):
        raise SettingsError(
            f"{name} must be a non-negative whole number of at most {MAX_SEED_DIGITS} digits "
            f"without sign or leading zeros, got {raw[:40]!r}"
        )
    return int(raw)


def split_seed() -> int:
    raw = os.environ.get(ENV_SPLIT_SEED)
    return check_seed_text(ENV_SPLIT_SEED, raw) if raw else 0


def check_expansion_mode(mode: str) -> str:
    if mode not in EXPANSION_MODES:
        raise SettingsError(f"expansion mode must be one of {', '.join(EXPANSION_MODES)}, got {mode!r}")
    return mode


def expansion_mode() -> str:
    raw = os.environ.get(ENV_EXPANSION_MODE) or EXPANSION_BERNOULLI
    try:
        return check_expansion_mode(raw)
    except SettingsError as exc:
        raise SettingsError(f"{ENV_EXPANSION_MODE}: {exc}") from None


def eos_token() -> str:
    """ "" means the tokenizer's own EOS token."""
    return os.environ.get(ENV_EOS_TOKEN, "")


ENV_SECRET_ENTROPY = "DLM_SECRET_ENTROPY"


def secret_entropy() -> bool:
    """Whether the credential scan also runs detect-secrets' high-entropy plugins (off by default:
    they flag hashes, test vectors and base64 data in ordinary code)."""
    return _switch(ENV_SECRET_ENTROPY)


ENV_MAX_EXPANDED_BYTES = "DLM_MAX_EXPANDED_BYTES"


def max_expanded_bytes() -> int:
    """Cap on the expanded corpus's text (copies x text bytes), checked before anything is gathered."""
    return _positive_int(ENV_MAX_EXPANDED_BYTES, _core_default("DEFAULT_MAX_EXPANDED_BYTES"))


ENV_COMPUTE = "DLM_COMPUTE"
ENV_RAY_ADDRESS = "DLM_RAY_ADDRESS"
ENV_RAY_BATCH_BYTES = "DLM_RAY_BATCH_BYTES"


def compute() -> str:
    """Where the token store's misses are tokenized (SPEC §6, `--compute local|ray`)."""
    raw = os.environ.get(ENV_COMPUTE) or COMPUTE_BACKENDS[0]
    if raw not in COMPUTE_BACKENDS:
        raise SettingsError(f"{ENV_COMPUTE} must be one of {', '.join(COMPUTE_BACKENDS)}, got {raw[:40]!r}")
    return raw


def ray_address() -> str:
    """ "" means LocalRay: a Ray cluster on this machine (or the one RAY_ADDRESS names)."""
    return os.environ.get(ENV_RAY_ADDRESS, "")


def ray_batch_bytes() -> int:
    return _positive_int(ENV_RAY_BATCH_BYTES, _core_default("DEFAULT_RAY_BATCH_BYTES"))


ENV_FULL_RESCAN = "DLM_FULL_RESCAN"


def full_rescan() -> bool:
    """Whether raw_corpus reads every file again instead of trusting the ingest index (and rebuilds it)."""
    return _switch(ENV_FULL_RESCAN)


def _switch(name: str) -> bool:
    """An on/off variable (see `parse_switch`)."""
    return parse_switch(name, os.environ.get(name, ""))


def parse_switch(name: str, raw: str) -> bool:
    """An on/off value (a variable, or a run tag that mirrors one): empty, 0, false, no or off is
    off; 1, true, yes or on is on; anything else is refused, so a typo never silently means off."""
    value = raw.strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise SettingsError(f"{name} must be 1 or 0, got {raw[:40]!r}")


def check_all(schedule: bool = True) -> None:
    """Parse every variable, so that a bad one is reported before the definitions (and Dagster) load.
    The cron check comes last: it is the one that needs Dagster's validator (about 1 s to import),
    so a command that runs no Dagster (`explain`) leaves it out with `schedule=False`."""
    for parse in (
        output_dir,
        cache_dir,
        tokenizer,
        weights_scope,
        max_file_bytes,
        max_weight,
        deployment,
        max_seq_len,
        cache_max_bytes,
        val_fraction,
        split_seed,
        expansion_mode,
        secret_entropy,
        max_expanded_bytes,
        full_rescan,
        compute,
        ray_batch_bytes,
        sensor_interval,
    ):
        parse()
    if schedule:
        nightly_cron()
