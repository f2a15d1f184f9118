"""Limits and abuse against real processes: connection caps, header/body caps, per-IP rate,
slowloris, and request smuggling (RFC 9112 framing) with a backend that records every byte.

Different client IPs come from binding the client socket to 127.0.0.2, 127.0.0.3, ...:
loopback answers for all of 127/8.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import Balancer, Processes, config, read_response

# -- clients ---------------------------------------------------------------------------------


def connect(port: int, source: str = "127.0.0.1", timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(
        ("127.0.0.1", port), timeout=timeout, source_address=(source, 0)
    )


def get(s: socket.socket, path: str = "/", extra: bytes = b"") -> int:
    s.sendall(b"GET %s HTTP/1.1\r\nHost: x\r\n%b\r\n" % (path.encode(), extra))
    return read_response(s)[0]


def closed_by_peer(s: socket.socket, timeout: float = 3.0) -> bool:
    """True if the server closes (FIN or reset) within `timeout`, reading what comes first."""
    s.settimeout(timeout)
    try:
        while s.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def refused(port: int, source: str = "127.0.0.1") -> bool:
    """A connection over a cap is accepted by the kernel and dropped by the balancer at once,
    before a byte is read: a request sent on it gets no answer."""
    try:
        s = connect(port, source)
    except ConnectionError:
        return True
    with s:
        try:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        except ConnectionError:
            return True
        s.settimeout(3)
        try:
            return s.recv(65536) == b""
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False


# -- a backend that records every byte -------------------------------------------------------


class Sink:
    """A TCP backend that keeps every byte of every connection and never answers, for proving
    what a backend did (not) receive."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self.conns: list[bytearray] = []
        self.log = bytearray()  # every byte of every connection, in arrival order
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            buf = bytearray()
            self.conns.append(buf)
            t = threading.Thread(target=self._read, args=(c, buf), daemon=True)
            self._threads.append(t)
            t.start()

    def _read(self, c: socket.socket, buf: bytearray) -> None:
        c.settimeout(0.1)
        with c:
            while not self._stop.is_set():
                try:
                    data = c.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                with self._lock:
                    buf += data
                    self.log += data

    def received(self) -> bytes:
        with self._lock:
            return bytes(self.log)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        for t in self._threads:
            t.join(2)


@pytest.fixture
def sink() -> Iterator[Sink]:
    s = Sink()
    try:
        yield s
    finally:
        s.close()


def complete_requests(data: bytes) -> int:
    """How many complete HTTP/1.1 requests a backend byte stream holds (Content-Length or
    chunked framing, as the balancer forwards them)."""
    n = 0
    while True:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return n
        head = data[:end].lower()
        rest = data[end + 4 :]
        if b"\r\ntransfer-encoding: chunked" in head:
            while True:
                line_end = rest.find(b"\r\n")
                if line_end < 0:
                    return n
                size = int(rest[:line_end].split(b";")[0], 16)
                if len(rest) < line_end + 2 + size + 2:
                    return n
                rest = rest[line_end + 2 + size + 2 :]
                if size == 0:
                    break
        else:
            length = 0
            for line in head.split(b"\r\n")[1:]:
                if line.startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            if len(rest) < length:
                return n
            rest = rest[length:]
        n += 1
        data = rest


def dechunk(framed: bytes) -> tuple[bytes, bool]:
    """The content of a strictly chunked byte stream, and whether its last chunk arrived;
    fails on anything that is not exact chunked framing."""
    content = b""
    rest = framed
    while rest:
        size_line, sep, rest = rest.partition(b"\r\n")
        assert sep and size_line and all(c in b"0123456789abcdef" for c in size_line), framed
        size = int(size_line, 16)
        if size == 0:
            assert rest == b"\r\n", framed
            return content, True
        assert rest[size : size + 2] == b"\r\n", framed
        content += rest[:size]
        rest = rest[size + 2 :]
    return content, False


# -- connection caps -------------------------------------------------------------------------


