"""The PROXY protocol parser and encoders: v1 and v2, valid, truncated and hostile input."""

from __future__ import annotations

import ipaddress
import re
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.proxy.proxy_protocol import (
    MAX_HEADER,
    NEED_MORE,
    V1_MAX,
    V2_MAX_PAYLOAD,
    V2_SIGNATURE,
    ProxyHeader,
    ProxyProtocolError,
    encode,
    encode_v1,
    encode_v2,
    local_header,
    parse,
)

# -- v1 ---------------------------------------------------------------------------------------


def test_v1_tcp4() -> None:
    line = b"PROXY TCP4 192.0.2.7 198.18.0.1 56324 443\r\n"
    assert parse(line + b"GET / HTTP/1.1\r\n") == ProxyHeader(
        ("192.0.2.7", 56324), ("198.18.0.1", 443), len(line), 1
    )


def test_v1_tcp6() -> None:
    line = b"PROXY TCP6 2001:db8::1 ::1 65535 0\r\n"
    assert parse(line) == ProxyHeader(("2001:db8::1", 65535), ("::1", 0), len(line), 1)


def test_v1_unknown_keeps_the_socket_peer() -> None:
    assert parse(b"PROXY UNKNOWN\r\n") == ProxyHeader(None, None, 15, 1)
    # anything after UNKNOWN on the line is ignored (spec 2.1)
    line = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"
    assert parse(line + b"x") == ProxyHeader(None, None, len(line), 1)


def test_v1_longest_valid_line_is_107_bytes() -> None:
    v6 = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    line = f"PROXY TCP6 {v6} {v6} 65535 65535\r\n".encode()
    assert parse(line).length == len(line)  # type: ignore[union-attr]
    # the spec's worst case: UNKNOWN followed by the longest TCP6 fields
    line = f"PROXY UNKNOWN {v6} {v6} 65535 65535\r\n".encode()
    assert len(line) == V1_MAX
    assert parse(line).length == V1_MAX  # type: ignore[union-attr]
    with pytest.raises(ProxyProtocolError):
        parse(line[:-2] + b"5\r\n")


