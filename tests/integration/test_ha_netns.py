"""The HA pair on real networks: namespaces on a bridge, a client streaming requests to the VIP."""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from balancer.ha.node import vip_lifetime
from tests.integration.netns import JsonLines, Topology, program, require_netns

pytestmark = pytest.mark.netns

VIP = "198.18.0.100/24"
VIP_IP = "198.18.0.100"
ADVERT = 0.2
DEAD = 0.6
RATE = 20.0  # client requests per second
IPS = {"client": "198.18.0.10", "lb1": "198.18.0.11", "lb2": "198.18.0.12"}
ROGUE_IP, STRANGER_IP = "198.18.0.13", "198.18.0.14"
KEY = "ha-test-key-0123456789abcdef"


class Cluster:
    """Two HA nodes and a client in a topology; every wait bounded."""

    def __init__(self, topo: Topology, tmp: Path) -> None:
        self.topo = topo
        self.tmp = tmp
        self.key_file = tmp / "ha.key"
        self.key_file.write_text(KEY + "\n")
        self.key_file.chmod(0o600)
        self.nodes: dict[str, JsonLines] = {}
        self.stream: JsonLines | None = None

    def start(self, name: str, priority: int, *, peers: list[str] | None = None, **ha: Any):
        other = "lb2" if name == "lb1" else "lb1"
        spec: dict[str, Any] = {
            "ha": {
                "node_id": name,
                "virtual_ip": VIP,
                "auth_key_file": str(self.key_file),
                "peers": [f"{ip}:5405" for ip in (peers or [IPS[other]])],
                "priority": priority,
                "advert_interval": ADVERT,
                "dead_after": DEAD,
                **ha,
            },
            "unhealthy_file": str(self.tmp / f"{name}.unhealthy"),
        }
        node = JsonLines(self.topo.run(name, program("node", json.dumps(spec))), name)
        node.wait_for(lambda e: e.get("event") == "started", 10, "start")
        self.nodes[name] = node
        return node

    def client(self) -> JsonLines:
        url = f"http://{VIP_IP}:8080/"
        proc = self.topo.run("client", program("client", url, "--rate", str(RATE)))
        self.stream = JsonLines(proc, "client")
        return self.stream

    def wait_holders(self, expected: list[str], timeout: float) -> float:
        """Poll until exactly `expected` hold the VIP; returns when (monotonic)."""
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            got = self.topo.holders(VIP)
            if got == expected:
                return now
            assert now < deadline, f"holders {got}, wanted {expected} within {timeout}s"
            time.sleep(0.01)

    def served_by(self, who: str, after: float, timeout: float = 5.0) -> dict[str, Any]:
        assert self.stream is not None
        return self.stream.wait_for(
            lambda r: r["ok"] and r["who"] == who and r["t"] >= after, timeout, f"answer by {who}"
        )

    def failures(self, since: float = 0.0, until: float = float("inf")) -> list[dict[str, Any]]:
        assert self.stream is not None
        return [r for r in self.stream.snapshot() if not r["ok"] and since <= r["t"] <= until]

    def status(self, name: str) -> dict[str, Any]:
        """The first status the node printed from now on (it prints one every 0.25 s)."""
        now = time.monotonic()
        return self.nodes[name].wait_for(
            lambda e: e.get("event") == "status" and e["t"] > now, 2, "status"
        )

    def warm_stream(self, who: str) -> None:
        """Start the client and let it run a second against the current holder."""
        self.client()
        self.served_by(who, 0.0)
        time.sleep(1.0)
        assert self.failures() == [], "failures before anything happened"


def sample_holders(topo: Topology, seconds: float) -> list[tuple[float, list[str]]]:
    samples = []
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        samples.append((time.monotonic(), topo.holders(VIP)))
        time.sleep(0.02)
    return samples


def measure(what: str, **values: Any) -> None:
    text = ", ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
    )
    print(f"HA-MEASURE {what}: {text}", file=sys.stderr)


@pytest.fixture
def topo() -> Iterator[Topology]:
    require_netns()
    t = Topology()
    try:
        for name, ip in IPS.items():
            t.add_host(name, ip)
        yield t
    finally:
        print(t.logs())  # pytest shows it for a failed test only
        t.cleanup()
        t.remove_logs()


@pytest.fixture
def cluster(topo: Topology, tmp_path: Path) -> Cluster:
    return Cluster(topo, tmp_path)


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("ci", "outcome"), [("true", "failed"), ("", "skipped")])
def test_missing_prerequisite_skips_but_fails_under_ci(
    monkeypatch: pytest.MonkeyPatch, ci: str, outcome: str
) -> None:
    from tests.integration import netns

    monkeypatch.setattr(netns, "netns_problem", lambda: "network namespace tests need root")
    monkeypatch.setenv("CI", ci)
    expected = pytest.fail.Exception if outcome == "failed" else pytest.skip.Exception
    with pytest.raises(expected, match="need root"):
        netns.require_netns()


