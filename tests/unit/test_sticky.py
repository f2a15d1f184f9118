"""Tests of the sticky-session cookie codec, the key file and the Cookie header helpers."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import stat
import threading

import pytest
from hypothesis import given
from hypothesis import strategies as st

from balancer.sticky import (
    CLOCK_SKEW,
    StickyCodec,
    _HmacSha256,
    find_cookie,
    load_or_create_keys,
    parse_keys,
    strip_cookie,
)

KEY = bytes(range(32))
OTHER_KEY = bytes(range(1, 33))
NOW = 1_700_000_000.0
TTL = 3600.0
ADDR = "198.18.2.3:8080"
ADDR2 = "198.18.2.4:8080"


@pytest.fixture
def codec() -> StickyCodec:
    return StickyCodec([KEY], "web", TTL)


def test_roundtrip(codec):
    tag = codec.tag(ADDR)
    assert len(tag) == 8
    value = codec.encode(tag, NOW)
    assert codec.decode(value, NOW) == tag
    assert codec.decode(value, NOW + TTL - 1) == tag


def test_tags_are_stable_and_distinct(codec):
    assert codec.tag(ADDR) == codec.tag(ADDR)
    assert codec.tag(ADDR) != codec.tag(ADDR2)
    assert codec.tag(ADDR) != StickyCodec([KEY], "api", TTL).tag(ADDR)


def test_value_is_opaque(codec):
    values = [codec.encode(codec.tag(a), NOW) for a in (ADDR, ADDR2)]
    for value in values:
        assert value.isascii() and "=" not in value and ";" not in value and " " not in value
        raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
        for secret in ("198.18.2.3", "198.18.2.4", "8080", "app1", "web"):
            assert secret not in value
            assert secret.encode() not in raw
        for packed in (bytes([198, 18, 2, 3]), bytes([198, 18, 2, 4]), (8080).to_bytes(2, "big")):
            assert packed not in raw
    # the two backends' cookies share the same layout and expiry, nothing else readable
    a, b = (base64.urlsafe_b64decode(v + "=" * (-len(v) % 4)) for v in values)
    assert len(a) == len(b)
    assert a[:5] == b[:5]  # version and expiry only
    assert a[5:] != b[5:]


def test_every_tampered_byte_is_refused(codec):
    value = codec.encode(codec.tag(ADDR), NOW)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for i, ch in enumerate(value):
        for replacement in {alphabet[(alphabet.index(ch) + d) % 64] for d in (1, 2, 32)}:
            tampered = value[:i] + replacement + value[i + 1 :]
            assert codec.decode(tampered, NOW) is None, (i, replacement)
    raw = bytearray(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
    for i in range(len(raw)):
        for bit in range(8):
            flipped = bytearray(raw)
            flipped[i] ^= 1 << bit
            forged = base64.urlsafe_b64encode(bytes(flipped)).decode().rstrip("=")
            assert codec.decode(forged, NOW) is None


def test_wrong_lengths_and_alphabets_are_refused(codec):
    value = codec.encode(codec.tag(ADDR), NOW)
    for bad in (
        "",
        value[:-1],
        value + "A",
        value + "=",
        value[:-2] + "==",
        value.replace("-", "+").replace("_", "/")
        if ("-" in value or "_" in value)
        else "+" + value[1:],
        " " + value[1:],
        value[:10] + "\u00e9" + value[11:],
        value[:-1] + "\x00",
    ):
        assert codec.decode(bad, NOW) is None, bad


def test_forged_random_values_are_refused(codec):
    for _ in range(2000):
        raw = bytes([1]) + os.urandom(28)
        assert codec.decode(base64.urlsafe_b64encode(raw).decode().rstrip("="), NOW) is None


def test_a_cookie_forged_for_a_chosen_backend_without_the_key_is_refused(codec):
    # an attacker who knows the layout signs a cookie for a backend with his own key
    attacker = StickyCodec([OTHER_KEY], "web", TTL)
    assert codec.decode(attacker.encode(attacker.tag(ADDR), NOW), NOW) is None
    # or pairs a real cookie's signature with another backend's tag
    real = base64.urlsafe_b64decode(codec.encode(codec.tag(ADDR), NOW) + "===")
    spliced = real[:5] + codec.tag(ADDR2) + real[13:]
    assert codec.decode(base64.urlsafe_b64encode(spliced).decode().rstrip("="), NOW) is None


def test_expired_is_refused(codec):
    value = codec.encode(codec.tag(ADDR), NOW)
    assert codec.decode(value, NOW + TTL) is None
    assert codec.decode(value, NOW + TTL * 10) is None


def test_expiry_beyond_the_current_ttl_is_refused():
    long_lived = StickyCodec([KEY], "web", 30 * 86400.0)
    value = long_lived.encode(long_lived.tag(ADDR), NOW)
    short = StickyCodec([KEY], "web", TTL)  # the operator shortened the ttl
    assert short.decode(value, NOW) is None
    # a node whose clock is a little behind still accepts the other's fresh cookie
    assert short.decode(short.encode(short.tag(ADDR), NOW), NOW - CLOCK_SKEW / 2) is not None


def test_other_pools_cookie_is_refused(codec):
    api = StickyCodec([KEY], "api", TTL)
    assert codec.decode(api.encode(api.tag(ADDR), NOW), NOW) is None
    # even carrying this pool's tag
    assert codec.decode(api.encode(codec.tag(ADDR), NOW), NOW) is None


def test_two_codecs_with_the_same_key_agree(codec):
    twin = StickyCodec([bytes(KEY)], "web", TTL)
    assert twin.tag(ADDR) == codec.tag(ADDR)
    assert twin.encode(twin.tag(ADDR), NOW) == codec.encode(codec.tag(ADDR), NOW)
    assert twin.decode(codec.encode(codec.tag(ADDR), NOW), NOW) == twin.tag(ADDR)


def test_codecs_with_different_keys_do_not(codec):
    other = StickyCodec([OTHER_KEY], "web", TTL)
    assert other.tag(ADDR) != codec.tag(ADDR)
    assert other.decode(codec.encode(codec.tag(ADDR), NOW), NOW) is None


def test_rotation_old_key_verifies_new_key_signs(codec):
    old_value = codec.encode(codec.tag(ADDR), NOW)
    rotated = StickyCodec([OTHER_KEY, KEY], "web", TTL)
    new_tag = rotated.tag(ADDR)  # the pool asks for every backend's tag on rebuild
    rotated.tag(ADDR2)
    assert new_tag == StickyCodec([OTHER_KEY], "web", TTL).tag(ADDR)
    # the cookie signed before the rotation still pins to the same backend
    assert rotated.decode(old_value, NOW) == new_tag
    # new cookies are signed with the first key: the old key alone does not accept them
    new_value = rotated.encode(new_tag, NOW)
    assert new_value == StickyCodec([OTHER_KEY], "web", TTL).encode(new_tag, NOW)
    assert codec.decode(new_value, NOW) is None
    # once the old key is removed, the old cookies stop verifying
    assert StickyCodec([OTHER_KEY], "web", TTL).decode(old_value, NOW) is None


def test_set_cookie_header(codec):
    value = codec.encode(codec.tag(ADDR), NOW)
    assert codec.set_cookie_header("LBSTICKY", value, False) == (
        f"LBSTICKY={value}; Max-Age=3600; Path=/; HttpOnly; SameSite=Lax".encode()
    )
    assert codec.set_cookie_header("LBSTICKY", value, True).endswith(b"; SameSite=Lax; Secure")


@pytest.mark.parametrize("key_size", [16, 32, 64, 65, 200])
def test_the_cached_hmac_is_hmac_sha256(key_size):
    key = os.urandom(key_size)
    for message in (b"", b"backend:web\x00198.18.2.3:8080", os.urandom(100)):
        expected = hmac.new(key, message, hashlib.sha256).digest()
        assert _HmacSha256(key).sign(message) == expected
        assert _HmacSha256(key).sign(message, 8) == expected[:8]


def test_the_layout_is_the_documented_one(codec):
    tag = codec.tag(ADDR)
    assert tag == hmac.new(KEY, b"backend:web\x00" + ADDR.encode(), hashlib.sha256).digest()[:8]
    raw = base64.urlsafe_b64decode(codec.encode(tag, NOW) + "=")
    head = bytes([1]) + int(NOW + TTL).to_bytes(4, "big") + tag
    assert raw == head + hmac.new(KEY, head + b"web", hashlib.sha256).digest()[:16]


def test_codec_rejects_bad_arguments():
    with pytest.raises(ValueError):
        StickyCodec([], "web", TTL)
    with pytest.raises(ValueError):
        StickyCodec([b""], "web", TTL)
    with pytest.raises(ValueError):
        StickyCodec([KEY], "web", 0)
    with pytest.raises(ValueError):
        StickyCodec([KEY], "web", TTL).encode(b"abc", NOW)


@given(st.text())
def test_decode_never_raises(value):
    assert StickyCodec([KEY], "web", TTL).decode(value, NOW) is None


@given(
    st.text(
        alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=",
        min_size=36,
        max_size=42,
    )
)
def test_decode_never_raises_on_base64_like_text(value):
    assert StickyCodec([KEY], "web", TTL).decode(value, NOW) is None


# ---------------------------------------------------------------------------------------------
# the key file
# ---------------------------------------------------------------------------------------------


def test_load_or_create_keys_creates_a_private_file_and_rereads_it(tmp_path):
    path = tmp_path / "sticky.key"
    keys = load_or_create_keys(str(path))
    assert len(keys) == 1 and len(keys[0]) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_keys(str(path)) == keys
    assert [p.name for p in tmp_path.iterdir()] == ["sticky.key"]  # no temporary left over
    assert load_or_create_keys(str(tmp_path / "other.key")) != keys


def test_load_or_create_keys_concurrent_creators_agree(tmp_path):
    path = str(tmp_path / "sticky.key")
    results: list[list[bytes]] = []
    barrier = threading.Barrier(8)

    def start() -> None:
        barrier.wait()
        results.append(load_or_create_keys(path))

    threads = [threading.Thread(target=start) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 8
    assert all(r == results[0] for r in results)
    assert results[0] == load_or_create_keys(path)


def test_key_file_formats_and_rotation_order(tmp_path):
    new, old = os.urandom(32), os.urandom(24)
    path = tmp_path / "k"
    path.write_text(
        "# rotated 2024-05-01\n"
        + new.hex().upper()
        + "\n\n"
        + base64.urlsafe_b64encode(old).decode().rstrip("=")
        + "\n"
        + base64.b64encode(KEY).decode()
        + "\n"
    )
    assert load_or_create_keys(str(path)) == [new, old, KEY]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no key"),
        ("# only a comment\n\n", "no key"),
    ],
)
def test_bad_key_file_is_a_clear_error(tmp_path, text, message):
    path = tmp_path / "k"
    path.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        load_or_create_keys(str(path))
    assert str(path) in str(info.value)


def test_a_line_that_is_no_encoded_key_is_a_passphrase_and_short_ones_are_logged(tmp_path, caplog):
    # two nodes given the same file agree on the key whatever its form; an operator's
    # "secret" must not keep the balancer from starting, but it is called weak
    path = tmp_path / "k"
    path.write_text("not a key!\n" + KEY.hex() + "\nabcd\nthis is a long enough passphrase\n")
    with caplog.at_level("WARNING", logger="balancer.sticky"):
        keys = load_or_create_keys(str(path))
    assert keys == [b"not a key!", KEY, b"abcd", b"this is a long enough passphrase"]
    assert ":1: a 10-byte key is weak" in caplog.text and ":3: a 4-byte key is weak" in caplog.text
    assert ":2:" not in caplog.text and ":4:" not in caplog.text


def test_a_binary_key_file_is_one_raw_key(tmp_path):
    # `openssl rand 32 > sticky.key`, the way the HA auth_key_file may be made: not text, so
    # the whole file (but for surrounding whitespace) is the key; before, run died on it
    path = tmp_path / "k"
    raw = b"\xff\x00\x9c" + bytes(range(1, 30))
    path.write_bytes(raw + b"\n")
    assert load_or_create_keys(str(path)) == [raw]
    path.write_bytes(b"\xff\x00short")
    with pytest.raises(ValueError, match="a raw \\(binary\\) key is 7 bytes, at least 16"):
        load_or_create_keys(str(path))


def test_parse_keys_reads_hex_before_base64():
    # 32 hex digits are also valid base64; hex wins, as documented
    assert parse_keys("00112233445566778899aabbccddeeff") == [
        bytes.fromhex("00112233445566778899aabbccddeeff")
    ]


# ---------------------------------------------------------------------------------------------
# Cookie header helpers
# ---------------------------------------------------------------------------------------------

N = b"LBSTICKY"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"a=1; LBSTICKY=x; b=2", b"a=1; b=2"),
        (b"LBSTICKY=x", None),
        (b"LBSTICKY=x; b=2", b"b=2"),
        (b"a=1; LBSTICKY=x", b"a=1"),
        (b"a=1;LBSTICKY=x;b=2", b"a=1;b=2"),
        (b"a=1;  LBSTICKY = x ;\tb=2", b"a=1;\tb=2"),
        (b"XLBSTICKY=1; LBSTICKYX=2", b"XLBSTICKY=1; LBSTICKYX=2"),
        (b"XLBSTICKY=1; LBSTICKY=x; LBSTICKYX=2", b"XLBSTICKY=1; LBSTICKYX=2"),
        (b"a=LBSTICKY=x; b=2", b"a=LBSTICKY=x; b=2"),
        (b"LBSTICKY=x; LBSTICKY=y", None),
        (b"LBSTICKY=x;", None),
        (b"a=1; LBSTICKY=x; LBSTICKY=y; c=3", b"a=1; c=3"),
        (b"lbsticky=1", b"lbsticky=1"),  # names are case-sensitive
        (b"a=1;b=2", b"a=1;b=2"),
        (b'a= "q; r"', b'a= "q; r"'),
    ],
)
def test_strip_cookie(header, expected):
    assert strip_cookie(header, N) == expected


def test_strip_cookie_returns_the_same_object_when_absent():
    header = b"a=1; b=2"
    assert strip_cookie(header, N) is header


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (b"a=1; LBSTICKY=x; b=2", b"x"),
        (b"LBSTICKY=x", b"x"),
        (b"LBSTICKY=", b""),
        (b"XLBSTICKY=1; LBSTICKY=2", b"2"),
        (b"LBSTICKYX=1; LBSTICKY=2", b"2"),
        (b"XLBSTICKY=1; LBSTICKYX=2", None),
        (b"a=LBSTICKY=x", None),
        (b"a=1;LBSTICKY = v ;b=2", b"v"),
        (b'\tLBSTICKY="quoted"', b"quoted"),
        (b"LBSTICKY=first; LBSTICKY=second", b"first"),
        (b"LBSTICKY", None),
        (b"", None),
        (b"a=1", None),
    ],
)
def test_find_cookie(header, expected):
    assert find_cookie(header, N) == expected


def test_find_then_decode(codec):
    value = codec.encode(codec.tag(ADDR), NOW)
    header = f"theme=dark; LBSTICKY={value}; sid=abc".encode()
    found = find_cookie(header, N)
    assert found is not None
    assert codec.decode(found.decode("latin-1"), NOW) == codec.tag(ADDR)
    assert codec.decode(found, NOW) == codec.tag(ADDR)  # the bytes as found will do
    assert strip_cookie(header, N) == b"theme=dark; sid=abc"


@given(st.binary())
def test_decode_never_raises_on_bytes(value):
    assert StickyCodec([KEY], "web", TTL).decode(value, NOW) is None


def test_decode_refuses_other_types(codec):
    for value in (None, 42, bytearray(39), ["x"]):
        assert codec.decode(value, NOW) is None  # type: ignore[arg-type]


_NAMES = st.sampled_from(["LBSTICKY", "XLBSTICKY", "LBSTICKYX", "a", "sid", "LB"])
_VALUES = st.text(alphabet="abcXYZ019-_.=LBSTICKY", max_size=8)


@given(st.lists(st.tuples(_NAMES, _VALUES), max_size=6), st.sampled_from(["; ", ";"]))
def test_strip_and_find_agree_with_a_parsed_header(pairs, separator):
    header = separator.join(f"{n}={v}" for n, v in pairs).encode()
    kept = [f"{n}={v}" for n, v in pairs if n != "LBSTICKY"]
    expected = separator.join(kept).encode() if kept else None
    assert strip_cookie(header, N) == expected
    values = [v for n, v in pairs if n == "LBSTICKY"]
    assert find_cookie(header, N) == (values[0].encode() if values else None)
