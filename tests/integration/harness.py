"""Real-process harness for integration tests: free ports, balancer and backend processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
RAWSERVER = Path(__file__).with_name("rawserver.py")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(
    port: int, proc: subprocess.Popen | None = None, timeout: float = 15.0, host: str = "127.0.0.1"
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"process {proc.args} exited with {proc.returncode} before listening on {port}"
            )
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s") from None
            time.sleep(0.03)


def rss_kib(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


class Processes:
    """Every process a test starts; all are stopped by PID at teardown, even on failure."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []

    def start(self, argv: list[str], *, log_name: str, **kw) -> subprocess.Popen:  # type: ignore[no-untyped-def]
        log = open(self.tmp / log_name, "ab")  # noqa: SIM115 - closed with the process
        p = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, **kw)
        p._log = log  # type: ignore[attr-defined]
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if p.poll() is None:
            p.send_signal(sig)
            try:
                p.wait(timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        p._log.close()  # type: ignore[attr-defined]
        return p.returncode

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)  # a test may have stopped it
                except ProcessLookupError:
                    pass
                self.stop(
                    p, signal.SIGKILL if getattr(p, "_hard", False) else signal.SIGTERM, timeout=5
                )
            else:
                p._log.close()  # type: ignore[attr-defined]

    # -- backends --------------------------------------------------------------------------

    def demo_backend(self, name: str, *args: str, port: int | None = None) -> int:
        port = port or free_port()
        p = self.start(
            [
                sys.executable,
                "-m",
                "balancer.demo.backend",
                "--port",
                str(port),
                "--name",
                name,
                *args,
            ],
            log_name=f"backend-{name}.log",
        )
        wait_port(port, p)
        return port

    def raw_backend(self, name: str, mode: str = "ok", *args: str) -> tuple[int, Path]:
        """The scripted backend of rawserver.py; returns (port, file of raw bytes received)."""
        port = free_port()
        record = self.tmp / f"raw-{name}.bin"
        p = self.start(
            [
                sys.executable,
                str(RAWSERVER),
                "--port",
                str(port),
                "--mode",
                mode,
                "--record",
                str(record),
                *args,
            ],
            log_name=f"raw-{name}.log",
        )
        wait_port(port, p)
        return port, record

    # -- the balancer ----------------------------------------------------------------------

    def balancer(  # type: ignore[no-untyped-def]
        self, config: dict | str, *, name: str = "lb", wait: bool = True, **popen
    ) -> Balancer:
        path = self.tmp / f"{name}.yaml"
        text = config if isinstance(config, str) else yaml.safe_dump(config, sort_keys=False)
        path.write_text(text)
        log = self.tmp / f"{name}.log"
        p = self.start(
            [sys.executable, "-m", "balancer", "run", "-c", str(path)],
            log_name=f"{name}.log",
            **popen,
        )
        cfg = yaml.safe_load(text)
        lb = Balancer(p, path, log, cfg)
        if wait:
            for port in lb.ports.values():
                wait_port(port, p)
            wait_port(lb.admin_port, p)
        return lb


class Balancer:
    def __init__(self, proc: subprocess.Popen, config_path: Path, log: Path, cfg: dict) -> None:
        self.proc = proc
        self.config_path = config_path
        self.log = log
        self.cfg = cfg
        self.ports = {lst["name"]: int(lst["bind"].rsplit(":", 1)[1]) for lst in cfg["listeners"]}
        admin = cfg.get("admin", {}).get("bind", "127.0.0.1:9000")
        self.admin_port = int(admin.rsplit(":", 1)[1])

    @property
    def port(self) -> int:
        return next(iter(self.ports.values()))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def admin(
        self, path: str, method: str = "GET", body: dict | None = None, token: str | None = None
    ) -> tuple[int, object]:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(
            f"http://127.0.0.1:{self.admin_port}{path}", data=data, method=method
        )
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if token:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                raw = r.read()
                status = r.status
        except urllib.error.HTTPError as e:
            raw = e.read()
            status = e.code
        try:
            return status, json.loads(raw)
        except ValueError:
            return status, raw.decode("utf-8", "replace")

    def status(self) -> dict:
        code, body = self.admin("/status")
        assert code == 200, body
        return body  # type: ignore[return-value]

    def backend(self, pool: str, name: str) -> dict:
        for b in self.status()["pools"][pool]["backends"]:
            if b["name"] == name:
                return b
        raise KeyError(name)

    def wait_state(self, pool: str, name: str, state: str, timeout: float = 10.0) -> float:
        start = time.monotonic()
        while True:
            if self.backend(pool, name)["state"] == state:
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                raise TimeoutError(
                    f"{pool}/{name} not {state} after {timeout}s: {self.backend(pool, name)}"
                )
            time.sleep(0.05)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def config(backends: list[tuple[str, int]], *, pool: dict | None = None, **top) -> dict:  # type: ignore[no-untyped-def]
    """A one-listener, one-pool config on free ports."""
    cfg: dict = {
        "listeners": [
            {"name": "http", "bind": f"127.0.0.1:{free_port()}", "routes": [{"pool": "web"}]}
        ],
        "pools": {
            "web": {
                "strategy": "round_robin",
                "backends": [{"name": n, "address": f"127.0.0.1:{p}"} for n, p in backends],
                **(pool or {}),
            }
        },
        "admin": {"bind": f"127.0.0.1:{free_port()}"},
    }
    cfg.update(top)
    return cfg


def http_raw(
    port: int,
    data: bytes,
    *,
    timeout: float = 10.0,
    read_until_close: bool = True,
    expect_responses: int = 1,
) -> bytes:
    """Send raw bytes, return everything received until the server closes (or timeout)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            chunks.append(chunk)
            if not read_until_close and b"".join(chunks).count(b"HTTP/1.1 ") >= expect_responses:
                got = b"".join(chunks)
                if complete_responses(got) >= expect_responses:
                    break
        return b"".join(chunks)


def complete_responses(data: bytes) -> int:
    """How many complete Content-Length-framed responses `data` holds."""
    n = 0
    while True:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return n
        head = data[:end].lower()
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line.startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        if len(data) < end + 4 + length:
            return n
        n += 1
        data = data[end + 4 + length :]


def read_response(s: socket.socket) -> tuple[int, bytes, bytes]:
    """One Content-Length-framed response from a socket: (status, head, body)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        assert chunk, f"connection closed mid-head: {data!r}"
        data += chunk
    head, body = data.split(b"\r\n\r\n", 1)
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = s.recv(65536)
        assert chunk, "connection closed mid-body"
        body += chunk
    return int(head.split(b" ", 2)[1]), head, body[:length]
