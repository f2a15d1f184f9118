"""The HTTP/1.1 proxy core against real backends: framing, headers, keep-alive, errors."""

from __future__ import annotations

import hashlib
import json
import signal
import socket
import threading
import time
from collections import Counter

import requests

from tests.integration.harness import config, free_port, http_raw, rss_kib, wait_port

PATTERN = bytes(range(256))


def pattern_sha(n: int) -> str:
    h = hashlib.sha256()
    full, rest = divmod(n, len(PATTERN))
    block = PATTERN * 4096
    left = full
    while left >= 4096:
        h.update(block)
        left -= 4096
    h.update(PATTERN * left + PATTERN[:rest])
    return h.hexdigest()


def three_backends(procs):  # type: ignore[no-untyped-def]
    return [(f"app{i}", procs.demo_backend(f"app{i}")) for i in (1, 2, 3)]


def echo(resp: requests.Response) -> dict:
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_round_robin_over_three_backends_and_keepalive(procs):
    lb = procs.balancer(config(three_backends(procs)))
    with requests.Session() as s:
        servers = [echo(s.get(f"{lb.url}/echo"))["server"] for _ in range(30)]
    assert Counter(servers) == {"app1": 10, "app2": 10, "app3": 10}
    # one client connection carried all 30 requests (keep-alive on the client side)
    assert lb.status()["listeners"][0]["connections"] <= 1


def test_upstream_connections_are_reused(procs):
    port, record = procs.raw_backend("a", "ok")
    lb = procs.balancer(config([("a", port)]))
    with requests.Session() as s:
        bodies = [s.get(f"{lb.url}/x{i}").text for i in range(10)]
    # the raw backend numbers its connections (the harness's port probe was the first):
    # all ten requests arrived on one connection
    assert len(set(bodies)) == 1 and bodies[0].startswith("ok conn=")


def test_stale_pooled_connection_is_not_a_backend_failure(procs):
    # the backend closes every connection right after answering, without saying so: the
    # pooled connection is dead when reused; the request must still succeed
    port, record = procs.raw_backend("a", "close")
    lb = procs.balancer(config([("a", port)]))
    for i in range(5):
        r = requests.get(f"{lb.url}/r{i}", timeout=5)
        assert r.status_code == 200
        time.sleep(0.05)
    b = lb.backend("web", "a")
    assert b["errors"] == 0 and b["state"] == "up"


def test_headers_forwarded_and_hop_by_hop_removed(procs):
    lb = procs.balancer(config(three_backends(procs)))
    req = (
        b"GET /echo/a%2Fb/../c;p?x=1&y=%20&z=%E2%82%AC&&q HTTP/1.1\r\n"
        b"Host: Shop.Example.com:8080\r\n"
        b"X-Dup: one\r\n"
        b"X-Forwarded-For: 203.0.113.7\r\n"
        b"X-Forwarded-Proto: https\r\n"
        b"Connection: keep-alive, X-Secret\r\n"
        b"X-Secret: drop me\r\n"
        b"Keep-Alive: timeout=5\r\n"
        b"TE: trailers\r\n"
        b"Trailer: X-T\r\n"
        b"Proxy-Connection: keep-alive\r\n"
        b"Upgrade: h2c\r\n"
        b"X-Dup: two\r\n"
        b"x-dup: three\r\n"
        b"\r\n"
    )
    raw = http_raw(lb.port, req, read_until_close=False)
    body = json.loads(raw.split(b"\r\n\r\n", 1)[1])
    assert body["path"] == "/echo/a%2Fb/../c;p?x=1&y=%20&z=%E2%82%AC&&q"
    headers = body["headers"]
    names = [n.lower() for n, _ in headers]
    for gone in (
        "x-secret",
        "keep-alive",
        "te",
        "trailer",
        "proxy-connection",
        "upgrade",
        "connection",
    ):
        assert gone not in names, (gone, headers)
    assert [v for n, v in headers if n.lower() == "x-dup"] == ["one", "two", "three"]
    assert [v for n, v in headers if n.lower() == "host"] == ["Shop.Example.com:8080"]
    assert [v for n, v in headers if n.lower() == "x-forwarded-for"] == ["203.0.113.7, 127.0.0.1"]
    assert [v for n, v in headers if n.lower() == "x-forwarded-proto"] == ["http"]
    assert [v for n, v in headers if n.lower() == "x-forwarded-host"] == ["Shop.Example.com:8080"]


