"""The `balancer` command as an operator uses it: check, run with a bad file, demo."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import pytest
import requests

from tests.integration.harness import ROOT, free_port, wait_port

BAD = """listeners:
  - name: http
    bind: "127.0.0.1:{port}"
    routes: [{{pool: wbe}}]
pools:
  web:
    strategyy: round_robin
    backends:
      - {{name: a, address: "127.0.0.1:9001"}}
      - {{name: b, address: "127.0.0.1:70000"}}
"""


def balancer(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "balancer", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


def test_check_accepts_the_demo_config():
    r = balancer("check", "-c", str(ROOT / "config" / "demo.yaml"))
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


def test_check_names_where_a_pool_discovers_its_backends(tmp_path):
    path = tmp_path / "d.yaml"
    path.write_text(
        "listeners: [{name: http, bind: '127.0.0.1:8080', routes: [{pool: web}]}]\n"
        "pools:\n  web:\n    discovery:\n"
        "      etcd: {endpoints: ['127.0.0.1:2379'], prefix: /p/}\n"
        "      dns: {name: app.internal, type: SRV}\n"
    )
    r = balancer("check", "-c", str(path))
    assert r.returncode == 0, r.stderr
    assert "web (0 backends + etcd and dns, round_robin)" in r.stdout


def test_register_refuses_what_the_balancers_would_skip():
    for bad, why in (
        (["--name", "a/b", "--address", "127.0.0.1:1"], "not a backend name"),
        (["--name", "a", "--address", "127.0.0.1"], "port"),
        (["--name", "a", "--address", "127.0.0.1:1", "--ttl", "1"], "ttl"),
    ):
        r = balancer("register", "--etcd", "127.0.0.1:1", "--prefix", "/p/", *bad)
        assert r.returncode == 2 and why in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_check_reports_every_problem_with_its_location(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(BAD.format(port=free_port()))
    r = balancer("check", "-c", str(path))
    assert r.returncode == 1
    err = r.stderr
    assert "Traceback" not in err
    assert f"{path}:4: listeners[0].routes[0].pool" in err
    assert f"{path}:7: pools.web.strategyy: unknown key" in err and "strategy" in err
    assert f"{path}:10: pools.web.backends[1].address" in err


def test_check_missing_and_unparsable_files(tmp_path):
    r = balancer("check", "-c", str(tmp_path / "nope.yaml"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "nope.yaml" in r.stderr
    (tmp_path / "syntax.yaml").write_text("listeners: [\n  - {name: x\n")
    r = balancer("check", "-c", str(tmp_path / "syntax.yaml"))
    assert r.returncode == 1 and "Traceback" not in r.stderr and "syntax.yaml:" in r.stderr


def test_run_refuses_a_bad_file_before_binding(tmp_path):
    port = free_port()
    path = tmp_path / "bad.yaml"
    path.write_text(BAD.format(port=port))
    r = balancer("run", "-c", str(path))
    assert r.returncode == 1
    assert "pools.web.strategyy" in r.stderr and "Traceback" not in r.stderr
    with socket.socket() as s:  # the port was never bound
        s.bind(("127.0.0.1", port))


STICKY = """listeners:
  - name: http
    bind: "127.0.0.1:{port}"
    routes: [{{pool: web}}]
pools:
  web:
    sticky: {{cookie: LB}}
    backends: [{{name: a, address: "127.0.0.1:9001"}}]
admin: {{bind: "127.0.0.1:{admin}"}}
"""


def test_run_names_the_address_in_use_and_exits_1(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        path = tmp_path / "lb.yaml"
        path.write_text(STICKY.format(port=port, admin=free_port()))
        r = balancer("run", "-c", str(path))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert f"cannot start: [Errno 98] listener http on 127.0.0.1:{port}" in r.stderr


def test_sticky_key_file_beside_the_config_is_checked(tmp_path):
    # a sticky.key that holds no key: `check` passed it and `run` died in a traceback
    path = tmp_path / "lb.yaml"
    path.write_text(STICKY.format(port=free_port(), admin=free_port()))
    (tmp_path / "sticky.key").write_text("# no key here\n")
    for command in ("check", "run"):
        r = balancer(command, "-c", str(path))
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "lb.yaml:7: pools.web.sticky: " in r.stderr and "no key in the file" in r.stderr
    # a binary key (`openssl rand 32 > sticky.key`) is one raw key
    (tmp_path / "sticky.key").write_bytes(b"\xff\x00" * 16)
    r = balancer("check", "-c", str(path))
    assert r.returncode == 0, r.stderr


def test_demo_serves_three_backends_and_stops_on_ctrl_c():
    for port in (8080, 9000, 9101, 9102, 9103):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(
                    f"port {port} is busy: the demo's fixed ports must be free for this test"
                )
    p = subprocess.Popen(
        [sys.executable, "-m", "balancer", "demo"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        wait_port(8080, p)
        wait_port(9000, p)
        deadline = time.monotonic() + 10
        names = set()
        with requests.Session() as s:
            while time.monotonic() < deadline and len(names) < 3:
                r = s.get("http://127.0.0.1:8080/", timeout=5)
                assert r.status_code == 200
                names.add(r.headers["X-Backend-Name"])
        assert names == {"app1", "app2", "app3"}
        assert (
            requests.get("http://127.0.0.1:9000/status", timeout=5).json()["pools"]["web"][
                "strategy"
            ]
            == "round_robin"
        )
        p.send_signal(signal.SIGINT)
        assert p.wait(20) == 0
        out = p.stdout.read()
        assert "http://127.0.0.1:8080/" in out and "Traceback" not in out
        for port in (8080, 9101, 9102, 9103):  # everything it started is gone
            with socket.socket() as s:
                assert s.connect_ex(("127.0.0.1", port)) != 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(5)


def test_demo_sticky_keeps_a_browser_on_one_server():
    for port in (8080, 9000, 9101, 9102, 9103):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(
                    f"port {port} is busy: the demo's fixed ports must be free for this test"
                )
    p = subprocess.Popen(
        [sys.executable, "-m", "balancer", "demo", "--sticky"],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(8080, p)
        with requests.Session() as s:  # a browser: keeps the cookies it is given
            first = s.get("http://127.0.0.1:8080/", timeout=5)
            assert "LBSTICKY" in first.headers.get("Set-Cookie", "")
            names = {
                s.get("http://127.0.0.1:8080/", timeout=5).headers["X-Backend-Name"]
                for _ in range(9)
            }
        assert names == {first.headers["X-Backend-Name"]}
    finally:
        p.send_signal(signal.SIGINT)
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)
