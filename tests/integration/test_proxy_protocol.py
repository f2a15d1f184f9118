"""The PROXY protocol against real peers: HAProxy in front of the balancer (send-proxy,
send-proxy-v2) and behind it (accept-proxy), raw sockets sending bad, truncated, slow or
missing headers, and the per-IP limits keyed by the address a header names."""

from __future__ import annotations

import json
import shutil
import socket
import ssl
import struct
import time
from pathlib import Path

import pytest
import trustme

from tests.integration.harness import (
    Balancer,
    Processes,
    config,
    free_port,
    read_response,
    wait_port,
)
from tests.support import missing_tool

CLIENT = "127.0.0.5"  # the original client: a source address HAProxy and the balancer don't have
OTHER_CLIENT = "127.0.0.6"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def v2_header(src: str, sport: int, dst: str, dport: int) -> bytes:
    block = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(block)) + block


def haproxy(procs: Processes, name: str, text: str, port: int) -> None:
    exe = shutil.which("haproxy")
    if exe is None:
        missing_tool("haproxy is not installed (Debian package haproxy)")
    path = procs.tmp / f"{name}.cfg"
    path.write_text(text)
    # -db: foreground, no daemon; stopped by PID with the other processes
    p = procs.start([exe, "-db", "-f", str(path)], log_name=f"{name}.log")
    wait_port(port, p)


HAPROXY_DEFAULTS = """
global
    maxconn 200
defaults
    timeout connect 2s
    timeout client 10s
    timeout server 10s
"""


def get_from(port: int, path: str = "/echo", *, source: str = CLIENT) -> tuple[int, bytes]:
    """One HTTP/1.1 request from `source` (a loopback address of its own)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n".encode())
        status, _, body = read_response(s)
    return status, body


def xff_of(body: bytes) -> str:
    headers = {k.lower(): v for k, v in json.loads(body)["headers"]}
    return headers["x-forwarded-for"]


def closed_within(s: socket.socket, seconds: float) -> tuple[bool, bytes]:
    """(whether the peer closed within `seconds`, what it sent before)."""
    s.settimeout(seconds)
    got = b""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            chunk = s.recv(65536)
            if not chunk:
                return True, got
            got += chunk
    except ConnectionResetError:
        return True, got
    except TimeoutError:
        return False, got
    return False, got


def pp_listener(cfg: dict, **extra: object) -> dict:
    cfg["listeners"][0]["proxy_protocol"] = True
    cfg["listeners"][0].update(extra)
    return cfg


# -- HAProxy in front ------------------------------------------------------------------------


@pytest.mark.parametrize("send", ["send-proxy", "send-proxy-v2"])
def test_haproxy_in_front_gives_the_client_address(procs: Processes, send: str) -> None:
    app = procs.demo_backend("app")
    lb = procs.balancer(pp_listener(config([("app", app)])))
    front = free_port()
    haproxy(
        procs,
        "front",
        HAPROXY_DEFAULTS
        + f"""
frontend fe
    mode tcp
    bind 127.0.0.1:{front}
    default_backend be
backend be
    mode tcp
    server lb 127.0.0.1:{lb.port} {send}
""",
        front,
    )
    rejected = rejected_count(lb)  # the harness's own port probes had no header
    for source in (CLIENT, OTHER_CLIENT):
        status, body = get_from(front, source=source)
        assert status == 200, body
        # HAProxy's own address (127.0.0.1) would be here without the header
        assert xff_of(body) == source
    assert rejected_count(lb) == rejected
    assert "Traceback" not in lb.log_text()


def test_haproxy_in_front_of_a_tls_listener(procs: Processes, tmp_path: Path) -> None:
    # the header comes before the TLS handshake: HAProxy passes TLS through in tcp mode
    ca = trustme.CA(key_type=trustme.KeyType.RSA)
    leaf = ca.issue_cert("localhost")
    cert, key = tmp_path / "site.pem", tmp_path / "site.key"
    cert.write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    key.write_bytes(leaf.private_key_pem.bytes())
    app = procs.demo_backend("app")
    lb = procs.balancer(
        pp_listener(
            config([("app", app)]),
            tls={"certificates": [{"cert": str(cert), "key": str(key)}]},
        )
    )
    front = free_port()
    haproxy(
        procs,
        "front",
        HAPROXY_DEFAULTS
        + f"""
frontend fe
    mode tcp
    bind 127.0.0.1:{front}
    default_backend be
backend be
    mode tcp
    server lb 127.0.0.1:{lb.port} send-proxy-v2
