"""acme: inventory records."""

from acme.core import Record, parse_record

__all__ = ["Record", "parse_record"]
