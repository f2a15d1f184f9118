"""balancer/proxy/hpack_codec.py against the `hpack` package as the oracle: the same header
lists out of the same blocks (dynamic table state kept from block to block), the same errors
for broken blocks, and blocks of ours that hpack reads back as what was encoded."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.exceptions
import hpack
import pytest
from hpack.exceptions import HPACKDecodingError, OversizedHeaderListError
from hpack.huffman import HuffmanEncoder
from hpack.huffman_constants import REQUEST_CODES, REQUEST_CODES_LENGTH
from hpack.huffman_table import decode_huffman
from hpack.struct import NeverIndexedHeaderTuple
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from balancer.proxy import hpack_codec
from balancer.proxy.hpack_tables import HUFFMAN_CODES

ORACLE_HUFFMAN = HuffmanEncoder(REQUEST_CODES, REQUEST_CODES_LENGTH)
STATIC_NAMES = sorted({n for n, _ in hpack_codec.STATIC_TABLE})

names = st.one_of(
    st.sampled_from(STATIC_NAMES),
    st.sampled_from([b"x-a", b"x-b", b"grpc-status", b"cookie", b"authorization"]),
    st.binary(max_size=12),
)
values = st.one_of(
    st.sampled_from([b"", b"GET", b"200", b"/", b"gzip, deflate", b"0"]),
    st.binary(max_size=40),
    st.binary(min_size=100, max_size=1500),  # large: evictions, an entry bigger than a small table
)
fields = st.tuples(names, values, st.integers(0, 9)).map(
    lambda t: NeverIndexedHeaderTuple(t[0], t[1]) if t[2] == 0 else (t[0], t[1])
)
header_lists = st.lists(fields, max_size=12)
# a block's header list, and the table size the decoding side allows before it (None: same)
blocks = st.lists(
    st.tuples(header_lists, st.one_of(st.none(), st.sampled_from([0, 64, 256, 4096, 8192]))),
    min_size=1,
    max_size=8,
)
SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def plain(headers: list) -> list[tuple[object, object, bool]]:
    """Fields as plain values (hpack gives HeaderTuples, we tuples), never-indexed marked."""
    return [(h[0], h[1], isinstance(h, NeverIndexedHeaderTuple)) for h in headers]


def outcome(decoder: object, block: bytes, raw: bool = True) -> object:
    """What decoding `block` gives: the fields (with never-indexed marked), or the error."""
    try:
        return ("ok", plain(decoder.decode(block, raw=raw)))  # type: ignore[attr-defined]
    except HPACKDecodingError as e:
        return ("error", type(e))
    except UnicodeDecodeError:
        return ("error", HPACKDecodingError)


@SETTINGS
@given(blocks)
def test_our_blocks_read_back_by_hpack(sequence: list) -> None:
    ours = hpack_codec.Encoder()
    oracle = hpack.Decoder()
    for headers, table_size in sequence:
        if table_size is not None:
            # the decoding side's SETTINGS_HEADER_TABLE_SIZE, acknowledged
            ours.header_table_size = table_size
            oracle.max_allowed_table_size = table_size
        block = ours.encode(headers)
        decoded = plain(oracle.decode(block, raw=True))
        assert [(n, v) for n, v, _ in decoded] == [(bytes(h[0]), bytes(h[1])) for h in headers]
        for (_, _, never), given_field in zip(decoded, headers, strict=True):
            if isinstance(given_field, NeverIndexedHeaderTuple):
                assert never  # RFC 7541 7.1.3: kept never-indexed
        assert ours.size <= ours.max_size <= hpack_codec.ENCODER_TABLE_CAP


@SETTINGS
@given(blocks, st.booleans())
def test_hpack_blocks_decoded_as_hpack_does(sequence: list, raw: bool) -> None:
    encoder = hpack.Encoder()
    ours = hpack_codec.Decoder()
    oracle = hpack.Decoder()
    for headers, table_size in sequence:
        if table_size is not None:
            encoder.header_table_size = table_size
            ours.max_allowed_table_size = oracle.max_allowed_table_size = table_size
        block = encoder.encode(headers)
        assert outcome(ours, block, raw) == outcome(oracle, block, raw)
        assert ours.header_table_size == oracle.header_table_size


def mutations(block: bytes, data: st.DataObject) -> bytes:
    kind = data.draw(st.sampled_from(["truncate", "flip", "insert", "same"]))
    if not block or kind == "same":
        return block
    at = data.draw(st.integers(0, len(block) - 1))
    if kind == "truncate":
        return block[:at]
    if kind == "flip":
        return block[:at] + bytes([block[at] ^ data.draw(st.integers(1, 255))]) + block[at + 1 :]
    return block[:at] + data.draw(st.binary(min_size=1, max_size=6)) + block[at:]


@SETTINGS
@given(blocks, st.data(), st.sampled_from([65536, 300, 80]))
def test_broken_blocks_fail_as_in_hpack(sequence: list, data: st.DataObject, cap: int) -> None:
    """Valid blocks bent out of shape, and arbitrary bytes: the same fields or the same error
    from both (a list over `cap`: OversizedHeaderListError, the bomb h2 ends a connection
    for); while neither fails, the tables go on in step."""
    encoder = hpack.Encoder()
    ours = hpack_codec.Decoder(cap)
    oracle = hpack.Decoder(cap)
    for headers, _ in sequence:
        block = mutations(encoder.encode(headers), data)
        if data.draw(st.booleans()):
            block = data.draw(st.binary(max_size=30))
        got, want = outcome(ours, block), outcome(oracle, block)
        assert got == want
        if got[0] == "error":
            return


@SETTINGS
@given(st.binary(max_size=64))
def test_huffman_against_hpack(data: bytes) -> None:
    code = ORACLE_HUFFMAN.encode(data)
    out = bytearray()
    hpack_codec.huffman_encode(data, out)
    assert bytes(out) == code
    assert hpack_codec.huffman_length(data) == len(code)
    assert hpack_codec.huffman_decode(code, 0, len(code)) == data


@SETTINGS
@given(st.binary(max_size=16))
def test_huffman_decoding_arbitrary_bytes(data: bytes) -> None:
    try:
        want: object = decode_huffman(data)
    except HPACKDecodingError:
        want = HPACKDecodingError
    try:
        got: object = hpack_codec.huffman_decode(data, 0, len(data))
    except HPACKDecodingError:
        got = HPACKDecodingError
    assert got == want


def test_padding_rules() -> None:
    # RFC 7541 5.2: padding longer than 7 bits, or not all ones, or EOS itself: errors
    code = ORACLE_HUFFMAN.encode(b"a")  # 5 bits + 3 bits of padding
    assert hpack_codec.huffman_decode(code, 0, 1) == b"a"
    for bad in (code + b"\xff", bytes([code[0] & 0xF8]), b"\xff\xff\xff\xff"):
        with pytest.raises(HPACKDecodingError):
            hpack_codec.huffman_decode(bad, 0, len(bad))


def test_padding_of_a_whole_octet_refused() -> None:
    eight = next(i for i in range(256) if REQUEST_CODES_LENGTH[i] == 8)
    code = ORACLE_HUFFMAN.encode(bytes([eight]))
    assert hpack_codec.huffman_decode(code, 0, 1) == bytes([eight])
    with pytest.raises(HPACKDecodingError):
        decode_huffman(code + b"\xff")
    with pytest.raises(HPACKDecodingError):
        hpack_codec.huffman_decode(code + b"\xff", 0, 2)


@pytest.mark.parametrize(
    "block",
    [
        b"\xff\x80\x80\x80\x80\x80\x00",  # five continuation octets: too long
        b"\xff\x80\x80\x80\x80\x00",  # four, then the last: a (huge) index
        b"\xbf\x80",  # index 63 + 0, an empty dynamic table
        b"\x80",  # index 0
        b"\xff",  # cut inside an integer
        b"\x40\x03ab",  # cut inside a name
        b"\x0f\x2f\x01a",  # a name index beyond the table, literal without indexing
        b"\x10\x01a\x01b",  # never indexed, literal name
        b"\x00\x81\xff\x00",  # a Huffman name that is EOS's prefix only
    ],
)
def test_edge_blocks_as_hpack(block: bytes) -> None:
    assert outcome(hpack_codec.Decoder(), block) == outcome(hpack.Decoder(), block)


def test_hpack_bomb_is_oversized() -> None:
    """One large entry, then a block that names it again and again."""
    encoder = hpack.Encoder()
    decoder = hpack_codec.Decoder(max_header_list_size=16384)
    big = (b"x-big", b"y" * 4000)
    decoder.decode(encoder.encode([big]), raw=True)
    bomb = encoder.encode([big] * 10)
    assert len(bomb) == 10  # ten one-octet references
    with pytest.raises(OversizedHeaderListError):
        decoder.decode(bomb, raw=True)


def test_size_update_rules() -> None:
    decoder = hpack_codec.Decoder()
    decoder.max_allowed_table_size = 100
    with pytest.raises(hpack.InvalidTableSizeError):
        decoder.decode(b"\x3f\xe1\x1f", raw=True)  # an update to 4096, above what we allow
    decoder = hpack_codec.Decoder()
    decoder.max_allowed_table_size = 100
    with pytest.raises(hpack.InvalidTableSizeError):
        decoder.decode(b"\x82", raw=True)  # the peer never shrank its table to our limit
    assert hpack_codec.Decoder().decode(b"\x3f\x21\x82", raw=True) == [(b":method", b"GET")]
    with pytest.raises(HPACKDecodingError):
        hpack_codec.Decoder().decode(b"\x82\x20", raw=True)  # an update after a field


def test_encoder_signals_table_changes_and_keeps_its_cap() -> None:
    encoder = hpack_codec.Encoder()
    decoder = hpack.Decoder()
    encoder.encode([(b"x-a", b"1")])
    encoder.header_table_size = 0
    encoder.header_table_size = 1000
    block = encoder.encode([(b"x-a", b"1")])
    assert block[:2] == b"\x20\x3f"  # the smallest size since the last block, then the current
    decoder.decode(hpack.Encoder().encode([(b"x-a", b"1")]), raw=True)
    assert decoder.decode(block, raw=True) == [(b"x-a", b"1")]
    assert decoder.header_table_size == 1000
    encoder.header_table_size = 1 << 20  # a peer that allows a megabyte: we keep 4096
    assert encoder.header_table_size == hpack_codec.ENCODER_TABLE_CAP


def test_sensitive_fields_never_indexed() -> None:
    """What h2's outbound normalization did (it is off now): credentials and short cookies
    stay out of the tables."""
    encoder = hpack_codec.Encoder()
    decoder = hpack.Decoder()
    fields = [(b"authorization", b"Basic eA=="), (b"cookie", b"a=1"), (b"cookie", b"x" * 40)]
    decoded = decoder.decode(encoder.encode(fields), raw=True)
    assert [isinstance(h, NeverIndexedHeaderTuple) for h in decoded] == [True, True, False]
    assert encoder.entries == [(b"cookie", b"x" * 40)]


def test_installed_on_h2_connection_maps_errors_as_before() -> None:
    """Through h2: a bad block is a ProtocolError, a bomb a DenialOfServiceError."""
    for block, error in (
        (b"\xff\xff\xff\xff\xff\xff\x7f", h2.exceptions.ProtocolError),
        (
            hpack.Encoder().encode([(b"x-big", b"y" * 4000)], huffman=False) + b"\xbe" * 40,
            h2.exceptions.DenialOfServiceError,
        ),
    ):
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        hpack_codec.install(conn, 16384)
        conn.initiate_connection()
        conn.receive_data(
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
        )
        frame = len(block).to_bytes(3, "big") + b"\x01\x05\x00\x00\x00\x01" + block
        with pytest.raises(error):
            conn.receive_data(frame)
        assert isinstance(conn.decoder, hpack_codec.Decoder)


# RFC 7541 Appendix C.4: three requests in a row, Huffman-coded, one connection's table.
RFC_C4 = (
    (
        "828684418cf1e3c2e5f23a6ba0ab90f4ff",
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")]
        + [(b":authority", b"www.example.com")],
    ),
    (
        "828684be5886a8eb10649cbf",
        [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/")]
        + [(b":authority", b"www.example.com"), (b"cache-control", b"no-cache")],
    ),
    (
        "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
        [(b":method", b"GET"), (b":scheme", b"https"), (b":path", b"/index.html")]
        + [(b":authority", b"www.example.com"), (b"custom-key", b"custom-value")],
    ),
)


def test_rfc7541_appendix_c4_requests_decode_in_sequence() -> None:
    """The specification's own examples: the tables are the RFC's, whoever else agrees."""
    ours, oracle = hpack_codec.Decoder(), hpack.Decoder()
    for block, expected in RFC_C4:
        data = bytes.fromhex(block)
        assert plain(ours.decode(data, raw=True)) == [(n, v, False) for n, v in expected]
        assert plain(oracle.decode(data, raw=True)) == [(n, v, False) for n, v in expected]


def test_huffman_code_is_the_canonical_code_of_its_lengths() -> None:
    """RFC 7541 Appendix B is a canonical Huffman code: ordered by (length, symbol), each code
    is the previous one plus one, shifted left by the growth in length. A mistyped row breaks
    that (or the prefix property) and fails here."""
    codes = HUFFMAN_CODES
    assert len(codes) == 257
    order = sorted(range(257), key=lambda s: (codes[s][1], s))
    code, length = 0, codes[order[0]][1]
    for i, sym in enumerate(order):
        bits = codes[sym][1]
        if i:
            code = (code + 1) << (bits - length)
        length = bits
        assert codes[sym] == (code, bits), sym
    assert codes[256] == (0x3FFFFFFF, 30)  # EOS: thirty ones
