"""The demo backend as a real process: every endpoint, the CLI, signals, and bounded memory."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

from balancer.demo.backend import PATTERN, SessionStore, build_app, parse_duration

REPO = Path(__file__).resolve().parents[2]
READY_TIMEOUT = 15.0
HTTP_TIMEOUT = 10.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Backend:
    proc: subprocess.Popen[str]
    port: int
    name: str
    ready_line: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
        assert m, status
        return int(m.group(1))


def _read_ready_line(proc: subprocess.Popen[str], timeout: float) -> str:
    assert proc.stdout is not None
    sel = selectors.DefaultSelector()
    sel.register(proc.stdout, selectors.EVENT_READ)
    try:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            if sel.select(left):
                line = proc.stdout.readline()
                if not line:
                    raise AssertionError(f"backend exited before ready, rc={proc.wait(5)}")
                return line.rstrip("\n")
        raise AssertionError("backend printed no ready line in time")
    finally:
        sel.close()


def _stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)


def start_backend(*args: str, port: int | None = None, via_cli: bool = False) -> Backend:
    """Start `python -m balancer.demo.backend` (or `python -m balancer demo-backend`) and wait,
    bounded in time, for its ready line."""
    port = free_port() if port is None else port
    module = ["balancer", "demo-backend"] if via_cli else ["balancer.demo.backend"]
    cmd = [sys.executable, "-m", *module, "--port", str(port), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        line = _read_ready_line(proc, READY_TIMEOUT)
    except BaseException:
        _stop(proc)
        raise
    m = re.fullmatch(r"demo-backend (\S+) listening on http://127\.0\.0\.1:(\d+)", line)
    if not m:
        _stop(proc)
        raise AssertionError(f"unexpected ready line {line!r}")
    return Backend(proc, int(m.group(2)), m.group(1), line)


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    b = start_backend("--name", "alpha")
    try:
        yield b
    finally:
        _stop(b.proc)


def visits_of(page: str) -> int:
    m = re.search(r'id="visits">(\d+)<', page)
    assert m, page
    return int(m.group(1))


def raw_exchange(port: int, request: bytes, timeout: float = HTTP_TIMEOUT) -> bytes:
    """Send `request` as is and read until the server closes (bounded in time)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
        else:
            raise AssertionError("server did not close the connection in time")
    return b"".join(chunks)


def split_response(data: bytes) -> tuple[str, dict[str, list[str]], bytes]:
    head, sep, body = data.partition(b"\r\n\r\n")
    assert sep, data[:200]
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, list[str]] = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers.setdefault(k.strip().lower(), []).append(v.strip())
    return lines[0], headers, body


