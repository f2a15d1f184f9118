"""Two whole `balancer run` daemons sharing two floating IPs (`ha.instances`, priorities swapped),
two demo app servers, and a client stream to each address (198.18.0.0/24 only)."""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.netns import JsonLines, Topology, program
from tests.integration.test_ha_daemon_netns import Pair, report, topo

__all__ = ["topo"]  # the fixture, used by name

pytestmark = pytest.mark.netns

A, B = "198.18.0.100/24", "198.18.0.101/24"
A_IP, B_IP = "198.18.0.100", "198.18.0.101"
RATE = 20.0
DEAD = 0.6
INSTANCES = {
    "lb1": [{"virtual_ip": A, "priority": 150}, {"virtual_ip": B, "priority": 100}],
    "lb2": [{"virtual_ip": B, "priority": 150}, {"virtual_ip": A, "priority": 100}],
}
SETTLED = {A_IP: ["lb1"], B_IP: ["lb2"]}
BOTH = {"lb1": {A_IP: ["lb1"], B_IP: ["lb1"]}, "lb2": {A_IP: ["lb2"], B_IP: ["lb2"]}}


class ActiveActive(Pair):
    """The daemon pair of test_ha_daemon_netns, with `ha.instances` instead of one VIP."""

    def __init__(self, topo: Topology, tmp: Path) -> None:
        super().__init__(topo, tmp)
        self.streams: dict[str, JsonLines] = {}
        self.preempt = True

    def config(self, name: str, priority: int) -> Path:
        path = super().config(name, priority)
        cfg = yaml.safe_load(path.read_text())
        del cfg["ha"]["virtual_ip"], cfg["ha"]["priority"]
        cfg["ha"]["instances"] = INSTANCES[name]
        cfg["ha"]["preempt"] = self.preempt
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return path

    def vips(self) -> dict[str, list[str]]:
        return {A_IP: self.topo.holders(A), B_IP: self.topo.holders(B)}

    def wait_vips(self, expected: dict[str, list[str]], timeout: float) -> float:
        self.wait(lambda: self.vips() == expected, timeout, f"holders {expected}")
        return time.monotonic()

    def stream_to_each(self) -> None:
        for ip in (A_IP, B_IP):
            url = f"http://{ip}:8080/echo"
            proc = self.topo.run("client", program("client", url, "--rate", str(RATE)))
            self.streams[ip] = JsonLines(proc, f"client-{ip}")
            self.streams[ip].wait_for(lambda r: r["ok"], 10, f"first answer through {ip}")
        time.sleep(1.0)
        assert self.failures() == {A_IP: [], B_IP: []}

    def failures(self, since: float = 0.0, until: float = float("inf")) -> dict[str, list]:
        return {
            ip: [r for r in s.snapshot() if not r["ok"] and since <= r["t"] <= until]
            for ip, s in self.streams.items()
        }

    def kill9(self, name: str) -> dict[str, float]:
        """kill -9 a daemon; each address's gap (kill to the first answer sent after it)."""
        t_kill = time.monotonic()
        self.nodes[name].kill()  # type: ignore[attr-defined]
        gaps = {}
        for ip, s in self.streams.items():
            first = s.wait_for(lambda r: r["ok"] and r["t"] >= t_kill, 10, f"{ip} after kill")
            failed = self.failures(t_kill - 1.0, first["t"])[ip]
            gaps[ip] = first["end"] - t_kill
            report(
                f"active-active kill -9 {name}, stream to {ip}",
                gap_s=gaps[ip],
                failed=len(failed),
                rate=RATE,
            )
        return gaps

    def ha(self, name: str) -> dict[str, Any]:
        status = self.admin(name, "/status")
        assert status is not None, f"{name} /status"
        return status["ha"]

    def instance_roles(self, name: str) -> list[tuple[str, str]]:
        return [(i["virtual_ip"], i["role"]) for i in self.ha(name)["instances"]]

    def metric_roles(self, name: str) -> dict[tuple[str, str], float]:
        code = (
            "import urllib.request\n"
            "print(urllib.request.urlopen('http://127.0.0.1:9000/metrics', timeout=2)"
            ".read().decode())"
        )
        text = self.topo.exec(name, [sys.executable, "-c", code]).stdout
        found = {}
        for line in text.splitlines():
            if line.startswith("balancer_ha_instance_role{"):
                labels, value = line.rsplit(" ", 1)
                fields = dict(
                    part.split("=", 1) for part in labels[labels.index("{") + 1 : -1].split(",")
                )
                key = (fields["virtual_ip"].strip('"'), fields["role"].strip('"'))
                found[key] = float(value)
        return found