@pytest.mark.parametrize(
    "prefix",
    [b"", b"P", b"PROX", b"PROXY ", b"PROXY TCP4 1.2.3.4", b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r"],
)
def test_v1_truncated_needs_more(prefix: bytes) -> None:
    assert parse(prefix) is NEED_MORE


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",  # LF without CR
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",  # a field missing
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",  # one too many
        b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",  # double space
        b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",  # leading zero
        b"PROXY TCP4 1.2.3.4 5.6.7.8 +1 2\r\n",  # sign
        b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",  # port out of range
        b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",  # bad address
        b"PROXY TCP4 ::1 ::1 1 2\r\n",  # family mismatch
        b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n",  # unknown protocol
        b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2\r\n",  # non-ASCII digit
        b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",  # case matters
        b"PROXYTCP4 1.2.3.4 5.6.7.8 1 2\r\n",
        b"PROXY\r\n",
        b"PROXY \r\n",
        b"PROXY TCP4 1.2.3.4\r5.6.7.8 1 2\r\n",  # stray CR
        b"GET / HTTP/1.1\r\n\r\n",  # no header at all
        b"\x16\x03\x01\x02\x00",  # a TLS ClientHello
    ],
)
def test_v1_malformed_is_refused(line: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse(line)


def test_v1_stray_lf_is_refused_before_the_line_ends() -> None:
    with pytest.raises(ProxyProtocolError):
        parse(b"PROXY TCP4 1.2\n")


def test_v1_longer_than_107_bytes_is_refused() -> None:
    with pytest.raises(ProxyProtocolError, match="longer"):
        parse(b"PROXY UNKNOWN " + b"x" * 200)
    # the line may not end just past the limit either
    with pytest.raises(ProxyProtocolError):
        parse(b"PROXY UNKNOWN " + b"x" * (V1_MAX - 15) + b"\r\n")


# -- v2 ---------------------------------------------------------------------------------------


def v2(ver_cmd: int, fam: int, payload: bytes, length: int | None = None) -> bytes:
    n = len(payload) if length is None else length
    return V2_SIGNATURE + bytes((ver_cmd, fam)) + struct.pack("!H", n) + payload


def test_v2_inet() -> None:
    block = bytes([192, 0, 2, 7, 198, 18, 0, 1]) + struct.pack("!HH", 56324, 443)
    hdr = v2(0x21, 0x11, block)
    assert parse(hdr + b"rest") == ProxyHeader(("192.0.2.7", 56324), ("198.18.0.1", 443), 28, 2)


def test_v2_inet6_and_mapped_v4() -> None:
    src = ipaddress.IPv6Address("2001:db8::5").packed
    dst = ipaddress.IPv6Address("::ffff:127.0.0.1").packed
    hdr = v2(0x21, 0x21, src + dst + struct.pack("!HH", 1, 2))
    assert parse(hdr) == ProxyHeader(("2001:db8::5", 1), ("127.0.0.1", 2), 52, 2)


def test_v2_tlvs_are_skipped() -> None:
    block = bytes([198, 18, 0, 1, 198, 18, 0, 2]) + struct.pack("!HH", 1000, 80)
    tlvs = b"\x01\x00\x02h2" + b"\x04\x00\x00"  # ALPN, NOOP
    hdr = v2(0x21, 0x11, block + tlvs)
    result = parse(hdr + b"GET")
    assert isinstance(result, ProxyHeader)
    assert result.source == ("198.18.0.1", 1000) and result.length == len(hdr)


@pytest.mark.parametrize(
    "tlvs, message",
    [
        (b"\x01\x00\x09h2", "TLV 0x01 of 9 bytes runs past the header"),
        (b"\x04\x00\x00" + b"\x02\x00", "2 stray byte(s) after the last TLV"),
    ],
)
def test_v2_tlvs_that_run_past_the_header_are_refused(tlvs: bytes, message: str) -> None:
    block = bytes([198, 18, 0, 1, 198, 18, 0, 2]) + struct.pack("!HH", 1000, 80)
    with pytest.raises(ProxyProtocolError, match=re.escape(message)):
        parse(v2(0x21, 0x11, block + tlvs) + b"GET")


def test_v2_local_keeps_the_socket_peer() -> None:
    assert parse(v2(0x20, 0x00, b"")) == ProxyHeader(None, None, 16, 2)
    # LOCAL with an address block: skipped unread
    assert parse(v2(0x20, 0x11, b"\x00" * 12)) == ProxyHeader(None, None, 28, 2)


def test_v2_unspec_and_unix_and_udp_keep_the_socket_peer() -> None:
    assert parse(v2(0x21, 0x00, b"")).source is None  # type: ignore[union-attr]
    assert parse(v2(0x21, 0x31, b"\x00" * 216)).source is None  # type: ignore[union-attr]
    assert parse(v2(0x21, 0x12, b"\x00" * 12)).source is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    "hdr",
    [
        v2(0x11, 0x11, b"\x00" * 12),  # version 1 in a v2 header
        v2(0x31, 0x11, b"\x00" * 12),  # version 3
        v2(0x22, 0x11, b"\x00" * 12),  # command 2
        v2(0x21, 0x41, b"\x00" * 12),  # family 4
        v2(0x21, 0x13, b"\x00" * 12),  # protocol 3
        v2(0x21, 0x11, b"\x00" * 11),  # address block too short for AF_INET
        v2(0x21, 0x21, b"\x00" * 35),  # ... and for AF_INET6
        v2(0x21, 0x11, b"", length=V2_MAX_PAYLOAD + 1),  # over the bound: refused at once
        b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x0c",  # signature wrong at the end
        b"\r\n\r\n\x01",
    ],
)
def test_v2_malformed_is_refused(hdr: bytes) -> None:
    with pytest.raises(ProxyProtocolError):
        parse(hdr)


def test_v2_truncated_needs_more() -> None:
    block = bytes([192, 0, 2, 7, 198, 18, 0, 1]) + struct.pack("!HH", 1, 2)
    hdr = v2(0x21, 0x11, block)
    for n in range(len(hdr)):
        assert parse(hdr[:n]) is NEED_MORE, n


