"""etcd values and watch events into records, without a server (the server tests are in
tests/integration/test_discovery_etcd.py)."""

from __future__ import annotations

import pytest

from balancer.config.schema import Address
from balancer.discovery.etcd import PrefixState, parse_value
from balancer.discovery.etcd_client import b64, prefix_end


def test_a_value_is_an_address_and_an_optional_weight():
    r = parse_value("app1", b'{"address": "198.18.0.5:8080", "weight": 3}')
    assert (r.name, r.address, r.weight) == ("app1", Address("198.18.0.5", 8080), 3)
    assert parse_value("app2", b'{"address": "[::1]:81"}').weight == 1


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("a", b"not json", "not JSON"),
        ("a", b"[1]", "JSON object"),
        ("a", b'{"weight": 2}', '"address" is missing'),
        ("a", b'{"address": "nohostport"}', "address"),
        ("a", b'{"address": "h:1", "weight": 0}', "weight"),
        ("a", b'{"address": "h:1", "weight": true}', "weight"),
        ("a", b'{"address": "h:1", "wieght": 2}', "unknown field"),
        ("sub/a", b'{"address": "h:1"}', "not a backend name"),
        ("a", b"\xff\xfe", "not JSON"),
    ],
)
def test_malformed_values_say_what_is_wrong(name, value, why):
    with pytest.raises(ValueError, match=why):
        parse_value(name, value)


def kv(key: str, value: bytes, rev: int) -> dict:
    return {"key": b64(key), "value": b64(value), "mod_revision": str(rev)}


def test_prefix_state_follows_puts_and_deletes_and_skips_the_malformed():
    st = PrefixState("/p/")
    st.load(5, [kv("/p/a", b'{"address": "h:1"}', 3), kv("/p/bad", b"x", 4)])
    st.apply({"header": {"revision": "9"}, "created": True})
    assert st.revision == 5  # the "created" header runs ahead of the replayed events
    st.apply(
        {
            "header": {"revision": "9"},
            "events": [
                {"kv": kv("/p/b", b'{"address": "h:2", "weight": 2}', 6)},
                {"type": "DELETE", "kv": {"key": b64("/p/a"), "mod_revision": "7"}},
            ],
        }
    )
    snap = st.snapshot()
    assert [(r.name, r.weight) for r in snap.records] == [("b", 2)]
    assert len(snap.skipped) == 1 and snap.skipped[0].startswith("/p/bad: not JSON")
    assert st.revision == 7


def test_prefix_end_covers_exactly_the_prefix():
    assert prefix_end(b"/p/") == b"/p0"
    assert prefix_end(b"a\xff") == b"b"
    assert prefix_end(b"\xff\xff") == b"\0"
