"""balancer/proxy/h2fields.py against h2's own inbound validation as the oracle: the same
header lists refused (RFC 9113 8.2, 8.3), now that h2client switches h2's off."""

from __future__ import annotations

import pytest
from h2.exceptions import ProtocolError
from h2.utilities import HeaderValidationFlags, normalize_inbound_headers, validate_headers
from hypothesis import given, settings
from hypothesis import strategies as st

from balancer.proxy.h2fields import request_error, response_error, trailers_error

REQUEST = HeaderValidationFlags(
    is_client=False, is_trailer=False, is_response_header=False, is_push_promise=False
)
RESPONSE = HeaderValidationFlags(
    is_client=True, is_trailer=False, is_response_header=True, is_push_promise=False
)
TRAILER = HeaderValidationFlags(
    is_client=False, is_trailer=True, is_response_header=False, is_push_promise=False
)

names = st.one_of(
    st.sampled_from(
        [b":method", b":scheme", b":authority", b":path", b":status", b":protocol", b":x"]
    ),
    st.sampled_from([b"host", b"cookie", b"te", b"connection", b"upgrade", b"keep-alive", b"x-a"]),
    st.sampled_from([b"transfer-encoding", b"proxy-connection", b"content-length", b""]),
    st.sampled_from([b"X-Up", b"a b", b"a:b", b"\xff", b"x\x7f", b"ok\t"]),
    st.binary(max_size=4),
)
values = st.one_of(
    st.sampled_from([b"GET", b"CONNECT", b"https", b"/", b"", b"a.example", b"b.example"]),
    st.sampled_from(
        [b"trailers", b"TRAILERS", b"gzip", b" x", b"x\t", b"a\r\nb", b"a\rb", b"a\nb", b"a\x00"]
    ),
    st.binary(max_size=4),
)
field_lists = st.lists(st.tuples(names, values), max_size=8)
GOOD = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"a.example"),
    (b":path", b"/"),
]
requests = st.one_of(field_lists, field_lists.map(lambda extra: GOOD + extra))


def h2_refuses(fields: list[tuple[bytes, bytes]], flags: HeaderValidationFlags) -> bool:
    try:
        list(validate_headers(normalize_inbound_headers(fields, flags), flags))
    except ProtocolError:
        return True
    return False


@settings(max_examples=3000, deadline=None)
@given(requests)
def test_requests_refused_as_h2_did(fields: list[tuple[bytes, bytes]]) -> None:
    assert (request_error(fields) is not None) == h2_refuses(fields, REQUEST)


responses = st.one_of(field_lists, field_lists.map(lambda extra: [(b":status", b"200"), *extra]))


@settings(max_examples=2000, deadline=None)
@given(responses)
def test_responses_refused_as_h2_did(fields: list[tuple[bytes, bytes]]) -> None:
    # h2upstream keeps h2's inbound normalization (cookie fields joined) and then checks
    normalized = list(normalize_inbound_headers(fields, RESPONSE))
    refused = response_error(normalized) is not None
    assert refused == h2_refuses(fields, RESPONSE)


@settings(max_examples=1000, deadline=None)
@given(field_lists)
def test_trailers_refused_as_h2_did(fields: list[tuple[bytes, bytes]]) -> None:
    assert (trailers_error(fields) is not None) == h2_refuses(fields, TRAILER)


@pytest.mark.parametrize(
    "extra",
    [
        [(b"connection", b"close")],
        [(b"transfer-encoding", b"chunked")],
        [(b"te", b"gzip")],
        [(b"x-a", b"evil\r\nHost: other")],
        [(b"x-a", b"a\rb")],
        [(b"x-a", b"a\x00b")],
        [(b"X-Upper", b"1")],
        [(b"x a", b"1")],
        [(b":path", b"/again")],
        [(b"host", b"b.example")],  # disagrees with :authority
        [(b"cookie", b"a=1 ")],  # the joined cookie ends in a space
    ],
)
def test_smuggling_attempts_refused(extra: list[tuple[bytes, bytes]]) -> None:
    assert request_error(GOOD + extra) is not None
    assert request_error(GOOD + [(b"x-ok", b"1"), (b"cookie", b"a=1"), (b"cookie", b"b=2")]) is None


def test_cookie_crumbs_judged_joined() -> None:
    # a crumb before the pseudo-headers was moved after them by h2's normalization
    assert request_error([(b"cookie", b"a=1"), *GOOD]) is None
    assert request_error([*GOOD, (b"cookie", b" a"), (b"cookie", b"b ")]) is not None
    assert request_error([*GOOD, (b"cookie", b"a "), (b"cookie", b"b")]) is None
