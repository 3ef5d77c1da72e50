"""Environment variables the pipeline reads, parsed once with messages that say how to fix them.

No Dagster import here: the CLI sets these from its flags before loading the definitions.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from dlm_pipeline.core.config import DEFAULT_MAX_WEIGHT
from dlm_pipeline.core.corpus import DEFAULT_MAX_FILE_BYTES
from dlm_pipeline.core.token_store import DEFAULT_MAX_BYTES as DEFAULT_CACHE_MAX_BYTES
from dlm_pipeline.core.tokenize import DEFAULT_MAX_SEQ_LEN
from dlm_pipeline.core.weights import SCOPE_NEAREST, check_scope

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

EXPANSION_BERNOULLI = "bernoulli"
EXPANSION_EXACT = "exact"
EXPANSION_MODES = (EXPANSION_BERNOULLI, EXPANSION_EXACT)
DEFAULT_VAL_FRACTION = 0.1
MAX_VAL_FRACTION = 0.5
MAX_SEED_DIGITS = 20


class SettingsError(ValueError):
    """An environment variable holds a value the pipeline cannot use."""


def source_root() -> str:
    return os.environ.get(ENV_SOURCE_ROOT) or str(EXAMPLE_ROOT)


def weights_scope() -> str:
    value = os.environ.get(ENV_WEIGHTS_SCOPE) or SCOPE_NEAREST
    try:
        return check_scope(value)
    except ValueError as exc:
        raise SettingsError(f"{ENV_WEIGHTS_SCOPE}: {exc}") from None


def _positive(name: str, default, parse=int):
    """The variable as a finite number > 0 (`parse`: int or float), or its default when unset."""
    raw = os.environ.get(name)
    if not raw:
        return default
    kind = "a whole number" if parse is int else "a number"
    try:
        value = parse(raw)
    except ValueError:
        raise SettingsError(f"{name} must be {kind}, got {raw!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise SettingsError(f"{name} must be {kind} > 0, got {raw!r}")
    return value


def _positive_int(name: str, default: int) -> int:
    return _positive(name, default, int)


def max_file_bytes() -> int:
    return _positive_int(ENV_MAX_FILE_BYTES, DEFAULT_MAX_FILE_BYTES)


def max_weight() -> float:
    return _positive(ENV_MAX_WEIGHT, DEFAULT_MAX_WEIGHT, float)


def output_dir() -> str:
    """"" means: the Dagster instance's storage directory ($DAGSTER_HOME/storage)."""
    return os.environ.get(ENV_OUTPUT_DIR, "")



def tokenizer() -> str:
    """"" means the bundled default tokenizer."""
    return os.environ.get(ENV_TOKENIZER, "")


def max_seq_len() -> int:
    return _positive_int(ENV_MAX_SEQ_LEN, DEFAULT_MAX_SEQ_LEN)


def cache_dir() -> str:
    """"" means $DAGSTER_HOME/token_cache."""
    return os.environ.get(ENV_CACHE_DIR, "")


def cache_max_bytes() -> int:
    return _positive_int(ENV_CACHE_MAX_BYTES, DEFAULT_CACHE_MAX_BYTES)


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
        value = float(raw)
    except ValueError:
        raise SettingsError(f"{ENV_VAL_FRACTION} must be a number from 0 to {MAX_VAL_FRACTION}, got {raw!r}") from None
    try:
        return check_val_fraction(value)
    except SettingsError:
        raise SettingsError(f"{ENV_VAL_FRACTION} must be a number from 0 to {MAX_VAL_FRACTION}, got {raw!r}") from None


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
    """"" means the tokenizer's own EOS token."""
    return os.environ.get(ENV_EOS_TOKEN, "")


# -- compute backend (SPEC §6, `--compute local|ray`) ------------------------------------------
ENV_COMPUTE = "DLM_COMPUTE"
ENV_RAY_ADDRESS = "DLM_RAY_ADDRESS"
ENV_RAY_BATCH_BYTES = "DLM_RAY_BATCH_BYTES"


def compute() -> str:
    from dlm_pipeline.core.compute import BACKENDS  # imported here to keep this block self-contained

    raw = os.environ.get(ENV_COMPUTE) or BACKENDS[0]
    if raw not in BACKENDS:
        raise SettingsError(f"{ENV_COMPUTE} must be one of {', '.join(BACKENDS)}, got {raw[:40]!r}")
    return raw


def ray_address() -> str:
    """"" means LocalRay: a Ray cluster on this machine (or the one RAY_ADDRESS names)."""
    return os.environ.get(ENV_RAY_ADDRESS, "")


def ray_batch_bytes() -> int:
    from dlm_pipeline.core.compute import DEFAULT_BATCH_BYTES

    return _positive_int(ENV_RAY_BATCH_BYTES, DEFAULT_BATCH_BYTES)
