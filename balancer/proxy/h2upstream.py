"""HTTP/2 to backends (`protocol: h2`, cleartext h2c), for gRPC: streams of many clients share a
few connections per backend.

An exchange drives an H2UpstreamStream exactly as it drives an HTTP/1.1 UpstreamConnection:
it writes the request it built for HTTP/1.1 backends, and this side parses those bytes back
(httptools: the request is our own, so this is framing, not validation) into HEADERS and DATA.
Routing, sticky cookies, X-Forwarded-* and the header rules stay one piece of code. Responses
come back through the same callbacks, plus trailers (grpc-status), which HTTP/1.1 backends
never send.
"""

from __future__ import annotations

import asyncio
import logging

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import httptools

from balancer.backend import parse_load
from balancer.proxy import hpack_codec
from balancer.proxy.h2fields import response_error, trailers_error
from balancer.proxy.upstream import (
    BODY_LENGTH,
    DONE,
    FAIL_CONNECT,
    FAIL_RESET,
    FAIL_TIMEOUT,
    HEAD,
    Relay,
    Watchdog,
)

log = logging.getLogger("balancer.proxy")

STREAM_WINDOW = 1024 * 1024  # per stream: a streaming response runs without waiting on us
CONNECTION_WINDOW = 16 * 1024 * 1024
PENDING_HIGH = 256 * 1024  # request bytes held for a backend's window before the client pauses
MAX_CONNECTIONS = 8  # per backend: beyond, streams wait in the kernel's queue of one of these
PROTOCOL_ERROR = 1
REFUSED_STREAM = 7
CANCEL = 8