""",
        front,
    )
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.set_alpn_protocols(["http/1.1"])
    raw = socket.create_connection(("127.0.0.1", front), timeout=10, source_address=(CLIENT, 0))
    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        status, _, body = read_response(s)
    assert status == 200, body
    assert xff_of(body) == CLIENT


# -- raw sockets: what a header-less or broken peer gets ---------------------------------------


def test_bytes_after_the_header_reach_the_backend_and_local_keeps_the_peer(
    procs: Processes,
) -> None:
    app = procs.demo_backend("app")
    lb = procs.balancer(pp_listener(config([("app", app)])))
    request = b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n"
    with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
        # v1 header and two keep-alive requests in one segment: nothing after the header lost
        s.sendall(b"PROXY TCP4 127.0.0.9 127.0.0.1 40000 80\r\n" + request + request)
        for _ in range(2):
            status, _, body = read_response(s)
            assert status == 200 and xff_of(body) == "127.0.0.9"
    with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
        # a header sent byte by byte, then the request
        for b in v2_header("127.0.0.10", 1, "127.0.0.1", 2):
            s.sendall(bytes([b]))
        s.sendall(request)
        status, _, body = read_response(s)
        assert status == 200 and xff_of(body) == "127.0.0.10"
    with socket.create_connection(
        ("127.0.0.1", lb.port), timeout=10, source_address=(CLIENT, 0)
    ) as s:
        # LOCAL (a health check of the proxy in front): the socket's own peer is the client
        s.sendall(V2_SIGNATURE + b"\x20\x00\x00\x00" + request)
        status, _, body = read_response(s)
        assert status == 200 and xff_of(body) == CLIENT


@pytest.mark.parametrize(
    "first",
    [
        b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n",  # no header at all
        b"PROXY TCP4 127.0.0.9 127.0.0.1 01 80\r\nGET / HTTP/1.1\r\nHost: t\r\n\r\n",
        b"PROXY TCP4 " + b"1" * 200,  # over 107 bytes without a CRLF
        V2_SIGNATURE + b"\x22\x11\x00\x0c" + b"\x00" * 12,  # command 2
        b"\x16\x03\x01\x00\x05hello",  # TLS where the header belongs
    ],
)
def test_a_bad_or_missing_header_closes_the_connection(procs: Processes, first: bytes) -> None:
    port, record = procs.raw_backend("app")
    cfg = pp_listener(config([("app", port)]))
    cfg["timeouts"] = {"client_header": "5s"}
    lb = procs.balancer(cfg)
    rejected = rejected_count(lb)
    with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
        s.sendall(first)
        closed, got = closed_within(s, 5.0)
    assert closed and got == b""  # closed, no answer
    assert not record.exists() or record.read_bytes() == b""  # nothing forwarded
    assert rejected_count(lb) == rejected + 1


def test_a_truncated_or_slow_header_is_closed_within_the_timeout(procs: Processes) -> None:
    port, record = procs.raw_backend("app")
    cfg = pp_listener(config([("app", port)]))
    cfg["timeouts"] = {"client_header": "1s"}
    lb = procs.balancer(cfg)
    rejected = rejected_count(lb)
    full = b"PROXY TCP4 127.0.0.9 127.0.0.1 40000 80\r\n"
    # truncated, then the client closes its side
    with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
        s.sendall(full[:20])
        s.shutdown(socket.SHUT_WR)
        closed, _ = closed_within(s, 5.0)
        assert closed
    # slow: part of a header and then nothing (a slowloris on the header)
    for partial in (full[:20], v2_header("127.0.0.9", 1, "127.0.0.1", 2)[:20], b""):
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
            started = time.monotonic()
            s.sendall(partial)
            closed, got = closed_within(s, 8.0)
            assert closed and got == b"", partial
            # client_header is 1s; generous for a loaded 2-core machine
            assert time.monotonic() - started < 6.0
    assert not record.exists() or record.read_bytes() == b""
    assert rejected_count(lb) == rejected + 4


def rejected_count(lb: Balancer) -> int:
    """The listener's count of connections closed for their PROXY header, once the
    harness's header-less port probes have been counted."""
    time.sleep(0.2)
    status = lb.status()
    for lst in status.get("listeners", []):
        if lst["name"] == "http":
            return lst["proxy_protocol_rejected"]
    raise AssertionError(f"no listener status in /status: {sorted(status)}")


def test_per_ip_connection_cap_applies_to_the_header_address(procs: Processes) -> None:
    app = procs.demo_backend("app")
    cfg = pp_listener(config([("app", app)]))
    cfg["limits"] = {"max_connections_per_ip": 1}
    lb = procs.balancer(cfg)
    request = b"GET /echo HTTP/1.1\r\nHost: t\r\n\r\n"

    def open_as(ip: str) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", lb.port), timeout=10)
        s.sendall(f"PROXY TCP4 {ip} 127.0.0.1 40000 80\r\n".encode() + request)
        return s

    first = open_as("127.0.0.20")
    try:
        assert read_response(first)[0] == 200  # held open: keep-alive
        # the same header address again: over the cap, refused
        second = open_as("127.0.0.20")
        closed, got = closed_within(second, 5.0)
        second.close()
        assert closed and got == b""
        # another header address over the same socket peer: fine
        third = open_as("127.0.0.21")
        assert read_response(third)[0] == 200
        third.close()
    finally:
        first.close()
    # the slot is given back when the first closes
    deadline = time.monotonic() + 5
    while True:
        s = open_as("127.0.0.20")
        try:
            s.settimeout(2)
            if read_response(s)[0] == 200:
                break
        except (AssertionError, OSError):
            if time.monotonic() > deadline:
                raise
        finally:
            s.close()
        time.sleep(0.1)