def test_topology_isolated_and_cleaned_up() -> None:
    require_netns()
    t = Topology()
    try:
        t.add_host("a", "198.18.0.21")
        t.add_host("b", "198.18.0.22")
        with pytest.raises(ValueError, match="198.18.0.0/24"):
            t.add_host("c", "192.0.2.1")  # TEST-NET-1: outside the range, never used
        ping = t.exec("a", [sys.executable, "-c", _CONNECT, "198.18.0.22", "9"], check=False)
        assert ping.stdout.strip() == "ConnectionRefusedError", ping.stderr  # b's kernel answered
        assert t.holders("198.18.0.22/24") == ["b"]
        sleeper = t.run("a", [sys.executable, "-c", "import time; time.sleep(60)"])
        names = {t.ns("a"), t.ns("b"), t.switch}
    finally:
        t.cleanup()
        t.remove_logs()
    listed = os.popen("ip netns list").read()
    assert not any(n in listed for n in names)
    assert sleeper.poll() is not None


_CONNECT = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=2).close()
    print("connected")
except OSError as e:
    print(type(e).__name__)
"""


def test_kill9_passive_takes_over_before_dead_after(cluster: Cluster, topo: Topology) -> None:
    lb1 = cluster.start("lb1", 150)
    cluster.start("lb2", 100)
    cluster.wait_holders(["lb1"], 5)
    cluster.warm_stream("lb1")

    t_kill = time.monotonic()
    lb1.proc.kill()
    first = cluster.served_by("lb2", t_kill)
    gap = first["end"] - t_kill
    failed = cluster.failures(t_kill - 1.0, first["t"])
    measure("kill -9", gap_s=gap, failed=len(failed), rate=RATE)
    assert gap < DEAD, "crash detection (port unreachable) beats waiting out dead_after"
    assert "crashed" in cluster.status("lb2")["last_transition"]
    # lb2's gratuitous ARP moved the client without waiting for its ARP cache to age.
    assert topo.neighbour("client", VIP_IP) == topo.mac("lb2")
    # The killed node's kernel keeps the VIP only until its lifetime runs out.
    gone = cluster.wait_holders(["lb2"], vip_lifetime(DEAD) + 1.5)
    measure("kill -9 stale VIP expired", after_s=gone - t_kill)
    assert all(h == ["lb2"] for _, h in sample_holders(topo, 1.0))
    assert cluster.failures(first["t"]) == []


def test_sigstop_takeover_and_woken_node_yields(cluster: Cluster, topo: Topology) -> None:
    lb1 = cluster.start("lb1", 150, preempt=False)
    cluster.start("lb2", 100, preempt=False)
    cluster.wait_holders(["lb1"], 5)
    cluster.warm_stream("lb1")

    t_stop = time.monotonic()
    os.kill(lb1.proc.pid, signal.SIGSTOP)
    try:
        took = cluster.wait_holders(["lb1", "lb2"], DEAD + 5 * ADVERT) - t_stop
        first = cluster.served_by("lb2", t_stop)
        gap = first["end"] - t_stop
        failed = cluster.failures(t_stop - 1.0, first["t"])
        measure("SIGSTOP", takeover_s=took, gap_s=gap, failed=len(failed), rate=RATE)
        assert took <= DEAD + 3 * ADVERT, "takeover within dead_after plus a few adverts"
        # The stopped node's kernel still holds the VIP (its lifetime is not over), so what
        # the node does on waking decides whether two hold it.
        assert topo.holders(VIP) == ["lb1", "lb2"]
        assert time.monotonic() - t_stop < vip_lifetime(DEAD) - 0.3
    finally:
        t_cont = time.monotonic()
        os.kill(lb1.proc.pid, signal.SIGCONT)
    samples = sample_holders(topo, 3.0)
    settled = next(t for t, h in samples if h == ["lb2"])
    measure("SIGCONT", woken_node_dropped_vip_after_s=settled - t_cont)
    assert settled - t_cont < 0.3, "the woken node drops the VIP at once"
    after = [h for t, h in samples if t >= settled]
    assert all(h == ["lb2"] for h in after), f"not exactly one holder: {after}"
    lb1.wait_for(lambda e: e.get("event") == "role" and e["role"] == "passive", 2, "passive")
    assert "woke" in cluster.status("lb1")["last_transition"]
    assert cluster.status("lb2")["role"] == "active"
    assert cluster.failures(first["t"]) == []


def test_sigterm_resign_hands_over_without_failed_requests(
    cluster: Cluster, topo: Topology
) -> None:
    lb1 = cluster.start("lb1", 150)
    cluster.start("lb2", 100)
    cluster.wait_holders(["lb1"], 5)
    cluster.warm_stream("lb1")

    t_term = time.monotonic()
    lb1.proc.send_signal(signal.SIGTERM)
    assert lb1.proc.wait(10) == 0
    stopped = lb1.wait_for(lambda e: e.get("event") == "stopped", 1, "stopped")
    first = cluster.served_by("lb2", t_term)
    time.sleep(1.0)
    measure(
        "SIGTERM",
        switch_s=first["end"] - t_term,
        shutdown_s=stopped["took"],
        failed=len(cluster.failures()),
        rate=RATE,
    )
    assert cluster.failures() == [], "a planned hand-over fails no request"
    assert topo.holders(VIP) == ["lb2"]
    assert stopped["final"]["holds_vip"] is False
    assert stopped["took"] < DEAD, "the successor claimed at once, no dead_after wait"


def test_preempt_hand_back_keeps_exactly_one_holder(cluster: Cluster, topo: Topology) -> None:
    lb1 = cluster.start("lb1", 150)
    cluster.start("lb2", 100)
    cluster.wait_holders(["lb1"], 5)
    cluster.warm_stream("lb1")
    lb1.proc.kill()
    t_kill = time.monotonic()
    cluster.served_by("lb2", t_kill)

    t_back = time.monotonic()
    cluster.start("lb1", 150)  # removes the VIP its killed predecessor left, starts passive
    converged = cluster.wait_holders(["lb1"], DEAD + 2.0)
    cluster.served_by("lb1", t_back)
    measure(
        "preempt hand-back",
        after_restart_s=converged - t_back,
        failed=len(cluster.failures(t_back)),
    )
    assert converged - t_back >= DEAD, "the returning node listens before it takes over"
    samples = sample_holders(topo, 3.0)
    assert all(h == ["lb1"] for _, h in samples), [h for _, h in samples if h != ["lb1"]]
    assert cluster.status("lb2")["role"] == "passive"
    assert "preempted by lb1" in cluster.status("lb2")["last_transition"]
    assert len(cluster.failures(t_back)) <= 1, "make before break: at most a request in flight"


def test_wrong_key_replayed_and_unknown_heartbeats_do_not_move_the_vip(
    cluster: Cluster, topo: Topology
) -> None:
    topo.add_host("rogue", ROGUE_IP)
    topo.exec("rogue", ["ip", "addr", "add", f"{STRANGER_IP}/24", "dev", "eth0"])
    # The rogue sits at an address both nodes list as a peer, but has the wrong key.
    cluster.start("lb1", 150, peers=[IPS["lb2"], ROGUE_IP])
    cluster.start("lb2", 100, peers=[IPS["lb1"], ROGUE_IP])
    cluster.wait_holders(["lb1"], 5)
    rogue_spec = {
        "targets": [f"{IPS['lb1']}:5405", f"{IPS['lb2']}:5405"],
        "wrong_key": "not-the-key-0123456789abcdef",
        "right_key": KEY,
        "peer_ip": ROGUE_IP,
        "stranger_ip": STRANGER_IP,
        "interval": 0.05,
    }
    rogue = JsonLines(topo.run("rogue", program("rogue", json.dumps(rogue_spec))), "rogue")
    samples = sample_holders(topo, 3.0)
    sent = rogue.last("rogue")
    assert sent is not None and sent["replayed"] > 0 and sent["wrong_key"] > 20
    assert all(h == ["lb1"] for _, h in samples), [h for _, h in samples if h != ["lb1"]]
    for name, transitions in (("lb1", 1), ("lb2", 0)):
        st = cluster.status(name)
        rejected = st["heartbeats"]["rejected"]
        measure(f"rogue vs {name}", **rejected)
        assert rejected["auth"] > 0 and rejected["unknown_peer"] > 0 and rejected["replay"] > 0
        assert st["transitions"] == transitions
        assert {p["node_id"] for p in st["peers"]} == {None, "lb2" if name == "lb1" else "lb1"}
    assert cluster.status("lb1")["role"] == "active"


def test_self_fencing_status_and_notify(cluster: Cluster, topo: Topology, tmp_path: Path) -> None:
    notes = {n: tmp_path / f"{n}.notify" for n in ("lb1", "lb2")}

    def notify(name: str) -> str:
        return f"sh -c 'echo \"$0\" >> {notes[name]}'"

    def wait_notes(name: str, expected: list[str]) -> None:
        deadline = time.monotonic() + 5
        while True:
            got = notes[name].read_text().split() if notes[name].exists() else []
            if got == expected:
                return
            assert time.monotonic() < deadline, f"{name} notify saw {got}, wanted {expected}"
            time.sleep(0.02)

    cluster.start("lb1", 150, notify=notify("lb1"))
    cluster.start("lb2", 120, notify=notify("lb2"))
    cluster.wait_holders(["lb1"], 5)
    wait_notes("lb1", ["active"])
    time.sleep(0.5)
    st = cluster.status("lb1")
    assert (st["role"], st["holds_vip"], st["effective_priority"], st["healthy"]) == (
        "active",
        True,
        150,
        True,
    )
    assert st["vip"] == VIP and st["interface"] == "eth0" and st["transitions"] == 1
    (peer,) = st["peers"]
    assert (peer["node_id"], peer["live"], peer["role"], peer["priority"]) == (
        "lb2",
        True,
        "passive",
        120,
    )
    assert peer["last_seen_age"] < 2 * ADVERT
    assert st["heartbeats"]["sent"] > 0 and st["heartbeats"]["received"] > 0
    assert sum(st["heartbeats"]["rejected"].values()) == 0

    # lb1's proxy goes unhealthy: 150 - 50 = 100 < 120, lb2 takes over, no moment without VIP.
    (tmp_path / "lb1.unhealthy").touch()
    t = time.monotonic()
    seen = []
    while time.monotonic() - t < 3 and seen[-1:] != [["lb2"]]:
        seen.append(topo.holders(VIP))
        time.sleep(0.01)
    assert seen[-1] == ["lb2"]
    assert [] not in seen
    time.sleep(0.5)
    st = cluster.status("lb1")
    assert (st["role"], st["healthy"], st["effective_priority"]) == ("passive", False, 100)
    assert "fenced" in st["last_transition"]
    wait_notes("lb2", ["active"])

    # Healthy again, preempt on: lb1 takes the role back.
    (tmp_path / "lb1.unhealthy").unlink()
    cluster.wait_holders(["lb1"], DEAD + 2.0)
    wait_notes("lb1", ["active", "passive", "active"])
    wait_notes("lb2", ["active", "passive"])


_VIP_OPS = """
import asyncio, json, sys, time
from balancer.ha.vip import Vip, VipAddress
vip = VipAddress("eth0", "198.18.0.100/24")
op = sys.argv[1]
if op == "idempotent":
    vip.add(); vip.add()
    held = vip.holds_vip()
    first, second = vip.remove(), vip.remove()
    print(json.dumps([held, first, second, vip.holds_vip()]))