# Fields of the HTTP/1.1 request that HTTP/2 carries otherwise or not at all (RFC 9113 8.2.2).
_NOT_IN_H2 = frozenset(
    {b"host", b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"}
)


def grpc_timeout(value: bytes) -> float | None:
    """Seconds from a grpc-timeout value ("100m", "5S", "2H"), None if malformed."""
    units = {b"H": 3600.0, b"M": 60.0, b"S": 1.0, b"m": 1e-3, b"u": 1e-6, b"n": 1e-9}
    digits, unit = value[:-1], value[-1:]
    if not digits.isdigit() or len(digits) > 8 or unit not in units:
        return None
    return int(digits) * units[unit]


class H2UpstreamStream:
    """One request on a multiplexed backend connection, in UpstreamConnection's shape."""

    __slots__ = (
        "owner",
        "stream_id",
        "exchange",
        "reused",
        "closed",
        "state",
        "status",
        "head_out",
        "h2_fields",
        "parser",
        "fields",
        "url",
        "method",
        "pending",
        "pending_size",
        "held",
        "end_pending",
        "deadline",
        "call_deadline",
        "unacked",
        "paused",
        "received_any",
        "write_paused",
    )

    def __init__(self, owner: H2BackendConnection, reused: bool) -> None:
        self.owner = owner
        self.stream_id = 0  # given when the request's HEADERS go out
        self.exchange: Relay | None = None
        self.reused = reused
        self.closed = False
        self.state = HEAD
        self.status = 0
        self.head_out = b""
        self.h2_fields: list[tuple[bytes, bytes]] | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.fields: list[tuple[bytes, bytes]] = []
        self.url = b""
        self.method = b""
        self.pending: list[bytes] = []
        self.pending_size = 0
        self.held: bytes | None = None  # the latest request DATA, until the flush (send_body)
        self.end_pending = False
        self.deadline = 0.0
        self.call_deadline = 0.0  # from the client's grpc-timeout
        self.unacked = 0
        self.paused = False
        self.received_any = False
        self.write_paused = False

    # -- what the exchange calls (UpstreamConnection's surface) ----------------------------

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:  # our own request: a bug, not bad input
            log.error("request to an HTTP/2 backend could not be framed: %s", e)
            self._fail_local(FAIL_RESET, e)

    def request_sent(self) -> None:
        if self.state == HEAD and not self.closed:
            self._arm_deadline()

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        if self.paused:
            self.paused = False
            if self.unacked and not self.closed:
                size, self.unacked = self.unacked, 0
                self.owner.acknowledge(self, size)

    def close(self) -> None:
        self.abort()

    def abort(self) -> None:
        self.exchange = None
        if not self.closed:
            self.closed = True
            self.owner.cancel(self)

    # -- httptools callbacks: the HTTP/1.1 request as HEADERS and DATA ---------------------

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.method = self.parser.get_method()
        authority = b""
        fields = []
        for name, value in self.fields:
            if name == b"host":
                authority = value
            elif name not in _NOT_IN_H2:
                fields.append((name, value))
            if name == b"grpc-timeout":
                seconds = grpc_timeout(value)
                if seconds is not None:
                    self.call_deadline = self.owner.loop_time() + seconds
        head = [
            (b":method", self.method),
            (b":scheme", b"http"),
            (b":authority", authority or self.owner.authority),
            (b":path", self.url),
            # the one TE value HTTP/2 allows, and the one gRPC servers insist on
            (b"te", b"trailers"),
        ]
        self.fields = []
        self.owner.open_stream(self, head + fields)

    def on_body(self, body: bytes) -> None:
        self.owner.send_body(self, bytes(body))

    def on_message_complete(self) -> None:
        self.owner.end_request(self)

    # -- from the backend ------------------------------------------------------------------

    def response_headers(self, fields: list[tuple[bytes, bytes]], ended: bool) -> None:
        ex = self.exchange
        if ex is None:
            return
        self.received_any = True
        status = 0
        out = []
        for name, value in fields:
            if name == b":status":
                status = int(value)
            elif name == b"x-backend-load":
                load = parse_load(value)
                if load is not None and ex.backend is not None:
                    ex.backend.report_load(load)
            elif name[:1] != b":":
                out.append((name, value))
        if 100 <= status < 200:
            return  # interim: the balancer answers Expect itself
        self.status = status
        self.h2_fields = out
        self.head_out = (
            b"HTTP/1.1 %d -\r\n" % status + b"".join(n + b": " + v + b"\r\n" for n, v in out)[:-2]
        )
        self.state = BODY_LENGTH
        self._arm_deadline()
        no_body = ended or ex.is_head or status in (204, 304)
        ex.response_head(self, has_body=not no_body, rechunk=True)  # type: ignore[arg-type]
        if no_body and self.exchange is ex:
            self._done()

    def response_data(self, data: bytes, flow: int) -> None:
        ex = self.exchange
        if ex is None:
            self.owner.acknowledge(self, flow)
            return
        self._arm_deadline()
        ex.response_body(data)
        if self.paused:
            self.unacked += flow
        else:
            self.owner.acknowledge(self, flow)

    def response_trailers(self, fields: list[tuple[bytes, bytes]]) -> None:
        ex = self.exchange
        if ex is not None:
            ex.response_trailers(fields)

    def response_end(self) -> None:
        if self.exchange is not None and self.state != HEAD:
            self._done()

    def reset(self, code: int, refused: bool) -> None:
        """The backend reset the stream, or the connection went away under it. `refused`:
        it never processed the request (REFUSED_STREAM, or above a GOAWAY's last stream)."""
        ex = self.exchange
        self.exchange = None
        self.closed = True
        self.deadline = 0.0
        if ex is None:
            return
        if refused:
            ex.upstream_failed(FAIL_CONNECT, self.reused, ConnectionError("stream refused"))
        elif self.state == HEAD:
            ex.upstream_failed(FAIL_RESET, self.reused, ConnectionError(f"stream reset ({code})"))
        else:
            ex.upstream_broken(f"backend reset the stream mid-response ({code})")

    def on_deadline(self, now: float) -> None:
        ex = self.exchange
        if ex is None or self.closed:
            return
        self.exchange = None
        self.closed = True
        self.owner.cancel(self)
        if self.state == HEAD:
            ex.upstream_failed(FAIL_TIMEOUT, self.reused, TimeoutError("backend response timeout"))
        else:
            ex.timed_out = True  # type: ignore[attr-defined]
            ex.upstream_broken("backend stopped sending mid-response")

    # -- helpers ---------------------------------------------------------------------------

    def _arm_deadline(self) -> None:
        deadline = self.owner.loop_time() + self.owner.pool.backend_timeout
        if self.call_deadline and self.call_deadline < deadline:
            deadline = self.call_deadline
        self.deadline = deadline

    def _done(self) -> None:
        ex = self.exchange
        self.exchange = None
        self.state = DONE
        self.closed = True
        self.deadline = 0.0
        self.owner.stream_done(self)
        if ex is not None:
            ex.response_done(reusable=True)

    def _fail_local(self, kind: str, exc: BaseException) -> None:
        ex = self.exchange
        self.abort()
        if ex is not None:
            ex.upstream_failed(kind, self.reused, exc)


class H2BackendConnection(asyncio.Protocol):
    """One h2c connection to a backend, carrying up to its MAX_CONCURRENT_STREAMS requests."""

    def __init__(self, pool: H2BackendConnections) -> None:
        self.pool = pool
        self.loop_time = pool.loop_time
        self.authority = pool.authority
        self.transport: asyncio.Transport | None = None
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=True,
                header_encoding=None,
                # the request is built here (on_headers_complete: pseudo-headers first,
                # lower-cased names, no connection-specific fields): not checked again
                validate_outbound_headers=False,
                normalize_outbound_headers=False,  # as h2client: hpack_codec's encoder
                # a response's fields are checked by h2fields (the rules h2 enforced, in
                # one pass); its normalization (cookie fields joined) stays h2's
                validate_inbound_headers=False,
            )
        )
        hpack_codec.install(self.h2)
        self.streams: dict[int, H2UpstreamStream] = {}
        self.reserved = 0  # streams handed out whose HEADERS have not gone yet
        self.used = False
        self.closed = False
        self.going_away = False
        self.write_paused = False
        self.deadline = 0.0
        self.loop = asyncio.get_running_loop()
        self.ready = self.loop.create_future()
        self.flush_pending = False  # a _flush_now is scheduled for this loop iteration
        self.holding: list[H2UpstreamStream] = []  # streams with a DATA frame held

    # -- capacity --------------------------------------------------------------------------

    def has_room(self) -> bool:
        if self.closed or self.going_away:
            return False
        limit = self.h2.remote_settings.max_concurrent_streams
        return len(self.streams) + self.reserved < limit

    def new_stream(self) -> H2UpstreamStream:
        stream = H2UpstreamStream(self, reused=self.used)
        self.used = True
        self.reserved += 1
        self.deadline = 0.0
        return stream

    # -- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.h2.local_settings = h2.settings.Settings(
            client=True,
            initial_values={
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
            },
        )
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._flush_now()
        self.pool.watchdog.add(self)
        if not self.ready.done():
            self.ready.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.pool.watchdog.discard(self)
        self.pool.forget(self)
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            # a stream whose HEADERS never went out was not seen: safe to send elsewhere
            stream.reset(0, refused=stream.stream_id == 0)

    def pause_writing(self) -> None:
        self.write_paused = True
        for stream in self.streams.values():
            ex = stream.exchange
            if ex is not None:
                ex.upstream_pause_writing()

    def resume_writing(self) -> None:
        self.write_paused = False
        for stream in self.streams.values():
            ex = stream.exchange
            if ex is not None and stream.pending_size < PENDING_HIGH:
                ex.upstream_resume_writing()

    def data_received(self, data: bytes) -> None:
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as e:
            log.warning("backend %s: HTTP/2 protocol error: %s", self.authority.decode(), e)
            self._flush_now()
            self._abort_all()
            return
        for ev in events:
            t = type(ev)
            if t is h2.events.DataReceived:
                stream = self.streams.get(ev.stream_id)
                if stream is None:
                    self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                else:
                    stream.response_data(ev.data, ev.flow_controlled_length)
            elif t is h2.events.ResponseReceived or t is h2.events.InformationalResponseReceived:
                why = response_error(ev.headers)
                if why is not None:
                    self._protocol_error(why)
                    return
                stream = self.streams.get(ev.stream_id)
                if stream is not None:
                    stream.response_headers(ev.headers, ev.stream_ended is not None)
            elif t is h2.events.TrailersReceived:
                why = trailers_error(ev.headers)
                if why is not None:
                    self._protocol_error(why)
                    return
                stream = self.streams.get(ev.stream_id)
                if stream is not None:
                    stream.response_trailers(ev.headers)
            elif t is h2.events.StreamEnded:
                stream = self.streams.get(ev.stream_id)
                if stream is not None:
                    stream.response_end()
            elif t is h2.events.StreamReset:
                stream = self.streams.pop(ev.stream_id, None)
                if stream is not None:
                    stream.reset(ev.error_code, refused=ev.error_code == REFUSED_STREAM)
            elif t is h2.events.WindowUpdated:
                self._window_opened(ev.stream_id)
            elif t is h2.events.ConnectionTerminated:
                self._goaway(ev.last_stream_id or 0)
        self._flush_now()

    def _protocol_error(self, why: str) -> None:
        """A response h2fields refused: as h2 did for its own errors, GOAWAY PROTOCOL_ERROR and
        every stream of the connection fails (none of that response reaches a client)."""
        log.warning("backend %s: HTTP/2 protocol error: %s", self.authority.decode(), why)
        try:
            self.h2.close_connection(PROTOCOL_ERROR)
        except h2.exceptions.ProtocolError:
            pass
        self._flush_now()
        self._abort_all()

    # -- used by the streams ---------------------------------------------------------------

    def open_stream(self, stream: H2UpstreamStream, fields: list[tuple[bytes, bytes]]) -> None:
        self.reserved = max(0, self.reserved - 1)
        if self.closed or self.going_away:
            stream.reset(0, refused=True)
            return
        sid = self.h2.get_next_available_stream_id()
        stream.stream_id = sid
        self.streams[sid] = stream
        try:
            self.h2.send_headers(sid, fields)
        except h2.exceptions.ProtocolError as e:
            self.streams.pop(sid, None)
            stream._fail_local(FAIL_RESET, e)
            return
        self._flush()

    def send_body(self, stream: H2UpstreamStream, data: bytes) -> None:
        if stream.closed or self.closed:
            return
        if stream.held is not None:
            self._release(stream)
        if stream.pending:
            stream.pending.append(data)
            self._check_pending(stream)
        else:
            # held until this iteration's flush: a request whose end comes with its body
            # (a unary call) goes out as one DATA frame with END_STREAM, not two frames
            stream.held = data
            self.holding.append(stream)
        self._flush()

    def _release(self, stream: H2UpstreamStream) -> None:
        """Send a stream's held DATA (as much as the windows allow; the rest waits)."""
        data, stream.held = stream.held, None
        rest = self._send_now(stream, data)  # type: ignore[arg-type]
        if rest:
            stream.pending.append(rest)
            self._check_pending(stream)

    def _check_pending(self, stream: H2UpstreamStream) -> None:
        stream.pending_size = sum(len(p) for p in stream.pending)
        if stream.pending_size > PENDING_HIGH and not stream.write_paused:
            stream.write_paused = True
            if stream.exchange is not None:
                stream.exchange.upstream_pause_writing()

    def end_request(self, stream: H2UpstreamStream) -> None:
        if stream.closed or self.closed or stream.stream_id == 0:
            return
        held = stream.held
        if held is not None:
            h2c = self.h2
            sid = stream.stream_id
            if len(held) <= min(h2c.local_flow_control_window(sid), h2c.max_outbound_frame_size):
                stream.held = None
                h2c.send_data(sid, held, end_stream=True)
                stream.request_sent()
                self._flush()
                return
            self._release(stream)
        if stream.pending:
            stream.end_pending = True
            return
        self.h2.end_stream(stream.stream_id)
        stream.request_sent()
        self._flush()

    def acknowledge(self, stream: H2UpstreamStream, size: int) -> None:
        if size and not self.closed:
            try:
                self.h2.acknowledge_received_data(size, stream.stream_id)
            except h2.exceptions.ProtocolError:
                pass
            self._flush()

    def cancel(self, stream: H2UpstreamStream) -> None:
        """The client left (or the call timed out): the backend stops working on it."""
        self.streams.pop(stream.stream_id, None)
        stream.held = None
        if stream.stream_id == 0:
            self.reserved = max(0, self.reserved - 1)
        elif not self.closed:
            try:
                self.h2.reset_stream(stream.stream_id, CANCEL)
            except h2.exceptions.ProtocolError:
                pass
            self._flush()
        self._maybe_idle()

    def stream_done(self, stream: H2UpstreamStream) -> None:
        self.streams.pop(stream.stream_id, None)
        self._maybe_idle()

    # -- internals -------------------------------------------------------------------------

    def _send_now(self, stream: H2UpstreamStream, data: bytes) -> bytes:
        h2c = self.h2
        sid = stream.stream_id
        while data:
            window = min(h2c.local_flow_control_window(sid), h2c.max_outbound_frame_size)
            if window <= 0:
                break
            h2c.send_data(sid, data[:window])
            data = data[window:]
        return data

    def _window_opened(self, stream_id: int) -> None:
        targets = (
            ([self.streams[stream_id]] if stream_id in self.streams else [])
            if stream_id
            else list(self.streams.values())
        )
        for stream in targets:
            while stream.pending:
                chunk = stream.pending.pop(0)
                rest = self._send_now(stream, chunk)
                if rest:
                    stream.pending.insert(0, rest)
                    break
            stream.pending_size = sum(len(p) for p in stream.pending)
            if not stream.pending and stream.end_pending:
                stream.end_pending = False
                self.h2.end_stream(stream.stream_id)
                stream.request_sent()
            if stream.write_paused and stream.pending_size <= PENDING_HIGH // 2:
                stream.write_paused = False
                if stream.exchange is not None:
                    stream.exchange.upstream_resume_writing()

    def _goaway(self, last_stream_id: int) -> None:
        self.going_away = True
        for sid in [s for s in self.streams if s > last_stream_id]:
            self.streams.pop(sid).reset(0, refused=True)
        self._maybe_idle()

    def _abort_all(self) -> None:
        self.closed = True
        streams = list(self.streams.values())
        self.streams.clear()
        for stream in streams:
            stream.reset(0, refused=False)
        if self.transport is not None:
            self.transport.abort()

    def _maybe_idle(self) -> None:
        if self.streams or self.reserved:
            return
        if self.going_away:
            self.close()
        else:
            self.deadline = self.loop_time() + self.pool.idle_timeout

    def _flush(self) -> None:
        """Write what h2 has queued once per loop iteration: the HEADERS and DATA of every
        call sent meanwhile leave in one write (as for client connections, h2client)."""
        if not self.flush_pending:
            self.flush_pending = True
            self.loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self.flush_pending = False
        if self.holding:
            holding, self.holding = self.holding, []
            if not self.closed:
                for stream in holding:
                    if stream.held is not None and not stream.closed:
                        self._release(stream)
        data = self.h2.data_to_send()
        # the transport, not self.closed: close() marks itself closed before its GOAWAY goes
        if data and self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def on_deadline(self, now: float) -> None:
        """Idle for upstream_idle: closed. Streams time out on the pool's own sweep."""
        if not self.streams and not self.reserved:
            self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.pool.forget(self)
            try:
                self.h2.close_connection()
                self._flush_now()
            except h2.exceptions.ProtocolError:
                pass
            if self.transport is not None:
                self.transport.close()


