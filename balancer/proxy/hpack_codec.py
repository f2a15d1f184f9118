"""HPACK (RFC 7541), the header compression of HTTP/2: the encoder and decoder h2's connections
use instead of the `hpack` package's (see install()), compiled with the hot path.

Same interface and same errors as `hpack.Encoder` / `hpack.Decoder` where h2 touches them
(encode(headers, huffman=...), decode(data, raw=...), header_table_size,
max_header_list_size, max_allowed_table_size; HPACKDecodingError and its subclasses), so h2
maps a bad block to PROTOCOL_ERROR and a bomb to ENHANCE_YOUR_CALM as before. What differs is
the cost: decoded fields are plain tuples (the table's own, when indexed: no copy), Huffman
codes are decoded four bits at a time through a table built once at import, and the encoder
finds a field in the dynamic table by a dict lookup, not a scan.

The encoder keeps what h2's outbound normalization did for us (that step is switched off):
`authorization`, `proxy-authorization` and short `cookie` values are never indexed (RFC 7541
7.1.3), and so is any field that arrived never-indexed (a NeverIndexedHeaderTuple from the
decoder), as an intermediary must. Its table stays at most 4096 bytes whatever the peer
allows (as nghttp2's): the peer's setting is a ceiling, not a size to fill.

tests/unit/test_hpack_codec.py checks it against the `hpack` package as the oracle.
"""

from __future__ import annotations

from collections.abc import Iterable

from hpack.exceptions import (
    HPACKDecodingError,
    InvalidTableIndex,
    InvalidTableSizeError,
    OversizedHeaderListError,
)
from hpack.struct import NeverIndexedHeaderTuple

from balancer.proxy.hpack_tables import HUFFMAN_CODES, STATIC_TABLE

DEFAULT_TABLE_SIZE = 4096  # RFC 7541 4.2 / RFC 9113 6.5.2: SETTINGS_HEADER_TABLE_SIZE's default
ENCODER_TABLE_CAP = 4096  # the most our encoder indexes, whatever the peer allows
DEFAULT_MAX_HEADER_LIST_SIZE = 65536  # as hpack's Decoder
MAX_INTEGER_OCTETS = 5  # continuation octets of an integer before it is refused (as hpack)
ENTRY_OVERHEAD = 32  # RFC 7541 4.1
# h2's rule for fields kept out of compression contexts (h2.utilities._secure_headers)
_SENSITIVE = frozenset((b"authorization", b"proxy-authorization"))
_SHORT_COOKIE = 20

STATIC_LENGTH = len(STATIC_TABLE)
_STATIC = STATIC_TABLE  # typed in the .pxd: a C-level read where fields are decoded
_EOS = 256

# Decoding flags, per (state, nibble) of the table below.
_EMIT = 1  # a symbol ends within this nibble
_FAIL = 2  # EOS decoded: an error (RFC 7541 5.2)


def _build_huffman_decoder() -> tuple[bytes, bytes, bytes, bytes]:
    """The code tree of HUFFMAN_CODES as a state machine read four bits at a time: for each
    internal node (state) and nibble, the node reached, the symbol emitted on the way (codes
    are at least five bits long, so at most one) and whether EOS was met. Also which states
    may end a string: the root, and the all-ones path up to seven bits deep (the padding is
    a prefix of EOS, shorter than an octet)."""
    children: list[list[int]] = [[0, 0]]  # internal nodes; a leaf is -1 - symbol
    for symbol, (code, bits) in enumerate(HUFFMAN_CODES):
        node = 0
        for shift in range(bits - 1, 0, -1):
            bit = (code >> shift) & 1
            if not children[node][bit]:
                children[node][bit] = len(children)
                children.append([0, 0])
            node = children[node][bit]
        children[node][code & 1] = -1 - symbol
    assert len(children) == 256  # a node number fits an octet
    accept = bytearray(256)
    node = 0
    for _ in range(8):
        accept[node] = 1
        node = children[node][1]
    nxt = bytearray(256 * 16)
    emit = bytearray(256 * 16)
    flags = bytearray(256 * 16)
    for state in range(256):
        for nibble in range(16):
            node, flag, symbol = state, 0, 0
            for shift in (3, 2, 1, 0):
                child = children[node][(nibble >> shift) & 1]
                if child >= 0:
                    node = child
                elif -1 - child == _EOS:
                    flag |= _FAIL
                    node = 0
                    break
                else:
                    flag |= _EMIT
                    symbol = -1 - child
                    node = 0
            at = state * 16 + nibble
            nxt[at], emit[at], flags[at] = node, symbol, flag
    return bytes(nxt), bytes(emit), bytes(flags), bytes(accept)


