"""The HTTP/2 attacks peers were hit by, each sent as frames to a real balancer: every one ends
in a stream or connection error, never in a request a backend could read two ways, a crash or
unbounded memory, and a normal client on another connection is served meanwhile."""

from __future__ import annotations

import socket
import ssl
import threading
import time

import hpack
import pytest
import trustme
from hyperframe.frame import (
    ContinuationFrame,
    DataFrame,
    HeadersFrame,
    PingFrame,
    RstStreamFrame,
    SettingsFrame,
)

from tests.integration.h2peer import H2Peer
from tests.integration.harness import rss_kib
from tests.integration.test_http2 import h2_balancer, tls_client

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
ENHANCE_YOUR_CALM = 11
PROTOCOL_ERROR = 1


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


class Bystander:
    """A normal client on its own connection, requesting all through an attack."""

    def __init__(self, port: int, ctx: ssl.SSLContext) -> None:
        self.peer = H2Peer(port, tls=ctx)
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        first = self.peer.get("/healthz")
        assert first.status == 200, first
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set() and len(self.latencies) + self.failures < 2000:
            t = time.monotonic()
            r = self.peer.get("/healthz", timeout=10)
            if r.status == 200 and r.ended:
                self.latencies.append(time.monotonic() - t)
            else:
                self.failures += 1
            time.sleep(0.02)

    def stop(self) -> None:
        deadline = time.monotonic() + 5
        while len(self.latencies) + self.failures < 5 and time.monotonic() < deadline:
            time.sleep(0.05)  # a few requests at least, right after the attack
        self._stop.set()
        self._thread.join(timeout=15)
        self.peer.close()
        assert self.failures == 0 and self.latencies, (self.failures, len(self.latencies))
        worst = max(self.latencies)
        median = sorted(self.latencies)[len(self.latencies) // 2]
        print(
            f"bystander: {len(self.latencies)} requests, median {median * 1000:.1f} ms,"
            f" worst {worst * 1000:.0f} ms"
        )


def raw_h2(port: int, ctx: ssl.SSLContext) -> ssl.SSLSocket:
    """A TLS connection that has sent the preface and empty SETTINGS, nothing more."""
    ctx.set_alpn_protocols(["h2"])
    s = ctx.wrap_socket(
        socket.create_connection(("127.0.0.1", port), timeout=10), server_hostname="localhost"
    )
    s.sendall(PREFACE + SettingsFrame(0).serialize())
    return s


def read_goaway(s: socket.socket, timeout: float = 10.0) -> int | None:
    """Read frames until the server's GOAWAY (its error code) or the connection ends."""
    buf = b""
    deadline = time.monotonic() + timeout
    s.settimeout(0.5)
    while time.monotonic() < deadline:
        try:
            data = s.recv(65536)
        except (TimeoutError, ssl.SSLWantReadError):
            continue
        except OSError:
            break
        if not data:
            break
        buf += data
        while len(buf) >= 9:
            length = int.from_bytes(buf[:3], "big")
            if len(buf) < 9 + length:
                break
            ftype, payload = buf[3], buf[9 : 9 + length]
            buf = buf[9 + length :]
            if ftype == 0x7:  # GOAWAY
                return int.from_bytes(payload[4:8], "big")
    return None


def flood(s: socket.socket, data: bytes, times: int = 1) -> None:
    """Send `data` `times` over; the server closing mid-flood is the answer, not a failure."""
    try:
        for _ in range(times):
            s.sendall(data)
    except OSError:
        pass


def request_block(path: str = "/", extra: list[tuple[bytes, bytes]] | None = None) -> bytes:
    enc = hpack.Encoder()
    return enc.encode(
        [
            (b":method", b"GET"),
            (b":scheme", b"https"),
            (b":authority", b"localhost"),
            (b":path", path.encode()),
            *(extra or []),
        ]
    )


def test_rapid_reset_ends_the_connection_and_others_are_served(procs, ca):
    b1 = procs.demo_backend("app1")
    lb = h2_balancer(procs, ca, [("app1", b1)])
    bystander = Bystander(lb.port, tls_client(ca))
    s = raw_h2(lb.port, tls_client(ca))
    base = rss_kib(lb.proc.pid)
    try:
        enc = hpack.Encoder()
        burst = b""
        for i in range(1000):
            sid = 2 * i + 1
            block = enc.encode(
                [
                    (b":method", b"GET"),
                    (b":scheme", b"https"),
                    (b":authority", b"localhost"),
                    (b":path", b"/?delay=1"),
                ]
            )
            burst += HeadersFrame(sid, block, flags=["END_HEADERS", "END_STREAM"]).serialize()
            burst += RstStreamFrame(sid, error_code=8).serialize()
        flood(s, burst)
        assert read_goaway(s) == ENHANCE_YOUR_CALM
    finally:
        s.close()
        bystander.stop()
    assert rss_kib(lb.proc.pid) - base < 50 * 1024
    assert "rapid reset" in lb.log_text()


def test_streams_opened_and_reset_in_one_read_never_reach_a_backend(procs, ca):
    """The balancer starts a stream's exchange only once the frames read with its HEADERS
    are handled, so a Rapid Reset burst costs it parsing, not backend connections."""
    port, _ = procs.raw_backend("counted")
    lb = h2_balancer(procs, ca, [("counted", port)])
    s = raw_h2(lb.port, tls_client(ca))
    try:
        enc = hpack.Encoder()
        burst = b""
        for i in range(150):  # below the reset budget: the connection lives on
            sid = 2 * i + 1
            block = enc.encode(
                [(b":method", b"GET"), (b":scheme", b"https"), (b":authority", b"localhost"),
                 (b":path", b"/")]
            )  # fmt: skip
            burst += HeadersFrame(sid, block, flags=["END_HEADERS", "END_STREAM"]).serialize()
            burst += RstStreamFrame(sid, error_code=8).serialize()
        s.sendall(burst)
        time.sleep(1.0)
    finally:
        s.close()
    # routed to the backend (connection opened or taken from the pool) at all
    routed = lb.backend("web", "counted")["requests"]
    # a pair split across two reads or slices may start its stream; the rest never do
    assert routed <= 10, routed


def test_continuation_flood_is_a_connection_error(procs, ca):
    b1 = procs.demo_backend("app1")
    lb = h2_balancer(procs, ca, [("app1", b1)])
    bystander = Bystander(lb.port, tls_client(ca))
    s = raw_h2(lb.port, tls_client(ca))
    try:
        block = request_block()
        frames = HeadersFrame(1, block, flags=[]).serialize()  # no END_HEADERS
        junk = ContinuationFrame(1, b"\x40\x01x\x01y", flags=[]).serialize()
        s.sendall(frames)
        flood(s, junk * 200, 50)
        assert read_goaway(s) == PROTOCOL_ERROR
    finally:
        s.close()
        bystander.stop()


def test_hpack_bomb_is_refused_and_oversized_lists_get_431(procs, ca):
    b1 = procs.demo_backend("app1")
    lb = h2_balancer(procs, ca, [("app1", b1)])
    base = rss_kib(lb.proc.pid)
    s = raw_h2(lb.port, tls_client(ca))
    try:
        # one 4 KiB value in the dynamic table, then referenced 3,000 times: 12 MB decoded
        # from a block of a few KiB
        enc = hpack.Encoder()
        first = enc.encode([(b"x-bomb", b"a" * 4000)])
        again = enc.encode([(b"x-bomb", b"a" * 4000)])  # now one byte: the table index
        block = request_block() + first + again * 3000
        rest = block[16000:]
        first_flags = ["END_STREAM"] if rest else ["END_STREAM", "END_HEADERS"]
        s.sendall(HeadersFrame(1, block[:16000], flags=first_flags).serialize())
        while rest:
            chunk, rest = rest[:16000], rest[16000:]
            flags = [] if rest else ["END_HEADERS"]
            s.sendall(ContinuationFrame(1, chunk, flags=flags).serialize())
        assert read_goaway(s) in (ENHANCE_YOUR_CALM, PROTOCOL_ERROR)
    finally:
        s.close()
    assert rss_kib(lb.proc.pid) - base < 50 * 1024
    peer = H2Peer(lb.port, tls=tls_client(ca))
    try:
        assert peer.get("/", headers=[("x-big", "v" * 80_000)]).status == 431
        assert peer.get("/healthz").status == 200
    finally:
        peer.close()


@pytest.mark.parametrize("kind", ["ping", "settings", "empty-data"])
def test_control_frame_floods_end_the_connection(procs, ca, kind):
    b1 = procs.demo_backend("app1")
    lb = h2_balancer(procs, ca, [("app1", b1)])
    bystander = Bystander(lb.port, tls_client(ca))
    s = raw_h2(lb.port, tls_client(ca))
    try:
        if kind == "ping":
            frame = PingFrame(0, opaque_data=b"12345678").serialize()
        elif kind == "settings":
            frame = SettingsFrame(0, settings={4: 65535}).serialize()
        else:
            s.sendall(HeadersFrame(1, request_block("/echo"), flags=["END_HEADERS"]).serialize())
            frame = DataFrame(1, b"").serialize()
        flood(s, frame * 500, 10)
        assert read_goaway(s) == ENHANCE_YOUR_CALM
    finally:
        s.close()
        bystander.stop()


def test_a_burst_below_the_budgets_is_parsed_in_turns_and_loses_nothing(procs, ca):
    """1,500 PINGs and a request in one write: more than one turn of parsing (the balancer
    yields the loop to other connections between turns), yet every PING is answered, in
    order, and so is the request behind them."""
    b1 = procs.demo_backend("app1")
    lb = h2_balancer(procs, ca, [("app1", b1)])
    peer = H2Peer(lb.port, tls=tls_client(ca))
    try:
        for i in range(1500):
            peer.conn.ping(i.to_bytes(8, "big"))
        sid = peer.request("/echo")  # flushes the pings and the request in one write
        r = peer.wait(sid)
        assert r.status == 200 and r.ended, r
        deadline = time.monotonic() + 10
        while peer.ping_acks < 1500 and time.monotonic() < deadline:
            peer.pump()
        assert peer.ping_acks == 1500 and peer.goaway is None and not peer.closed
    finally:
        peer.close()


def test_a_preface_and_then_silence_is_closed_after_client_header(procs, ca):
    b1 = procs.demo_backend("app1")
    lb = h2_balancer(procs, ca, [("app1", b1)], timeouts={"client_header": "1s"})
    s = raw_h2(lb.port, tls_client(ca))
    try:
        started = time.monotonic()
        assert read_goaway(s, timeout=10) == 0  # graceful: it never asked for anything
        assert time.monotonic() - started < 8
    finally:
        s.close()


SMUGGLING = {
    "connection header": [(b"connection", b"keep-alive")],
    "te other than trailers": [(b"te", b"gzip")],
    "transfer-encoding": [(b"transfer-encoding", b"chunked")],
    "upgrade": [(b"upgrade", b"h2c")],
    "crlf in a value": [(b"x-a", b"1\r\nx-injected: 1")],
    "lf in a value": [(b"x-a", b"1\nGET /admin HTTP/1.1")],
    "nul in a value": [(b"x-a", b"1\x00x")],
    "uppercase name": [(b"X-Upper", b"1")],
    "space in a name": [(b"x a", b"1")],
    "pseudo after regular": [(b"x-a", b"1"), (b":foo", b"1")],
}


@pytest.mark.parametrize("case", sorted(SMUGGLING))
def test_downgrade_smuggling_never_reaches_a_backend(procs, ca, case):
    port, record = procs.raw_backend("raw", "ok")
    lb = h2_balancer(procs, ca, [("raw", port)])
    s = raw_h2(lb.port, tls_client(ca))
    try:
        block = request_block("/smuggle", SMUGGLING[case])
        s.sendall(HeadersFrame(1, block, flags=["END_HEADERS", "END_STREAM"]).serialize())
        assert read_goaway(s) == PROTOCOL_ERROR
    finally:
        s.close()
    peer = H2Peer(lb.port, tls=tls_client(ca))
    try:
        assert peer.get("/after").status == 200  # served on: the error was that client's
    finally:
        peer.close()
    seen = record.read_bytes() if record.exists() else b""
    assert b"/smuggle" not in seen and b"injected" not in seen.lower(), seen


@pytest.mark.parametrize(("declared", "sent"), [(10, 5), (5, 10)])
def test_content_length_that_disagrees_with_data_is_refused(procs, ca, declared, sent):
    port, record = procs.raw_backend("raw", "ok")
    lb = h2_balancer(procs, ca, [("raw", port)])
    s = raw_h2(lb.port, tls_client(ca))
    try:
        block = request_block("/cl", [(b"content-length", str(declared).encode())])
        s.sendall(HeadersFrame(1, block, flags=["END_HEADERS"]).serialize())
        s.sendall(DataFrame(1, b"x" * sent, flags=["END_STREAM"]).serialize())
        assert read_goaway(s) == PROTOCOL_ERROR
    finally:
        s.close()
    time.sleep(0.3)
    seen = record.read_bytes() if record.exists() else b""
    # at most the declared length reached the backend, whose connection was then cut: no
    # byte beyond it that a backend could read as a second request
    body = seen.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in seen else b""
    assert len(body.split(b"\n--END--")[0]) <= declared, seen