def test_max_connections_refuses_the_extra_one_and_keeps_serving(procs):
    port, _ = procs.raw_backend("a")
    lb = procs.balancer(config([("a", port)], limits={"max_connections": 3}))
    held = [connect(lb.port) for _ in range(3)]
    try:
        for s in held:
            assert get(s) == 200
        t0 = time.monotonic()
        assert refused(lb.port)
        assert refused(lb.port, "127.0.0.2")  # the total cap counts every client IP
        assert time.monotonic() - t0 < 3  # refused at once, not after a timeout
        for s in held:  # the three admitted keep being served on their connections
            assert get(s) == 200
        held.pop().close()
        deadline = time.monotonic() + 3
        while True:  # the freed slot is reusable once the balancer saw the close
            try:
                with connect(lb.port) as s:
                    assert get(s) == 200
                break
            except (AssertionError, ConnectionError):
                # until the balancer has seen the close, a new connection is still over the
                # cap: refused with a reset, which the client may see as a reset read
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        for s in held:
            s.close()
    assert lb.status()["listeners"][0]["refused"] >= 2


def test_max_connections_per_ip_leaves_other_ips_alone(procs):
    port, _ = procs.raw_backend("a")
    lb = procs.balancer(config([("a", port)], limits={"max_connections_per_ip": 2}))
    mine = [connect(lb.port) for _ in range(2)]
    try:
        for s in mine:
            assert get(s) == 200
        assert refused(lb.port)
        others = [connect(lb.port, "127.0.0.2") for _ in range(2)]
        for s in others:
            assert get(s) == 200
        assert refused(lb.port, "127.0.0.2")
        for s in mine + others:
            assert get(s) == 200
        for s in others:
            s.close()
    finally:
        for s in mine:
            s.close()


# -- header and body caps --------------------------------------------------------------------


def test_header_size_and_count_limits_give_431(procs):
    port, record = procs.raw_backend("a")
    lb = procs.balancer(config([("a", port)], limits={"max_header_bytes": 4096, "max_headers": 20}))

    def status(extra: bytes, path: bytes = b"/") -> int:
        with connect(lb.port) as s:
            s.sendall(b"GET %b HTTP/1.1\r\nHost: x\r\n%b\r\n" % (path, extra))
            code, head, _ = read_response(s)
            if code >= 400:
                assert b"connection: close" in head.lower()
                assert closed_by_peer(s)
            return code

    assert status(b"X-Fill: " + b"a" * 3000 + b"\r\n") == 200
    assert status(b"X-Fill: " + b"a" * 5000 + b"\r\n") == 431
    assert status(b"".join(b"X-Fill-%d: %s\r\n" % (i, b"a" * 300) for i in range(15))) == 431
    assert status(b"".join(b"X-%d: 1\r\n" % i for i in range(19))) == 200  # 20 with Host
    assert status(b"".join(b"X-%d: 1\r\n" % i for i in range(20))) == 431
    assert status(b"", b"/" + b"p" * 5000) == 414
    # a header line that never ends is cut off at the cap, not buffered without bound
    with connect(lb.port) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Endless: ")
        try:
            for _ in range(64):
                s.sendall(b"a" * 1024)
        except ConnectionError:
            pass  # closed while we were still sending: that's the point
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(65536).startswith(b"HTTP/1.1 431 ")
    forwarded = record.read_bytes()
    assert complete_requests(forwarded.replace(b"\n--END--\n", b"")) == 2