# -- encoding ---------------------------------------------------------------------------------


def test_encode_v1_and_unknown() -> None:
    assert encode_v1(("127.0.0.5", 4000), ("127.0.0.1", 80)) == (
        b"PROXY TCP4 127.0.0.5 127.0.0.1 4000 80\r\n"
    )
    assert encode_v1(None, None) == b"PROXY UNKNOWN\r\n"
    # a v4 client on a v6 listener: both as IPv6
    assert encode_v1(("127.0.0.5", 1), ("::1", 2)) == b"PROXY TCP6 ::ffff:127.0.0.5 ::1 1 2\r\n"


def test_encode_v2_local() -> None:
    assert encode_v2(None, None) == v2(0x20, 0x00, b"")
    assert encode_v2(("1.2.3.4", 1), ("5.6.7.8", 2), local=True) == v2(0x20, 0x00, b"")
    assert local_header("v1") == b"PROXY UNKNOWN\r\n"
    assert local_header("v2") == v2(0x20, 0x00, b"")
    assert local_header("none") == b"" and encode("none", None, None) == b""


def test_encode_by_setting() -> None:
    src, dst = ("127.0.0.5", 4000), ("127.0.0.1", 80)
    assert encode("v1", src, dst) == encode_v1(src, dst)
    assert encode("v2", src, dst) == encode_v2(src, dst)


# -- properties -------------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
ipv6 = st.ip_addresses(v=6).filter(lambda a: a.ipv4_mapped is None).map(str)
port = st.integers(0, 65535)


@st.composite
def address_pairs(draw: st.DrawFn) -> tuple[tuple[str, int], tuple[str, int]]:
    hosts = st.sampled_from([ipv4, ipv6])
    family = draw(hosts)
    return (draw(family), draw(port)), (draw(family), draw(port))


def _canonical(host: str) -> str:
    return str(ipaddress.ip_address(host))


@settings(max_examples=300, deadline=None)
@given(address_pairs(), st.sampled_from(["v1", "v2"]), st.binary(max_size=64))
def test_encode_then_parse_round_trips(
    pair: tuple[tuple[str, int], tuple[str, int]], version: str, rest: bytes
) -> None:
    src, dst = pair
    hdr = encode(version, src, dst)
    result = parse(hdr + rest)
    assert isinstance(result, ProxyHeader)
    assert result.length == len(hdr)
    assert result.version == int(version[1])
    assert result.source == (_canonical(src[0]), src[1])
    assert result.destination == (_canonical(dst[0]), dst[1])
    # every proper prefix is a valid beginning: NEED_MORE, never an error
    for n in range(len(hdr)):
        assert parse(hdr[:n]) is NEED_MORE


class _Bounded(bytes):
    """bytes that fail the test when read past MAX_HEADER."""

    def __getitem__(self, key):  # type: ignore[no-untyped-def]
        if isinstance(key, slice):
            stop = len(self) if key.stop is None else key.stop
            assert stop <= MAX_HEADER or len(self) <= MAX_HEADER, key
        else:
            assert key < MAX_HEADER, key
        return bytes.__getitem__(self, key)


@settings(max_examples=500, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.binary(max_size=300).map(lambda b: b"PROXY " + b),
        st.binary(max_size=300).map(lambda b: V2_SIGNATURE + b),
        st.binary(max_size=40).map(lambda b: b"PROXY TCP4 " + b),
    )
)
def test_arbitrary_bytes_never_crash(data: bytes) -> None:
    try:
        result = parse(data)
    except ProxyProtocolError:
        return
    if result is NEED_MORE:
        # a valid beginning is never longer than the longest header
        assert len(data) < MAX_HEADER
        return
    assert isinstance(result, ProxyHeader)
    assert 0 < result.length <= min(len(data), MAX_HEADER)


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=64), st.integers(0, 20000))
def test_parse_never_reads_past_the_limit(prefix: bytes, pad: int) -> None:
    for head in (V2_SIGNATURE + b"\x21\x11", b"PROXY "):
        data = _Bounded(head + prefix + b"\x00" * pad)
        try:
            parse(data)
        except ProxyProtocolError:
            pass