def start(pair: ActiveActive, preempt: bool) -> None:
    pair.preempt = preempt
    pair.start("lb1", 0)
    pair.start("lb2", 0)
    pair.wait_vips(SETTLED, 10)


def test_daemons_kill9_preempt_false_return_and_sigterm_of_both(
    topo: Topology, tmp_path: Path
) -> None:
    pair = ActiveActive(topo, tmp_path)
    # both start with preempt, so each ends up with its preferred address whichever came up
    # first; what a returning node does is decided by its own preempt setting
    start(pair, preempt=True)
    ha = pair.ha("lb1")
    assert ha["role"] == "active"
    assert pair.instance_roles("lb1") == [(A, "active"), (B, "passive")]
    assert pair.instance_roles("lb2") == [(B, "active"), (A, "passive")]
    roles = pair.metric_roles("lb1")
    assert roles[(A, "active")] == 1 and roles[(A, "passive")] == 0
    assert roles[(B, "passive")] == 1 and roles[(B, "active")] == 0
    pair.stream_to_each()

    t_kill = time.monotonic()
    gaps = pair.kill9("lb2")
    assert gaps[B_IP] < 1.0
    assert pair.failures(t_kill - 1.0)[A_IP] == [], "the address lb1 held never stopped"
    pair.wait_vips(BOTH["lb1"], 5)  # the dead node's VIP lifetime ran out
    assert pair.instance_roles("lb1") == [(A, "active"), (B, "active")]

    t_back = time.monotonic()
    pair.preempt = False
    pair.start("lb2", 0)
    time.sleep(DEAD + 2.0)
    assert pair.vips() == BOTH["lb1"], "the returning node takes back nothing"
    assert pair.ha("lb2")["role"] == "passive"
    assert pair.failures(t_back) == {A_IP: [], B_IP: []}

    t_term = time.monotonic()
    proc = pair.nodes["lb1"]
    proc.send_signal(signal.SIGTERM)  # type: ignore[attr-defined]
    assert proc.wait(15) == 0  # type: ignore[attr-defined]
    pair.wait_vips(BOTH["lb2"], 5)
    time.sleep(1.0)
    report("active-active SIGTERM of the node holding both", took=time.monotonic() - t_term,
           failed=sum(map(len, pair.failures(t_term).values())))  # fmt: skip
    assert pair.failures(t_term) == {A_IP: [], B_IP: []}, (
        f"a planned hand-over fails nothing (SIGTERM at {t_term:.3f})"
    )
    assert pair.instance_roles("lb2") == [(B, "active"), (A, "active")]


def test_daemons_preempt_true_return_takes_back_only_its_address(
    topo: Topology, tmp_path: Path
) -> None:
    pair = ActiveActive(topo, tmp_path)
    start(pair, preempt=True)
    pair.stream_to_each()

    t_kill = time.monotonic()
    gaps = pair.kill9("lb1")
    assert gaps[A_IP] < 1.0
    assert pair.failures(t_kill - 1.0)[B_IP] == []
    pair.wait_vips(BOTH["lb2"], 5)

    t_back = time.monotonic()
    pair.start("lb1", 0)
    pair.wait_vips(SETTLED, DEAD + 3.0)
    report("active-active preempt hand-back", after_restart_s=time.monotonic() - t_back)
    time.sleep(1.0)
    assert pair.vips() == SETTLED
    failed = pair.failures(t_back)
    assert failed[B_IP] == [] and len(failed[A_IP]) <= 1, "make before break"
    assert pair.instance_roles("lb1") == [(A, "active"), (B, "passive")]