class H2BackendConnections:
    """The HTTP/2 connections to one backend address: a stream goes on the first with room."""

    def __init__(
        self,
        host: str,
        port: int,
        *,
        watchdog: Watchdog,
        loop: asyncio.AbstractEventLoop,
        connect_timeout: float,
        backend_timeout: float,
        idle_timeout: float,
    ) -> None:
        self.host = host
        self.port = port
        self.authority = (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode()
        self.watchdog = watchdog
        self._loop = loop
        self.loop_time = loop.time
        self.connect_timeout = connect_timeout
        self.backend_timeout = backend_timeout
        self.idle_timeout = idle_timeout
        self.connections: list[H2BackendConnection] = []
        self._connecting: asyncio.Future | None = None
        self._sweep = _StreamSweep(self)
        watchdog.add(self._sweep)

    def acquire_idle(self) -> H2UpstreamStream | None:
        for conn in self.connections:
            if conn.has_room():
                return conn.new_stream()
        return None

    async def connect(self) -> H2UpstreamStream:
        if self._connecting is not None or len(self.connections) >= MAX_CONNECTIONS:
            # a connection is on its way (or the cap is reached): share it instead of
            # opening one per waiting request
            fut = self._connecting
            if fut is not None:
                await asyncio.shield(fut)
            stream = self.acquire_idle()
            if stream is not None:
                return stream
            if len(self.connections) >= MAX_CONNECTIONS:
                raise ConnectionRefusedError("every HTTP/2 connection to the backend is full")
        self._connecting = self._loop.create_future()
        try:
            _, conn = await asyncio.wait_for(
                self._loop.create_connection(
                    lambda: H2BackendConnection(self), self.host, self.port
                ),
                self.connect_timeout,
            )
        finally:
            fut, self._connecting = self._connecting, None
            if not fut.done():
                fut.set_result(None)
        self.connections.append(conn)
        return conn.new_stream()

    def release(self, stream: H2UpstreamStream) -> None:
        """A stream that was never used (its client left while connecting)."""
        stream.abort()

    def forget(self, conn: H2BackendConnection) -> None:
        if conn in self.connections:
            self.connections.remove(conn)

    def close_idle(self) -> None:
        for conn in list(self.connections):
            if not conn.streams:
                conn.close()
        self.watchdog.discard(self._sweep)

    def live_streams(self) -> list[H2UpstreamStream]:
        return [s for c in self.connections for s in c.streams.values()]


class _StreamSweep:
    """Checks the deadlines of every stream of one backend, once per watchdog period (one
    entry for the pool rather than one per stream)."""

    __slots__ = ("pool", "deadline")

    def __init__(self, pool: H2BackendConnections) -> None:
        self.pool = pool
        self.deadline = pool.loop_time() + 0.5

    def on_deadline(self, now: float) -> None:
        for stream in self.pool.live_streams():
            if 0.0 < stream.deadline <= now:
                stream.on_deadline(now)
        self.deadline = now + 0.5