def test_rate_per_ip_and_client_ip_hashing_use_the_header_address(procs: Processes) -> None:
    a = procs.demo_backend("a")
    b = procs.demo_backend("b")
    cfg = pp_listener(
        config(
            [("a", a), ("b", b)],
            pool={"strategy": "consistent_hash", "hash_key": "client_ip"},
        )
    )
    cfg["limits"] = {"rate_per_ip": 2}
    lb = procs.balancer(cfg)

    def ask(ip: str) -> tuple[int, bytes]:
        with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
            s.sendall(
                f"PROXY TCP4 {ip} 127.0.0.1 40000 80\r\n".encode()
                + b"GET /echo HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            )
            status, _, body = read_response(s)
        return status, body

    # the same header address always lands on the same backend, and is rate limited as one
    statuses = []
    servers = set()
    for _ in range(6):
        status, body = ask("127.0.0.30")
        statuses.append(status)
        if status == 200:
            servers.add(json.loads(body)["server"])
    assert 429 in statuses and len(servers) == 1
    # another header address (same socket peer) has its own budget
    assert ask("127.0.0.31")[0] == 200


# -- HAProxy behind: the backend reads our header ----------------------------------------------


def haproxy_backend(procs: Processes, name: str) -> int:
    """HAProxy answering every request with the source address its PROXY header named."""
    port = free_port()
    haproxy(
        procs,
        name,
        HAPROXY_DEFAULTS
        + f"""
frontend fe
    mode http
    bind 127.0.0.1:{port} accept-proxy
    http-request return status 200 content-type text/plain lf-string "%[src]"
""",
        port,
    )
    return port


@pytest.mark.parametrize("version", ["v1", "v2"])
def test_sending_to_haproxy_http_mode_with_health_checks(procs: Processes, version: str) -> None:
    hp = haproxy_backend(procs, "back")
    cfg = config(
        [("hp", hp)],
        pool={
            "send_proxy_protocol": version,
            "health_check": {"path": "/healthz", "interval": "200ms", "rise": 1, "fall": 1},
        },
    )
    lb = procs.balancer(cfg)
    # accept-proxy refuses a connection without a header: passing checks prove they send one
    lb.wait_state("web", "hp", "up")
    checks = lb.backend("web", "hp")
    assert checks["state"] == "up"
    # keep-alive clients: each sees its own address on every request, through the pooled
    # backend connections (reused only for the client whose header opened them)
    socks = {
        ip: socket.create_connection(("127.0.0.1", lb.port), timeout=10, source_address=(ip, 0))
        for ip in (CLIENT, OTHER_CLIENT)
    }
    try:
        for _ in range(3):
            for ip, s in socks.items():
                s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
                status, _, body = read_response(s)
                assert status == 200 and body == ip.encode(), (ip, body)
    finally:
        for s in socks.values():
            s.close()
    time.sleep(0.5)
    assert lb.backend("web", "hp")["state"] == "up"


def test_sending_to_haproxy_tcp_mode(procs: Processes) -> None:
    hp = haproxy_backend(procs, "back")
    cfg = {
        "listeners": [
            {"name": "tcp", "bind": f"127.0.0.1:{free_port()}", "mode": "tcp", "pool": "db"}
        ],
        "pools": {
            "db": {
                "send_proxy_protocol": "v2",
                "health_check": {"type": "tcp", "interval": "200ms", "rise": 1, "fall": 1},
                "backends": [{"name": "hp", "address": f"127.0.0.1:{hp}"}],
            }
        },
        "admin": {"bind": f"127.0.0.1:{free_port()}"},
    }
    lb = procs.balancer(cfg)
    lb.wait_state("db", "hp", "up")
    for ip in (CLIENT, OTHER_CLIENT):
        status, body = get_from(lb.port, "/", source=ip)
        assert status == 200 and body == ip.encode(), (ip, body)


def test_chained_headers_pass_the_original_address(procs: Processes) -> None:
    # received from a proxy in front and sent on to a backend: the backend sees the address
    # the first header named, not the front proxy's
    hp = haproxy_backend(procs, "back")
    cfg = pp_listener(config([("hp", hp)], pool={"send_proxy_protocol": "v1"}))
    lb = procs.balancer(cfg)
    with socket.create_connection(("127.0.0.1", lb.port), timeout=10) as s:
        s.sendall(v2_header("127.0.0.40", 5555, "127.0.0.1", 80))
        s.sendall(b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        status, _, body = read_response(s)
    assert status == 200 and body == b"127.0.0.40"
