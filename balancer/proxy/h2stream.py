"""One HTTP/2 request stream: its Downstream (flow control per stream) and the Exchange subclass
that answers it with HEADERS and DATA frames instead of HTTP/1.1 bytes.

The request side is mapped onto the HTTP/1.1 form the rest of the proxy already speaks
(RFC 9113 8.3.1: `:authority` becomes Host, `:path` the target, cookie fields are joined), so
routing, sticky sessions, strategies, retries, limits and the forwarded head are the same
code as for HTTP/1.1 clients. A request body whose length the client did not declare goes to
an HTTP/1.1 backend chunked.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Protocol

from balancer.proxy.exchange import CHUNKED_END, Exchange, Site
from balancer.proxy.http import RequestRejected
from balancer.proxy.proxy_protocol import Address

if TYPE_CHECKING:
    from balancer.proxy import upstream as up

# Pseudo-headers and the fields HTTP/2 forbids were checked by h2fields (RFC 9113 8.2, 8.3);
# what is left here is the mapping to the HTTP/1.1 request an HTTP/1.1 backend reads.

# Response fields that describe an HTTP/1.1 connection and have no place in HTTP/2
# (RFC 9113 8.2.2); the upstream side has already removed the others.
# connection-specific fields (RFC 9113 8.2.2): an HTTP/1.1 backend's are left out of the
# answer rather than have h2 refuse the whole response
_NOT_IN_H2 = frozenset(
    {b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade", b"te"}
)

# gRPC status codes the balancer itself answers with (grpc/doc/statuscodes.md).
GRPC_DEADLINE_EXCEEDED = b"4"
GRPC_UNAVAILABLE = b"14"
GRPC_INTERNAL = b"13"
GRPC_RESOURCE_EXHAUSTED = b"8"


class StreamOwner(Protocol):
    """The HTTP/2 connection a stream lives on (proxy/h2client.py)."""

    closing: bool
    write_paused: bool

    def send_headers(
        self, stream: H2Stream, headers: list[tuple[bytes, bytes]], end: bool
    ) -> None: ...
    def send_body(self, stream: H2Stream, data: bytes) -> None: ...
    def end_stream(self, stream: H2Stream) -> None: ...
    def reset_stream(self, stream: H2Stream, code: int) -> None: ...
    def stream_finished(self, stream: H2Stream) -> None: ...
    def acknowledge(self, stream: H2Stream, size: int) -> None: ...
    def addresses(self) -> tuple[Address, Address] | None: ...


def _grpc_status_for(status: int) -> bytes:
    """The gRPC code for an HTTP error the balancer answers itself (the mapping gRPC's own
    clients apply to HTTP statuses, made explicit so the client sees a proper status)."""
    if status == 504 or status == 408:
        return GRPC_DEADLINE_EXCEEDED
    if status in (502, 503, 429):
        return GRPC_UNAVAILABLE
    if status == 413 or status == 431:
        return GRPC_RESOURCE_EXHAUSTED
    return GRPC_INTERNAL


def parse_local(data: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
    """A local HTTP/1.1 answer (proxy/http.py local_response) as status, fields and body."""
    end = data.find(b"\r\n\r\n")
    head, body = data[:end], data[end + 4 :]
    status = int(head.split(b" ", 2)[1])
    return status, response_fields(head), body


def response_fields(head_out: bytes) -> list[tuple[bytes, bytes]]:
    """The end-to-end fields of an HTTP/1.1 response head (the backend's, as the upstream
    side prepared it for HTTP/1.1 clients, or a local answer), lower-cased as HTTP/2
    requires, without the connection-specific fields."""
    fields = []
    for line in head_out.split(b"\r\n")[1:]:
        if not line:
            continue
        name, _, value = line.partition(b":")
        lname = name.strip().lower()
        if lname not in _NOT_IN_H2:
            fields.append((lname, value.strip()))
    return fields


class H2Stream:
    """The Downstream of one HTTP/2 request: what pause/resume and endings mean per stream."""

    __slots__ = (
        "owner",
        "stream_id",
        "listener",
        "client_ip",
        "client_ip_b",
        "exchange",
        "closed",
        "read_pause",
        "unacked",
        "request_ended",
        "headers_sent",
        "ended",
        "pending",
        "pending_size",
        "held",
        "end_pending",
        "upstream_paused",
        "last_progress",
        "header_bytes",
    )

    def __init__(self, owner: StreamOwner, stream_id: int, listener: Site, client_ip: str) -> None:
        self.owner = owner
        self.stream_id = stream_id
        self.listener = listener
        self.client_ip = client_ip
        self.client_ip_b = client_ip.encode()
        self.exchange: H2Exchange | None = None
        self.closed = False  # reset, or the connection is gone: nothing more is sent
        self.read_pause = 0  # reasons to hold back the client's flow-control credit
        self.unacked = 0  # request body bytes received but not yet credited back
        self.request_ended = False
        self.headers_sent = False
        self.ended = False  # END_STREAM sent (or queued behind pending data)
        # response DATA waiting for flow-control window, and whether END_STREAM follows it
        self.pending: list[bytes] = []
        self.pending_size = 0
        # the latest response DATA, kept until the loop iteration's flush so that an
        # END_STREAM coming in the same iteration rides on its frame (see h2client)
        self.held: bytes | None = None
        self.end_pending = False
        self.upstream_paused = False
        self.last_progress = 0.0
        self.header_bytes = 0

    # -- Downstream ------------------------------------------------------------------------

    @property
    def closing(self) -> bool:
        return self.owner.closing

    @property
    def write_paused(self) -> bool:
        return self.owner.write_paused or self.upstream_paused

    def pause(self, reason: int) -> None:
        self.read_pause |= reason

    def resume(self, reason: int) -> None:
        if self.read_pause & reason:
            self.read_pause &= ~reason
            if not self.read_pause and self.unacked:
                size, self.unacked = self.unacked, 0
                self.owner.acknowledge(self, size)

    def write(self, data: bytes) -> None:
        """Only reached for bytes HTTP/2 has no use for (an HTTP/1.1 tunnel); ignored."""

    def writelines(self, parts: Iterable[bytes]) -> None:
        """As write()."""

    def exchange_done(self, ex: Exchange) -> None:
        self.exchange = None
        if not self.request_ended and not self.closed:
            # the whole answer went out before the request ended: the rest of the upload is
            # not wanted (RFC 9113 8.1), so the stream is reset without an error
            self.owner.reset_stream(self, 0)
        self.owner.stream_finished(self)

    def exchange_broken(self, ex: Exchange) -> None:
        self.exchange = None
        if not self.closed:
            if ex.grpc and self.headers_sent:  # type: ignore[attr-defined]
                # a gRPC call cut by its backend: UNAVAILABLE in trailers, which a gRPC client
                # may retry, rather than a reset that reads as INTERNAL (DEADLINE_EXCEEDED
                # when it was the call's grpc-timeout that ran out)
                late = ex.timed_out
                self.owner.send_headers(
                    self,
                    [
                        (b"grpc-status", GRPC_DEADLINE_EXCEEDED if late else GRPC_UNAVAILABLE),
                        (b"grpc-message", b"deadline exceeded" if late else b"backend failed"),
                    ],
                    end=True,
                )
            else:
                self.owner.reset_stream(self, 2)  # INTERNAL_ERROR: the answer is incomplete
        self.owner.stream_finished(self)

    def tunnel_opened(self, ex: Exchange, conn: up.UpstreamConnection) -> bool:
        return False  # HTTP/2 requests carry no Upgrade (h2 refuses it as connection-specific)

    def tunnel_relayed(self) -> None:
        pass

    def tunnel_ended(self) -> None:
        pass

    # -- events from the connection --------------------------------------------------------

    def request_received(self, fields: list[tuple[bytes, bytes]], end_stream: bool) -> None:
        """The request's HEADERS: map them and start the exchange, or answer an error."""
        ex = H2Exchange(self)
        self.exchange = ex
        self.request_ended = end_stream
        try:
            map_request(ex, fields, end_stream, self.listener)
            ex.version = "1.1"  # prepare() builds the HTTP/1.1 request a backend reads
            ex.prepare()
        except RequestRejected as e:
            ex.version = "2.0"
            ex.local_error(e.status, e.detail)
            return
        ex.version = "2.0"
        ex.start()
        if end_stream:
            self.request_done()

    def body_received(self, data: bytes, flow_size: int) -> None:
        ex = self.exchange
        if ex is None or ex.finished:
            self.owner.acknowledge(self, flow_size)  # answered already: credit and drop
            return
        ex.body_received += len(data)
        max_body = self.listener.limits.config.max_body_bytes
        if max_body and ex.body_received > max_body:
            self.owner.acknowledge(self, flow_size)
            if ex.response_started:
                self.owner.reset_stream(self, 8)  # CANCEL: mid-answer, nothing else to say
                self.reset_by_client()
                self.owner.stream_finished(self)
                return
            ex.abandon_upstream()
            ex.gone = False
            ex.local_error(413, "request body too large")
            return
        if not data:
            pass  # an empty DATA frame: as a chunk it would read as the body's end
        elif ex.chunked:
            ex.request_body(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            ex.request_body(data)
        if self.read_pause:
            self.unacked += flow_size
        else:
            self.owner.acknowledge(self, flow_size)

    def request_done(self) -> None:
        self.request_ended = True
        ex = self.exchange
        if ex is None or ex.finished or ex.request_complete:
            return
        if ex.chunked:
            ex.request_body(CHUNKED_END)
        ex.request_done()

    def addresses(self) -> tuple[Address, Address] | None:
        """The client's addresses, as its connection knows them."""
        return self.owner.addresses()

    def reset_by_client(self) -> None:
        self.closed = True
        ex = self.exchange
        self.exchange = None
        if ex is not None:
            ex.client_gone()


def map_request(
    ex: Exchange, fields: list[tuple[bytes, bytes]], end_stream: bool, listener: Site
) -> None:
    """Fill an exchange from an HTTP/2 request's fields (checked by h2fields) as the HTTP/1.1
    request prepare() expects; raise RequestRejected for what HTTP/2 allows but the
    balancer refuses (header limits, CONNECT)."""
    limits = listener.limits.config
    method = path = authority = b""
    headers: list[tuple[bytes, bytes]] = []
    cookies: list[bytes] = []
    size = 0
    has_length = False
    for name, value in fields:
        if name == b"cookie":
            cookies.append(value)  # RFC 9113 8.2.3: one field again for HTTP/1.1
            continue
        size += len(name) + len(value) + 4
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            continue
        if name == b"host":
            if not authority:
                authority = value
            continue
        if name == b"content-length":
            has_length = True
        headers.append((name, value))
    cookie = b"; ".join(cookies) if cookies else b""
    if cookies:
        size += len(cookie) + 10  # counted as the one field it becomes
    if 0 < limits.max_header_bytes < size:
        raise RequestRejected(431, "request header fields too large")
    if 0 < limits.max_headers < len(headers) + (1 if cookies else 0):
        raise RequestRejected(431, "too many request header fields")
    if cookies:
        headers.append((b"cookie", cookie))
    if authority:
        headers.insert(0, (b"host", authority))
    if method == b"CONNECT":
        raise RequestRejected(405, "CONNECT is not supported")
    ex.method = method
    ex.url = path
    ex.grpc = any(  # type: ignore[attr-defined]
        n == b"content-type" and v.startswith(b"application/grpc") for n, v in headers
    )
    if not end_stream and not has_length:
        # a body of undeclared length: an HTTP/1.1 backend gets it chunked
        headers.append((b"transfer-encoding", b"chunked"))
    ex.headers = headers


class H2Exchange(Exchange):
    """An Exchange whose answer goes out as HTTP/2 frames on one stream."""

    __slots__ = ("grpc", "grpc_status")

    def __init__(self, stream: H2Stream) -> None:
        super().__init__(stream)  # type: ignore[arg-type]
        self.grpc = False
        self.grpc_status = b""

    def _send_continue(self) -> None:
        stream: H2Stream = self.client  # type: ignore[assignment]
        stream.owner.send_headers(stream, [(b":status", b"100")], end=False)

    def local_error(self, status: int, detail: str) -> None:
        """Answer this stream with a local error (the exchange never reached a backend)."""
        self.request_complete = True
        self._fail(status, detail)

    def _fail(self, status: int, detail: str) -> None:
        if self.grpc:
            self._grpc_error(status, _grpc_status_for(status), detail)
            return
        super()._fail(status, detail)

    def _grpc_error(self, status: int, code: bytes, detail: str) -> None:
        """A gRPC "trailers-only" answer (HTTP 200, the status in the one HEADERS frame)."""
        self.status = status
        self.response_started = True
        stream: H2Stream = self.client  # type: ignore[assignment]
        if not stream.closed:
            stream.headers_sent = True
            stream.owner.send_headers(
                stream,
                [
                    (b":status", b"200"),
                    (b"content-type", b"application/grpc"),
                    (b"grpc-status", code),
                    (b"grpc-message", detail.encode("latin-1", "replace")),
                ],
                end=True,
            )
        self._finish()

    def _send_local(self, data: bytes, status: int) -> None:
        self.status = status
        self.response_started = True
        stream: H2Stream = self.client  # type: ignore[assignment]
        if not stream.closed:
            code, fields, body = parse_local(data)
            if self.is_head:
                body = b""
            stream.headers_sent = True
            owner = stream.owner
            owner.send_headers(stream, [(b":status", b"%d" % code), *fields], end=not body)
            if body:
                self.bytes_out += len(body)
                owner.send_body(stream, body)
                owner.end_stream(stream)
        self._finish()

    def response_head(self, conn: up.UpstreamConnection, *, has_body: bool, rechunk: bool) -> None:
        stream: H2Stream = self.client  # type: ignore[assignment]
        self.response_started = True
        self.status = status = conn.status
        self.body_buf.clear()
        self.replayable = False
        given = conn.h2_fields
        fields = [
            (b":status", b"%d" % status),
            *(given if given is not None else response_fields(conn.head_out)),
        ]
        pool = self.pool
        if pool is not None and pool.sticky is not None:
            b = self.backend
            if b is not None and not self.sticky_hit:
                self.set_cookie = pool.sticky_cookie_header(
                    b, secure=self.listener.scheme == b"https"
                )
                fields.append((b"set-cookie", self.set_cookie))
        if stream.closed:
            return
        stream.headers_sent = True
        stream.owner.send_headers(stream, fields, end=not has_body)

    def response_body(self, data: bytes) -> None:
        if not data:
            return
        self.bytes_out += len(data)
        stream: H2Stream = self.client  # type: ignore[assignment]
        if not stream.closed:
            stream.owner.send_body(stream, bytes(data))

    def response_trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        stream: H2Stream = self.client  # type: ignore[assignment]
        if not stream.closed and not stream.ended:
            if self.grpc:
                for name, value in fields:
                    if name == b"grpc-status":
                        self.grpc_status = value
            stream.owner.send_headers(stream, fields, end=True)

    def response_done(self, reusable: bool) -> None:
        self.conn = None
        stream: H2Stream = self.client  # type: ignore[assignment]
        if not stream.closed and not stream.ended:
            stream.owner.end_stream(stream)
        b = self.backend
        if b is not None:
            self.pool.release(b, failed=self.status >= 500)  # type: ignore[union-attr]
        self._finish()
