"""A blocking HTTP/2 client for tests, on h2's client side: real sockets, frames the test chooses.

`H2Peer` speaks h2 (ALPN on TLS) or h2c (prior knowledge) to a listener, records what comes
back per stream, and can also write hand-made frames (hyperframe) for the attack tests, which
a well-behaved client library would refuse to send.
"""

from __future__ import annotations

import socket
import ssl
import time
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings


@dataclass
class StreamResult:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    trailers: list[tuple[bytes, bytes]] = field(default_factory=list)
    ended: bool = False
    reset: int | None = None  # RST_STREAM error code from the server

    def header(self, name: bytes) -> bytes | None:
        for n, v in self.headers:
            if n == name:
                return v
        return None

    @property
    def done(self) -> bool:
        return self.ended or self.reset is not None


class H2Peer:
    def __init__(
        self,
        port: int,
        *,
        tls: ssl.SSLContext | None = None,
        server_name: str = "localhost",
        settings: dict[int, int] | None = None,
        auto_window: bool = True,
        timeout: float = 10.0,
    ) -> None:
        raw = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        # as real clients do: without it a WINDOW_UPDATE followed by the next request waits
        # out the server's delayed ACK (40 ms), which then reads as the balancer's latency
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if tls is not None:
            tls.set_alpn_protocols(["h2"])
            self.sock: socket.socket = tls.wrap_socket(raw, server_hostname=server_name)
            assert self.sock.selected_alpn_protocol() == "h2"  # type: ignore[attr-defined]
        else:
            self.sock = raw
        self.authority = f"{server_name}:{port}".encode()
        self.scheme = b"https" if tls is not None else b"http"
        self.conn = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=True, header_encoding=None)
        )
        self.conn.initiate_connection()
        if settings:
            self.conn.update_settings(settings)
        self.auto_window = auto_window
        self.streams: dict[int, StreamResult] = {}
        self.goaway: h2.events.ConnectionTerminated | None = None
        self.closed = False
        self.remote_settings: dict[int, int] = {}
        self.ping_acks = 0
        self.flush()

    # -- sending ---------------------------------------------------------------------------

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def request(
        self,
        path: str = "/",
        *,
        method: str = "GET",
        headers: list[tuple[str, str]] | None = None,
        body: bytes | None = None,
        end: bool = True,
    ) -> int:
        sid = self.conn.get_next_available_stream_id()
        fields = [
            (b":method", method.encode()),
            (b":scheme", self.scheme),
            (b":authority", self.authority),
            (b":path", path.encode()),
        ]
        fields += [(n.encode(), v.encode()) for n, v in headers or []]
        self.streams[sid] = StreamResult()
        self.conn.send_headers(sid, fields, end_stream=end and body is None)
        self.flush()
        if body is not None:
            self.send_body(sid, body, end=end)
        return sid

    def send_body(self, sid: int, body: bytes, *, end: bool = True, timeout: float = 10.0) -> None:
        """DATA within the server's flow-control windows, waiting for credit as needed."""
        deadline = time.monotonic() + timeout
        view = memoryview(body)
        while view:
            window = min(
                self.conn.local_flow_control_window(sid), self.conn.max_outbound_frame_size
            )
            if window <= 0:
                if time.monotonic() > deadline or not self.pump():
                    raise TimeoutError("no flow-control credit from the server")
                continue
            self.conn.send_data(sid, view[:window].tobytes())
            view = view[window:]
            self.flush()
        if end:
            self.conn.end_stream(sid)
            self.flush()

    # -- receiving -------------------------------------------------------------------------

    def pump(self, timeout: float = 0.2) -> bool:
        """Read once (up to `timeout`); False when the server closed the connection."""
        if self.closed:
            return False
        self.sock.settimeout(timeout)
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError):
            return True
        except (ConnectionError, ssl.SSLError, OSError):
            self.closed = True
            return False
        if not data:
            self.closed = True
            return False
        try:
            events = self.conn.receive_data(data)
        except h2.exceptions.ProtocolError:
            self.closed = True
            return False
        for ev in events:
            self._event(ev)
        try:
            self.flush()
        except OSError:
            self.closed = True
        return True

    def _event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.ResponseReceived):
            r = self.streams.setdefault(ev.stream_id, StreamResult())
            r.headers = list(ev.headers)
            r.status = int(dict(ev.headers)[b":status"])
        elif isinstance(ev, h2.events.TrailersReceived):
            self.streams[ev.stream_id].trailers = list(ev.headers)
        elif isinstance(ev, h2.events.DataReceived):
            self.streams[ev.stream_id].body += ev.data
            if self.auto_window:
                self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            self.streams[ev.stream_id].ended = True
        elif isinstance(ev, h2.events.StreamReset):
            self.streams.setdefault(ev.stream_id, StreamResult()).reset = ev.error_code
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = ev
            if ev.error_code == 0:
                # a graceful GOAWAY lets the streams below last_stream_id finish (RFC 9113
                # 6.8); h2's client side treats any GOAWAY as the end, so it is told otherwise
                self.conn.state_machine.state = h2.connection.ConnectionState.CLIENT_OPEN
        elif isinstance(ev, h2.events.PingAckReceived):
            self.ping_acks += 1
        elif isinstance(ev, h2.events.RemoteSettingsChanged):
            for code, change in ev.changed_settings.items():
                self.remote_settings[int(code)] = change.new_value

    def wait(self, sid: int, timeout: float = 10.0) -> StreamResult:
        deadline = time.monotonic() + timeout
        while not self.streams[sid].done and time.monotonic() < deadline:
            if not self.pump() and not self.streams[sid].done:
                break
        return self.streams[sid]

    def wait_closed(self, timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.pump():
                return True
        return False

    def get(self, path: str = "/", *, timeout: float = 10.0, **kw) -> StreamResult:  # type: ignore[no-untyped-def]
        return self.wait(self.request(path, **kw), timeout=timeout)

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
