from acme.core import parse_record


def test_parse():
    assert parse_record("a,1,2.0").total == 2.0