def test_header_byte_cap_is_the_whole_head_however_it_is_split(procs):
    """max_header_bytes is the request head's size, request line and blank line included,
    exactly at the cap; a head that arrives in several reads counts once, not twice (a
    571-byte head split in two used to get a 431 under a 1024-byte cap)."""
    port, _ = procs.raw_backend("a")
    lb = procs.balancer(config([("a", port)], limits={"max_header_bytes": 1024}))

    def head(size: int) -> bytes:
        base = b"GET / HTTP/1.1\r\nHost: x\r\nX-Pad: \r\n\r\n"
        return base[:-4] + b"a" * (size - len(base)) + b"\r\n\r\n"

    def status(data: bytes, cuts: tuple[int, ...] = ()) -> int:
        with connect(lb.port) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            start = 0
            for cut in (*cuts, len(data)):
                s.sendall(data[start:cut])
                start = cut
                time.sleep(0.05)  # separate reads on the other side
            return read_response(s)[0]

    for size, expected in ((1024, 200), (1025, 431)):
        data = head(size)
        assert len(data) == size
        assert status(data) == expected
        assert status(data, (size - 3,)) == expected
        assert status(data, (20, size // 2, size - 1)) == expected
    half = head(600)
    assert status(half, (len(half) - 3,)) == 200


def test_body_limit_413_up_front_and_mid_stream(procs, sink):
    port, record = procs.raw_backend("a")
    cfg = config([("a", port)], limits={"max_body_bytes": 1000})
    cfg["listeners"][0]["routes"] = [{"path_prefix": "/sink", "pool": "sink"}, {"pool": "web"}]
    cfg["pools"]["sink"] = {"backends": [{"name": "sink", "address": f"127.0.0.1:{sink.port}"}]}
    lb = procs.balancer(cfg)

    with connect(lb.port) as s:  # exactly at the cap passes
        s.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n" + b"b" * 1000)
        assert read_response(s)[0] == 200
    with connect(lb.port) as s:  # announced too large: 413 before a body byte is sent
        s.sendall(
            b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: 1001\r\n"
            b"Expect: 100-continue\r\n\r\n"
        )
        code, head, _ = read_response(s)
        assert code == 413 and b"connection: close" in head.lower()
        assert b"100 Continue" not in head
        assert closed_by_peer(s)
    with connect(lb.port) as s:  # chunked, crossing the cap mid-stream
        s.sendall(b"POST /sink HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        time.sleep(0.2)  # the head is forwarded before the body arrives
        for _ in range(3):
            s.sendall(b"190\r\n" + b"c" * 400 + b"\r\n")  # 400 bytes a chunk
            time.sleep(0.05)
        with contextlib.suppress(ConnectionError):
            s.sendall(b"190\r\n" + b"c" * 400 + b"\r\n0\r\n\r\n")
        code, head, _ = read_response(s)
        assert code == 413 and b"connection: close" in head.lower()
        assert closed_by_peer(s)
    time.sleep(0.3)
    got = sink.received()
    # the backend got the head and at most the allowed body, then its connection was cut:
    # never a complete request, never a byte past the cap
    assert got.count(b"POST /sink HTTP/1.1\r\n") == 1
    assert complete_requests(got) == 0
    assert got.count(b"c") <= 1000
    assert record.read_bytes().count(b"POST / HTTP/1.1") == 1  # only the one at the cap


# -- rate limit ------------------------------------------------------------------------------


def test_rate_per_ip_429_with_retry_after_and_other_ips_unaffected(procs):
    port, _ = procs.raw_backend("a")
    lb = procs.balancer(config([("a", port)], limits={"rate_per_ip": 5}))

    def one(source: str) -> tuple[int, bytes]:
        with connect(lb.port, source) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            code, head, _ = read_response(s)
            return code, head

    t0 = time.monotonic()
    results = [one("127.0.0.1") for _ in range(12)]
    assert time.monotonic() - t0 < 1.0  # all within one second: the burst of 5 is used up
    codes = [c for c, _ in results]
    assert codes[:5] == [200] * 5 and 429 in codes[5:], codes
    limited = next(h for c, h in results if c == 429)
    retry = [ln for ln in limited.split(b"\r\n") if ln.lower().startswith(b"retry-after:")]
    assert len(retry) == 1 and int(retry[0].split(b":")[1]) >= 1
    # another client IP has its own bucket
    assert [one("127.0.0.2")[0] for _ in range(5)] == [200] * 5
    # after Retry-After, the first client is served again
    time.sleep(int(retry[0].split(b":")[1]))
    assert one("127.0.0.1")[0] == 200


# -- slowloris -------------------------------------------------------------------------------

SLOW = 1000
HEADER_TIMEOUT = 2.0


def raise_fd_limit(need: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        # the balancer is started after this and inherits it
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= need, "fd limit too low"


async def slow_client(port: int, t_start: float, results: list, stop_at: float) -> None:
    """Connect and send a request head one byte every 0.2 s, never finishing it; record when
    and how the balancer ended it."""
    request = b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"s" * 200
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
    except OSError as e:
        results.append(("connect-failed", 0.0, repr(e)))
        return
    opened = time.monotonic()
    answer = b""
    try:
        for i in range(len(request)):
            writer.write(request[i : i + 1])
            try:
                answer = await asyncio.wait_for(reader.read(4096), 0.2)
            except TimeoutError:
                if time.monotonic() > stop_at:
                    results.append(("still-open", time.monotonic() - opened, ""))
                    return
                continue
            except ConnectionError:
                answer = b"<reset>"
            results.append(("closed", time.monotonic() - opened, answer[:12].decode("latin-1")))
            return
    finally:
        writer.transport.abort()


def test_slowloris_does_not_starve_a_normal_client(procs):
    raise_fd_limit(SLOW + 1024)
    port, _ = procs.raw_backend("a")
    lb = procs.balancer(config([("a", port)], timeouts={"client_header": f"{HEADER_TIMEOUT}s"}))
    latencies: list[float] = []
    failures: list[str] = []
    stop = threading.Event()

    def normal_client() -> None:
        # from another client IP, a fresh connection per request, all through the attack
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                with connect(lb.port, "127.0.0.2", timeout=5) as s:
                    code = get(s, "/", b"Connection: close\r\n")
                latencies.append(time.monotonic() - t0)
                if code != 200:
                    failures.append(f"status {code}")
            except OSError as e:
                failures.append(repr(e))
            time.sleep(0.05)

    async def attack() -> list:
        results: list = []
        t_start = time.monotonic()
        stop_at = t_start + 4 * HEADER_TIMEOUT
        tasks = []
        for _ in range(SLOW):
            tasks.append(asyncio.ensure_future(slow_client(lb.port, t_start, results, stop_at)))
            await asyncio.sleep(0.001)  # ~1 s to open them all, as a real attack ramps up
        async with asyncio.timeout(stop_at - time.monotonic() + 5):
            await asyncio.gather(*tasks)
        return results

    t = threading.Thread(target=normal_client)
    t.start()
    t0 = time.monotonic()
    try:
        results = asyncio.run(attack())
    finally:
        stop.set()
        t.join(10)
    took = time.monotonic() - t0
    kinds = [r[0] for r in results]
    assert kinds.count("closed") == SLOW, {k: kinds.count(k) for k in set(kinds)}
    held = sorted(r[1] for r in results)
    # closed at the header timeout, counted from the accept (the trickle doesn't extend it);
    # the watchdog sweeps every 0.1 s
    assert held[0] > HEADER_TIMEOUT - 0.3 and held[-1] < HEADER_TIMEOUT + 1.5, (held[0], held[-1])
    answers = {r[2] for r in results}
    assert answers <= {"HTTP/1.1 408", "<reset>", ""}, answers
    assert sum(r[2] == "HTTP/1.1 408" for r in results) > SLOW * 0.9
    assert not failures, failures[:5]
    assert len(latencies) >= 20
    worst = max(latencies)
    print(
        f"\nslowloris: {SLOW} slow connections held {held[0]:.2f}-{held[-1]:.2f} s; "
        f"normal client {len(latencies)} requests, median "
        f"{sorted(latencies)[len(latencies) // 2] * 1000:.1f} ms, worst {worst * 1000:.1f} ms; "
        f"attack phase {took:.1f} s"
    )
    assert worst < 1.0
    assert lb.proc.poll() is None


def test_trickled_pipelined_head_still_times_out(procs):
    # one complete request, then the next head trickled in while the first is answered: the
    # header clock must run for the second head too
    port, _ = procs.raw_backend("a")
    lb = procs.balancer(config([("a", port)], timeouts={"client_header": "1s"}))
    with connect(lb.port, timeout=10) as s:
        s.sendall(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\n")
        assert read_response(s)[0] == 200
        t0 = time.monotonic()
        data = b""
        try:
            for _ in range(40):
                s.sendall(b"X")
                s.settimeout(0.25)
                try:
                    data += s.recv(4096)
                except TimeoutError:
                    continue
                if data.startswith(b"HTTP/1.1 408 ") or not data:
                    break
        except ConnectionError:
            pass
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert time.monotonic() - t0 < 2.5


def test_header_clock_starts_at_the_accept(procs):
    # a client that waits before its first byte does not get a fresh client_header after it
    port, _ = procs.raw_backend("a")
    lb = procs.balancer(config([("a", port)], timeouts={"client_header": "1s"}))
    with connect(lb.port, timeout=10) as s:
        t0 = time.monotonic()
        time.sleep(0.7)
        data = b""
        trickle = b"GET / HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 100
        try:
            for i in range(20):
                s.sendall(trickle[i : i + 1])
                s.settimeout(0.1)
                try:
                    data += s.recv(4096)
                except TimeoutError:
                    continue
                break
        except ConnectionError:
            pass
        took = time.monotonic() - t0
    assert data.startswith(b"HTTP/1.1 408 "), data
    assert took < 1.5, took
    # and one that never sends a byte gets its 408 at the same deadline
    with connect(lb.port, timeout=10) as s:
        t0 = time.monotonic()
        data = s.recv(4096)
        assert 0.8 < time.monotonic() - t0 < 1.5
        assert data.startswith(b"HTTP/1.1 408 ") and b"Connection: close" in data, data
        s.settimeout(5)
        while data:
            data = s.recv(4096)  # then the connection is closed


# -- request smuggling (RFC 9112) ------------------------------------------------------------

H = b"POST /x HTTP/1.1\r\nHost: x\r\n"
CHUNKED = H + b"Transfer-Encoding: chunked\r\n\r\n"

SMUGGLING = {
    "CL+TE": (H + b"Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "TE+CL": (H + b"Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n", 400),
    "duplicate CL, same value": (H + b"Content-Length: 3\r\nContent-Length: 3\r\n\r\nabc", 400),
    "duplicate CL, other value": (H + b"Content-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    "CL list": (H + b"Content-Length: 3, 3\r\n\r\nabc", 400),
    "CL with sign": (H + b"Content-Length: +3\r\n\r\nabc", 400),
    "CL negative": (H + b"Content-Length: -3\r\n\r\nabc", 400),
    "CL overflow": (H + b"Content-Length: 99999999999999999999999\r\n\r\nabc", 400),
    "TE obs-fold": (H + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n", 400),
    "TE obs-fold after value": (
        H + b"Transfer-Encoding: identity\r\n chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    "TE chunked then identity": (
        H + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
        400,
    ),
    "TE chunked, identity": (H + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n", 400),
    "TE chunked, chunked": (H + b"Transfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n", 400),
    "TE identity": (H + b"Transfer-Encoding: identity\r\n\r\n", 501),
    "TE in HTTP/1.0": (
        b"POST /x HTTP/1.0\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        400,
    ),
    "space before colon in TE": (H + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n", 400),
    "space before colon": (b"GET /x HTTP/1.1\r\nHost: x\r\nX-A : b\r\n\r\n", 400),
    "whitespace-led first header": (b"GET /x HTTP/1.1\r\n Host: x\r\n\r\n", 400),
    "NUL in header value": (b"GET /x HTTP/1.1\r\nHost: x\r\nX-A: a\x00b\r\n\r\n", 400),
    "CR in header value": (b"GET /x HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n", 400),
    "bare LF ending the head": (b"GET /x HTTP/1.1\r\nHost: x\n\n", 400),
    "two Host headers": (b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    "absolute-form, other Host": (
        b"GET http://evil.test/x HTTP/1.1\r\nHost: good.test\r\n\r\n",
        400,
    ),
    "absolute-form, no Host": (b"GET http://evil.test/x HTTP/1.1\r\n\r\n", 400),
    "absolute-form, two Hosts": (
        b"GET http://a.test/x HTTP/1.1\r\nHost: a.test\r\nHost: a.test\r\n\r\n",
        400,
    ),
    "absolute-form, odd scheme": (
        b"GET javascript://a.test/x HTTP/1.1\r\nHost: a.test\r\n\r\n",
        400,
    ),
    "HTTP/0.9 request line": (b"GET /x\r\n\r\n", 505),
    "HTTP/2.0 as a version": (b"GET /x HTTP/2.0\r\nHost: x\r\n\r\n", 505),
    "chunk size with junk": (CHUNKED + b"3x\r\nabc\r\n0\r\n\r\n", 400),
    "chunk size 0x prefix": (CHUNKED + b"0x3\r\nabc\r\n0\r\n\r\n", 400),
    "chunk size with space": (CHUNKED + b"3 \r\nabc\r\n0\r\n\r\n", 400),
    "chunk size overflow": (CHUNKED + b"fffffffffffffffff\r\nabc\r\n0\r\n\r\n", 400),
    "chunk ext with control char": (CHUNKED + b"3;a=\x01b\r\nabc\r\n0\r\n\r\n", 400),
    "chunk ext with space in name": (CHUNKED + b"3;a b\r\nabc\r\n0\r\n\r\n", 400),
    "chunk ext bare LF": (CHUNKED + b"3;a=b\nabc\r\n0\r\n\r\n", 400),
    "bare LF after chunk size": (CHUNKED + b"3\nabc\r\n0\r\n\r\n", 400),
    "bare LF after chunk data": (CHUNKED + b"3\r\nabc\n0\r\n\r\n", 400),
    "bare LF in last chunk": (CHUNKED + b"3\r\nabc\r\n0\n\r\n", 400),
    "bare LF ending the body": (CHUNKED + b"3\r\nabc\r\n0\r\n\n", 400),
    "chunk data longer than its size": (CHUNKED + b"3\r\nabcdef\r\n0\r\n\r\n", 400),
}


# framing errors inside a chunked body (the head before them is valid)
BODY_FRAMING = {name for name in SMUGGLING if "chunk" in name or "bare LF" in name} - {
    "bare LF ending the head",
    "TE chunked then identity",
    "TE chunked, identity",
    "TE chunked, chunked",
}


@pytest.fixture(scope="module")
def smuggling_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Balancer, Sink]]:
    """One balancer in front of one recording sink for all the smuggling cases."""
    procs = Processes(tmp_path_factory.mktemp("smuggling"))
    sink = Sink()
    try:
        yield procs.balancer(config([("sink", sink.port)])), sink
    finally:
        procs.stop_all()
        sink.close()


@pytest.mark.parametrize("split", [False, True], ids=["one-write", "head-then-body"])
@pytest.mark.parametrize("case", list(SMUGGLING))
def test_smuggling_attempts_are_refused_and_never_reach_the_backend(
    smuggling_target: tuple[Balancer, Sink], case: str, split: bool
) -> None:
    lb, sink = smuggling_target
    request, status = SMUGGLING[case]
    before = len(sink.received())
    with connect(lb.port) as s:
        if split:
            # the head first: a valid head is on its way to the backend before the body's
            # framing turns out bad, so the backend connection must be cut, not reused
            cut = request.find(b"\r\n\r\n") + 4
            s.sendall(request[:cut])
            time.sleep(0.15)
            with contextlib.suppress(ConnectionError):
                s.sendall(request[cut:])
        else:
            s.sendall(request)
        code, head, _ = read_response(s)
        assert code == status, (case, head)
        assert b"connection: close" in head.lower()
        assert closed_by_peer(s), "the connection stays open after a framing error"
    time.sleep(0.05)
    got = sink.received()[before:]
    assert complete_requests(got) == 0, got
    if case in BODY_FRAMING and split:
        # the valid head (and any valid chunks) went ahead of the bad framing, re-framed by
        # the balancer; then the backend connection was cut: an unfinished request, and not
        # one byte of the bad framing itself
        if got:
            head, framed = got.split(b"\r\n\r\n", 1)
            assert head.startswith(b"POST /x HTTP/1.1\r\n"), got
            content, finished = dechunk(framed)
            assert not finished and b"abc".startswith(content), got
    else:
        assert got == b"", got  # a bad head is never forwarded at all


def test_valid_chunked_request_is_forwarded_with_one_framing(procs):
    port, record = procs.raw_backend("a")
    lb = procs.balancer(config([("a", port)]))
    body = b"hello, world" * 1000
    chunks = [body[i : i + 1000] for i in range(0, len(body), 1000)]
    request = (
        b"POST /up?x=1 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        + b"".join(b"%x;ext=1\r\n%b\r\n" % (len(c), c) for c in chunks)
        + b"0\r\nX-Trailer: t\r\n\r\n"
    )
    with connect(lb.port) as s:
        s.sendall(request)
        assert read_response(s)[0] == 200
    got = record.read_bytes().split(b"\n--END--\n")[0]
    head, framed = got.split(b"\r\n\r\n", 1)
    lines = [ln.lower() for ln in head.split(b"\r\n")]
    assert lines[0] == b"post /up?x=1 http/1.1"
    assert lines.count(b"transfer-encoding: chunked") == 1
    assert not any(ln.startswith(b"content-length") for ln in lines)
    # de-chunk what the backend got: the same content, one terminating chunk, nothing after
    # (the client's chunk extensions and trailer are not passed on)
    assert dechunk(framed) == (body, True)


def test_content_length_request_is_forwarded_with_one_framing(procs):
    port, record = procs.raw_backend("a")
    lb = procs.balancer(config([("a", port)]))
    with connect(lb.port) as s:
        s.sendall(b"PUT /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhelloGET /next")
        assert read_response(s)[0] == 200
    got = record.read_bytes().split(b"\n--END--\n")[0]
    head, body = got.split(b"\r\n\r\n", 1)
    lines = [ln.lower() for ln in head.split(b"\r\n")]
    assert lines.count(b"content-length: 5") == 1
    assert not any(ln.startswith(b"transfer-encoding") for ln in lines)
    assert body == b"hello"


def test_connection_header_cannot_strip_framing_or_host(procs):
    port, record = procs.raw_backend("a")
    lb = procs.balancer(config([("a", port)]))
    smuggled = b"GET /admin HTTP/1.1\r\nHost: x\r\n\r\n"
    with connect(lb.port) as s:
        s.sendall(
            b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n"
            b"Connection: content-length, host, x-secret\r\nX-Secret: s\r\n\r\n%b"
            % (len(smuggled), smuggled)
        )
        assert read_response(s)[0] == 200
    time.sleep(0.1)
    got = record.read_bytes()
    # one request, its body intact: had Content-Length been dropped as "nominated", the
    # backend would have read the body as a second request (GET /admin)
    assert got.count(b"\n--END--\n") == 1, got
    head, body = got.split(b"\n--END--\n")[0].split(b"\r\n\r\n", 1)
    lines = head.lower().split(b"\r\n")
    assert b"content-length: %d" % len(smuggled) in lines
    assert b"host: x" in lines
    assert not any(ln.startswith(b"x-secret") for ln in lines)  # other nominees still go
    assert body == smuggled


class ScriptedBackend:
    """Answers every request head it reads with the same fixed bytes (keep-alive)."""

    def __init__(self, answer: bytes) -> None:
        self.answer = answer
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._accept, daemon=True)]
        self._threads[0].start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                c, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(c,), daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, c: socket.socket) -> None:
        c.settimeout(0.1)
        buf = b""
        with c:
            while not self._stop.is_set():
                try:
                    data = c.recv(65536)
                except TimeoutError:
                    continue
                except OSError:
                    return
                if not data:
                    return
                buf += data
                while b"\r\n\r\n" in buf:
                    _, buf = buf.split(b"\r\n\r\n", 1)
                    c.sendall(self.answer)

    def close(self) -> None:
        self._stop.set()
        self.listener.close()
        for t in self._threads:
            t.join(2)


def test_backend_connection_header_cannot_strip_response_framing(procs):
    backend = ScriptedBackend(
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: content-length, x-hop\r\n"
        b"X-Hop: h\r\n\r\nhello"
    )
    try:
        lb = procs.balancer(config([("b", backend.port)]))
        with connect(lb.port) as s:
            for _ in range(3):  # keep-alive: each response must end where it says
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                status, head, body = read_response(s)
                assert status == 200 and body == b"hello"
                lines = head.lower().split(b"\r\n")
                assert b"content-length: 5" in lines
                assert not any(ln.startswith(b"x-hop") for ln in lines)
    finally:
        backend.close()


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_out_of_descriptors_pauses_accepting_instead_of_spinning(procs):
    """At its descriptor limit the balancer keeps serving the connections it has, leaves new
    ones waiting in the backlog and retries a little later: no busy loop, no log flood."""
    port, _ = procs.raw_backend("a")
    limit = 64
    lb = procs.balancer(
        config([("a", port)]),
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit)),
    )
    with connect(lb.port) as first:
        first.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_response(first)[0] == 200
        held = [connect(lb.port) for _ in range(limit + 20)]  # more than it can hold
        try:
            time.sleep(0.5)
            before = cpu_seconds(lb.proc.pid)
            time.sleep(2.0)
            # a spinning loop would burn about 2 s of CPU here; paused, almost none
            assert cpu_seconds(lb.proc.pid) - before < 0.5
            # the connection it already had is still served
            first.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(first)[0] == 200
        finally:
            for s in held:
                s.close()
    # descriptors free again: new clients are accepted (within the retry delay)
    deadline = time.monotonic() + 10
    while True:
        try:
            with connect(lb.port) as s:
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert read_response(s)[0] == 200
                break
        except (OSError, AssertionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    # (the admin API shares the descriptor limit: asked only now)
    assert lb.status()["listeners"][0]["accept_errors"] > 0
    assert lb.log_text().count("accept failed") <= 10


RESPONSE_HEAD_FORMS = {
    # backend head -> (status line the client must see, lines it must see, lines it must not)
    "plain keep-alive": (
        b"HTTP/1.1 200 OK\r\nServer: t\r\nConnection: keep-alive\r\nContent-Length: 5\r\n"
        b"X-A: 1\r\n\r\nhello",
        b"HTTP/1.1 200 OK",
        [b"server: t", b"content-length: 5", b"x-a: 1"],
        [b"connection: keep-alive"],
    ),
    "odd case Connection": (
        b"HTTP/1.1 200 OK\r\nCONNECTION:  Keep-Alive \r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK",
        [b"content-length: 5"],
        [b"connection:  keep-alive "],
    ),
    "backend closes": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
        b"HTTP/1.1 200 OK",
        [b"content-length: 5"],
        [b"connection: close"],
    ),
    "HTTP/1.0 backend": (
        b"HTTP/1.0 200 OK\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\nhello",
        b"HTTP/1.1 200 OK",
        [b"content-length: 5"],
        [],
    ),
    "empty reason": (
        b"HTTP/1.1 201 \r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 201 -",
        [b"content-length: 5"],
        [],
    ),
    "Keep-Alive and Trailer headers": (
        b"HTTP/1.1 200 OK\r\nKeep-Alive: timeout=5\r\nTrailer: x\r\nContent-Length: 5\r\n"
        b"X-B: 2\r\n\r\nhello",
        b"HTTP/1.1 200 OK",
        [b"content-length: 5", b"x-b: 2"],
        [b"keep-alive: timeout=5", b"trailer: x"],
    ),
    "two Connection lines": (
        b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 5\r\n"
        b"Connection: x-hop\r\nX-Hop: 1\r\n\r\nhello",
        b"HTTP/1.1 200 OK",
        [b"content-length: 5"],
        [b"x-hop: 1"],
    ),
}


@pytest.mark.parametrize("form", list(RESPONSE_HEAD_FORMS))
def test_response_heads_are_forwarded_with_hop_by_hop_lines_removed(procs, form):
    answer, status_line, present, absent = RESPONSE_HEAD_FORMS[form]
    backend = ScriptedBackend(answer)
    try:
        lb = procs.balancer(config([("b", backend.port)]))
        with connect(lb.port) as s:
            for _ in range(3):  # keep-alive to the client whatever the backend's connection
                s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                status, head, body = read_response(s)
                assert body == b"hello"
                lines = head.split(b"\r\n")
                assert lines[0] == status_line
                lower = [ln.lower() for ln in lines[1:]]
                for want in present:
                    assert want in lower, (form, head)
                for unwanted in absent:
                    assert unwanted not in lower, (form, head)
                assert not any(ln.startswith(b"connection:") for ln in lower), head
    finally:
        backend.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nContent-Length: 5x\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\nBad Header: 1\r\nContent-Length: 5\r\n\r\nhello",
        b"HTTP/1.1 2000 OK\r\nContent-Length: 5\r\n\r\nhello",
    ],
)
def test_invalid_response_heads_get_502_never_forwarded(procs, answer):
    backend = ScriptedBackend(answer)
    try:
        lb = procs.balancer(config([("b", backend.port)], pool={"retries": 0}))
        with connect(lb.port) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            status, head, body = read_response(s)
            assert status == 502, head
            assert b"hello" not in body
    finally:
        backend.close()


def test_half_closed_client_still_gets_its_answers(procs):
    port, record = procs.raw_backend("a")
    lb = procs.balancer(config([("a", port)]))
    with connect(lb.port) as s:
        s.sendall(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\nGET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
        s.shutdown(socket.SHUT_WR)  # "that's all I have to say" (nc -N, scripted clients)
        first = read_response(s)
        second = read_response(s)
        assert first[0] == 200 and second[0] == 200
        assert closed_by_peer(s)  # then the balancer closes its side too
    with connect(lb.port) as s:
        s.sendall(b"GET /1 HTTP/1.1\r\nHost: x\r\n\r\n")
        s.shutdown(socket.SHUT_WR)
        status, head, _ = read_response(s)
        assert status == 200 and b"connection: close" in head.lower()
        assert closed_by_peer(s)
    # a request cut short by the half-close can never complete: closed at once, unanswered
    before = len(record.read_bytes())
    with connect(lb.port) as s:
        s.sendall(b"POST /3 HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")
        s.shutdown(socket.SHUT_WR)
        t0 = time.monotonic()
        assert s.recv(65536) == b""
        assert time.monotonic() - t0 < 1
    time.sleep(0.1)
    assert b"POST /3" not in record.read_bytes()[before:]
