"""`balancer demo --fleet`: a local etcd, several balancers sharing one registry prefix and one
sticky key, and demo app servers that register themselves and come and go.

Every part is a process of its own, started the way an operator would start it (`etcd`,
`balancer run -c ...`, `balancer demo-backend` beside `balancer register`), so the demo shows
the deployment, not a simulation of it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from balancer import sticky

PREFIX = "/balancer/pools/web/"
ETCD_CANDIDATES = ("etcd", "/usr/bin/etcd", "/usr/local/bin/etcd")


@dataclass
class FleetPorts:
    etcd: int = 2379  # client port; the peer port is the next one
    site: int = 8080  # balancer i listens on site + i
    admin: int = 9000  # and serves its admin API on admin + i
    app: int = 9101  # app server j on app + j


@dataclass
class App:
    name: str
    port: int
    server: subprocess.Popen
    registration: subprocess.Popen


@dataclass
class Fleet:
    """The processes of one fleet; `stop()` ends every one of them, by PID."""

    workdir: Path
    balancers: int = 2
    apps: int = 3
    ports: FleetPorts = field(default_factory=FleetPorts)
    log_level: str = "warning"
    app_args: tuple[str, ...] = ()  # extra `balancer demo-backend` options (--latency ...)
    health_interval: str = "1s"
    etcd: subprocess.Popen | None = None
    lbs: list[subprocess.Popen] = field(default_factory=list)
    running: list[App] = field(default_factory=list)
    _next_app: int = 1

    @property
    def etcd_endpoint(self) -> str:
        return f"127.0.0.1:{self.ports.etcd}"

    def site(self, i: int) -> str:
        return f"127.0.0.1:{self.ports.site + i}"

    def admin(self, i: int) -> str:
        return f"127.0.0.1:{self.ports.admin + i}"

    # -- starting -------------------------------------------------------------------------

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._start_etcd()
        key_file = self.workdir / "sticky.key"
        sticky.load_or_create_keys(str(key_file))  # one key for the whole fleet
        for i in range(self.balancers):
            path = self.workdir / f"lb{i + 1}.yaml"
            path.write_text(yaml.safe_dump(self.balancer_config(i, key_file), sort_keys=False))
            self.lbs.append(self._spawn(["run", "-c", str(path)], f"lb{i + 1}"))
        for i in range(self.balancers):
            _wait_port(self.site(i), self.lbs[i])
            _wait_port(self.admin(i), self.lbs[i])
        for _ in range(self.apps):
            self.add_app()

    def balancer_config(self, i: int, key_file: Path) -> dict:
        return {
            "listeners": [{"name": "http", "bind": self.site(i), "routes": [{"pool": "web"}]}],
            "pools": {
                "web": {
                    "strategy": "round_robin",
                    "sticky": {"cookie": "LBSTICKY", "ttl": "1h", "key_file": str(key_file)},
                    "health_check": {
                        "path": "/healthz",
                        "interval": self.health_interval,
                        "timeout": "500ms",
                    },
                    "discovery": {"etcd": {"endpoints": [self.etcd_endpoint], "prefix": PREFIX}},
                    "backends": [],
                }
            },
            "admin": {"bind": self.admin(i)},
        }

    def _start_etcd(self) -> None:
        binary = next((b for b in map(shutil.which, ETCD_CANDIDATES) if b), None)
        if binary is None:
            raise SystemExit(
                "balancer demo --fleet needs etcd: install it (Debian: apt install etcd-server)"
            )
        peer = self.ports.etcd + 1
        client = f"http://{self.etcd_endpoint}"
        self.etcd = self._popen(
            [
                binary,
                "--name",
                "fleet",
                "--data-dir",
                str(self.workdir / "etcd"),
                "--listen-client-urls",
                client,
                "--advertise-client-urls",
                client,
                "--listen-peer-urls",
                f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{peer}",
                "--initial-cluster",
                f"fleet=http://127.0.0.1:{peer}",
            ],
            "etcd",
        )
        _wait_port(self.etcd_endpoint, self.etcd, timeout=20)

    # -- app servers that come and go ---------------------------------------------------------

    def add_app(self) -> App:
        n = self._next_app
        self._next_app += 1
        name, port = f"app{n}", self.ports.app + n - 1
        server = self._spawn(
            ["demo-backend", "--port", str(port), "--name", name, *self.app_args], name
        )
        _wait_port(f"127.0.0.1:{port}", server)
        registration = self._spawn(
            [
                "register",
                "--etcd",
                self.etcd_endpoint,
                "--prefix",
                PREFIX,
                "--name",
                name,
                "--address",
                f"127.0.0.1:{port}",
                "--log-level",
                self.log_level,
            ],
            f"register-{name}",
        )
        app = App(name, port, server, registration)
        self.running.append(app)
        return app

    def remove_app(self) -> App | None:
        """Stop the newest app server the way a scale-in does: unregister, then stop it once
        the balancers have drained it."""
        if not self.running:
            return None
        app = self.running.pop()
        _stop(app.registration)
        time.sleep(1.5)  # the key is gone at once; in-flight requests finish meanwhile
        _stop(app.server)
        return app

    # -- stopping -----------------------------------------------------------------------------

    def stop(self) -> None:
        for app in self.running:
            _stop(app.registration)
        for app in self.running:
            _stop(app.server)
        self.running = []
        for lb in self.lbs:
            _stop(lb)
        self.lbs = []
        if self.etcd is not None:
            _stop(self.etcd)
            self.etcd = None

    # -- processes ----------------------------------------------------------------------------

    def _spawn(self, args: list[str], log: str) -> subprocess.Popen:
        argv = [sys.executable, "-m", "balancer", *args]
        if args[0] in ("run", "register") and "--log-level" not in args:
            argv += ["--log-level", self.log_level]
        return self._popen(argv, log)

    def _popen(self, argv: list[str], log: str) -> subprocess.Popen:
        out = open(self.workdir / f"{log}.log", "ab")  # noqa: SIM115 - the child keeps it
        try:
            return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        finally:
            out.close()


def free_port_run(n: int) -> int:
    """The first of `n` consecutive free loopback ports (a fleet's ports go in runs)."""
    import random

    for _ in range(200):
        base = random.randrange(20000, 60000)
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError(f"no run of {n} free ports")


def status(admin: str) -> dict:
    with urllib.request.urlopen(f"http://{admin}/status", timeout=5) as r:
        return json.loads(r.read())


def _stop(p: subprocess.Popen, timeout: float = 10.0) -> None:
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(5)


def _wait_port(address: str, proc: subprocess.Popen, timeout: float = 15.0) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"{proc.args[0]} exited with {proc.returncode} (is {address} free?)")
        try:
            with socket.create_connection((host, int(port)), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"nothing listening on {address} after {timeout:.0f}s") from None
            time.sleep(0.05)


