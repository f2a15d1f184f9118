"""HTTP/1.1 wire helpers shared by both sides of the proxy: hop-by-hop rules and local answers."""

from __future__ import annotations

from http import HTTPStatus

# Headers that describe one connection, not the message (RFC 9110 7.6.1); never forwarded.
# Transfer-Encoding is re-emitted by the proxy itself when it frames a body as chunked.
HOP_BY_HOP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)

# Methods that can be retried on another backend when the first one failed before answering.
IDEMPOTENT = frozenset({b"GET", b"HEAD", b"OPTIONS", b"TRACE", b"PUT", b"DELETE"})

CRLF = b"\r\n"
CHUNKED_END = b"0\r\n\r\n"
CONTINUE_100 = b"HTTP/1.1 100 Continue\r\n\r\n"


class RequestRejected(Exception):
    """Raised inside parser callbacks to answer the client with a local error."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def connection_tokens(values: list[bytes]) -> set[bytes]:
    """Lower-cased tokens of all Connection header values."""
    tokens: set[bytes] = set()
    for v in values:
        for t in v.split(b","):
            t = t.strip().lower()
            if t:
                tokens.add(t)
    return tokens


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b"Unknown"


def local_response(
    status: int,
    detail: str = "",
    *,
    close: bool = True,
    headers: list[tuple[bytes, bytes]] | None = None,
    head_only: bool = False,
) -> bytes:
    """A complete response made by the balancer itself (errors, redirects)."""
    reason = _reason(status)
    body = (
        b""
        if status in (204, 304)
        else (f"{status} {reason.decode()}" + (f": {detail}" if detail else "") + "\n").encode()
    )
    lines = [b"HTTP/1.1 %d %s" % (status, reason)]
    lines.append(b"Content-Type: text/plain; charset=utf-8")
    lines.append(b"Content-Length: %d" % len(body))
    lines.append(b"Cache-Control: no-store")
    if headers:
        lines.extend(name + b": " + value for name, value in headers)
    lines.append(b"Connection: close" if close else b"Connection: keep-alive")
    head = CRLF.join(lines) + CRLF + CRLF
    return head if head_only else head + body


def host_without_port(host: bytes) -> bytes:
    """`example.com:8080` -> `example.com`, `[::1]:80` -> `[::1]`, lower-cased."""
    host = host.strip().lower()
    if host.startswith(b"["):
        end = host.find(b"]")
        return host[: end + 1] if end > 0 else host
    colon = host.rfind(b":")
    return host[:colon] if colon >= 0 else host


# bytes that can't be in a Host value (a space, a second authority, a path, userinfo...)
_BAD_HOST = b" \t,/@?#\\"


def valid_host(host: bytes) -> bool:
    """A syntactically plausible Host value (RFC 9110 7.2): one authority, no spaces."""
    if not host or len(host) > 255:
        return False
    # translate() drops those bytes: a shorter result means one was there (cheaper per
    # request than a regex search)
    return len(host.translate(None, _BAD_HOST)) == len(host)
