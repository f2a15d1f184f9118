"""A real etcd server (Debian's etcd-server) on loopback ports of its own, for the discovery
tests, and a blocking client for what the tests do to it (through its JSON gateway)."""

from __future__ import annotations

import base64
import json
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.integration.harness import Processes, free_port, wait_port
from tests.support import missing_tool

ETCD = shutil.which("etcd") or "/usr/bin/etcd"


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


class Etcd:
    """One etcd member (or a member of a cluster the test builds)."""

    def __init__(self, procs: Processes, name: str = "etcd", cluster: dict[str, int] | None = None):
        if not Path(ETCD).exists():
            missing_tool("etcd not installed (Debian package etcd-server)")
        self.procs = procs
        self.name = name
        self.client_port = free_port()
        self.peer_port = (cluster or {}).get(name) or free_port()
        self.cluster = cluster or {name: self.peer_port}
        self.data = procs.tmp / f"{name}.data"
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.client_port}"

    def start(self, wait: bool = True) -> Etcd:
        peers = ",".join(f"{n}=http://127.0.0.1:{p}" for n, p in self.cluster.items())
        self.proc = self.procs.start(
            [
                ETCD,
                "--name",
                self.name,
                "--data-dir",
                str(self.data),
                "--listen-client-urls",
                f"http://127.0.0.1:{self.client_port}",
                "--advertise-client-urls",
                f"http://127.0.0.1:{self.client_port}",
                "--listen-peer-urls",
                f"http://127.0.0.1:{self.peer_port}",
                "--initial-advertise-peer-urls",
                f"http://127.0.0.1:{self.peer_port}",
                "--initial-cluster",
                peers,
                "--initial-cluster-token",
                f"t{self.cluster[next(iter(self.cluster))]}",
                # quick elections: a lost leader is replaced within a second
                "--heartbeat-interval",
                "50",
                "--election-timeout",
                "500",
            ],
            log_name=f"{self.name}.log",
        )
        if wait:
            wait_port(self.client_port, self.proc, timeout=20)
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.call("kv/range", {"key": b64("/")})
                return
            except (OSError, RuntimeError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)

    def stop(self, sig: int = 15) -> None:
        assert self.proc is not None
        self.procs.stop(self.proc, sig)

    def call(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(
            f"http://{self.endpoint}/v3/{path}", data=json.dumps(body).encode(), method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as r:
                answer = json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"etcd {path}: {e.code} {e.read()[:200]!r}") from None
        if "error" in answer:
            raise RuntimeError(f"etcd {path}: {answer}")
        return answer

    def put(self, key: str, value: dict | bytes | str, lease: int = 0) -> int:
        raw = json.dumps(value).encode() if isinstance(value, dict) else value
        body: dict = {"key": b64(key), "value": b64(raw)}
        if lease:
            body["lease"] = str(lease)
        return int(self.call("kv/put", body)["header"]["revision"])

    def delete(self, key: str) -> int:
        return int(self.call("kv/deleterange", {"key": b64(key)})["header"]["revision"])

    def get(self, key: str) -> bytes | None:
        kvs = self.call("kv/range", {"key": b64(key)}).get("kvs", [])
        return base64.b64decode(kvs[0]["value"]) if kvs else None

    def compact(self) -> int:
        revision = int(self.call("kv/range", {"key": b64("/")})["header"]["revision"])
        self.call("kv/compaction", {"revision": str(revision), "physical": True})
        return revision

    def leader(self) -> bool:
        status = self.call("maintenance/status", {})
        return status.get("leader") == status.get("header", {}).get("member_id")