_H_NEXT, _H_SYMBOL, _H_FLAGS, _H_ACCEPT = _build_huffman_decoder()
_H_CODES = [code for code, _ in HUFFMAN_CODES[:256]]
_H_BITS = bytes(bits for _, bits in HUFFMAN_CODES[:256])

# the static table for the encoder: a full field, and a name, to its (first) index
_STATIC_FIELDS: dict[tuple[bytes, bytes], int] = {}
_STATIC_NAMES: dict[bytes, int] = {}
for _i, _field in enumerate(STATIC_TABLE, 1):
    _STATIC_FIELDS.setdefault(_field, _i)
    _STATIC_NAMES.setdefault(_field[0], _i)
del _i, _field


def huffman_decode(data: bytes, start: int, end: int) -> bytes:
    """The Huffman-coded string data[start:end], decoded; HPACKDecodingError if it is not
    one (EOS in it, or padding that is not a short prefix of EOS)."""
    nxt: bytes = _H_NEXT
    symbol: bytes = _H_SYMBOL
    flags: bytes = _H_FLAGS
    out = bytearray()
    state = 0
    for i in range(start, end):
        octet = data[i]
        at = state * 16 + (octet >> 4)
        flag = flags[at]
        if flag:
            if flag & _FAIL:
                raise HPACKDecodingError("Invalid Huffman string")
            out.append(symbol[at])
        state = nxt[at]
        at = state * 16 + (octet & 0x0F)
        flag = flags[at]
        if flag:
            if flag & _FAIL:
                raise HPACKDecodingError("Invalid Huffman string")
            out.append(symbol[at])
        state = nxt[at]
    if not _H_ACCEPT[state]:
        raise HPACKDecodingError("Incomplete Huffman string")
    return bytes(out)


def huffman_length(data: bytes) -> int:
    """Octets the Huffman code of `data` takes."""
    bits: bytes = _H_BITS
    total = 0
    for octet in data:
        total += bits[octet]
    return (total + 7) >> 3


def huffman_encode(data: bytes, out: bytearray) -> None:
    """Append the Huffman code of `data` to `out`, padded with the start of EOS."""
    codes: list = _H_CODES
    bits: bytes = _H_BITS
    acc = 0
    held = 0
    for octet in data:
        n = bits[octet]
        acc = (acc << n) | codes[octet]
        held += n
        while held >= 8:
            held -= 8
            out.append((acc >> held) & 0xFF)
        acc &= (1 << held) - 1
    if held:
        out.append(((acc << (8 - held)) | (0xFF >> held)) & 0xFF)


