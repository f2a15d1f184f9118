"""Active-active on real networks: two HA nodes sharing two floating IPs, each preferred for one,
and a client streaming requests to each address (namespaces on a bridge, 198.18.0.0/24 only)."""

from __future__ import annotations

import json
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

A, B = "198.18.0.100/24", "198.18.0.101/24"
A_IP, B_IP = "198.18.0.100", "198.18.0.101"
ADVERT = 0.2
DEAD = 0.6
RATE = 20.0  # requests per second, per stream
IPS = {"client": "198.18.0.10", "lb1": "198.18.0.11", "lb2": "198.18.0.12"}
KEY = "ha-active-active-key-0123456789"
# lb1 prefers A and backs up B; lb2 has them the other way round (and lists them in that order)
INSTANCES = {"lb1": [[A, 150], [B, 100]], "lb2": [[B, 150], [A, 100]]}


class Pair:
    def __init__(self, topo: Topology, tmp: Path) -> None:
        self.topo = topo
        self.tmp = tmp
        self.key_file = tmp / "ha.key"
        self.key_file.write_text(KEY + "\n")
        self.key_file.chmod(0o600)
        self.nodes: dict[str, JsonLines] = {}
        self.streams: dict[str, JsonLines] = {}

    def start(self, name: str, **ha: Any) -> JsonLines:
        other = "lb2" if name == "lb1" else "lb1"
        spec = {
            "ha": {
                "node_id": name,
                "instances": INSTANCES[name],
                "auth_key_file": str(self.key_file),
                "peers": [f"{IPS[other]}:5405"],
                "advert_interval": ADVERT,
                "dead_after": DEAD,
                **ha,
            }
        }
        node = JsonLines(self.topo.run(name, program("node", json.dumps(spec))), name)
        node.wait_for(lambda e: e.get("event") == "started", 10, "start")
        self.nodes[name] = node
        return node

    def holders(self) -> dict[str, list[str]]:
        return {A_IP: self.topo.holders(A), B_IP: self.topo.holders(B)}

    def wait_holders(self, expected: dict[str, list[str]], timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while True:
            now = time.monotonic()
            got = self.holders()
            if got == expected:
                return now
            assert now < deadline, f"holders {got}, wanted {expected} within {timeout}s"
            time.sleep(0.01)

    def stream_to_each(self) -> None:
        """A client stream to each address, warmed for a second against the current holders."""
        for ip in (A_IP, B_IP):
            proc = self.topo.run(
                "client", program("client", f"http://{ip}:8080/", "--rate", str(RATE))
            )
            self.streams[ip] = JsonLines(proc, f"client-{ip}")
        for ip, who in ((A_IP, "lb1"), (B_IP, "lb2")):
            self.served_by(ip, who, 0.0)
        time.sleep(1.0)
        assert self.failures() == {A_IP: [], B_IP: []}, "failures before anything happened"

    def served_by(self, ip: str, who: str, after: float, timeout: float = 5.0) -> dict[str, Any]:
        return self.streams[ip].wait_for(
            lambda r: r["ok"] and r["who"] == who and r["t"] >= after, timeout, f"{ip} by {who}"
        )

    def failures(self, since: float = 0.0, until: float = float("inf")) -> dict[str, list]:
        return {
            ip: [r for r in s.snapshot() if not r["ok"] and since <= r["t"] <= until]
            for ip, s in self.streams.items()
        }

    def served(self, ip: str, since: float) -> set[str]:
        return {r["who"] for r in self.streams[ip].snapshot() if r["ok"] and r["t"] >= since}

    def status(self, name: str) -> dict[str, Any]:
        now = time.monotonic()
        return self.nodes[name].wait_for(
            lambda e: e.get("event") == "status" and e["t"] > now, 2, "status"
        )

    def kill(self, name: str) -> dict[str, float]:
        """kill -9 `name`: returns each address's gap (first answer by the survivor - kill)."""
        survivor = "lb2" if name == "lb1" else "lb1"
        t_kill = time.monotonic()
        self.nodes[name].proc.kill()
        gaps = {}
        for ip in (A_IP, B_IP):
            first = self.served_by(ip, survivor, t_kill)
            failed = self.failures(t_kill - 1.0, first["t"])[ip]
            # an address the survivor already held has no gap: its first answer is just the
            # next request of the stream
            gaps[ip] = first["end"] - t_kill
            measure(
                f"kill -9 {name}, stream to {ip}", gap_s=gaps[ip], failed=len(failed), rate=RATE
            )
        return gaps


def measure(what: str, **values: Any) -> None:
    text = ", ".join(
        f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items()
    )
    print(f"HA-MEASURE active-active {what}: {text}", file=sys.stderr)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    require_netns()
    topo = Topology()
    try:
        for name, ip in IPS.items():
            topo.add_host(name, ip)
        yield Pair(topo, tmp_path)
    finally:
        print(topo.logs())  # pytest shows it for a failed test only
        topo.cleanup()
        topo.remove_logs()


SETTLED = {A_IP: ["lb1"], B_IP: ["lb2"]}


def test_kill9_the_other_holds_both_and_a_preempt_false_return_moves_nothing(
    pair: Pair,
) -> None:
    # both start with preempt, so each ends up with its preferred address whichever came up
    # first; what a returning node does is decided by its own preempt setting
    pair.start("lb1")
    pair.start("lb2")
    pair.wait_holders(SETTLED, 5)
    st = pair.status("lb1")
    assert st["role"] == "active"
    assert [(i["virtual_ip"], i["role"]) for i in st["instances"]] == [
        (A, "active"),
        (B, "passive"),
    ]
    pair.stream_to_each()

    t_kill = time.monotonic()
    gaps = pair.kill("lb2")
    assert gaps[B_IP] < DEAD, "crash detection (port unreachable) beats waiting out dead_after"
    assert pair.failures(t_kill - 1.0)[A_IP] == [], "the address lb1 held never stopped"
    st = pair.status("lb1")
    assert [i["role"] for i in st["instances"]] == ["active", "active"]
    assert "crashed" in st["instances"][1]["last_transition"]
    # the dead node's kernel drops B when its lifetime runs out; then lb1 alone holds both
    both = {A_IP: ["lb1"], B_IP: ["lb1"]}
    pair.wait_holders(both, vip_lifetime(DEAD) + 1.5)

    t_back = time.monotonic()
    pair.start("lb2", preempt=False)
    time.sleep(DEAD + 2.0)
    assert pair.holders() == both, "preempt: false: the returning node takes back nothing"
    st = pair.status("lb2")
    assert st["role"] == "passive" and st["transitions"] == 0
    assert pair.served(B_IP, t_back) == {"lb1"}
    assert pair.failures(t_back) == {A_IP: [], B_IP: []}


def test_kill9_then_a_preempt_true_return_takes_back_only_its_address(pair: Pair) -> None:
    pair.start("lb1")
    pair.start("lb2")
    pair.wait_holders(SETTLED, 5)
    pair.stream_to_each()

    t_kill = time.monotonic()
    gaps = pair.kill("lb1")
    assert gaps[A_IP] < DEAD
    assert pair.failures(t_kill - 1.0)[B_IP] == []
    pair.wait_holders({A_IP: ["lb2"], B_IP: ["lb2"]}, vip_lifetime(DEAD) + 1.5)

    t_back = time.monotonic()
    pair.start("lb1")
    converged = pair.wait_holders(SETTLED, DEAD + 3.0)
    pair.served_by(A_IP, "lb1", t_back)
    measure("preempt hand-back of A", after_restart_s=converged - t_back)
    assert converged - t_back >= DEAD, "the returning node listens before it takes over"
    time.sleep(1.0)
    assert pair.holders() == SETTLED
    assert pair.served(B_IP, t_back) == {"lb2"}, "B never moved"
    failed = pair.failures(t_back)
    assert failed[B_IP] == [] and len(failed[A_IP]) <= 1, "make before break"
    assert "preempted by lb1" in pair.status("lb2")["instances"][1]["last_transition"]


def test_sigterm_hands_over_both_addresses_without_failed_requests(pair: Pair) -> None:
    lb1 = pair.start("lb1")
    pair.start("lb2")
    pair.wait_holders(SETTLED, 5)
    pair.stream_to_each()
    # For lb1 to hold both, lb2 stops (its planned hand-over of B) and returns with preempt
    # false; then lb1's SIGTERM must hand over both addresses.
    lb2 = pair.nodes["lb2"]
    lb2.proc.send_signal(signal.SIGTERM)
    assert lb2.proc.wait(10) == 0
    pair.wait_holders({A_IP: ["lb1"], B_IP: ["lb1"]}, 3)
    pair.start("lb2", preempt=False)
    pair.nodes["lb2"].wait_for(
        lambda e: e.get("event") == "status" and e["peers"][0]["live"], 5, "lb2 hears lb1"
    )
    time.sleep(DEAD + 0.5)  # lb2 listened long enough to take over at once
    assert pair.holders() == {A_IP: ["lb1"], B_IP: ["lb1"]}

    t_term = time.monotonic()
    lb1.proc.send_signal(signal.SIGTERM)
    assert lb1.proc.wait(10) == 0
    stopped = lb1.wait_for(lambda e: e.get("event") == "stopped", 1, "stopped")
    switched = {ip: pair.served_by(ip, "lb2", t_term)["end"] - t_term for ip in (A_IP, B_IP)}
    time.sleep(1.0)
    for ip in (A_IP, B_IP):
        measure(f"SIGTERM, stream to {ip}", switch_s=switched[ip], failed=len(pair.failures()[ip]))
    measure("SIGTERM", shutdown_s=stopped["took"])
    assert pair.failures() == {A_IP: [], B_IP: []}, "a planned hand-over fails no request"
    assert pair.holders() == {A_IP: ["lb2"], B_IP: ["lb2"]}
    assert stopped["final"]["holds_vip"] is False
    assert stopped["took"] < DEAD, "the successor claimed both at once, no dead_after wait"
