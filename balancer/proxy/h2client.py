"""The HTTP/2 client connection: h2's sans-I/O state machine on an asyncio Protocol, one
H2Stream (and its Exchange) per request, and the limits that keep a hostile peer bounded.

Attacks the peers were hit by, and what answers each here:
- Rapid Reset (CVE-2023-44487): streams the client resets before their answer are counted in
  a sliding window; past RESET_BUDGET the connection ends with GOAWAY ENHANCE_YOUR_CALM.
- CONTINUATION flood (CVE-2024-27316): h2 caps the frames of one header block, and the HPACK
  decoder caps the decoded size (a bomb) at twice max_header_bytes: a connection error.
- Oversized header lists below that cap: a 431 on the stream.
- SETTINGS / PING / PRIORITY / empty DATA floods: counted together against CONTROL_BUDGET.
- Zero-window stalls: response bytes wait in a bounded per-stream buffer (the backend is not
  read meanwhile); a stream that makes no progress for client_idle is reset.
- A client that reads nothing: while the socket's write buffer is full, its frames are not
  read either, so the answers it provokes (PING ACKs, SETTINGS ACKs) cannot pile up.
- Downgrade smuggling (RFC 9113 8.2): h2fields refuses connection-specific fields, TE other
  than "trailers", CR/LF/NUL, uppercase names and bad pseudo-headers (the rules h2's own
  validation enforced, which is off: it cost more than the rest of a stream), h2 a
  content-length that disagrees with the DATA sent; the request to the backend is built by
  the same code as for HTTP/1.1 clients, with its own framing.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from hyperframe.frame import GoAwayFrame

from balancer.proxy import hpack_codec
from balancer.proxy.exchange import Site
from balancer.proxy.h2fields import request_error, trailers_error
from balancer.proxy.h2stream import H2Stream
from balancer.proxy.proxy_protocol import Address, transport_addresses

log = logging.getLogger("balancer.proxy")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

MAX_CONCURRENT_STREAMS = 100
# Per-stream receive window: bounds the request body buffered per stream while its backend
# is slow; the connection window is sized for all streams at once.
STREAM_WINDOW = 256 * 1024
CONNECTION_WINDOW = 16 * 1024 * 1024
# Response bytes held per stream when the client's window is closed; beyond it the backend
# connection stops being read until the client takes more.
PENDING_HIGH = 256 * 1024
MAX_REQUESTS = 10000  # then a graceful GOAWAY: no connection lives for ever
WINDOW = 10.0  # seconds over which floods are counted
RESET_BUDGET = 200  # streams reset by the client before their answer, per WINDOW
CONTROL_BUDGET = 2000  # SETTINGS, PING, PRIORITY and empty DATA frames, per WINDOW
SLICE = 4096  # bytes handed to h2 at a time
TURN = 0.005  # seconds of parsing one connection may take before the others get the loop

NO_ERROR = 0
PROTOCOL_ERROR = 1
INTERNAL_ERROR = 2
REFUSED_STREAM = 7
ENHANCE_YOUR_CALM = 11

_CONTROL_EVENTS = (
    h2.events.PingReceived,
    h2.events.RemoteSettingsChanged,
    h2.events.PriorityUpdated,
)


class _Budget:
    """Events counted over a sliding window of time."""

    __slots__ = ("times", "limit")

    def __init__(self, limit: int) -> None:
        self.times: deque[float] = deque()
        self.limit = limit

    def spend(self, now: float) -> bool:
        """Count one event; False once more than `limit` fell within the window."""
        times = self.times
        times.append(now)
        while times and times[0] < now - WINDOW:
            times.popleft()
        return len(times) <= self.limit


class H2ClientConnection(asyncio.Protocol):
    """One client connection speaking HTTP/2 (ALPN h2 on TLS, or prior-knowledge h2c)."""

    def __init__(self, listener: Site, client_ip: str) -> None:
        self.listener = listener
        self.client_ip = client_ip
        # (client, listener) addresses from a PROXY header the listener read, else None
        self.origin: tuple[Address, Address] | None = None
        self.transport: asyncio.Transport | None = None
        limits = listener.limits.config
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(
                client_side=False,
                header_encoding=None,
                # what we send is built here (h2stream: lower-cased names, no
                # connection-specific fields, pseudo-headers first): checking it again per
                # response was a large share of a stream's cost
                validate_outbound_headers=False,
                # h2's normalization lower-cases names (ours are) and keeps credentials out
                # of the HPACK table, which our encoder does itself (hpack_codec)
                normalize_outbound_headers=False,
                # received fields are checked by h2fields in one pass (every rule h2's
                # validation enforced), and cookie crumbs joined by map_request
                validate_inbound_headers=False,
                normalize_inbound_headers=False,
            )
        )
        self.h2.local_settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
                # the decoder's hard cap: twice the limit, so a list between the two gets a
                # 431 on its stream and only a bomb beyond it ends the connection
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: 2
                * (limits.max_header_bytes or 65536),
            },
        )
        # our HPACK codec (compiled) instead of the hpack package's; until the client
        # acknowledges these settings, h2 decodes with its defaults: the decoder's cap is
        # ours from the first frame
        hpack_codec.install(self.h2, 2 * (limits.max_header_bytes or 65536))
        self.streams: dict[int, H2Stream] = {}
        self.admitted = False
        self.closed = False
        self.closing = False  # GOAWAY sent: no new streams
        self.write_paused = False
        self.read_paused = False
        self.last_stream_id = 0
        self.requests = 0
        self.resets = _Budget(RESET_BUDGET)
        self.control = _Budget(CONTROL_BUDGET)
        self.deadline = 0.0
        self.idle_since = 0.0
        self.flush_pending = False  # a _flush_now is scheduled for this loop iteration
        self.holding: list[H2Stream] = []  # streams with a DATA frame held (send_body)
        self.backlog: bytearray | None = None  # read but not yet parsed (see _feed)
        # streams whose HEADERS came in the slice being handled: started once it is done,
        # unless the client reset them meanwhile (see _receive)
        self.starting: dict[int, tuple[list, bool]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- connection ------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.loop = asyncio.get_running_loop()
        listener = self.listener
        self.admitted = True  # the accept counted it against the connection caps
        listener.connections.add(self)
        self.h2.initiate_connection()
        self.h2.increment_flow_control_window(CONNECTION_WINDOW - 65535)
        self._flush_now()
        # the preface and the first request must come within client_header of the accept
        self.deadline = listener.loop_time() + listener.timeouts.client_header
        listener.watchdog.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.admitted:
            return
        self.admitted = False
        listener = self.listener
        listener.limits.release(self.client_ip)
        listener.connections.discard(self)
        listener.watchdog.discard(self)
        streams = list(self.streams.values())
        self.streams.clear()
        self.starting.clear()
        for stream in streams:
            stream.reset_by_client()

    def pause_writing(self) -> None:
        self.write_paused = True
        # the client takes nothing: neither read its frames (their answers would pile up)
        # nor the backends' answers
        self._pause_reading()
        for stream in self.streams.values():
            ex = stream.exchange
            if ex is not None and ex.conn is not None:
                ex.conn.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.read_paused and not self.closed:
            self.read_paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        for stream in self.streams.values():
            ex = stream.exchange
            if ex is not None and ex.conn is not None and not stream.upstream_paused:
                ex.conn.resume_reading()

    def _pause_reading(self) -> None:
        if not self.read_paused and not self.closed:
            self.read_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        return False

    def data_received(self, data: bytes) -> None:
        if self.backlog is not None:  # still working through an earlier read: keep order
            self.backlog += data
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """Hand `data` to h2 in slices, and after TURN seconds of work yield the loop to the
        other connections, going on in its next iteration: a read full of tiny frames (a
        flood, up to the budgets that end it) is parsed in turns, so it cannot hold every
        other client's requests up for the whole of it."""
        start = time.perf_counter()
        size = len(data)
        done = 0
        while done < size:
            chunk = data[done : done + SLICE] if size > SLICE else data
            done += len(chunk)
            if not self._receive(chunk):
                return
            if done < size and time.perf_counter() - start > TURN:
                self.backlog = bytearray(data[done:])
                if not self.read_paused:
                    self.transport.pause_reading()  # type: ignore[union-attr]
                self.loop.call_soon(self._feed_backlog)  # type: ignore[union-attr]
                break
        self._flush_now()

    def _feed_backlog(self) -> None:
        data, self.backlog = bytes(self.backlog or b""), None
        if self.closed:
            return
        if not self.read_paused:
            self.transport.resume_reading()  # type: ignore[union-attr]
        self._feed(data)

    def _receive(self, data: bytes) -> bool:
        """One slice through h2 and the handlers; False once the connection ended."""
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.DenialOfServiceError as e:
            self._connection_error(ENHANCE_YOUR_CALM, f"refused: {e}", sent=True)
            return False
        except h2.exceptions.ProtocolError as e:
            # h2 has queued its GOAWAY with the right code; the streams die with it
            self._connection_error(PROTOCOL_ERROR, f"protocol error: {e}", sent=True)
            return False
        now = self.listener.loop_time()
        for ev in events:
            handler = _HANDLERS.get(type(ev))
            if handler is not None:
                handler(self, ev, now)
            elif isinstance(ev, _CONTROL_EVENTS) and not self.control.spend(now):
                self._connection_error(ENHANCE_YOUR_CALM, "control frame flood")
            if self.closed:
                return False
        # a stream opened and reset within one slice (Rapid Reset's pattern) never reached
        # this point: no exchange, no backend connection, was ever made for it
        for sid in list(self.starting):
            self._start(sid)
            if self.closed:
                return False
        return True

    def _start(self, sid: int) -> None:
        fields, ended = self.starting.pop(sid)
        stream = self.streams.get(sid)
        if stream is not None and not stream.closed:
            stream.request_received(fields, ended)

    # -- events ----------------------------------------------------------------------------

    def _on_request(self, ev: h2.events.RequestReceived, now: float) -> None:
        sid = ev.stream_id
        why = request_error(ev.headers)
        if why is not None:
            self._connection_error(PROTOCOL_ERROR, f"protocol error: {why}")
            return
        if self.closing:
            # after our GOAWAY: the client did not know yet; it may retry elsewhere
            self.h2.reset_stream(sid, REFUSED_STREAM)
            return
        self.last_stream_id = sid
        self.requests += 1
        if self.requests >= MAX_REQUESTS:
            self.shutdown()
        stream = H2Stream(self, sid, self.listener, self.client_ip)
        stream.last_progress = now
        self.streams[sid] = stream
        self.deadline = now + 1.0  # streams open: the sweep checks them each second
        self.starting[sid] = (ev.headers, ev.stream_ended is not None)

    def _on_data(self, ev: h2.events.DataReceived, now: float) -> None:
        if ev.stream_id in self.starting:
            self._start(ev.stream_id)  # its exchange takes the body
        stream = self.streams.get(ev.stream_id)
        size = ev.flow_controlled_length
        if stream is None:
            self.h2.acknowledge_received_data(size, ev.stream_id)
            return
        if not ev.data and ev.stream_ended is None and not self.control.spend(now):
            self._connection_error(ENHANCE_YOUR_CALM, "empty DATA frame flood")
            return
        stream.last_progress = now
        stream.body_received(ev.data, size)
        if ev.stream_ended is not None:
            stream.request_done()

    def _on_stream_ended(self, ev: h2.events.StreamEnded, now: float) -> None:
        waiting = self.starting.get(ev.stream_id)
        if waiting is not None:
            # not started yet: it starts as a request without a body (still resettable)
            self.starting[ev.stream_id] = (waiting[0], True)
            return
        stream = self.streams.get(ev.stream_id)
        if stream is not None and not stream.request_ended:
            stream.request_done()

    def _on_trailers(self, ev: h2.events.TrailersReceived, now: float) -> None:
        why = trailers_error(ev.headers)
        if why is not None:
            self._connection_error(PROTOCOL_ERROR, f"protocol error: {why}")
            return
        # request trailers have no place in the HTTP/1.1 request a backend is sent
        self._on_stream_ended(ev, now)  # type: ignore[arg-type]

    def _on_reset(self, ev: h2.events.StreamReset, now: float) -> None:
        stream = self.streams.pop(ev.stream_id, None)
        if stream is None:
            return
        opened = self.starting.pop(ev.stream_id, None) is not None
        if (opened or stream.exchange is not None) and not self.resets.spend(now):
            self._connection_error(ENHANCE_YOUR_CALM, "too many streams reset (rapid reset)")
            return
        stream.reset_by_client()

    def _on_window(self, ev: h2.events.WindowUpdated, now: float) -> None:
        if ev.stream_id:
            stream = self.streams.get(ev.stream_id)
            if stream is not None and stream.pending:
                stream.last_progress = now
                self._drain(stream)
        else:
            for stream in list(self.streams.values()):
                if stream.pending:
                    stream.last_progress = now
                    self._drain(stream)
                    if self.closed:
                        return

    def _on_goaway(self, ev: h2.events.ConnectionTerminated, now: float) -> None:
        # the client will open no more streams; the ones it has go on
        self.closing = True
        if ev.error_code:
            self._connection_error(NO_ERROR, "client ended the connection", sent=True)
        elif not self.streams:
            self._close()

    # -- used by the streams ---------------------------------------------------------------

    def send_headers(self, stream: H2Stream, headers: list[tuple[bytes, bytes]], end: bool) -> None:
        if stream.closed or self.closed:
            return
        if stream.held is not None:
            self._release(stream)  # the body before the trailers
        try:
            self.h2.send_headers(stream.stream_id, headers, end_stream=end)
        except h2.exceptions.ProtocolError as e:
            log.info(
                "%s: stream %d: response headers refused: %s", self.client_ip, stream.stream_id, e
            )
            self.reset_stream(stream, INTERNAL_ERROR)
            return
        if end:
            stream.ended = True
        self._flush()

    def send_body(self, stream: H2Stream, data: bytes) -> None:
        if stream.closed or self.closed:
            return
        if stream.held is not None:
            self._release(stream)
        if stream.pending:
            stream.pending.append(data)
            stream.pending_size += len(data)
            self._check_pending(stream)
        else:
            # held until this iteration's flush: a response whose end comes with its body
            # (the usual one) goes out as one DATA frame with END_STREAM, not two frames
            stream.held = data
            self.holding.append(stream)
        self._flush()

    def _release(self, stream: H2Stream) -> None:
        """Send a stream's held DATA (as much as the windows allow; the rest waits)."""
        data, stream.held = stream.held, None
        rest = self._send_now(stream, data)  # type: ignore[arg-type]
        if rest:
            stream.pending.append(rest)
            stream.pending_size += len(rest)
            self._check_pending(stream)

    def _check_pending(self, stream: H2Stream) -> None:
        if stream.pending_size > PENDING_HIGH and not stream.upstream_paused:
            stream.upstream_paused = True
            ex = stream.exchange
            if ex is not None and ex.conn is not None:
                ex.conn.pause_reading()

    def end_stream(self, stream: H2Stream) -> None:
        if stream.closed or self.closed or stream.ended:
            return
        stream.ended = True
        held = stream.held
        if held is not None:
            h2c = self.h2
            sid = stream.stream_id
            if len(held) <= min(h2c.local_flow_control_window(sid), h2c.max_outbound_frame_size):
                stream.held = None
                h2c.send_data(sid, held, end_stream=True)
                self._flush()
                return
            self._release(stream)
        if stream.pending:
            stream.end_pending = True
            return
        self.h2.end_stream(stream.stream_id)
        self._flush()

    def reset_stream(self, stream: H2Stream, code: int) -> None:
        if stream.closed or self.closed:
            return
        stream.closed = True
        stream.pending.clear()
        stream.held = None
        try:
            self.h2.reset_stream(stream.stream_id, code)
        except h2.exceptions.ProtocolError:
            pass  # already closed both ways
        self._flush()

    def addresses(self) -> tuple[Address, Address] | None:
        """The client's address and the one it connected to, as a PROXY header to a backend
        tells them: those a received PROXY header named, else the socket's."""
        return self.origin or transport_addresses(self.transport)

    def acknowledge(self, stream: H2Stream, size: int) -> None:
        if size and not self.closed:
            try:
                self.h2.acknowledge_received_data(size, stream.stream_id)
            except h2.exceptions.ProtocolError:
                pass  # the stream closed meanwhile; h2 credited the connection already

    def stream_finished(self, stream: H2Stream) -> None:
        """The stream's exchange is over (its last frames may still wait for window)."""
        if not stream.pending:
            self._forget(stream)

    # -- flow control ----------------------------------------------------------------------

    def _send_now(self, stream: H2Stream, data: bytes) -> bytes:
        """Send what the windows allow; return the rest."""
        h2c = self.h2
        sid = stream.stream_id
        if len(data) <= min(h2c.local_flow_control_window(sid), h2c.max_outbound_frame_size):
            h2c.send_data(sid, data)  # the usual small answer: one frame, no copies
            return b""
        view = memoryview(data)
        while view:
            window = min(h2c.local_flow_control_window(sid), h2c.max_outbound_frame_size)
            if window <= 0:
                break
            h2c.send_data(sid, view[:window].tobytes())
            view = view[window:]
        return view.tobytes() if view else b""

    def _drain(self, stream: H2Stream) -> None:
        pending = stream.pending
        while pending:
            chunk = pending.pop(0)
            rest = self._send_now(stream, chunk)
            stream.pending_size -= len(chunk) - len(rest)
            if rest:
                pending.insert(0, rest)
                break
        if not pending:
            stream.pending_size = 0
            if stream.end_pending:
                stream.end_pending = False
                self.h2.end_stream(stream.stream_id)
            if stream.exchange is None:
                self._forget(stream)
        if stream.upstream_paused and stream.pending_size <= PENDING_HIGH // 2:
            stream.upstream_paused = False
            ex = stream.exchange
            if ex is not None and ex.conn is not None and not self.write_paused:
                ex.conn.resume_reading()
        self._flush()

    def _forget(self, stream: H2Stream) -> None:
        self.streams.pop(stream.stream_id, None)
        if not self.streams:
            if self.closing:
                self._close()
                return
            listener = self.listener
            self.deadline = listener.loop_time() + listener.timeouts.client_idle

    # -- endings ---------------------------------------------------------------------------

    def _flush(self) -> None:
        """Write what h2 has queued, once per loop iteration: a response's HEADERS, DATA and
        END_STREAM, and the answers of every stream whose backend spoke in this iteration,
        leave in one write (one TLS record run, one syscall) instead of one each."""
        if not self.flush_pending and self.loop is not None:
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
        if data and not self.closed:
            self.transport.write(data)  # type: ignore[union-attr]

    def shutdown(self) -> None:
        """Graceful stop (drain, reload): GOAWAY naming the last stream taken; those finish,
        later ones are refused, and the connection closes once none is left."""
        if self.closing or self.closed:
            return
        self.closing = True
        # written by hand: h2's close_connection() would also end the streams still running
        frame = GoAwayFrame(stream_id=0, last_stream_id=self.last_stream_id, error_code=NO_ERROR)
        self._flush_now()
        self.transport.write(frame.serialize())  # type: ignore[union-attr]
        if not self.streams:
            self._close()

    def _connection_error(self, code: int, why: str, *, sent: bool = False) -> None:
        log.info("%s: HTTP/2 connection ended: %s", self.client_ip, why)
        self.listener.rejected += 1
        if not sent:
            try:
                self.h2.close_connection(code, last_stream_id=self.last_stream_id)
            except h2.exceptions.ProtocolError:
                pass
        self._flush_now()
        streams = list(self.streams.values())
        self.streams.clear()
        self.starting.clear()
        for stream in streams:
            stream.reset_by_client()
        self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closing = True
            self._flush_now()
            self.transport.close()  # type: ignore[union-attr]

    def close(self) -> None:
        self._close()

    def on_deadline(self, now: float) -> None:
        if not self.streams:
            # no request yet within client_header, or idle for client_idle
            self.shutdown()
            self._close()
            return
        stall = self.listener.timeouts.client_idle
        for stream in list(self.streams.values()):
            if now - stream.last_progress < stall:
                continue
            waiting_body = not stream.request_ended and not stream.read_pause
            if stream.pending or waiting_body:
                # a closed window (zero-window stall) or a request body that stopped coming
                log.info("%s: stream %d stalled; reset", self.client_ip, stream.stream_id)
                ex = stream.exchange
                self.reset_stream(stream, 8)  # CANCEL
                self.streams.pop(stream.stream_id, None)
                if ex is not None:
                    stream.exchange = None
                    ex.client_gone()
        if self.closed:
            return
        if self.streams:
            self.deadline = now + 1.0
        elif self.closing:
            self._close()
        else:
            self.deadline = now + self.listener.timeouts.client_idle


_HANDLERS = {
    h2.events.RequestReceived: H2ClientConnection._on_request,
    h2.events.DataReceived: H2ClientConnection._on_data,
    h2.events.StreamEnded: H2ClientConnection._on_stream_ended,
    h2.events.TrailersReceived: H2ClientConnection._on_trailers,
    h2.events.StreamReset: H2ClientConnection._on_reset,
    h2.events.WindowUpdated: H2ClientConnection._on_window,
    h2.events.ConnectionTerminated: H2ClientConnection._on_goaway,
}