def pattern_bytes(n: int) -> bytes:
    return (PATTERN * (n // len(PATTERN) + 1))[:n]


# ---------------------------------------------------------------------------------------------
# CLI and lifecycle
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_ready_line_default_name_and_clean_exit_on_signal(sig: signal.Signals) -> None:
    port = free_port()
    b = start_backend(port=port)
    try:
        assert b.ready_line == f"demo-backend app-{port} listening on http://127.0.0.1:{port}"
        r = requests.get(b.url + "/", timeout=HTTP_TIMEOUT)
        assert r.headers["X-Backend-Name"] == f"app-{port}"
        assert f"app-{port}" in r.text
        os.kill(b.proc.pid, sig)
        assert b.proc.wait(timeout=10) == 0
        assert b.proc.stdout is not None and b.proc.stdout.read() == ""  # one line, no more
    finally:
        _stop(b.proc)


def test_balancer_cli_runs_the_same_server() -> None:
    b = start_backend("--name", "via-cli", via_cli=True)
    try:
        assert b.name == "via-cli"
        assert requests.get(b.url + "/healthz", timeout=HTTP_TIMEOUT).json()["name"] == "via-cli"
        os.kill(b.proc.pid, signal.SIGTERM)
        assert b.proc.wait(timeout=10) == 0
    finally:
        _stop(b.proc)


def test_signal_exits_promptly_with_a_request_in_flight() -> None:
    b = start_backend()
    try:
        t = threading.Thread(target=_get_ignoring_errors, args=(b.url + "/products?delay=30",))
        t.start()
        _wait_for(lambda: _healthz(b)["inflight"] == 1, "request in flight")
        started = time.monotonic()
        os.kill(b.proc.pid, signal.SIGTERM)
        assert b.proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
        t.join(timeout=10)
    finally:
        _stop(b.proc)


def _get_ignoring_errors(url: str) -> None:
    # The server is stopped under this request; how the client sees that is not the point here.
    with contextlib.suppress(requests.RequestException):
        requests.get(url, timeout=HTTP_TIMEOUT)


def test_cli_knobs_latency_and_capacity() -> None:
    b = start_backend("--name", "knobbed", "--latency", "300ms", "--capacity", "4")
    try:
        started = time.monotonic()
        r = requests.get(b.url + "/products", timeout=HTTP_TIMEOUT)
        assert r.status_code == 200
        assert time.monotonic() - started >= 0.3
        threads = [
            threading.Thread(
                target=requests.get, args=(b.url + "/products?delay=1.5",), kwargs={"timeout": 10}
            )
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        try:
            # /healthz itself waits the 300 ms latency too, but is never counted.
            _wait_for(lambda: _healthz(b)["inflight"] == 2, "two requests in flight")
            assert _healthz(b)["load"] == 0.5
        finally:
            for t in threads:
                t.join(timeout=10)
    finally:
        _stop(b.proc)


def test_cli_rejects_bad_arguments_and_busy_port() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    base = [sys.executable, "-m", "balancer.demo.backend"]
    for bad in (
        [],
        ["--port", "x"],
        ["--port", "1", "--latency", "soon"],
        ["--port", "1", "--capacity", "0"],
    ):
        p = subprocess.run(
            base + bad, cwd=REPO, env=env, capture_output=True, text=True, timeout=30
        )
        assert p.returncode == 2, (bad, p.stderr)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        busy = s.getsockname()[1]
        p = subprocess.run(
            base + ["--port", str(busy)],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=30,
        )
    assert p.returncode == 1
    assert "cannot listen" in p.stderr
    assert p.stdout == ""


def test_parse_duration() -> None:
    assert parse_duration("50ms") == pytest.approx(0.05)
    assert parse_duration("2s") == 2.0
    assert parse_duration("1.5s") == 1.5
    assert parse_duration("1m") == 60.0
    assert parse_duration("1h30m") == 5400.0
    assert parse_duration("0") == 0.0
    with pytest.raises(ValueError):
        parse_duration("50")  # a bare number is ambiguous, as in the config file
    with pytest.raises(ValueError):
        parse_duration("-1s")
    with pytest.raises(ValueError):
        parse_duration("5 parsecs")


def test_build_app_rejects_bad_options() -> None:
    with pytest.raises(ValueError):
        build_app("x", capacity=0)
    with pytest.raises(ValueError):
        build_app("x", latency=-1)


def test_session_store_is_capped_lru() -> None:
    store = SessionStore(cap=3)
    ids = [store.get_or_create(None)[0] for _ in range(3)]
    assert store.get(ids[0]) is not None  # touch: ids[1] is now the least recently used
    store.get_or_create(None)
    assert len(store) == 3
    assert store.get(ids[1]) is None
    assert store.get(ids[0]) is not None and store.get(ids[2]) is not None
    # A well-formed id from elsewhere (another server's cookie) is adopted, a junk one replaced.
    sid, _, cookie_needed = store.get_or_create("fromAnotherServer_123")
    assert (sid, cookie_needed) == ("fromAnotherServer_123", False)
    sid, _, cookie_needed = store.get_or_create("bad id;")
    assert sid != "bad id;" and cookie_needed


# ---------------------------------------------------------------------------------------------
# The page and its per-session counter
# ---------------------------------------------------------------------------------------------


def test_page_names_server_and_counts_visits_per_session(backend: Backend) -> None:
    a, b = requests.Session(), requests.Session()
    r = a.get(backend.url + "/", timeout=HTTP_TIMEOUT)
    assert r.status_code == 200
    assert r.headers["Content-Type"].startswith("text/html")
    assert r.headers["X-Backend-Name"] == "alpha"
    assert ">alpha<" in r.text and f">{backend.port}<" in r.text
    assert "sticky sessions" in r.text
    assert "<script" not in r.text and "http://" not in r.text and "https://" not in r.text
    assert "demo_session" in r.cookies
    assert visits_of(r.text) == 1
    r = a.get(backend.url + "/", timeout=HTTP_TIMEOUT)
    assert visits_of(r.text) == 2
    assert "Set-Cookie" not in r.headers  # the cookie is set once, on the first visit
    assert visits_of(b.get(backend.url + "/", timeout=HTTP_TIMEOUT).text) == 1
    assert a.cookies["demo_session"] != b.cookies["demo_session"]
    assert visits_of(a.get(backend.url + "/", timeout=HTTP_TIMEOUT).text) == 3
    assert visits_of(b.get(backend.url + "/", timeout=HTTP_TIMEOUT).text) == 2


def test_session_from_another_server_starts_from_one(backend: Backend) -> None:
    cookies = {"demo_session": "madeByAnotherServer42"}
    r = requests.get(backend.url + "/", cookies=cookies, timeout=HTTP_TIMEOUT)
    assert visits_of(r.text) == 1
    assert "Set-Cookie" not in r.headers
    r = requests.get(backend.url + "/", cookies=cookies, timeout=HTTP_TIMEOUT)
    assert visits_of(r.text) == 2


def test_name_is_escaped_in_page() -> None:
    b = start_backend("--name", "<b>x&y</b>")
    try:
        r = requests.get(b.url + "/", timeout=HTTP_TIMEOUT)
        assert "&lt;b&gt;x&amp;y&lt;/b&gt;" in r.text and "<b>x" not in r.text
    finally:
        _stop(b.proc)


# ---------------------------------------------------------------------------------------------
# Health, load, and the controls
# ---------------------------------------------------------------------------------------------


def _healthz(b: Backend) -> dict:
    r = requests.get(b.url + "/healthz", timeout=HTTP_TIMEOUT)
    body = r.json()
    assert float(r.headers["X-Backend-Load"]) == body["load"]
    body["_status"] = r.status_code
    return body


def _wait_for(cond, what: str, timeout: float = 5.0) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_healthz_idle(backend: Backend) -> None:
    r = requests.get(backend.url + "/healthz", timeout=HTTP_TIMEOUT)
    assert r.status_code == 200
    assert r.json() == {"status": "ok", "name": "alpha", "load": 0.0, "inflight": 0}
    assert r.headers["X-Backend-Load"] == "0.0"
    assert r.headers["X-Backend-Name"] == "alpha"


def test_healthz_load_rises_with_requests_in_flight(backend: Backend) -> None:
    results: list[int] = []
    threads = [
        threading.Thread(
            target=lambda: results.append(
                requests.get(backend.url + "/products?delay=2", timeout=10).status_code
            )
        )
        for _ in range(5)
    ]
    for t in threads:
        t.start()
    try:
        _wait_for(lambda: _healthz(backend)["inflight"] == 5, "five requests in flight")
        h = _healthz(backend)
        assert h["load"] == 0.5 and h["inflight"] == 5 and h["_status"] == 200
    finally:
        for t in threads:
            t.join(timeout=10)
    assert results == [200] * 5
    _wait_for(lambda: _healthz(backend)["inflight"] == 0, "requests to finish")
    assert _healthz(backend)["load"] == 0.0


def test_control_health_flips_healthz(backend: Backend) -> None:
    url = backend.url + "/_control/health"
    try:
        r = requests.post(url, json={"healthy": False}, timeout=HTTP_TIMEOUT)
        assert r.status_code == 200
        for _ in range(3):  # stays down until set back
            h = _healthz(backend)
            assert h["_status"] == 503 and h["status"] == "unhealthy" and h["name"] == "alpha"
        assert requests.get(backend.url + "/products", timeout=HTTP_TIMEOUT).status_code == 200
    finally:
        requests.post(url, json={"healthy": True}, timeout=HTTP_TIMEOUT)
    h = _healthz(backend)
    assert h["_status"] == 200 and h["status"] == "ok"


def test_control_load_pins_and_unpins(backend: Backend) -> None:
    url = backend.url + "/_control/load"
    try:
        assert requests.post(url, json={"load": 0.9}, timeout=HTTP_TIMEOUT).status_code == 200
        r = requests.get(backend.url + "/healthz", timeout=HTTP_TIMEOUT)
        assert r.json()["load"] == 0.9 and r.headers["X-Backend-Load"] == "0.9"
        assert requests.post(url, json={"load": 2}, timeout=HTTP_TIMEOUT).status_code == 200
        assert _healthz(backend)["load"] == 2.0
    finally:
        requests.post(url, json={"load": None}, timeout=HTTP_TIMEOUT)
    assert _healthz(backend)["load"] == 0.0


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/_control/health", b"not json"),
        ("/_control/health", b'{"healthy": "no"}'),
        ("/_control/health", b"[1]"),
        ("/_control/load", b"{}"),
        ("/_control/load", b'{"load": -1}'),
        ("/_control/load", b'{"load": "high"}'),
        ("/_control/load", b'{"load": true}'),
    ],
)
def test_control_rejects_bad_bodies(backend: Backend, path: str, body: bytes) -> None:
    r = requests.post(
        backend.url + path,
        data=body,
        headers={"Content-Type": "application/json"},
        timeout=HTTP_TIMEOUT,
    )
    assert r.status_code == 400
    h = _healthz(backend)
    assert h["_status"] == 200 and h["load"] == 0.0


# ---------------------------------------------------------------------------------------------
# Per-request knobs
# ---------------------------------------------------------------------------------------------


def test_delay_and_cpu_knobs(backend: Backend) -> None:
    started = time.monotonic()
    assert requests.get(backend.url + "/healthz?delay=0.3", timeout=HTTP_TIMEOUT).ok
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()  # a duration, as for --latency and in the config
    assert requests.get(backend.url + "/healthz?delay=300ms", timeout=HTTP_TIMEOUT).ok
    assert time.monotonic() - started >= 0.3
    started = time.monotonic()
    r = requests.get(backend.url + "/echo?cpu=250", timeout=HTTP_TIMEOUT)
    assert r.ok and time.monotonic() - started >= 0.25
    for bad in (
        "delay=abc",
        "delay=-1",
        "delay=nan",
        "cpu=1e9",
        "delay=inf",
        "delay=2h",
        "delay=1x",
    ):
        r = requests.get(f"{backend.url}/products?{bad}", timeout=HTTP_TIMEOUT)
        assert r.status_code == 400, bad


# ---------------------------------------------------------------------------------------------
# /echo
# ---------------------------------------------------------------------------------------------


def test_echo_preserves_raw_path_query_and_duplicate_headers(backend: Backend) -> None:
    target = "/echo/a%2Fb/./c%20d?q=%20x&q=2&empty&x=%zz"
    req = (
        f"PATCH {target} HTTP/1.1\r\n"
        f"Host: 127.0.0.1:{backend.port}\r\n"
        "X-Dup: one\r\n"
        "x-other: middle\r\n"
        "X-Dup: two\r\n"
        "Cookie: a=1\r\n"
        "Cookie: b=2\r\n"
        "Content-Length: 5\r\n"
        "Connection: close\r\n"
        "\r\n"
        "hello"
    ).encode()
    status, headers, body = split_response(raw_exchange(backend.port, req))
    assert status.startswith("HTTP/1.1 200")
    assert headers["x-backend-name"] == ["alpha"]
    echoed = json.loads(body)
    assert echoed["server"] == "alpha"
    assert echoed["method"] == "PATCH"
    assert echoed["path"] == target
    assert echoed["http_version"] == "1.1"
    assert echoed["headers"] == [
        ["Host", f"127.0.0.1:{backend.port}"],
        ["X-Dup", "one"],
        ["x-other", "middle"],
        ["X-Dup", "two"],
        ["Cookie", "a=1"],
        ["Cookie", "b=2"],
        ["Content-Length", "5"],
        ["Connection", "close"],
    ]
    assert echoed["body_length"] == 5
    assert echoed["body_sha256"] == hashlib.sha256(b"hello").hexdigest()


@pytest.mark.parametrize(
    "target",
    ["/echo?", "/echo//double//slash?a=b+c", "/echo/%7Euser/../x?a=%41&b=%2f#frag", "/echo?&&=&"],
)
def test_echo_path_is_byte_exact(backend: Backend, target: str) -> None:
    # "/echo?" is the case a parsed-and-reserialised URL loses: the empty query vanishes.
    req = f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    _, _, body = split_response(raw_exchange(backend.port, req))
    assert json.loads(body)["path"] == target


@pytest.mark.parametrize("method", ["GET", "DELETE", "OPTIONS", "PUT"])
def test_echo_any_method_any_subpath(backend: Backend, method: str) -> None:
    r = requests.request(method, backend.url + "/echo-this/too", timeout=HTTP_TIMEOUT)
    assert r.status_code == 200
    e = r.json()
    assert (e["method"], e["path"], e["body_length"]) == (method, "/echo-this/too", 0)
    assert e["body_sha256"] == hashlib.sha256(b"").hexdigest()


def test_echo_http_10(backend: Backend) -> None:
    req = b"GET /echo HTTP/1.0\r\nHost: x\r\n\r\n"
    _, _, body = split_response(raw_exchange(backend.port, req))
    assert json.loads(body)["http_version"] == "1.0"


class PatternBody:
    """A file-like upload body of `n` pattern bytes, made as it is read, never held whole."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.sent = 0
        self.digest = hashlib.sha256()

    def __len__(self) -> int:
        return self.n

    def read(self, size: int = -1) -> bytes:
        size = 65536 if size is None or size < 0 else min(size, 65536)
        # Offsets are kept aligned to the pattern so the bytes are the same as pattern_bytes(n).
        chunk = PATTERN[self.sent % len(PATTERN) :][:size]
        chunk = chunk[: self.n - self.sent]
        self.sent += len(chunk)
        self.digest.update(chunk)
        return chunk


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_large_upload_hashes_in_bounded_memory(backend: Backend, framing: str) -> None:
    n = 50 * 1024 * 1024 + 17
    # Warm up first so one-time allocations are not counted as growth.
    requests.post(backend.url + "/echo", data=b"x" * 100_000, timeout=HTTP_TIMEOUT)
    before = backend.rss_kib()
    body = PatternBody(n)
    # A generator makes requests send chunked; a sized file-like, a Content-Length.
    data = iter(lambda: body.read(65536), b"") if framing == "chunked" else body
    # Sampled during the upload too: a body held whole and freed at the end would be gone
    # again by the time "after" is read.
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.01):
            peak = max(peak, backend.rss_kib())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        r = requests.post(backend.url + "/echo/upload", data=data, timeout=60)
    finally:
        done.set()
        sampler.join(timeout=10)
    after = backend.rss_kib()
    assert r.status_code == 200
    e = r.json()
    names = [k.lower() for k, _ in e["headers"]]
    assert ("transfer-encoding" in names) == (framing == "chunked")
    assert body.sent == n
    assert e["body_length"] == n
    assert e["body_sha256"] == body.digest.hexdigest()
    assert after - before < 30 * 1024, f"RSS grew by {(after - before) // 1024} MiB"
    assert peak - before < 30 * 1024, f"RSS peaked {(peak - before) // 1024} MiB above start"


# ---------------------------------------------------------------------------------------------
# Downloads, statuses, and broken responses
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("n", [0, 1, 65536, 5 * 1024 * 1024 + 123])
def test_bytes_streams_the_pattern(backend: Backend, n: int, chunked: bool) -> None:
    url = f"{backend.url}/bytes?n={n}" + ("&chunked=1" if chunked else "")
    digest = hashlib.sha256()
    got = 0
    with requests.get(url, stream=True, timeout=HTTP_TIMEOUT) as r:
        assert r.status_code == 200
        assert r.headers["X-Backend-Name"] == "alpha"
        if chunked:
            assert r.headers["Transfer-Encoding"] == "chunked"
            assert "Content-Length" not in r.headers
        else:
            assert r.headers["Content-Length"] == str(n)
        for chunk in r.iter_content(65536):
            digest.update(chunk)
            got += len(chunk)
    assert got == n
    assert digest.hexdigest() == hashlib.sha256(pattern_bytes(n)).hexdigest()


def test_bytes_rejects_bad_n(backend: Backend) -> None:
    for q in ("", "?n=-1", "?n=abc"):
        assert requests.get(backend.url + "/bytes" + q, timeout=HTTP_TIMEOUT).status_code == 400


@pytest.mark.parametrize("code", [200, 201, 301, 404, 418, 500, 502, 503])
def test_status_with_body(backend: Backend, code: int) -> None:
    r = requests.get(f"{backend.url}/status/{code}", allow_redirects=False, timeout=HTTP_TIMEOUT)
    assert r.status_code == code
    assert r.headers["X-Backend-Name"] == "alpha"
    assert r.content == f"status {code}\n".encode()


@pytest.mark.parametrize("code", [204, 304])
def test_status_without_body(backend: Backend, code: int) -> None:
    # Raw, with Connection: close, so any stray body bytes would show up after the head.
    req = f"GET /status/{code} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
    status, headers, body = split_response(raw_exchange(backend.port, req))
    assert status.startswith(f"HTTP/1.1 {code}")
    assert body == b""
    assert headers.get("content-length", ["0"]) == ["0"]


def test_status_out_of_range(backend: Backend) -> None:
    assert requests.get(backend.url + "/status/099", timeout=HTTP_TIMEOUT).status_code == 400
    assert requests.get(backend.url + "/status/600", timeout=HTTP_TIMEOUT).status_code == 400


def test_slow_body_stalls_inside_the_body(backend: Backend) -> None:
    n = 1000
    started = time.monotonic()
    with requests.get(f"{backend.url}/slow-body?n={n}&pause=1", stream=True, timeout=5) as r:
        assert r.status_code == 200
        assert "Content-Length" not in r.headers
        first = r.raw.read(n)
        first_at = time.monotonic() - started
        rest = r.raw.read()
        end_at = time.monotonic() - started
    assert first == pattern_bytes(n) and rest == b""
    assert first_at < 0.8
    assert end_at >= 1.0


def test_close_mid_body_really_closes_early(backend: Backend) -> None:
    n = 200_000
    req = f"GET /close-mid-body?n={n} HTTP/1.1\r\nHost: x\r\n\r\n".encode()  # keep-alive asked
    started = time.monotonic()
    status, headers, body = split_response(raw_exchange(backend.port, req))
    assert time.monotonic() - started < 5
    assert status.startswith("HTTP/1.1 200")
    assert headers["content-length"] == [str(2 * n)]
    assert body == pattern_bytes(n)  # exactly the first half, then the connection is gone
    # And the server is fine afterwards.
    assert requests.get(backend.url + "/healthz", timeout=HTTP_TIMEOUT).status_code == 200


def test_close_mid_body_delivers_the_whole_first_half_to_a_slow_reader(backend: Backend) -> None:
    # Big enough that the socket buffers fill and the server waits on this reader, and ending
    # in a small piece that aiohttp writes without waiting for a drain: all n bytes must still
    # arrive, and then the close, never the second half.
    n = 4 * 1024 * 1024 + 1000
    req = f"GET /close-mid-body?n={n} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
    digest = hashlib.sha256()
    received = 0
    with socket.create_connection(("127.0.0.1", backend.port), timeout=HTTP_TIMEOUT) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        s.sendall(req)
        time.sleep(0.5)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(4096)
            assert chunk, "closed before the head"
            head += chunk
        head, _, rest = head.partition(b"\r\n\r\n")
        assert f"Content-Length: {2 * n}".encode() in head
        digest.update(rest)
        received += len(rest)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(16384)
            except ConnectionResetError:
                break
            if not chunk:
                break
            digest.update(chunk)
            received += len(chunk)
            time.sleep(0.001)  # a slow reader, so the server waits on us
        else:
            raise AssertionError("connection not closed in time")
    assert received == n
    assert digest.hexdigest() == hashlib.sha256(pattern_bytes(n)).hexdigest()


def test_close_mid_body_is_an_error_to_a_client(backend: Backend) -> None:
    with pytest.raises(requests.exceptions.ChunkedEncodingError):
        requests.get(backend.url + "/close-mid-body?n=1000", timeout=HTTP_TIMEOUT)


def test_set_cookie_sends_two_headers(backend: Backend) -> None:
    req = b"GET /set-cookie HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    status, headers, _ = split_response(raw_exchange(backend.port, req))
    assert status.startswith("HTTP/1.1 200")
    assert [c.split(";")[0] for c in headers["set-cookie"]] == ["app_a=1", "app_b=2"]


def test_every_response_names_the_backend(backend: Backend) -> None:
    for path in ("/no/such/page", "/products/999", "/status/500", "/bytes?n=3"):
        r = requests.get(backend.url + path, timeout=HTTP_TIMEOUT)
        assert r.headers["X-Backend-Name"] == "alpha", path
    r = requests.post(backend.url + "/products", timeout=HTTP_TIMEOUT)
    assert r.status_code == 405 and r.headers["X-Backend-Name"] == "alpha"


def test_large_request_headers_are_accepted(backend: Backend) -> None:
    # The balancer's own header limit is 64 KiB; the backend must not refuse below that.
    r = requests.get(backend.url + "/echo", headers={"X-Big": "v" * 30_000}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 200
    assert ["X-Big", "v" * 30_000] in r.json()["headers"]


# ---------------------------------------------------------------------------------------------
# The shop
# ---------------------------------------------------------------------------------------------


def test_shop_session_flow(backend: Backend) -> None:
    s = requests.Session()
    r = s.post(backend.url + "/login", json={"user": "ada"}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 200 and r.json() == {"server": "alpha", "user": "ada"}
    assert "demo_session" in s.cookies
    products = s.get(backend.url + "/products", timeout=HTTP_TIMEOUT).json()["products"]
    assert len(products) >= 5 and {"id", "name", "price_cents"} <= set(products[0])
    p = products[2]
    assert s.get(f"{backend.url}/products/{p['id']}", timeout=HTTP_TIMEOUT).json()["product"] == p
    assert s.get(backend.url + "/products/99999", timeout=HTTP_TIMEOUT).status_code == 404
    r = s.post(backend.url + "/cart", json={"product_id": p["id"], "quantity": 2}, timeout=10)
    assert r.status_code == 200
    s.post(backend.url + "/cart", data={"product_id": str(p["id"])}, timeout=HTTP_TIMEOUT)
    s.post(backend.url + "/cart", json={"product_id": products[0]["id"]}, timeout=HTTP_TIMEOUT)
    cart = s.get(backend.url + "/cart", timeout=HTTP_TIMEOUT).json()
    assert cart["user"] == "ada" and cart["server"] == "alpha"
    assert {i["product_id"]: i["quantity"] for i in cart["items"]} == {
        p["id"]: 3,
        products[0]["id"]: 1,
    }
    assert cart["total_cents"] == 3 * p["price_cents"] + products[0]["price_cents"]
    # Another visitor, or the same one without the cookie, has an empty cart on this server.
    other = requests.get(backend.url + "/cart", timeout=HTTP_TIMEOUT).json()
    assert other["items"] == [] and other["user"] is None


def test_shop_form_login_and_bad_input(backend: Backend) -> None:
    s = requests.Session()
    r = s.post(backend.url + "/login", data={"user": "bob"}, timeout=HTTP_TIMEOUT)
    assert r.json()["user"] == "bob"
    assert s.post(backend.url + "/login", json={}, timeout=HTTP_TIMEOUT).status_code == 400
    assert (
        s.post(backend.url + "/login", json={"user": ""}, timeout=HTTP_TIMEOUT).status_code == 400
    )
    assert s.post(backend.url + "/cart", json={"product_id": "x"}, timeout=10).status_code == 400
    assert s.post(backend.url + "/cart", json={"product_id": 99999}, timeout=10).status_code == 404
    r = s.post(backend.url + "/cart", json={"product_id": 1, "quantity": 0}, timeout=10)
    assert r.status_code == 400
    assert s.get(backend.url + "/cart", timeout=HTTP_TIMEOUT).json()["items"] == []


def test_cart_without_login_sets_a_session(backend: Backend) -> None:
    s = requests.Session()
    r = s.post(backend.url + "/cart", json={"product_id": 1}, timeout=HTTP_TIMEOUT)
    assert r.status_code == 200 and "demo_session" in s.cookies
    cart = s.get(backend.url + "/cart", timeout=HTTP_TIMEOUT).json()
    assert cart["items"][0]["product_id"] == 1 and cart["user"] is None
