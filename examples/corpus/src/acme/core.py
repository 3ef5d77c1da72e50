"""Parsing of comma-separated inventory records."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Record:
    name: str
    quantity: int
    unit_price: float

    @property
    def total(self) -> float:
        return self.quantity * self.unit_price


def parse_record(line: str) -> Record:
    """Parse `name,quantity,unit_price`; raise ValueError with the offending field."""
    name, quantity, price = (part.strip() for part in line.split(","))
    if not name:
        raise ValueError("name is empty")
    return Record(name, int(quantity), float(price))
