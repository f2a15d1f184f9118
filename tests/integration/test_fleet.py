"""`balancer demo --fleet` as an operator runs it: etcd, two balancers sharing the registry
prefix and the sticky key, and self-registering app servers."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import urllib.request

import requests

from balancer.demo.fleet import free_port_run as free_run
from tests.integration.etcd import ETCD, b64
from tests.integration.harness import Processes, wait_port
from tests.integration.traffic import wait_until
from tests.support import missing_tool

PREFIX = "/balancer/pools/web/"


def backends(admin: int) -> dict[str, str]:
    with urllib.request.urlopen(f"http://127.0.0.1:{admin}/status", timeout=5) as r:
        pool = json.loads(r.read())["pools"]["web"]
    return {b["name"]: b["state"] for b in pool["backends"]}


def test_fleet_demo_shares_registry_and_sticky_key_and_stops_cleanly(procs: Processes):
    if not os.path.exists(ETCD):
        missing_tool("etcd not installed (Debian package etcd-server)")
    etcd, site, admin, app = free_run(2), free_run(2), free_run(2), free_run(4)
    demo = procs.start(
        [
            sys.executable,
            "-m",
            "balancer",
            "demo",
            "--fleet",
            "--churn",
            "0",
            "--etcd-port",
            str(etcd),
            "--port",
            str(site),
            "--admin-port",
            str(admin),
            "--app-port",
            str(app),
        ],
        log_name="fleet.log",
    )
    for port in (site, site + 1, admin, admin + 1):
        wait_port(port, demo, timeout=40)
    want = {"app1": "up", "app2": "up", "app3": "up"}
    for a in (admin, admin + 1):
        wait_until(lambda a=a: backends(a) == want, 15, f"lb on admin {a} to list {want}")

    # a change in etcd reaches both balancers (health-checked, then up)
    key = {
        "key": b64(PREFIX + "extra"),
        "value": b64(json.dumps({"address": f"127.0.0.1:{app + 3}"})),
    }
    req = urllib.request.Request(
        f"http://127.0.0.1:{etcd}/v3/kv/put", data=json.dumps(key).encode()
    )
    urllib.request.urlopen(req, timeout=5).read()
    for a in (admin, admin + 1):
        wait_until(lambda a=a: "extra" in backends(a), 5, "the new key at every balancer")

    # a client pinned by one balancer's cookie stays pinned through the other
    with requests.Session() as s:
        first = s.get(f"http://127.0.0.1:{site}/", timeout=5)
        pinned = first.headers["X-Backend-Name"]
        assert "LBSTICKY" in s.cookies
        for port in (site + 1, site, site + 1):
            for _ in range(3):
                r = s.get(f"http://127.0.0.1:{port}/", timeout=5)
                assert r.headers["X-Backend-Name"] == pinned

    demo.send_signal(signal.SIGTERM)
    assert demo.wait(30) == 0
    deadline = time.monotonic() + 10
    for port in (etcd, site, site + 1, admin, admin + 1, app, app + 1, app + 2):
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            except OSError:
                break
            assert time.monotonic() < deadline, f"port {port} still served after the demo ended"
            time.sleep(0.1)
