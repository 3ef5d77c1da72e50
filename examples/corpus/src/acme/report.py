"""Summaries over many records."""

from collections.abc import Iterable

from acme.core import Record


def inventory_value(records: Iterable[Record]) -> float:
    return sum(r.total for r in records)


def largest(records: Iterable[Record], n: int = 3) -> list[Record]:
    return sorted(records, key=lambda r: r.total, reverse=True)[:n]