def _put_integer(out: bytearray, value: int, prefix_bits: int, first: int) -> None:
    """RFC 7541 5.1: `value` with a `prefix_bits` prefix, the first octet's high bits `first`."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        out.append(first | value)
        return
    out.append(first | limit)
    value -= limit
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def _put_string(out: bytearray, data: bytes, huffman: bool) -> None:
    """RFC 7541 5.2: a string literal, Huffman-coded when asked and when that is shorter."""
    size = len(data)
    if huffman and size:
        coded = huffman_length(data)
        if coded < size:
            _put_integer(out, coded, 7, 0x80)
            huffman_encode(data, out)
            return
    _put_integer(out, size, 7, 0)
    out += data


def _to_bytes(value: object) -> bytes:
    if type(value) is bytes:
        return value  # type: ignore[return-value]
    if type(value) is not str:
        value = str(value)
    return value.encode("utf-8")  # type: ignore[attr-defined]


class Encoder:
    """HPACK encoder: header lists into header blocks, keeping a dynamic table."""

    def __init__(self) -> None:
        # the dynamic table, oldest first; entry k (counted from the connection's first) is
        # entries[k - evicted], and its index is STATIC_LENGTH + added - k
        self.entries: list[tuple[bytes, bytes]] = []
        self.fields: dict[tuple[bytes, bytes], int] = {}  # field -> k of its latest entry
        self.names: dict[bytes, int] = {}  # name -> k of its latest entry
        self.added = 0
        self.evicted = 0
        self.size = 0
        self.max_size = DEFAULT_TABLE_SIZE
        self.resize_min = -1  # smallest size since the last block, when it changed

    @property
    def header_table_size(self) -> int:
        return self.max_size

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        """The peer's SETTINGS_HEADER_TABLE_SIZE: the ceiling of our table."""
        size = min(int(value), ENCODER_TABLE_CAP)
        if size == self.max_size:
            return
        self.max_size = size
        self._evict(0)
        if self.resize_min < 0 or size < self.resize_min:
            self.resize_min = size

    def encode(self, headers: Iterable, huffman: bool = True) -> bytes:
        """A header block for `headers`: (name, value) pairs, bytes or str, or
        (name, value, sensitive) triples, or hpack HeaderTuples."""
        out = bytearray()
        if self.resize_min >= 0:
            # RFC 7541 4.2: the smallest size since the last block, then the current one
            if self.resize_min < self.max_size:
                _put_integer(out, self.resize_min, 5, 0x20)
            _put_integer(out, self.max_size, 5, 0x20)
            self.resize_min = -1
        if isinstance(headers, dict):
            headers = sorted(headers.items(), key=lambda f: not _to_bytes(f[0]).startswith(b":"))
        for header in headers:
            self._field(out, header, huffman)
        return bytes(out)

    def _field(self, out: bytearray, header: tuple, huffman: bool) -> None:
        name = _to_bytes(header[0])
        value = _to_bytes(header[1])
        sensitive = False
        if type(header) is not tuple:
            indexable = getattr(header, "indexable", None)
            if indexable is not None:
                sensitive = not indexable
            elif len(header) > 2:
                sensitive = bool(header[2])
        elif len(header) > 2:
            sensitive = bool(header[2])
        if name in _SENSITIVE or (name == b"cookie" and len(value) < _SHORT_COOKIE):
            sensitive = True
        key = (name, value)
        index = _STATIC_FIELDS.get(key, 0)
        if not index:
            k = self.fields.get(key, -1)
            if k >= self.evicted:
                index = STATIC_LENGTH + self.added - k
        if index and not sensitive:
            _put_integer(out, index, 7, 0x80)  # indexed field (6.1)
            return
        name_index = _STATIC_NAMES.get(name, 0)
        if not name_index:
            k = self.names.get(name, -1)
            if k >= self.evicted:
                name_index = STATIC_LENGTH + self.added - k
        size = len(name) + len(value) + ENTRY_OVERHEAD
        if sensitive:
            prefix, first, indexed = 4, 0x10, False  # never indexed (6.2.3)
        elif size > self.max_size:
            prefix, first, indexed = 4, 0x00, False  # without indexing: it would empty the table
        else:
            prefix, first, indexed = 6, 0x40, True  # with incremental indexing (6.2.1)
        if name_index:
            _put_integer(out, name_index, prefix, first)
        else:
            out.append(first)
            _put_string(out, name, huffman)
        _put_string(out, value, huffman)
        if indexed:
            self._evict(size)
            self.entries.append(key)
            self.fields[key] = self.added
            self.names[name] = self.added
            self.added += 1
            self.size += size

    def _evict(self, room: int) -> None:
        """Drop the oldest entries until `room` more bytes fit."""
        entries = self.entries
        while entries and self.size + room > self.max_size:
            key = entries.pop(0)
            k = self.evicted
            self.evicted += 1
            self.size -= len(key[0]) + len(key[1]) + ENTRY_OVERHEAD
            if self.fields.get(key) == k:
                del self.fields[key]
            if self.names.get(key[0]) == k:
                del self.names[key[0]]