def test_routing_by_host_and_path_prefix_first_match_wins(procs):
    a = procs.demo_backend("images")
    b = procs.demo_backend("api")
    c = procs.demo_backend("web")
    cfg = config([("web", c)])
    cfg["listeners"][0]["routes"] = [
        {"host": "images.example.com", "pool": "images"},
        {"path_prefix": "/api/", "pool": "api"},
        {"pool": "web"},
    ]
    cfg["pools"]["images"] = {"backends": [{"name": "images", "address": f"127.0.0.1:{a}"}]}
    cfg["pools"]["api"] = {"backends": [{"name": "api", "address": f"127.0.0.1:{b}"}]}
    lb = procs.balancer(cfg)

    def who(path: str, host: str) -> str:
        return requests.get(f"{lb.url}{path}", headers={"Host": host}, timeout=5).headers[
            "X-Backend-Name"
        ]

    assert who("/echo", "images.example.com") == "images"
    assert who("/api/echo", "IMAGES.example.com:80") == "images"  # host first, case-insensitive
    assert who("/api/x", "www.example.com") == "api"
    assert who("/apix", "www.example.com") == "web"
    assert who("/", "other") == "web"


def test_chunked_upload_and_content_length_upload_hash(procs):
    lb = procs.balancer(config(three_backends(procs)))
    data = PATTERN * 4000 + b"tail"

    def gen():  # requests sends a generator body as chunked
        for i in range(0, len(data), 10000):
            yield data[i : i + 10000]

    r = requests.post(f"{lb.url}/echo", data=gen(), timeout=10)
    assert echo(r)["body_sha256"] == hashlib.sha256(data).hexdigest()
    assert ["Transfer-Encoding", "chunked"] in [[n, v] for n, v in r.json()["headers"]]
    r = requests.put(f"{lb.url}/echo", data=data, timeout=10)
    assert echo(r)["body_sha256"] == hashlib.sha256(data).hexdigest()
    assert echo(r)["body_length"] == len(data)


def test_chunked_and_length_downloads(procs):
    lb = procs.balancer(config(three_backends(procs)))
    for chunked in (0, 1):
        r = requests.get(f"{lb.url}/bytes?n=300000&chunked={chunked}", timeout=10)
        assert r.status_code == 200
        assert hashlib.sha256(r.content).hexdigest() == pattern_sha(300000)
        assert ("chunked" in r.headers.get("Transfer-Encoding", "")) == bool(chunked)


