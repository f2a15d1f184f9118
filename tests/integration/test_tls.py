"""TLS termination against real processes: SNI certificates, protocol floor, ciphers, reload,
the forwarded scheme, Secure sticky cookies and the plain-HTTP redirect listener.

Certificates come from a throwaway CA (trustme) made per test; clients are plain `ssl`
sockets so that the SNI name, protocol versions and cipher lists are exactly what the test
says.
"""

from __future__ import annotations

import contextlib
import json
import signal
import socket
import ssl
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from cryptography import x509

from tests.integration.harness import Balancer, Processes, config, free_port, read_response

RSA = trustme.KeyType.RSA


# -- certificates and clients ----------------------------------------------------------------


def write_cert(cert: trustme.LeafCert, directory: Path, stem: str) -> dict[str, str]:
    """PEM files for one certificate (leaf then chain) and its key; returns the config entry."""
    cert_path = directory / f"{stem}.pem"
    key_path = directory / f"{stem}.key"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key_path.write_bytes(cert.private_key_pem.bytes())
    return {"cert": str(cert_path), "key": str(key_path)}


def client_context(
    ca: trustme.CA,
    *,
    version: ssl.TLSVersion | None = None,
    ciphers: str | None = None,
    verify: bool = True,
) -> ssl.SSLContext:
    """A client context pinned to one protocol version and/or cipher list.

    `@SECLEVEL=0` lets this client *offer* what modern OpenSSL refuses by default (TLS 1.1,
    SHA-1 CBC suites), so a failed handshake is the server's refusal, not the client's.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if verify:
        ca.configure_trust(ctx)
    else:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if version is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # TLSv1/TLSv1_1 names
            ctx.minimum_version = version
            ctx.maximum_version = version
    if ciphers is not None or version is not None:
        ctx.set_ciphers((ciphers or "ALL") + ":@SECLEVEL=0")
    return ctx


@contextlib.contextmanager
def tls_connect(port: int, server_name: str | None, ctx: ssl.SSLContext) -> Iterator[ssl.SSLSocket]:
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        with ctx.wrap_socket(raw, server_hostname=server_name) as s:
            yield s
    finally:
        raw.close()


def peer_cert(s: ssl.SSLSocket) -> x509.Certificate:
    der = s.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def dns_names(cert: x509.Certificate) -> list[str]:
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return san.get_values_for_type(x509.DNSName)


def https_get(
    port: int, server_name: str, ctx: ssl.SSLContext, path: str = "/echo", host: str | None = None
) -> tuple[int, bytes, bytes, x509.Certificate]:
    with tls_connect(port, server_name, ctx) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: {host or server_name}\r\n\r\n".encode())
        status, head, body = read_response(s)
        return status, head, body, peer_cert(s)


def handshake_error(port: int, server_name: str, ctx: ssl.SSLContext) -> BaseException | None:
    """None if a handshake with `ctx` succeeds, else the error it failed with."""
    try:
        with tls_connect(port, server_name, ctx) as s:
            s.do_handshake()
            return None
    except (ssl.SSLError, ConnectionError) as e:
        return e


@contextlib.contextmanager
def permissive_server(cert: trustme.LeafCert) -> Iterator[int]:
    """An in-process TLS server that accepts TLS 1.0+ and every cipher: the control showing
    this machine's client really can negotiate what the balancer must refuse."""
    srv = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    cert.configure_cert(srv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        srv.minimum_version = ssl.TLSVersion.TLSv1
    srv.set_ciphers("ALL:@SECLEVEL=0")
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conn.settimeout(5)
            with contextlib.suppress(OSError), srv.wrap_socket(conn, server_side=True):
                pass
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        t.join(5)
        listener.close()


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA(key_type=RSA)


def tls_config(backend_port: int, certificates: list[dict[str, str]], **pool) -> dict:  # type: ignore[no-untyped-def]
    cfg = config([("app", backend_port)], pool=pool or None)
    cfg["listeners"][0]["name"] = "https"
    cfg["listeners"][0]["tls"] = {"certificates": certificates}
    return cfg


def start_tls_balancer(procs: Processes, ca: trustme.CA, *names: str) -> tuple[Balancer, Path]:
    backend = procs.demo_backend("app")
    cert = ca.issue_cert(*names, key_type=RSA)
    lb = procs.balancer(tls_config(backend, [write_cert(cert, procs.tmp, "site")]))
    return lb, procs.tmp


# -- tests -----------------------------------------------------------------------------------


def test_https_request_verifies_and_backend_sees_https(procs, ca):
    lb, _ = start_tls_balancer(procs, ca, "shop.test")
    status, head, body, cert = https_get(lb.port, "shop.test", client_context(ca))
    assert status == 200, head
    echo = json.loads(body)
    headers = {n.lower(): v for n, v in echo["headers"]}
    # offloaded: the backend speaks plain HTTP but learns the client used https
    assert headers["x-forwarded-proto"] == "https"
    assert headers["host"] == "shop.test"
    assert dns_names(cert) == ["shop.test"]
    # the same port does not answer plain HTTP as if it were HTTPS
    with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as s:
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        with contextlib.suppress(ConnectionError):
            assert b"x-forwarded-proto" not in s.recv(65536).lower()


def test_sni_selects_the_certificate_per_hostname(procs, ca):
    backend = procs.demo_backend("app")
    a = ca.issue_cert("a.test", key_type=RSA)
    b = ca.issue_cert("b.test", "www.b.test", key_type=RSA)
    w = ca.issue_cert("*.w.test", key_type=RSA)
    certs = [write_cert(c, procs.tmp, n) for c, n in ((a, "a"), (b, "b"), (w, "w"))]
    lb = procs.balancer(tls_config(backend, certs))
    verify = client_context(ca)
    for name, want in (
        ("a.test", ["a.test"]),
        ("b.test", ["b.test", "www.b.test"]),
        ("WWW.B.TEST", ["b.test", "www.b.test"]),  # SNI names are case-insensitive
        ("x.w.test", ["*.w.test"]),
    ):
        status, _, _, cert = https_get(lb.port, name, verify)
        assert status == 200
        assert dns_names(cert) == want, name
    # an unknown name, or none at all, gets the first certificate (the default)
    anything = client_context(ca, verify=False)
    for name in ("unknown.test", None):
        with tls_connect(lb.port, name, anything) as s:
            assert dns_names(peer_cert(s)) == ["a.test"]
    # a verifying client asking for a name the balancer has no certificate for must fail
    err = handshake_error(lb.port, "unknown.test", verify)
    assert isinstance(err, ssl.SSLCertVerificationError), err


def test_protocol_floor_is_tls12(procs, ca):
    lb, _ = start_tls_balancer(procs, ca, "shop.test")
    cert = ca.issue_cert("shop.test", key_type=RSA)
    old = (ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1)
    with permissive_server(cert) as control:
        for version in old:
            # control: this client can speak the old version when a server allows it...
            ctx = client_context(ca, version=version)
            with tls_connect(control, "shop.test", ctx) as s:
                assert s.version() in ("TLSv1", "TLSv1.1")
            # ...and the balancer refuses it
            assert handshake_error(lb.port, "shop.test", ctx) is not None, version
    seen = {}
    for version in (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3):
        ctx = client_context(ca, version=version)
        ctx.set_ciphers("DEFAULT")  # no @SECLEVEL=0: an ordinary modern client
        with tls_connect(lb.port, "shop.test", ctx) as s:
            s.sendall(b"GET /echo HTTP/1.1\r\nHost: shop.test\r\n\r\n")
            assert read_response(s)[0] == 200
            seen[s.version()] = s.cipher()[0]
            assert s.selected_alpn_protocol() is None  # the client offered none
    assert set(seen) == {"TLSv1.2", "TLSv1.3"}
    # forward secrecy with an AEAD cipher on TLS 1.2
    assert seen["TLSv1.2"].startswith("ECDHE-") and (
        "GCM" in seen["TLSv1.2"] or "CHACHA" in seen["TLSv1.2"]
    )


@pytest.mark.parametrize(
    "ciphers",
    [
        "AES128-SHA",  # RSA key exchange (no forward secrecy), CBC, SHA-1
        "AES256-SHA256",  # RSA key exchange, CBC
        "AES128-GCM-SHA256",  # AEAD but RSA key exchange: no forward secrecy
        "ECDHE-RSA-AES128-SHA",  # forward secret but CBC with SHA-1 MAC
        "ECDHE-RSA-AES256-SHA384",  # forward secret but CBC
    ],
)
def test_weak_tls12_ciphers_are_refused(procs, ca, ciphers):
    lb, _ = start_tls_balancer(procs, ca, "shop.test")
    cert = ca.issue_cert("shop.test", key_type=RSA)
    ctx = client_context(ca, version=ssl.TLSVersion.TLSv1_2, ciphers=ciphers)
    with permissive_server(cert) as control, tls_connect(control, "shop.test", ctx) as s:
        # control: this client really negotiates the suite when a server allows it
        assert s.cipher()[0] == ciphers
    err = handshake_error(lb.port, "shop.test", ctx)
    assert err is not None, f"balancer accepted {ciphers}"
    # the good suite with the same client set-up is accepted (the failure above is the cipher)
    good = client_context(ca, version=ssl.TLSVersion.TLSv1_2, ciphers="ECDHE-RSA-AES128-GCM-SHA256")
    assert handshake_error(lb.port, "shop.test", good) is None


def test_sticky_cookie_is_secure_on_tls_listener(procs, ca):
    backend = procs.demo_backend("app")
    cert = ca.issue_cert("shop.test", key_type=RSA)
    cfg = tls_config(backend, [write_cert(cert, procs.tmp, "site")], sticky={"cookie": "LBS"})
    plain = free_port()
    cfg["listeners"].append(
        {"name": "http", "bind": f"127.0.0.1:{plain}", "routes": [{"pool": "web"}]}
    )
    lb = procs.balancer(cfg)
    _, head, _, _ = https_get(lb.ports["https"], "shop.test", client_context(ca))
    cookies = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"set-cookie: lbs=")]
    assert len(cookies) == 1 and b"; secure" in cookies[0].lower(), head
    # the same pool on a plain listener must not mark it Secure (the browser would drop it)
    with socket.create_connection(("127.0.0.1", plain), timeout=5) as s:
        s.sendall(b"GET /echo HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        _, head, _ = read_response(s)
    cookies = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"set-cookie: lbs=")]
    assert len(cookies) == 1 and b"secure" not in cookies[0].lower(), head