class Decoder:
    """HPACK decoder: header blocks into header lists, keeping the peer's dynamic table."""

    def __init__(self, max_header_list_size: int = DEFAULT_MAX_HEADER_LIST_SIZE) -> None:
        self.entries: list[tuple[bytes, bytes]] = []  # the dynamic table, oldest first
        self.size = 0
        self.max_size = DEFAULT_TABLE_SIZE
        # the decoded size (32 + name + value per field) past which a block is refused
        # (OversizedHeaderListError: an HPACK bomb)
        self.max_header_list_size = max_header_list_size
        # our SETTINGS_HEADER_TABLE_SIZE, once acknowledged: the most the peer may use
        self.max_allowed_table_size = DEFAULT_TABLE_SIZE
        self.pos = 0  # where the block being decoded is read

    @property
    def header_table_size(self) -> int:
        return self.max_size

    @header_table_size.setter
    def header_table_size(self, value: int) -> None:
        self.max_size = value
        self._evict(0)

    def decode(self, data: bytes, raw: bool = False) -> list:
        """The fields of one header block, in order, as (name, value) tuples of bytes (`raw`)
        or str; a never-indexed field as a NeverIndexedHeaderTuple."""
        if type(data) is not bytes:
            data = bytes(data)
        end = len(data)
        limit = self.max_header_list_size
        headers: list = []
        inflated = 0
        pos = 0
        while pos < end:
            octet = data[pos]
            if octet & 0x80:  # indexed field (6.1)
                self.pos = pos
                header = self._entry(self._integer(data, 7))
            elif octet & 0x40:  # literal with incremental indexing (6.2.1)
                header = self._literal(data, pos, 6)
                self._add(header)
            elif octet & 0x20:  # dynamic table size update (6.3)
                if headers:
                    raise HPACKDecodingError("Table size update not at the start of the block")
                self.pos = pos
                size = self._integer(data, 5)
                if size > self.max_allowed_table_size:
                    raise InvalidTableSizeError("Encoder exceeded max allowable table size")
                self.max_size = size
                self._evict(0)
                pos = self.pos
                continue
            else:  # literal without indexing, or never indexed (6.2.2, 6.2.3)
                header = self._literal(data, pos, 4)
                if octet & 0x10:
                    header = NeverIndexedHeaderTuple(header[0], header[1])
            pos = self.pos
            headers.append(header)
            inflated += len(header[0]) + len(header[1]) + ENTRY_OVERHEAD
            if inflated > limit:
                raise OversizedHeaderListError(
                    f"A header list larger than {limit} has been received"
                )
        if self.max_size > self.max_allowed_table_size:
            raise InvalidTableSizeError("Encoder did not shrink table size to within the max")
        if not raw:
            return _as_text(headers)
        return headers

    def _integer(self, data: bytes, prefix_bits: int) -> int:
        """RFC 7541 5.1: the integer at self.pos, which moves past it."""
        pos = self.pos
        end = len(data)
        if pos >= end:
            raise HPACKDecodingError("Unable to decode HPACK integer representation")
        limit = (1 << prefix_bits) - 1
        value = data[pos] & limit
        pos += 1
        if value == limit:
            shift = 0
            count = 0
            while True:
                if pos >= end:
                    raise HPACKDecodingError("Unable to decode HPACK integer representation")
                octet = data[pos]
                pos += 1
                count += 1
                value += (octet & 0x7F) << shift
                if octet < 0x80:
                    break
                if count >= MAX_INTEGER_OCTETS:
                    raise HPACKDecodingError("Variable integer representation is too long")
                shift += 7
        self.pos = pos
        return value

    def _string(self, data: bytes) -> bytes:
        """RFC 7541 5.2: the string literal at self.pos, which moves past it."""
        pos = self.pos
        if pos >= len(data):
            raise HPACKDecodingError("Unable to decode HPACK integer representation")
        coded = data[pos] & 0x80
        length = self._integer(data, 7)
        start = self.pos
        if length > len(data) - start:
            raise HPACKDecodingError("Truncated header block")
        self.pos = start + length
        if coded:
            return huffman_decode(data, start, start + length)
        return data[start : start + length]

    def _literal(self, data: bytes, pos: int, prefix_bits: int) -> tuple[bytes, bytes]:
        """A literal field at `pos`, its name indexed (a non-zero prefix) or literal."""
        if data[pos] & ((1 << prefix_bits) - 1):
            self.pos = pos
            name = self._entry(self._integer(data, prefix_bits))[0]
        else:
            self.pos = pos + 1
            name = self._string(data)
        return (name, self._string(data))

    def _entry(self, index: int) -> tuple[bytes, bytes]:
        if 0 < index <= STATIC_LENGTH:
            return _STATIC[index - 1]
        dynamic = index - STATIC_LENGTH
        entries = self.entries
        if 0 < dynamic <= len(entries):
            return entries[len(entries) - dynamic]
        raise InvalidTableIndex(f"Invalid table index {index}")

    def _add(self, field: tuple[bytes, bytes]) -> None:
        size = len(field[0]) + len(field[1]) + ENTRY_OVERHEAD
        if size > self.max_size:
            # RFC 7541 4.4: an entry larger than the table empties it
            self.entries.clear()
            self.size = 0
            return
        self._evict(size)
        self.entries.append(field)
        self.size += size

    def _evict(self, room: int) -> None:
        entries = self.entries
        while entries and self.size + room > self.max_size:
            name, value = entries.pop(0)
            self.size -= len(name) + len(value) + ENTRY_OVERHEAD


def _as_text(headers: list) -> list:
    """Fields as str (decode(raw=False)), never-indexed ones still marked."""
    try:
        return [
            NeverIndexedHeaderTuple(h[0].decode("utf-8"), h[1].decode("utf-8"))
            if type(h) is NeverIndexedHeaderTuple
            else (h[0].decode("utf-8"), h[1].decode("utf-8"))
            for h in headers
        ]
    except UnicodeDecodeError as e:
        raise HPACKDecodingError("Unable to decode headers as UTF-8") from e


def install(conn: object, max_header_list_size: int | None = None) -> None:
    """Give an h2 H2Connection this module's encoder and decoder (before any frame),
    keeping the decoder's cap on a header list."""
    old = conn.decoder  # type: ignore[attr-defined]
    cap = old.max_header_list_size if max_header_list_size is None else max_header_list_size
    conn.encoder = Encoder()  # type: ignore[attr-defined]
    conn.decoder = Decoder(cap)  # type: ignore[attr-defined]