def run_fleet(
    *, balancers: int = 2, apps: int = 3, churn: float = 20.0, ports: FleetPorts | None = None
) -> int:
    """The demo in the foreground until Ctrl-C: every `churn` seconds an app server joins or
    leaves (alternately), and every balancer follows through etcd."""
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="balancer-fleet-"))
    fleet = Fleet(workdir, balancers=balancers, apps=apps, ports=ports or FleetPorts())
    stopping = False

    def on_term(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, on_term)
    try:
        fleet.start()
        print(
            "\nbalancer demo --fleet is running:\n"
            f"  etcd       http://{fleet.etcd_endpoint}  (prefix {PREFIX})\n"
            + "".join(
                f"  lb{i + 1}        http://{fleet.site(i)}/   dashboard http://{fleet.admin(i)}/\n"
                for i in range(balancers)
            )
            + f"  apps       {', '.join(a.name for a in fleet.running)} (one joins or leaves"
            f" every {churn:.0f}s)\n"
            f"  logs       {workdir}\n"
            "Press Ctrl-C to stop everything.\n",
            flush=True,
        )
        grow = True
        next_change = time.monotonic() + churn
        while not stopping:
            time.sleep(0.2)
            if churn > 0 and time.monotonic() >= next_change:
                if grow:
                    print(f"scale out: {fleet.add_app().name} registers", flush=True)
                else:
                    app = fleet.remove_app()
                    print(f"scale in: {app.name if app else '-'} leaves", flush=True)
                grow = not grow
                next_change = time.monotonic() + churn
    except KeyboardInterrupt:
        pass
    finally:
        fleet.stop()
        if os.environ.get("BALANCER_FLEET_KEEP") != "1":
            shutil.rmtree(workdir, ignore_errors=True)
    return 0
