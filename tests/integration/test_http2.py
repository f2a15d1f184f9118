"""HTTP/2 to clients against real processes: ALPN on TLS, streams balanced like HTTP/1.1
requests, flow control, errors as HTTP/2 answers, graceful GOAWAY, and curl as a real client."""

from __future__ import annotations

import json
import re
import shutil
import signal
import ssl
import subprocess
import time

import pytest
import trustme

from tests.integration.h2peer import H2Peer
from tests.integration.harness import Balancer, Processes, config, rss_kib
from tests.integration.test_tls import write_cert
from tests.support import missing_tool


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


def tls_client(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(ctx)
    return ctx


def h2_balancer(
    procs: Processes, ca: trustme.CA, backends: list[tuple[str, int]], **kw
) -> Balancer:  # type: ignore[no-untyped-def]
    pool = kw.pop("pool", None)
    cfg = config(backends, pool=pool, **kw)
    cert = ca.issue_cert("localhost", "127.0.0.1")
    cfg["listeners"][0]["tls"] = {"certificates": [write_cert(cert, procs.tmp, "site")]}
    ca.cert_pem.write_to_path(str(procs.tmp / "ca.pem"))
    return procs.balancer(cfg)


def curl(procs: Processes, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["curl", "-s", "--cacert", str(procs.tmp / "ca.pem"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_browser_style_client_gets_h2_by_alpn_and_streams_rotate(procs, ca):
    b1, b2 = procs.demo_backend("app1"), procs.demo_backend("app2")
    lb = h2_balancer(procs, ca, [("app1", b1), ("app2", b2)])
    url = f"https://localhost:{lb.port}/"
    out = curl(
        procs,
        "-v",
        "--http2",
        url,
        url,
        url,
        url,
        "-o",
        "/dev/null",
        "-o",
        "/dev/null",
        "-o",
        "/dev/null",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version} %{http_code}\n",
    )
    assert out.stdout.split("\n")[:4] == ["2 200"] * 4, out
    assert "ALPN: server accepted h2" in out.stderr
    assert "Re-using existing connection" in out.stderr  # four streams, one connection
    names = [line.split(": ")[1] for line in out.stderr.splitlines() if "x-backend-name" in line]
    assert names == ["app1", "app2", "app1", "app2"], names
    # an HTTP/1.1-only client on the same listener still gets HTTP/1.1
    old = curl(procs, "--http1.1", url, "-o", "/dev/null", "-w", "%{http_version}")
    assert old.stdout == "1.1"


def test_streams_multiplex_with_bodies_and_reach_backends_as_http1(procs, ca):
    b1 = procs.demo_backend("app1")
    lb = h2_balancer(procs, ca, [("app1", b1)])
    peer = H2Peer(lb.port, tls=tls_client(ca))
    try:
        sized = b"x" * 100_000
        ids = {
            "get": peer.request("/echo?q=1"),
            "sized": peer.request(
                "/echo", method="POST", headers=[("content-length", str(len(sized)))], body=sized
            ),
            "unsized": peer.request("/echo", method="POST", body=b"hello" * 5000),
            "cookies": peer.request(
                "/echo", headers=[("cookie", "a=1"), ("cookie", "b=2"), ("te", "trailers")]
            ),
        }
        results = {k: peer.wait(sid) for k, sid in ids.items()}
        for k, r in results.items():
            assert r.status == 200 and r.ended, (k, r)
        seen = {k: json.loads(r.body) for k, r in results.items()}
        assert seen["sized"]["body_length"] == 100_000
        assert seen["unsized"]["body_length"] == 25_000
        get_headers = {n.lower(): v for n, v in seen["get"]["headers"]}
        assert get_headers["host"] == f"localhost:{lb.port}"
        assert get_headers["x-forwarded-proto"] == "https"
        assert get_headers["x-forwarded-for"] == "127.0.0.1"
        cookie_headers = {n.lower(): v for n, v in seen["cookies"]["headers"]}
        assert cookie_headers["cookie"] == "a=1; b=2"  # RFC 9113 8.2.3: joined for HTTP/1.1
        assert "te" not in cookie_headers
        assert peer.remote_settings.get(3) == 100  # SETTINGS_MAX_CONCURRENT_STREAMS
    finally:
        peer.close()
    time.sleep(0.6)  # the access log is flushed a few times a second
    assert '"GET /echo?q=1 HTTP/2.0" 200' in lb.log_text()


def test_errors_are_http2_answers_and_the_connection_lives_on(procs, ca):
    b1 = procs.demo_backend("app1")
    lb = h2_balancer(procs, ca, [("app1", b1)], limits={"max_body_bytes": 1000})
    peer = H2Peer(lb.port, tls=tls_client(ca))
    try:
        big = peer.get("/echo", method="POST", body=b"x" * 5000)
        assert big.status == 413
        huge = peer.get("/", headers=[("x-big", "v" * 70_000)])
        assert huge.status == 431
        many = peer.get("/", headers=[(f"x-h{i}", "1") for i in range(150)])
        assert many.status == 431
        assert lb.admin("/pools/web/backends/app1", "PATCH", {"state": "disabled"})[0] == 200
        assert peer.get("/").status == 503
        assert lb.admin("/pools/web/backends/app1", "PATCH", {"state": "up"})[0] == 200
        ok = peer.get("/healthz")
        assert ok.status == 200 and not peer.closed
    finally:
        peer.close()


def test_sticky_cookie_pins_h2_streams(procs, ca):
    b1, b2 = procs.demo_backend("app1"), procs.demo_backend("app2")
    lb = h2_balancer(procs, ca, [("app1", b1), ("app2", b2)], pool={"sticky": {"cookie": "LB"}})
    peer = H2Peer(lb.port, tls=tls_client(ca))
    try:
        first = peer.get("/")
        cookies = [v for n, v in first.headers if n == b"set-cookie" and v.startswith(b"LB=")]
        assert len(cookies) == 1, first.headers
        cookie = cookies[0]
        pinned = first.header(b"x-backend-name")
        value = cookie.split(b";")[0].decode()
        for _ in range(4):
            again = peer.get("/", headers=[("cookie", value)])
            assert again.header(b"x-backend-name") == pinned
            assert not [v for n, v in again.headers if v.startswith(b"LB=")]
    finally:
        peer.close()


def test_large_download_in_bounded_memory_while_other_streams_are_served(procs, ca):
    b1 = procs.demo_backend("app1")
    lb = h2_balancer(procs, ca, [("app1", b1)])
    size = 256 * 1024 * 1024
    # a client that reads nothing of the big stream (no WINDOW_UPDATE for it): the balancer
    # must hold at most a bounded buffer, and the connection's other streams go on
    peer = H2Peer(lb.port, tls=tls_client(ca), auto_window=False, settings={4: 65535})
    try:
        base = rss_kib(lb.proc.pid)
        big = peer.request(f"/bytes?n={size}")
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            peer.pump()
        # the big stream has used up its own window; the connection gets credit to spare
        peer.conn.increment_flow_control_window(1 << 20)
        small = peer.request("/healthz")
        # credit only the small stream (and the connection) as its data arrives
        deadline = time.monotonic() + 10
        while not peer.streams[small].done and time.monotonic() < deadline:
            peer.pump()
        assert peer.streams[small].status == 200 and peer.streams[small].ended
        grown = rss_kib(lb.proc.pid) - base
        assert grown < 64 * 1024, f"balancer grew by {grown} KiB while a stream was stalled"
        assert not peer.streams[big].done
    finally:
        peer.close()
    # and a reading client gets the whole body
    out = curl(
        procs,
        "--http2",
        f"https://localhost:{lb.port}/bytes?n={size}",
        "-o",
        "/dev/null",
        "-w",
        "%{http_version} %{http_code} %{size_download}",
    )
    assert out.stdout == f"2 200 {size}", out


def test_stalled_stream_is_reset_after_client_idle(procs, ca):
    b1 = procs.demo_backend("app1")
    lb = h2_balancer(procs, ca, [("app1", b1)], timeouts={"client_idle": "2s"})
    peer = H2Peer(lb.port, tls=tls_client(ca), auto_window=False, settings={4: 1024})
    try:
        sid = peer.request("/bytes?n=1000000")
        r = peer.wait(sid, timeout=15)
        assert r.reset == 8, r  # CANCEL: the stream made no progress for client_idle
    finally:
        peer.close()


def test_sigterm_sends_goaway_and_finishes_streams_in_flight(procs, ca):
    b1 = procs.demo_backend("app1")
    lb = h2_balancer(procs, ca, [("app1", b1)])
    peer = H2Peer(lb.port, tls=tls_client(ca))
    try:
        slow = peer.request("/?delay=1.5")
        time.sleep(0.3)
        lb.proc.send_signal(signal.SIGTERM)
        r = peer.wait(slow, timeout=10)
        assert r.status == 200 and r.ended
        assert peer.goaway is not None and peer.goaway.error_code == 0
        assert peer.goaway.last_stream_id >= slow
        # a new stream after the GOAWAY is refused, not served (RFC 9113 6.8)
        late = peer.wait(peer.request("/"), timeout=5)
        assert late.reset == 7 or peer.closed, late  # REFUSED_STREAM
    finally:
        peer.close()  # as any client does once its streams are done
    assert lb.proc.wait(timeout=15) == 0


def test_backend_dying_mid_response_resets_only_that_stream(procs, ca):
    port, _ = procs.raw_backend("dies", "head-then-die")
    lb = h2_balancer(procs, ca, [("dies", port)], pool={"retries": 0})
    peer = H2Peer(lb.port, tls=tls_client(ca))
    try:
        r = peer.get("/")
        assert r.reset == 2, r  # INTERNAL_ERROR: a cut answer must not look complete
        assert len(r.body) < 100
        assert not peer.closed  # the connection and its other streams live on
    finally:
        peer.close()


def test_a_backends_upgrade_offer_is_left_out_not_an_error(procs, ca):
    """An HTTP/1.1 backend offering an upgrade on its answers (Apache with mod_http2 does):
    those fields are connection-specific, so the h2 answer leaves them out instead of the
    stream failing."""
    port, _ = procs.raw_backend("offer", "upgrade-offer")
    lb = h2_balancer(procs, ca, [("offer", port)])
    peer = H2Peer(lb.port, tls=tls_client(ca))
    try:
        r = peer.get("/")
        assert r.status == 200 and r.body.startswith(b"ok conn="), r
        names = {name for name, _ in r.headers}
        assert b"x-raw" in names and not names & {b"upgrade", b"connection"}
    finally:
        peer.close()


def test_plain_listener_with_http2_speaks_h2c_and_http1(procs):
    b1 = procs.demo_backend("app1")
    cfg = config([("app1", b1)])
    cfg["listeners"][0]["http2"] = True
    lb = procs.balancer(cfg)
    url = f"http://127.0.0.1:{lb.port}/healthz"
    fmt = ["-o", "/dev/null", "-w", "%{http_version} %{http_code}"]
    h2c = subprocess.run(
        ["curl", "-s", "--http2-prior-knowledge", url, *fmt], capture_output=True, text=True
    )
    assert h2c.stdout == "2 200", h2c
    h1 = subprocess.run(["curl", "-s", "--http1.1", url, *fmt], capture_output=True, text=True)
    assert h1.stdout == "1.1 200", h1
    # a plain listener without http2 keeps answering the preface as a bad HTTP/1.1 request
    cfg2 = config([("app1", b1)])
    lb2 = procs.balancer(cfg2, name="lb2")
    plain = subprocess.run(
        ["curl", "-s", "--http2-prior-knowledge", f"http://127.0.0.1:{lb2.port}/", *fmt],
        capture_output=True,
        text=True,
    )
    assert plain.stdout != "2 200", plain


def test_h2load_streams_over_tls_are_all_answered_and_balanced(procs, ca):
    """h2load (nghttp2) is the load client HTTP/2 peers are measured with: 4 connections of
    10 concurrent streams each, every one answered 2xx and spread over both backends."""
    if shutil.which("h2load") is None:
        missing_tool("h2load not installed (Debian nghttp2-client)")
    b1, b2 = procs.demo_backend("app1"), procs.demo_backend("app2")
    lb = h2_balancer(procs, ca, [("app1", b1), ("app2", b2)])
    run = subprocess.run(
        ["h2load", "-n", "400", "-c", "4", "-m", "10", f"https://127.0.0.1:{lb.port}/"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Application protocol: h2" in run.stdout, run.stdout  # chosen by ALPN
    done = re.search(r"requests: 400 total, \d+ started, (\d+) done, (\d+) succeeded", run.stdout)
    assert done and done.groups() == ("400", "400"), run.stdout
    assert re.search(r"status codes: 400 2xx", run.stdout), run.stdout
    served = {b["name"]: b["requests"] for b in lb.status()["pools"]["web"]["backends"]}
    assert sum(served.values()) == 400 and min(served.values()) >= 100, served