def wait_log(lb: Balancer, text: str, count: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while lb.log_text().count(text) < count:
        assert time.monotonic() < deadline, (
            f"{text!r} not logged {count}x:\n{lb.log_text()[-2000:]}"
        )
        time.sleep(0.05)


def test_sighup_picks_up_renewed_certificate_files(procs, ca):
    backend = procs.demo_backend("app")
    old_a = ca.issue_cert("a.test", key_type=RSA)
    old_b = ca.issue_cert("b.test", key_type=RSA)
    files = [write_cert(old_a, procs.tmp, "a"), write_cert(old_b, procs.tmp, "b")]
    lb = procs.balancer(tls_config(backend, files))
    verify = client_context(ca)

    def serial(name: str) -> int:
        return https_get(lb.port, name, verify)[3].serial_number

    assert serial("a.test") == serial_of(old_a)
    assert serial("b.test") == serial_of(old_b)
    # a keep-alive connection made before the reload keeps working after it
    with tls_connect(lb.port, "b.test", verify) as kept:
        kept.sendall(b"GET /echo HTTP/1.1\r\nHost: b.test\r\n\r\n")
        assert read_response(kept)[0] == 200
        # renewal: same names, same paths, new key and serial
        new_a = ca.issue_cert("a.test", key_type=RSA)
        new_b = ca.issue_cert("b.test", key_type=RSA)
        write_cert(new_a, procs.tmp, "a")
        write_cert(new_b, procs.tmp, "b")
        lb.proc.send_signal(signal.SIGHUP)
        wait_log(lb, "reloaded", 1)
        # the default (first) certificate and an SNI-selected one are both renewed
        assert serial("a.test") == serial_of(new_a)
        assert serial("b.test") == serial_of(new_b)
        with tls_connect(lb.port, None, client_context(ca, verify=False)) as anon:
            assert peer_cert(anon).serial_number == serial_of(new_a)
        kept.sendall(b"GET /echo HTTP/1.1\r\nHost: b.test\r\n\r\n")
        assert read_response(kept)[0] == 200
        assert peer_cert(kept).serial_number == serial_of(old_b)  # its session is unchanged


def test_broken_renewal_is_rejected_and_the_last_good_certificate_serves(procs, ca):
    backend = procs.demo_backend("app")
    good = ca.issue_cert("a.test", key_type=RSA)
    lb = procs.balancer(tls_config(backend, [write_cert(good, procs.tmp, "a")]))
    verify = client_context(ca)
    # a renewer that wrote the new certificate but not yet its key: they don't match
    bad = ca.issue_cert("a.test", key_type=RSA)
    (procs.tmp / "a.pem").write_bytes(b"".join(b.bytes() for b in bad.cert_chain_pems))
    lb.proc.send_signal(signal.SIGHUP)
    wait_log(lb, "reload rejected", 1)
    assert "listeners[0].tls.certificates[0]" in lb.log_text()  # a located error
    assert https_get(lb.port, "a.test", verify)[3].serial_number == serial_of(good)
    assert lb.proc.poll() is None


def serial_of(cert: trustme.LeafCert) -> int:
    """The serial number of a trustme leaf certificate."""
    return x509.load_pem_x509_certificate(cert.cert_chain_pems[0].bytes()).serial_number


def test_redirect_listener_sends_301_to_https_keeping_path_and_query(procs, ca):
    lb0, _ = start_tls_balancer(procs, ca, "shop.test")
    https_port = lb0.port
    backend = procs.demo_backend("other")
    cfg = config([("app", backend)])
    plain = free_port()
    cfg["listeners"] = [
        {
            "name": "redirect",
            "bind": f"127.0.0.1:{plain}",
            "redirect_https": f"https://{{host}}:{https_port}",
        }
    ]
    lb = procs.balancer(cfg, name="redirect")
    with socket.create_connection(("127.0.0.1", plain), timeout=5) as s:
        s.sendall(b"GET /cart/items?id=7&q=a%20b HTTP/1.1\r\nHost: Shop.Test:8080\r\n\r\n")
        status, head, _ = read_response(s)
        assert status == 301
        location = [ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"location:")]
        assert location == [b"Location: https://shop.test:%d/cart/items?id=7&q=a%%20b" % https_port]
        # the redirect keeps the connection for the next request
        s.sendall(b"HEAD / HTTP/1.1\r\nHost: shop.test\r\n\r\n")
        data = s.recv(65536)
        assert (
            data.startswith(b"HTTP/1.1 301 ")
            and b"location: https://shop.test:%d/\r\n" % https_port in data.lower()
        )
    # following the Location lands on the TLS listener with a verified certificate
    status, _, body, _ = https_get(https_port, "shop.test", client_context(ca), "/echo?id=7")
    assert status == 200 and json.loads(body)["path"] == "/echo?id=7"
    assert lb.proc.poll() is None