def test_head_204_304_have_no_body_and_connection_stays_usable(procs):
    lb = procs.balancer(config(three_backends(procs)))
    req = (
        b"HEAD /bytes?n=1000 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /status/204 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /status/304 HTTP/1.1\r\nHost: x\r\n\r\n"
        b"GET /status/200 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    raw = http_raw(lb.port, req)
    parts = raw.split(b"HTTP/1.1 ")
    assert [p[:3] for p in parts[1:]] == [b"200", b"204", b"304", b"200"]
    head_resp = parts[1]
    assert b"content-length: 1000" in head_resp.lower()
    assert head_resp.endswith(b"\r\n\r\n")  # no body after the HEAD response head
    assert parts[2].endswith(b"\r\n\r\n") and parts[3].endswith(b"\r\n\r\n")


def test_pipelined_requests_answered_in_order(procs):
    lb = procs.balancer(config(three_backends(procs)))
    req = (
        b"".join(
            b"GET /echo/%d?delay=%s HTTP/1.1\r\nHost: x\r\n\r\n" % (i, d)
            for i, d in ((1, b"0.3"), (2, b"0"), (3, b"0.1"), (4, b"0"))
        )
        + b"POST /echo/5 HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello"
    )
    raw = http_raw(lb.port, req)
    paths = [
        json.loads(p.split(b"\r\n\r\n", 1)[1])["path"] for p in raw.split(b"HTTP/1.1 200 OK")[1:]
    ]
    assert paths == [
        "/echo/1?delay=0.3",
        "/echo/2?delay=0",
        "/echo/3?delay=0.1",
        "/echo/4?delay=0",
        "/echo/5",
    ]


def test_expect_100_continue(procs):
    lb = procs.balancer(config(three_backends(procs)))
    with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as s:
        s.sendall(
            b"POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = s.recv(100)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        s.sendall(b"hello")
        data = b""
        while b"}" not in data:
            data += s.recv(65536)
    body = json.loads(data.split(b"\r\n\r\n", 1)[1])
    assert body["body_sha256"] == hashlib.sha256(b"hello").hexdigest()
    assert "expect" not in [n.lower() for n, _ in body["headers"]]


def test_bad_requests_get_precise_errors_and_never_reach_the_backend(procs):
    port, record = procs.raw_backend("a", "ok")
    cfg = config([("a", port)], limits={"max_header_bytes": 4096, "max_headers": 20})
    lb = procs.balancer(cfg)
    cases = [
        (b"GARBAGE\r\n\r\n", 400),
        (
            b"GET /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            400,
        ),
        (b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
        (
            b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
            400,
        ),
        (b"GET /x HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n folded\r\n\r\n", 400),
        (b"GET /x HTTP/1.1\nHost: x\n\n", 400),
        (b"GET /x HTTP/1.1\r\n\r\n", 400),  # no Host
        (b"GET /x HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
        (b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
        (b"GET /x HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 5000 + b"\r\n\r\n", 431),
        (
            b"GET /x HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-%d: 1\r\n" % i for i in range(30))
            + b"\r\n",
            431,
        ),
    ]
    for req, status in cases:
        raw = http_raw(lb.port, req)
        assert raw.startswith(b"HTTP/1.1 %d " % status), (req[:60], raw[:200])
        assert b"connection: close" in raw.lower()
    assert record.read_bytes() == b"" if record.exists() else True


def test_slow_headers_get_408(procs):
    port, _ = procs.raw_backend("a", "ok")
    cfg = config([("a", port)], timeouts={"client_header": "700ms"})
    lb = procs.balancer(cfg)
    with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")
        t0 = time.monotonic()
        data = s.recv(1000)
        waited = time.monotonic() - t0
    assert data.startswith(b"HTTP/1.1 408 ")
    assert 0.5 < waited < 5


def test_idle_keepalive_connection_closed(procs):
    port, _ = procs.raw_backend("a", "ok")
    lb = procs.balancer(config([("a", port)], timeouts={"client_idle": "500ms"}))
    with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(1000).startswith(b"HTTP/1.1 200")
        t0 = time.monotonic()
        assert s.recv(1000) == b""  # closed quietly, no 408 for an idle connection
        assert time.monotonic() - t0 < 5


def test_backend_too_slow_gives_504(procs):
    lb = procs.balancer(config(three_backends(procs), timeouts={"backend": "500ms"}))
    r = requests.get(f"{lb.url}/echo?delay=3", timeout=10)
    assert r.status_code == 504


def test_refused_backend_is_skipped_without_client_error(procs):
    dead = free_port()  # nothing listens there
    live = procs.demo_backend("live")
    lb = procs.balancer(config([("dead", dead), ("live", live)]))
    with requests.Session() as s:
        codes = [s.get(f"{lb.url}/echo", timeout=5).status_code for _ in range(10)]
    assert codes == [200] * 10


def test_all_backends_refusing_gives_502_and_none_healthy_gives_503(procs):
    lb = procs.balancer(config([("d1", free_port()), ("d2", free_port())]))
    r = requests.get(f"{lb.url}/", timeout=5)
    assert r.status_code == 502
    cfg = config(
        [("d1", free_port())],
        pool={"health_check": {"interval": "200ms", "timeout": "100ms", "fall": 1}},
    )
    lb2 = procs.balancer(cfg, name="lb2")
    lb2.wait_state("web", "d1", "down")
    t0 = time.monotonic()
    r = requests.get(f"{lb2.url}/", timeout=5)
    assert r.status_code == 503 and time.monotonic() - t0 < 1


def test_reset_before_response_is_retried_for_idempotent_only(procs):
    bad, bad_record = procs.raw_backend("bad", "reset")
    good = procs.demo_backend("good")
    lb = procs.balancer(
        config([("bad", bad), ("good", good)], pool={"passive_health": {"consecutive_failures": 0}})
    )
    with requests.Session() as s:
        gets = [s.get(f"{lb.url}/echo", timeout=5).status_code for _ in range(6)]
    assert gets == [200] * 6
    # a POST that reached the reset backend must not be replayed elsewhere: it gets 502
    posts = [requests.post(f"{lb.url}/echo", data=b"x", timeout=5).status_code for _ in range(4)]
    assert 502 in posts and set(posts) <= {200, 502}


def test_response_broken_mid_body_is_never_presented_complete(procs):
    lb = procs.balancer(config(three_backends(procs)))
    with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
        s.sendall(b"GET /close-mid-body?n=100000 HTTP/1.1\r\nHost: x\r\n\r\n")
        data = b""
        try:
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        except ConnectionResetError:
            pass
    head, body = data.split(b"\r\n\r\n", 1)
    assert b"content-length: 200000" in head.lower()
    assert len(body) < 200000  # the client can tell: fewer bytes than announced, then close


def test_large_upload_and_download_stream_in_bounded_memory(procs):
    lb = procs.balancer(config(three_backends(procs), timeouts={"backend": "120s"}))
    size = 1 << 30  # 1 GiB each way
    before = rss_kib(lb.proc.pid)
    # download
    h = hashlib.sha256()
    got = 0
    with requests.get(f"{lb.url}/bytes?n={size}", stream=True, timeout=120) as r:
        for chunk in r.iter_content(1 << 20):
            h.update(chunk)
            got += len(chunk)
    assert got == size and h.hexdigest() == pattern_sha(size)
    # upload
    block = PATTERN * 4096

    def body():
        for _ in range(size // len(block)):
            yield block

    r = requests.post(f"{lb.url}/echo", data=body(), timeout=180)
    assert r.json()["body_length"] == size
    assert r.json()["body_sha256"] == pattern_sha(size)
    peak = rss_kib(lb.proc.pid, "VmHWM")
    assert peak - before < 64 * 1024, f"balancer RSS grew by {(peak - before) // 1024} MiB"


def test_sigterm_drains_in_flight_requests_then_exits_0(procs):
    lb = procs.balancer(config(three_backends(procs)))
    results: list[int] = []

    def slow():
        results.append(requests.get(f"{lb.url}/echo?delay=1.5", timeout=10).status_code)

    t = threading.Thread(target=slow)
    t.start()
    time.sleep(0.4)
    lb.proc.send_signal(signal.SIGTERM)
    t.join(10)
    assert results == [200]
    assert lb.proc.wait(10) == 0
    # it stopped accepting
    try:
        socket.create_connection(("127.0.0.1", lb.port), timeout=1).close()
        accepted = True
    except OSError:
        accepted = False
    assert not accepted


def test_access_log_plain_and_json(procs):
    backends = three_backends(procs)
    lb = procs.balancer(config(backends))
    requests.get(f"{lb.url}/echo/logged?q=1", timeout=5)
    cfg = config(backends, access_log={"format": "json"})
    lb2 = procs.balancer(cfg, name="lb2")
    requests.get(f"{lb2.url}/echo/json", timeout=5)
    time.sleep(1.2)  # the access log is flushed a few times a second
    line = next(ln for ln in lb.log_text().splitlines() if "/echo/logged" in ln)
    assert (
        '"GET /echo/logged?q=1 HTTP/1.1" 200' in line and "web/app" in line and "127.0.0.1" in line
    )
    rec = next(json.loads(ln) for ln in lb2.log_text().splitlines() if ln.startswith("{"))
    assert rec["path"] == "/echo/json" and rec["status"] == 200 and rec["backend"].startswith("app")
    assert rec["client"] == "127.0.0.1" and rec["bytes"] > 0 and rec["duration_ms"] >= 0


def test_http10_client_gets_close_delimited_body(procs):
    lb = procs.balancer(config(three_backends(procs)))
    raw = http_raw(lb.port, b"GET /bytes?n=5000&chunked=1 HTTP/1.0\r\n\r\n")
    head, body = raw.split(b"\r\n\r\n", 1)
    assert b"chunked" not in head.lower()
    assert len(body) == 5000


def test_listener_port_unavailable_fails_cleanly(procs):
    port = procs.demo_backend("x")
    cfg = config([("x", port)])
    cfg["listeners"][0]["bind"] = f"127.0.0.1:{port}"  # already taken by the backend
    lb = procs.balancer(cfg, wait=False)
    assert lb.proc.wait(15) == 1
    assert "Traceback" not in lb.log_text()
    wait_port(port)


def test_backend_connect_timeout_gives_504(procs):
    # a listener that never accepts, its accept queue filled: further SYNs go unanswered
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    port = blackhole.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
            fillers.append(s)
        time.sleep(0.2)
        lb = procs.balancer(config([("slow", port)], timeouts={"connect": "500ms"}))
        t0 = time.monotonic()
        r = requests.get(f"{lb.url}/", timeout=10)
        took = time.monotonic() - t0
        assert r.status_code == 504
        assert 0.4 < took < 5
    finally:
        for s in fillers:
            s.close()
        blackhole.close()


def test_idle_upstream_connections_expire(procs):
    port, _ = procs.raw_backend("a", "ok")
    lb = procs.balancer(config([("a", port)], timeouts={"upstream_idle": "500ms"}))
    first = requests.get(f"{lb.url}/1", timeout=5).text
    again = requests.get(f"{lb.url}/2", timeout=5).text
    assert first == again  # reused while warm
    time.sleep(1.5)  # longer than upstream_idle: the pooled connection was closed
    later = requests.get(f"{lb.url}/3", timeout=5).text
    assert later != first and later.startswith("ok conn=")


def test_sigterm_closes_idle_keepalive_connections_at_once(procs):
    lb = procs.balancer(config(three_backends(procs)))
    idle = socket.create_connection(("127.0.0.1", lb.port), timeout=10)
    idle.sendall(b"GET /echo HTTP/1.1\r\nHost: x\r\n\r\n")
    assert idle.recv(65536).startswith(b"HTTP/1.1 200")
    t0 = time.monotonic()
    lb.proc.send_signal(signal.SIGTERM)
    assert idle.recv(100) == b""  # closed by the balancer, not left to the 30 s drain limit
    assert lb.proc.wait(10) == 0
    assert time.monotonic() - t0 < 5
    idle.close()
