"""The PROXY protocol (HAProxy's v1 text and v2 binary headers): parse and encode, pure.

A load balancer in front (an NLB, HAProxy) opens each connection with a header naming the
client's address; `parse` reads it from the first bytes of a connection. Going the other
way, `encode_v1` / `encode_v2` make the header a backend reads. No I/O here: the listener
(proxy/listener.py) reads the bytes, the upstream side writes the header.

Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
"""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import NamedTuple

Address = tuple[str, int]  # (host, port) as the socket module gives it

V1_PREFIX = b"PROXY "
V1_MAX = 107  # the longest v1 line, CRLF included (spec section 2.1)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = 16  # signature, version/command, family/protocol, length
# A v2 header's address block and TLVs: 36 bytes of addresses (IPv6) plus TLVs, which
# senders use for a few small values (ALPN, authority, a cloud endpoint id). Beyond this the
# header is refused rather than buffered: a peer must not make us hold 64 KiB per socket.
V2_MAX_PAYLOAD = 4096
MAX_HEADER = V2_HEADER + V2_MAX_PAYLOAD  # the most bytes parse() ever looks at
# how many first bytes tell a v1 from a v2 header from neither
_SNIFF = len(V2_SIGNATURE)


class ProxyHeader(NamedTuple):
    """A parsed header: the client (`source`) and the address it connected to
    (`destination`), both None for a LOCAL or UNKNOWN header (the connection's own peer
    stands), and how many bytes of the stream the header took."""

    source: Address | None
    destination: Address | None
    length: int
    version: int


class ProxyProtocolError(ValueError):
    """The bytes are not a valid PROXY header: the connection is to be closed."""


