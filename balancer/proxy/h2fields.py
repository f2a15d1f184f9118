"""The rules a client's HTTP/2 header list must meet (RFC 9113 8.2, 8.3), checked in one pass.

h2 checks these itself when `validate_inbound_headers` is on, through a chain of seven
generators and a Python loop over every character of every name and value: most of the cost
of receiving a request. h2client switches that off and calls these instead, which enforce
every rule h2 did, in the same order of precedence, so a request that smuggles something
(RFC 9113 8.2: connection-specific fields, TE other than "trailers", CR/LF/NUL, uppercase
or spaced names, pseudo-header errors) still ends the connection with PROTOCOL_ERROR and
reaches no backend. The content-length against DATA check stays h2's (it is not part of
that switch). Cookie fields are judged as the one field they are joined into (as h2 did,
whose inbound normalization joined them first and is off as well).

h2upstream does the same with a backend's response heads and trailers (response_error).

tests/unit/test_h2fields.py checks them against h2's own validation as the oracle.
"""

from __future__ import annotations

# RFC 9113 8.2.1: a name may hold 0x21-0x40 and 0x5b-0x7e only (no controls, space,
# uppercase, DEL or non-ASCII); deleting those leaves what is illegal
_NAME_CHARS = bytes(range(0x21, 0x41)) + bytes(range(0x5B, 0x7F))
_VALUE_BAD = (b"\x00", b"\r", b"\n")
_WHITESPACE = (0x20, 0x09)
# RFC 9113 8.2.2
CONNECTION_FIELDS = frozenset(
    (b"connection", b"proxy-connection", b"keep-alive", b"transfer-encoding", b"upgrade")
)
_PSEUDO_ALLOWED = frozenset(
    (b":method", b":scheme", b":authority", b":path", b":status", b":protocol")
)


def _field_error(name: bytes, value: bytes) -> str | None:
    """What is wrong with one field by itself (8.2.1, 8.2.2), or None."""
    if name.translate(None, _NAME_CHARS):
        return f"illegal character in header name {name!r}"
    if name.find(b":", 1) != -1:
        return f"illegal character ':' in header name {name!r}"
    if value:
        if b"\x00" in value or b"\r" in value or b"\n" in value:
            return f"illegal character in header value {value!r}"
        if value[0] in _WHITESPACE or value[-1] in _WHITESPACE:
            return f"header value surrounded by whitespace {value!r}"
    if not name:
        return "header name of zero length"
    if name == b"te" and value.lower() != b"trailers":
        return f"invalid value for TE header: {value!r}"
    if name in CONNECTION_FIELDS:
        return f"connection-specific header field present: {name!r}"
    return None


def request_error(fields: list[tuple[bytes, bytes]]) -> str | None:
    """Why a request's header list breaks RFC 9113, or None when it is well-formed."""
    seen: set[bytes] = set()
    regular = False
    method = None
    authority = None
    host = None
    cookies: list[bytes] = []
    for field in fields:
        name = field[0]
        value = field[1]
        if name == b"cookie":
            # judged as the one field the crumbs are joined into, after all the others
            cookies.append(value)
            continue
        why = _field_error(name, value)
        if why is not None:
            return why
        if name[0] == 0x3A:  # ':'
            if name in seen:
                return f"duplicate pseudo-header field {name!r}"
            seen.add(name)
            if regular:
                return f"pseudo-header field out of sequence: {name!r}"
            if name not in _PSEUDO_ALLOWED:
                return f"custom pseudo-header field {name!r}"
            if name == b":method":
                method = value
            elif name == b":authority":
                authority = value
            elif name == b":path" and not value:
                return "an empty :path header is forbidden"
        else:
            regular = True
            if name == b"host":
                if host is not None:
                    return "request header block has multiple Host headers"
                host = value
    if cookies:
        why = _field_error(b"cookie", b"; ".join(cookies))
        if why is not None:
            return why
    why = _pseudo_error(seen, method)
    if why is not None:
        return why
    if authority is None and host is None:
        return "request header block has neither :authority nor Host"
    if authority is not None and host is not None and authority != host:
        return f"mismatched :authority and Host: {authority!r} / {host!r}"
    return None


def _pseudo_error(seen: set[bytes], method: bytes | None) -> str | None:
    """The pseudo-header fields a request must and must not have (8.3.1, RFC 8441 4)."""
    if b":method" not in seen:
        return "header block missing mandatory :method"
    connect = method == b"CONNECT"
    if connect and b":protocol" not in seen:
        if b":scheme" in seen or b":path" in seen:
            return "ordinary CONNECT must not include :scheme or :path"
    else:
        if b":scheme" not in seen:
            return "header block missing mandatory :scheme"
        if b":path" not in seen:
            return "header block missing mandatory :path"
    if b":status" in seen:
        return "response-only pseudo-header in a request"
    if not connect and b":protocol" in seen:
        return ":protocol outside CONNECT"
    return None


_REQUEST_ONLY = frozenset((b":method", b":scheme", b":authority", b":path", b":protocol"))


def response_error(fields: list[tuple[bytes, bytes]]) -> str | None:
    """Why a backend's response head breaks RFC 9113 (what h2 refused for h2upstream: the
    field rules, and exactly one :status before the other fields), or None."""
    seen: set[bytes] = set()
    regular = False
    for field in fields:
        name = field[0]
        why = _field_error(name, field[1])
        if why is not None:
            return why
        if name[0] == 0x3A:
            if name in seen:
                return f"duplicate pseudo-header field {name!r}"
            seen.add(name)
            if regular:
                return f"pseudo-header field out of sequence: {name!r}"
            if name not in _PSEUDO_ALLOWED or name in _REQUEST_ONLY:
                return f"pseudo-header {name!r} in a response"
        else:
            regular = True
    if b":status" not in seen:
        return "response without :status"
    return None


def trailers_error(fields: list[tuple[bytes, bytes]]) -> str | None:
    """Why trailers (a request's or a backend's) break RFC 9113 (no pseudo-headers in them),
    or None."""
    cookies: list[bytes] = []
    for field in fields:
        name = field[0]
        value = field[1]
        if name == b"cookie":
            cookies.append(value)
            continue
        why = _field_error(name, value)
        if why is not None:
            return why
        if name[0] == 0x3A:
            return f"pseudo-header in trailers: {name!r}"
    if cookies:
        return _field_error(b"cookie", b"; ".join(cookies))
    return None
