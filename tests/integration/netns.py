"""Real hosts in network namespaces on one bridge (198.18.0.0/24 only), and programs run in them.

`Topology` builds a private switch namespace holding a bridge, and one namespace per host joined
to it by a veth pair (`eth0` inside the host). Every name carries a per-run tag so parallel runs
never collide, and `cleanup()` kills every process it started (by PID) and deletes every
namespace it made, whatever happened before.

Run as a program inside a host namespace (`Topology.run(host, program("node", ...))`):

    netns.py node CONFIG_JSON    an HaNode plus a tiny HTTP responder on the wildcard address
    netns.py client URL          a steady request stream, one JSON line per request
    netns.py rogue CONFIG_JSON   forged, wrongly keyed and replayed heartbeats
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

NETWORK = ipaddress.ip_network("198.18.0.0/24")  # RFC 2544 benchmarking range; nothing else
PREFIX = NETWORK.prefixlen
IP = shutil.which("ip") or "ip"


def netns_problem() -> str | None:
    """Why namespaces cannot be used here, or None when they can."""
    if os.geteuid() != 0:
        return "network namespace tests need root"
    if shutil.which("ip") is None:
        return "network namespace tests need iproute2's `ip` (apt-get install iproute2)"
    probe = f"lbprobe{secrets.token_hex(3)}"
    made = subprocess.run([IP, "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"`ip netns add` failed: {made.stderr.strip()}"
    subprocess.run([IP, "netns", "del", probe], capture_output=True)
    return None


def require_netns() -> None:
    """Skip the calling test when namespaces are unavailable; under CI=true, fail it instead."""
    from tests.support import missing_tool

    problem = netns_problem()
    if problem is not None:
        missing_tool(problem)


def program(*args: str) -> list[str]:
    """argv running this file as a program with the current interpreter."""
    return [sys.executable, str(Path(__file__).resolve()), *args]


class JsonLines:
    """Collects the JSON lines a process prints, from a reader thread."""

    def __init__(self, proc: subprocess.Popen, name: str) -> None:
        self.proc = proc
        self.name = name
        self.items: list[dict[str, Any]] = []
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, name=f"read-{name}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                item = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                self.items.append(item)
                self._cond.notify_all()

    def snapshot(self) -> list[dict[str, Any]]:
        with self._cond:
            return list(self.items)

    def wait_for(
        self, pred: Callable[[dict[str, Any]], bool], timeout: float, what: str = ""
    ) -> dict[str, Any]:
        """The first line (old or new) satisfying pred; AssertionError after timeout."""
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for item in self.items[seen:]:
                    if pred(item):
                        return item
                seen = len(self.items)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(f"{self.name}: no {what or 'matching line'} in {timeout}s")
                self._cond.wait(min(left, 0.05))

    def last(self, event: str) -> dict[str, Any] | None:
        with self._cond:
            for item in reversed(self.items):
                if item.get("event") == event:
                    return item
        return None


class Topology:
    """A bridge in a private namespace and hosts (namespaces) hanging off it."""

    def __init__(self, tag: str | None = None) -> None:
        # 'lb' + 6 hex: unique per run, and short enough for every derived name.
        self.tag = tag or f"lb{secrets.token_hex(3)}"
        self.switch = f"{self.tag}-sw"
        self.hosts: dict[str, str] = {}  # host name -> ip
        self.logdir = Path(tempfile.mkdtemp(prefix=f"{self.tag}-logs-"))
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen] = []
        self._logs: list[Path] = []
        try:
            self._netns_add(self.switch)
            self._ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            self._ip("-n", self.switch, "link", "set", "br0", "up")
        except BaseException:
            self.cleanup()
            raise

    def __enter__(self) -> Topology:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def ns(self, host: str) -> str:
        """The namespace name of a host (a host name that is already one passes through)."""
        return host if host.startswith(f"{self.tag}-") else f"{self.tag}-{host}"

    def add_host(self, name: str, ip: str) -> str:
        """A namespace with `eth0` at ip/24 on the bridge; returns the namespace name."""
        if ipaddress.ip_address(ip) not in NETWORK:
            raise ValueError(f"{ip}: only {NETWORK} is used inside the namespaces")
        if name in self.hosts:
            raise ValueError(f"host {name} exists")
        ns = self.ns(name)
        port = f"v{len(self.hosts)}"
        self._netns_add(ns)
        self._ip("-n", ns, "link", "set", "lo", "up")
        self._ip(
            "-n", self.switch, "link", "add", port, "type", "veth", "peer", "name", "eth0",
            "netns", ns,
        )  # fmt: skip
        self._ip("-n", self.switch, "link", "set", port, "master", "br0", "up")
        self._ip("-n", ns, "addr", "add", f"{ip}/{PREFIX}", "dev", "eth0")
        self._ip("-n", ns, "link", "set", "eth0", "up")
        self.hosts[name] = ip
        return ns

    def run(self, host: str, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        """Start argv inside a host; stdout is a pipe, stderr goes to a log file."""
        log = self.logdir / f"{host}-{len(self._logs)}.log"
        self._logs.append(log)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **kw.pop("env", {})}
        with open(log, "wb") as err:
            # `ip netns exec` execs argv after setns, so the PID is the program's own.
            proc = subprocess.Popen(
                [IP, "netns", "exec", self.ns(host), *argv],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
                **kw,
            )
        self._procs.append(proc)
        return proc

    def exec(
        self, host: str, argv: Sequence[str], *, check: bool = True, timeout: float = 10.0
    ) -> subprocess.CompletedProcess:
        return subprocess.run(
            [IP, "netns", "exec", self.ns(host), *argv],
            capture_output=True,
            text=True,
            check=check,
            timeout=timeout,
        )

    def holders(self, vip: str) -> list[str]:
        """The hosts whose interfaces hold vip now, sorted."""
        ip = str(ipaddress.ip_interface(vip).ip)
        out = []
        for host in self.hosts:
            res = subprocess.run(
                [IP, "-n", self.ns(host), "-o", "-4", "addr", "show"],
                capture_output=True,
                text=True,
                timeout=5,
            )
            if re.search(rf"\binet {re.escape(ip)}/", res.stdout):
                out.append(host)
        return sorted(out)

    def mac(self, host: str, dev: str = "eth0") -> str:
        res = self._ip("-n", self.ns(host), "-o", "link", "show", dev)
        return re.search(r"link/ether ([0-9a-f:]{17})", res.stdout).group(1)  # type: ignore[union-attr]

    def neighbour(self, host: str, ip: str) -> str | None:
        """The MAC `host` has cached for ip, if any."""
        res = self._ip("-n", self.ns(host), "neigh", "show", ip)
        m = re.search(r"lladdr ([0-9a-f:]{17})", res.stdout)
        return m.group(1) if m else None

    def logs(self) -> str:
        parts = []
        for log in self._logs:
            if log.exists():
                parts.append(f"----- {log.name}\n{log.read_text(errors='replace')[-6000:]}")
        return "\n".join(parts)

    def cleanup(self) -> None:
        """Kill what we started, delete what we made. Safe to call twice."""
        for proc in self._procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(signal.SIGCONT)  # a stopped process dies only once resumed
                    proc.kill()
                except ProcessLookupError:
                    pass
        for proc in self._procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()
        self._procs.clear()
        # Deleting a namespace deletes its interfaces; a veth goes with either end.
        listed = subprocess.run([IP, "netns", "list"], capture_output=True, text=True).stdout
        mine = {line.split()[0] for line in listed.splitlines() if line.startswith(f"{self.tag}-")}
        for ns in [*self._namespaces, *sorted(mine - set(self._namespaces))]:
            subprocess.run([IP, "netns", "del", ns], capture_output=True)
        self._namespaces.clear()
        self.hosts.clear()

    def remove_logs(self) -> None:
        shutil.rmtree(self.logdir, ignore_errors=True)

    # -- helpers ---------------------------------------------------------------------------------

    def _netns_add(self, ns: str) -> None:
        self._ip("netns", "add", ns)
        self._namespaces.append(ns)

    def _ip(self, *args: str) -> subprocess.CompletedProcess:
        res = subprocess.run([IP, *args], capture_output=True, text=True, timeout=10)
        if res.returncode != 0:
            raise RuntimeError(f"ip {' '.join(args)}: {res.stderr.strip()}")
        return res


# ---------------------------------------------------------------------------------------------
# Programs run inside the namespaces
# ---------------------------------------------------------------------------------------------


def emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, "t": time.monotonic(), **fields}), flush=True)


def ha_config(spec: dict[str, Any]):  # -> HaConfig
    """An HaConfig from a JSON spec; `instances: [[virtual_ip, priority], ...]` for several VIPs."""
    from balancer.config import Address, HaConfig, HaInstanceConfig

    def address(text: str) -> Address:
        host, _, port = text.rpartition(":")
        return Address(host, int(port))

    extra: dict[str, Any] = {}
    if spec.get("instances"):
        extra["instances"] = tuple(HaInstanceConfig(v, p) for v, p in spec["instances"])
        spec = {**spec, "virtual_ip": spec["instances"][0][0], "priority": spec["instances"][0][1]}
    return HaConfig(
        node_id=spec["node_id"],
        interface=spec.get("interface", "eth0"),
        virtual_ip=spec["virtual_ip"],
        auth_key_file=spec["auth_key_file"],
        peers=tuple(address(p) for p in spec["peers"]),
        priority=spec.get("priority", 100),
        bind=address(spec.get("bind", "0.0.0.0:5405")),
        advert_interval=spec.get("advert_interval", 0.2),
        dead_after=spec.get("dead_after", 0.6),
        preempt=spec.get("preempt", True),
        notify=spec.get("notify"),
        **extra,
    )


async def _node_main(spec: dict[str, Any]) -> None:
    from balancer.ha.node import HaNode

    node_id = spec["ha"]["node_id"]
    inflight = 0
    unhealthy_file = spec.get("unhealthy_file")

    async def respond(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal inflight
        inflight += 1
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            body = f"{node_id}\n".encode()
            writer.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            inflight -= 1
            writer.close()

    async def drain() -> None:
        deadline = time.monotonic() + 5
        while inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.01)

    def healthy() -> bool:
        return not (unhealthy_file and os.path.exists(unhealthy_file))

    # Wildcard bind: the passive serves the VIP the instant it arrives, no ip_nonlocal_bind.
    server = await asyncio.start_server(respond, "0.0.0.0", spec.get("http_port", 8080))
    node = HaNode(
        ha_config(spec["ha"]),
        local_health=healthy,
        on_role_change=lambda role: emit("role", role=role, node=node_id),
    )
    await node.start()
    emit("started", node=node_id, pid=os.getpid())
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    every = spec.get("status_every", 0.25)
    while not stop.is_set():
        emit("status", **node.status())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every)
    t = time.monotonic()
    await node.shutdown(drain)
    server.close()
    emit("stopped", node=node_id, took=time.monotonic() - t, **{"final": node.status()})


async def _client_main(url: str, rate: float, timeout: float) -> None:
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    host, port = parts.hostname or "", parts.port or 80

    async def one(seq: int) -> None:
        t0 = time.monotonic()
        who = error = None
        writer = None
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            writer.write(
                f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode()
            )  # read() below waits for the end of the connection: ask for it
            raw = await asyncio.wait_for(reader.read(), timeout)
            head, _, body = raw.partition(b"\r\n\r\n")
            if head.startswith(b"HTTP/1.1 200"):
                who = body.decode().strip()
            else:
                error = head.split(b"\r\n", 1)[0].decode(errors="replace") or "empty answer"
        except TimeoutError:
            error = "timeout"
        except OSError as e:
            error = type(e).__name__
        finally:
            if writer is not None:
                writer.close()
        print(
            json.dumps(
                {"seq": seq, "t": t0, "end": time.monotonic(), "ok": who is not None, "who": who,
                 "error": error}
            ),
            flush=True,
        )  # fmt: skip

    interval = 1.0 / rate
    start = time.monotonic()
    tasks: set[asyncio.Task] = set()
    seq = 0
    while True:
        # A fixed schedule: a hanging request never delays the next one.
        task = asyncio.ensure_future(one(seq))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        seq += 1
        await asyncio.sleep(max(0.0, start + seq * interval - time.monotonic()))


async def _rogue_main(spec: dict[str, Any]) -> None:
    """Heartbeats the real nodes must ignore: a wrong key from a configured peer address, the right
    key from an address not in peers, and genuine heartbeats replayed late."""
    import socket

    from balancer.ha.heartbeat import FLAG_PREEMPT, FLAG_READY, Heartbeat, encode
    from balancer.ha.state import Role

    def target(text: str) -> tuple[str, int]:
        host, _, port = text.rpartition(":")
        return host, int(port)

    targets = [target(t) for t in spec["targets"]]
    wrong_key = spec["wrong_key"].encode()
    right_key = spec["right_key"].encode()
    listen = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    listen.bind((spec["peer_ip"], 5405))  # where the nodes send us their genuine heartbeats
    listen.setblocking(False)
    as_peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    as_peer.bind((spec["peer_ip"], 0))
    stranger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    stranger.bind((spec["stranger_ip"], 0))
    captured: list[tuple[float, bytes]] = []
    seq = 0
    epoch = time.time_ns()
    counts = {"wrong_key": 0, "stranger": 0, "replayed": 0}
    while True:
        seq += 1
        forged = Heartbeat(
            "intruder", 254, Role.ACTIVE, epoch, seq, time.time_ns(), FLAG_READY | FLAG_PREEMPT
        )
        for t in targets:
            as_peer.sendto(encode(forged, wrong_key), t)
            counts["wrong_key"] += 1
            stranger.sendto(encode(forged, right_key), t)
            counts["stranger"] += 1
        try:
            while True:
                captured.append((time.monotonic(), listen.recv(2048)))
        except BlockingIOError:
            pass
        # Genuine heartbeats a node sent us, replayed half a second later to every node.
        now = time.monotonic()
        while captured and now - captured[0][0] > 0.5:
            _, data = captured.pop(0)
            for t in targets:
                as_peer.sendto(data, t)
                counts["replayed"] += 1
        emit("rogue", **counts)
        await asyncio.sleep(spec.get("interval", 0.05))


def main(argv: list[str] | None = None) -> None:
    import logging

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    node = sub.add_parser("node")
    node.add_argument("spec")
    client = sub.add_parser("client")
    client.add_argument("url")
    client.add_argument("--rate", type=float, default=20.0)
    client.add_argument("--timeout", type=float, default=0.5)
    rogue = sub.add_parser("rogue")
    rogue.add_argument("spec")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.cmd == "node":
        import uvloop  # as the daemon runs

        uvloop.run(_node_main(json.loads(args.spec)))
    elif args.cmd == "client":
        asyncio.run(_client_main(args.url, args.rate, args.timeout))
    else:
        asyncio.run(_rogue_main(json.loads(args.spec)))


if __name__ == "__main__":
    main()
