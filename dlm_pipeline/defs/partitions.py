"""Seeds are dynamic partitions: adding one (UI or CLI) needs no code change."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import dagster as dg

from dlm_pipeline import settings

SEEDS_PARTITION = "seeds"
seeds_partitions = dg.DynamicPartitionsDefinition(name=SEEDS_PARTITION)


def parse_seed(key: str) -> int:
    """A canonical non-negative decimal seed ("0", "42") of at most MAX_SEED_DIGITS digits (a longer
    one would make file names too long); anything else is refused."""
    try:
        return settings.check_seed_text("seed", key if isinstance(key, str) else "")
    except settings.SettingsError:
        raise ValueError(
            f"seed {str(key)[:40]!r} is not a canonical non-negative decimal integer of at most "
            f"{settings.MAX_SEED_DIGITS} digits (use e.g. 0 or 42: no sign, no leading zeros, digits only)"
        ) from None


def is_seed(key: str) -> bool:
    """Whether `key` is a seed `parse_seed` accepts (safe in a file name)."""
    try:
        parse_seed(key)
    except ValueError:
        return False
    return True


def parse_seed_or_fail(context: dg.AssetExecutionContext | dg.AssetCheckExecutionContext) -> int:
    """The run's seed, or a run failure that says how to fix the partition key."""
    try:
        return parse_seed(context.partition_key)
    except ValueError as exc:
        raise dg.Failure(description=f"{exc}; delete this partition and add a valid one") from None


def registered_seeds(instance: dg.DagsterInstance) -> tuple[list[str], list[str]]:
    """(valid seeds in numeric order, registered keys that are not canonical seeds).

    A key added by hand in the UI can be anything; runs for it fail with a message, and
    automation and the CLI leave it out instead of starting runs that must fail.
    """
    valid, invalid = [], []
    for key in instance.get_dynamic_partitions(SEEDS_PARTITION):
        try:
            parse_seed(key)
        except ValueError:
            invalid.append(key)
        else:
            valid.append(key)
    return sorted(valid, key=lambda k: (len(k), k)), sorted(invalid)


@contextmanager
def _partitioned_checks_accepted():
    """Dagster 1.13 flags partitioned checks as "preview"; we rely on them knowingly, so the
    warning is silenced where they are declared rather than shown on every import."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", dg.PreviewWarning)
        yield


def seed_check(**kwargs):
    """`dg.asset_check` evaluated per seed partition."""

    def decorate(fn):
        with _partitioned_checks_accepted():
            return dg.asset_check(partitions_def=seeds_partitions, **kwargs)(fn)

    return decorate


def seed_check_spec(name: str, **kwargs) -> dg.AssetCheckSpec:
    """A check spec evaluated per seed partition (for checks that share a step)."""
    with _partitioned_checks_accepted():
        return dg.AssetCheckSpec(name, partitions_def=seeds_partitions, **kwargs)