elif op == "lifetime":
    vip.add(lifetime=2)
    t = time.monotonic()
    while time.monotonic() - t < 3.5:  # renewed: stays past its lifetime
        vip.add(lifetime=2); time.sleep(0.2)
    renewed = vip.holds_vip()
    t = time.monotonic()
    while vip.holds_vip() and time.monotonic() - t < 5:
        time.sleep(0.05)
    print(json.dumps([renewed, vip.holds_vip(), time.monotonic() - t]))
elif op == "claim":
    async def main():
        v = Vip("eth0", "198.18.0.100/24", garp_count=3, garp_interval=0.05)
        await v.add()
        await v.announce()
        print(json.dumps([await v.holds_vip(), v.garps_sent]))
        v.close()
    asyncio.run(main())
elif op == "remove":
    print(json.dumps(vip.remove()))
"""


def test_vip_add_remove_lifetime_and_gratuitous_arp(topo: Topology) -> None:
    def vip(host: str, op: str) -> Any:
        res = topo.exec(host, [sys.executable, "-c", _VIP_OPS, op], check=False)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    assert vip("lb1", "idempotent") == [True, True, False, False]
    renewed, still, expired_in = vip("lb1", "lifetime")
    assert renewed and not still
    assert 1.0 < expired_in < 3.5  # lifetime 2 s, checked by the kernel on whole seconds

    # The client learns the VIP at lb2 by ARP, then lb1 claims it and announces:
    # the client's cache must follow without any traffic of its own.
    assert vip("lb2", "claim") == [True, 6]
    out = topo.exec("client", [sys.executable, "-c", _CONNECT, VIP_IP, "9"], check=False)
    assert out.stdout.strip() == "ConnectionRefusedError"
    assert topo.neighbour("client", VIP_IP) == topo.mac("lb2")
    assert vip("lb2", "remove") is True
    assert vip("lb1", "claim") == [True, 6]
    assert topo.neighbour("client", VIP_IP) == topo.mac("lb1")
    assert topo.holders(VIP) == ["lb1"]