class _NeedMore:
    """The marker `parse` returns while the header may still be complete with more bytes."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_MORE"


NEED_MORE = _NeedMore()


def parse(buf: bytes) -> ProxyHeader | _NeedMore:
    """The PROXY header at the start of `buf`; NEED_MORE if `buf` is a valid beginning of one.

    Raises ProxyProtocolError for anything else. Never looks beyond MAX_HEADER bytes, so a
    caller that holds more than that and still gets NEED_MORE has a bug, not a slow peer.
    """
    head = buf[:_SNIFF]
    if head[:1] == b"\r":
        if not V2_SIGNATURE.startswith(head):
            raise ProxyProtocolError("not a PROXY protocol header")
        if len(buf) < V2_HEADER:
            return NEED_MORE
        return _parse_v2(buf)
    if head[:1] == b"P":
        n = min(len(buf), len(V1_PREFIX))
        if buf[:n] != V1_PREFIX[:n]:
            raise ProxyProtocolError("not a PROXY protocol header")
        return _parse_v1(buf)
    if not buf:
        return NEED_MORE
    raise ProxyProtocolError("not a PROXY protocol header")


# -- v1 -------------------------------------------------------------------------------------


def _parse_v1(buf: bytes) -> ProxyHeader | _NeedMore:
    end = buf.find(b"\r\n", 0, V1_MAX)
    if end < 0:
        if len(buf) >= V1_MAX:
            raise ProxyProtocolError(f"v1 header longer than {V1_MAX} bytes")
        # no CRLF yet: a LF, or a CR that is not the last byte, can never become one
        if b"\n" in buf or b"\r" in buf[:-1]:
            raise ProxyProtocolError("v1 header: stray CR or LF")
        return NEED_MORE
    line = buf[:end]
    try:
        text = line.decode("ascii")
    except UnicodeDecodeError:
        raise ProxyProtocolError("v1 header: not ASCII") from None
    parts = text.split(" ")
    if parts[0] != "PROXY" or len(parts) < 2:
        raise ProxyProtocolError("v1 header: malformed")
    proto = parts[1]
    length = end + 2
    if proto == "UNKNOWN":
        # the sender does not know the addresses (or talks about itself): whatever follows
        # UNKNOWN on the line is to be ignored (spec 2.1)
        return ProxyHeader(None, None, length, 1)
    if proto not in ("TCP4", "TCP6"):
        raise ProxyProtocolError(f"v1 header: unknown protocol {proto[:16]!r}")
    if len(parts) != 6:
        raise ProxyProtocolError("v1 header: expected PROXY TCP4|TCP6 SRC DST SPORT DPORT")
    family = socket.AF_INET if proto == "TCP4" else socket.AF_INET6
    src = _v1_address(parts[2], family)
    dst = _v1_address(parts[3], family)
    sport = _v1_port(parts[4])
    dport = _v1_port(parts[5])
    return ProxyHeader((src, sport), (dst, dport), length, 1)


def _v1_address(text: str, family: int) -> str:
    try:
        packed = socket.inet_pton(family, text)
    except OSError:
        raise ProxyProtocolError(f"v1 header: bad address {text[:45]!r}") from None
    if family == socket.AF_INET and socket.inet_ntop(family, packed) != text:
        # inet_pton is strict already; this also refuses leading zeros some libcs accept
        raise ProxyProtocolError(f"v1 header: bad address {text[:45]!r}")
    return socket.inet_ntop(family, packed)


def _v1_port(text: str) -> int:
    # decimal digits, no sign, no leading zero (spec 2.1), 0..65535
    if not text.isascii() or not text.isdigit() or (len(text) > 1 and text[0] == "0"):
        raise ProxyProtocolError(f"v1 header: bad port {text[:8]!r}")
    port = int(text)
    if port > 65535:
        raise ProxyProtocolError(f"v1 header: bad port {text[:8]!r}")
    return port


# -- v2 -------------------------------------------------------------------------------------

_CMD_LOCAL = 0x0
_CMD_PROXY = 0x1
_AF_UNSPEC, _AF_INET, _AF_INET6, _AF_UNIX = 0x0, 0x1, 0x2, 0x3
_PROTO_UNSPEC, _PROTO_STREAM, _PROTO_DGRAM = 0x0, 0x1, 0x2
_V2_INET = struct.Struct("!4s4sHH")
_V2_INET6 = struct.Struct("!16s16sHH")


def _parse_v2(buf: bytes) -> ProxyHeader | _NeedMore:
    if buf[:12] != V2_SIGNATURE:
        raise ProxyProtocolError("not a PROXY protocol header")
    ver_cmd = buf[12]
    if ver_cmd >> 4 != 2:
        raise ProxyProtocolError(f"v2 header: version {ver_cmd >> 4} is not 2")
    command = ver_cmd & 0x0F
    if command not in (_CMD_LOCAL, _CMD_PROXY):
        raise ProxyProtocolError(f"v2 header: unknown command {command}")
    family, proto = buf[13] >> 4, buf[13] & 0x0F
    payload = int.from_bytes(buf[14:16], "big")
    if payload > V2_MAX_PAYLOAD:
        raise ProxyProtocolError(f"v2 header: {payload} bytes of addresses and TLVs is too many")
    length = V2_HEADER + payload
    if len(buf) < length:
        return NEED_MORE
    if command == _CMD_LOCAL:
        # a health check or a connection the proxy made for itself: the socket's peer stands,
        # and the address block (if any) is skipped unread, as the spec says
        return ProxyHeader(None, None, length, 2)
    if family > _AF_UNIX or proto > _PROTO_DGRAM:
        raise ProxyProtocolError(f"v2 header: unknown family/protocol 0x{buf[13]:02x}")
    if family not in (_AF_INET, _AF_INET6) or proto != _PROTO_STREAM:
        # not a TCP client the balancer could name (UNSPEC, a unix socket, UDP): the
        # connection is accepted with its socket peer as the client, as for LOCAL
        return ProxyHeader(None, None, length, 2)
    layout, af = (_V2_INET, socket.AF_INET) if family == _AF_INET else (_V2_INET6, socket.AF_INET6)
    if payload < layout.size:
        raise ProxyProtocolError("v2 header: address block shorter than its family needs")
    # whatever follows the addresses is TLVs: none is needed, but each must fit, since a
    # header whose TLVs run past its length is malformed and its addresses can't be trusted
    _check_tlvs(buf, V2_HEADER + layout.size, length)
    src, dst, sport, dport = layout.unpack_from(buf, V2_HEADER)
    return ProxyHeader((_v2_host(af, src), sport), (_v2_host(af, dst), dport), length, 2)


def _check_tlvs(buf: bytes, start: int, end: int) -> None:
    at = start
    while at < end:
        if end - at < 3:
            raise ProxyProtocolError(f"v2 header: {end - at} stray byte(s) after the last TLV")
        size = int.from_bytes(buf[at + 1 : at + 3], "big")
        if at + 3 + size > end:
            raise ProxyProtocolError(
                f"v2 header: TLV 0x{buf[at]:02x} of {size} bytes runs past the header"
            )
        at += 3 + size


def _v2_host(af: int, packed: bytes) -> str:
    host = socket.inet_ntop(af, packed)
    if af == socket.AF_INET6:
        mapped = ipaddress.IPv6Address(packed).ipv4_mapped
        if mapped is not None:
            # ::ffff:a.b.c.d is how a dual-stack proxy names an IPv4 client: name it as one,
            # so per-IP limits and hashing see one client, not two
            return str(mapped)
    return host


# -- encoding -------------------------------------------------------------------------------


def _family(src: Address, dst: Address) -> int:
    fs = _address_family(src[0])
    fd = _address_family(dst[0])
    if fs != fd:
        # a v4 client on a v6 socket (or the reverse): both sides as IPv6, v4 ones mapped
        return socket.AF_INET6
    return fs


def _address_family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def _packed(host: str, af: int) -> bytes:
    if af == socket.AF_INET6 and ":" not in host:
        return socket.inet_pton(socket.AF_INET6, "::ffff:" + host)
    return socket.inet_pton(af, host.partition("%")[0])


def encode_v1(src: Address | None, dst: Address | None) -> bytes:
    """The v1 line telling a backend that `src` connected to `dst`; `PROXY UNKNOWN` when
    either is None (a health check, or a client that is not a TCP/IP one)."""
    if src is None or dst is None:
        return b"PROXY UNKNOWN\r\n"
    af = _family(src, dst)
    if af == socket.AF_INET:
        s, d, proto = src[0], dst[0], "TCP4"
    else:
        s = socket.inet_ntop(af, _packed(src[0], af))
        d = socket.inet_ntop(af, _packed(dst[0], af))
        proto = "TCP6"
    return f"PROXY {proto} {s} {d} {src[1]} {dst[1]}\r\n".encode("ascii")


def encode_v2(src: Address | None, dst: Address | None, local: bool = False) -> bytes:
    """The v2 header telling a backend that `src` connected to `dst`; a LOCAL header (no
    addresses: the backend uses the socket's peer) when `local` or either address is None."""
    if local or src is None or dst is None:
        return V2_SIGNATURE + bytes((0x20 | _CMD_LOCAL, 0x00)) + b"\x00\x00"
    af = _family(src, dst)
    if af == socket.AF_INET:
        block = _V2_INET.pack(_packed(src[0], af), _packed(dst[0], af), src[1], dst[1])
        fam = (_AF_INET << 4) | _PROTO_STREAM
    else:
        block = _V2_INET6.pack(_packed(src[0], af), _packed(dst[0], af), src[1], dst[1])
        fam = (_AF_INET6 << 4) | _PROTO_STREAM
    return V2_SIGNATURE + bytes((0x20 | _CMD_PROXY, fam)) + len(block).to_bytes(2, "big") + block


def encode(version: str, src: Address | None, dst: Address | None) -> bytes:
    """The header for a pool's `send_proxy_protocol` ("v1" | "v2"); b"" for "none"."""
    if version == "v1":
        return encode_v1(src, dst)
    if version == "v2":
        return encode_v2(src, dst)
    return b""


def local_header(version: str) -> bytes:
    """The header for a connection the balancer makes for itself (a health check): v2
    LOCAL or v1 UNKNOWN, so a backend that requires the header accepts it."""
    if version == "v1":
        return encode_v1(None, None)
    if version == "v2":
        return encode_v2(None, None, local=True)
    return b""


def transport_addresses(transport: object) -> tuple[Address, Address] | None:
    """The (peer, local) addresses of a connected transport, or None when it has none."""
    get = transport.get_extra_info  # type: ignore[attr-defined]
    peer = get("peername")
    sock = get("sockname")
    if not isinstance(peer, tuple) or not isinstance(sock, tuple):
        return None
    return (peer[0], peer[1]), (sock[0], sock[1])