# asyncio/uvloop give a TLS handshake 60 s by default, and the connection only reaches the
# protocol (and its header timeout) once the handshake is done: the listener bounds the
# handshake by timeouts.client_header.
def test_stalled_handshake_is_closed_at_the_header_timeout(procs, ca):
    backend = procs.demo_backend("app")
    cfg = tls_config(backend, [write_cert(ca.issue_cert("a.test", key_type=RSA), procs.tmp, "a")])
    cfg["timeouts"] = {"client_header": "1s"}
    lb = procs.balancer(cfg)
    with socket.create_connection(("127.0.0.1", lb.port), timeout=6) as s:
        t0 = time.monotonic()
        s.sendall(b"\x16\x03\x01")  # the start of a ClientHello record, never finished
        try:
            assert s.recv(100) == b""
        except ConnectionResetError:
            pass
        assert time.monotonic() - t0 < 3


def test_plain_http_on_the_tls_port_gets_a_clear_400(procs, ca):
    backend = procs.demo_backend("app")
    cfg = tls_config(backend, [write_cert(ca.issue_cert("a.test", key_type=RSA), procs.tmp, "a")])
    lb = procs.balancer(cfg)
    for _ in range(2):
        with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as s:
            s.sendall(b"GET /echo HTTP/1.1\r\nHost: a.test\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        assert data.startswith(b"HTTP/1.1 400 "), data
        assert b"plain HTTP request sent to the HTTPS port" in data
    assert lb.status()["listeners"][0]["rejected"] == 2
    status, _, _, _ = https_get(lb.port, "a.test", client_context(ca))
    assert status == 200  # TLS clients are served as before


def test_unfinished_handshakes_count_against_max_connections(procs, ca):
    # connections are counted at accept, before their handshake: a flood of clients that
    # never finish the handshake can't exceed limits.max_connections
    backend = procs.demo_backend("app")
    cfg = tls_config(backend, [write_cert(ca.issue_cert("a.test", key_type=RSA), procs.tmp, "a")])
    cfg["limits"] = {"max_connections": 2}
    lb = procs.balancer(cfg)
    # the harness's readiness probe was a connection too: its slot comes back once the
    # balancer has seen it close mid-handshake (taken now, it made this test flaky)
    time.sleep(0.5)
    stalled = [socket.create_connection(("127.0.0.1", lb.port), timeout=5) for _ in range(2)]
    try:
        time.sleep(0.3)
        try:
            # on a busy machine the reset can land before connect() has even returned
            with socket.create_connection(("127.0.0.1", lb.port), timeout=5) as third:
                got = third.recv(1)
        except ConnectionResetError:
            got = b""
        assert got == b""  # refused at once, not left waiting for a handshake
        assert lb.status()["listeners"][0]["refused"] >= 1
    finally:
        for s in stalled:
            s.close()
    # the slots come back when the stalled clients leave: a real client is served again
    time.sleep(0.3)
    status, _, _, _ = https_get(lb.port, "a.test", client_context(ca))
    assert status == 200
