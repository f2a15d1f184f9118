"""Pools fed by a real etcd (Debian's etcd-server on loopback ports of its own), with real
app servers, `balancer register` processes and client traffic."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
import requests

from tests.integration.etcd import Etcd
from tests.integration.harness import Balancer, Processes, config, free_port, wait_port
from tests.integration.traffic import Traffic, msum, scrape, wait_until

PREFIX = "/balancer/pools/web/"
HEALTH = {"interval": "200ms", "timeout": "200ms", "rise": 1, "fall": 2}


def discovery_config(etcd: Etcd, *listed: tuple[str, int], **pool: object) -> dict:
    cfg = config(list(listed), pool={"health_check": dict(HEALTH), **pool})
    cfg["pools"]["web"]["discovery"] = {"etcd": {"endpoints": [etcd.endpoint], "prefix": PREFIX}}
    return cfg


def discovered(lb: Balancer, pool: str = "web") -> dict[str, dict]:
    return {b["name"]: b for b in lb.status()["pools"][pool]["backends"] if b["source"] != "config"}


def wait_discovered(lb: Balancer, want: dict[str, str], timeout: float = 10.0) -> None:
    """Until the pool's discovered backends are exactly `want` (name -> state)."""
    wait_until(
        lambda: {n: b["state"] for n, b in discovered(lb).items()} == want,
        timeout,
        f"discovered backends {want} (have {discovered(lb)})",
    )


def register(procs: Processes, etcd: Etcd, name: str, port: int, ttl: int = 3) -> subprocess.Popen:
    return procs.start(
        [
            sys.executable,
            "-m",
            "balancer",
            "register",
            "--etcd",
            etcd.endpoint,
            "--prefix",
            PREFIX,
            "--name",
            name,
            "--address",
            f"127.0.0.1:{port}",
            "--ttl",
            str(ttl),
        ],
        log_name=f"register-{name}.log",
    )


@pytest.fixture
def etcd(procs: Processes) -> Etcd:
    return Etcd(procs).start()


def test_keys_become_backends_checked_before_traffic_and_drained_when_deleted(procs, etcd):
    a, b = procs.demo_backend("a"), procs.demo_backend("b")
    lb = procs.balancer(discovery_config(etcd))
    assert lb.status()["pools"]["web"]["discovery"]["state"] == "fresh"
    etcd.put(PREFIX + "a", {"address": f"127.0.0.1:{a}"})
    wait_discovered(lb, {"a": "up"})
    assert discovered(lb)["a"]["source"] == "etcd"
    with Traffic(lb.url) as traffic:
        etcd.put(PREFIX + "b", {"address": f"127.0.0.1:{b}", "weight": 2})
        t = time.monotonic()
        traffic.wait_for("b", since=t)
        assert discovered(lb)["b"]["weight"] == 2
        etcd.delete(PREFIX + "a")
        wait_discovered(lb, {"b": "up"})
        gone = time.monotonic()
        time.sleep(0.5)
    traffic.assert_clean(at_least=20)
    assert traffic.served_by(since=gone + 0.2)["a"] == 0


def test_a_key_for_a_server_that_is_down_takes_no_traffic(procs, etcd):
    lb = procs.balancer(discovery_config(etcd, ("web1", procs.demo_backend("web1"))))
    etcd.put(PREFIX + "ghost", {"address": f"127.0.0.1:{free_port()}"})
    wait_discovered(lb, {"ghost": "down"})
    with requests.Session() as s:
        for _ in range(20):
            r = s.get(lb.url + "/echo", timeout=5)
            assert r.status_code == 200 and r.headers["X-Backend-Name"] == "web1"


def test_malformed_values_are_skipped_and_logged_once_with_their_key(procs, etcd):
    port = procs.demo_backend("ok")
    lb = procs.balancer(discovery_config(etcd))
    etcd.put(PREFIX + "broken", b"{not json")
    etcd.put(PREFIX + "noport", {"address": "127.0.0.1"})
    etcd.put(PREFIX + "ok", {"address": f"127.0.0.1:{port}"})
    wait_discovered(lb, {"ok": "up"})
    etcd.put(PREFIX + "ok", {"address": f"127.0.0.1:{port}", "weight": 4})  # another update
    wait_until(lambda: discovered(lb)["ok"]["weight"] == 4, 5, "weight 4")
    skipped = lb.status()["pools"]["web"]["discovery"]["skipped"]
    assert sorted(s.split(":")[0] for s in skipped) == [PREFIX + "broken", PREFIX + "noport"]
    log = lb.log_text()
    assert log.count(PREFIX + "broken") == 1 and log.count(PREFIX + "noport") == 1
    assert msum(scrape(lb), "balancer_discovery_skipped", pool="web", source="etcd") == 2


def test_register_keeps_a_lease_sigterm_removes_at_once_and_a_crash_expires(procs, etcd):
    a, b = procs.demo_backend("a"), procs.demo_backend("b")
    lb = procs.balancer(discovery_config(etcd))
    ra = register(procs, etcd, "a", a, ttl=3)
    rb = register(procs, etcd, "b", b, ttl=3)
    wait_discovered(lb, {"a": "up", "b": "up"})
    time.sleep(4)  # longer than the TTL: the lease is being kept alive
    assert set(discovered(lb)) == {"a", "b"}
    with Traffic(lb.url) as traffic:
        assert procs.stop(ra) == 0
        wait_until(lambda: etcd.get(PREFIX + "a") is None, 2, "the key deleted on SIGTERM")
        wait_discovered(lb, {"b": "up"}, timeout=3)
        rb._hard = True
        procs.stop(rb, signal.SIGKILL)  # no revoke: the lease has to run out
        killed = time.monotonic()
        wait_until(lambda: etcd.get(PREFIX + "b") is None, 8, "the lease to expire")
        expired = time.monotonic() - killed
        wait_discovered(lb, {}, timeout=3)
    assert expired <= 3 + 2
    # b was the last backend: requests after it left are 503, the rest were answered
    assert not [e for e in traffic.errors if not e.startswith("503")]


def test_unreachable_etcd_keeps_the_backends_and_says_stale_then_resumes(procs, etcd):
    a, b = procs.demo_backend("a"), procs.demo_backend("b")
    lb = procs.balancer(discovery_config(etcd))
    etcd.put(PREFIX + "a", {"address": f"127.0.0.1:{a}"})
    wait_discovered(lb, {"a": "up"})
    before = time.time()
    etcd.stop()
    wait_until(
        lambda: lb.status()["pools"]["web"]["discovery"]["state"] == "stale", 8, "stale state"
    )
    d = lb.status()["pools"]["web"]["discovery"]
    assert before - 1 <= d["since"] <= time.time()
    top = lb.status()["discovery"]  # the whole balancer's view: stale while any pool is
    assert top["state"] == "stale" and top["since"] == d["since"] and "web" in top["pools"]
    assert msum(scrape(lb), "balancer_discovery_stale", pool="web", source="etcd") == 1
    with requests.Session() as s:
        for _ in range(10):
            assert s.get(lb.url + "/echo", timeout=5).headers["X-Backend-Name"] == "a"
    etcd.start()  # the same member, the same data
    etcd.put(PREFIX + "b", {"address": f"127.0.0.1:{b}"})
    wait_discovered(lb, {"a": "up", "b": "up"}, timeout=15)
    assert lb.status()["pools"]["web"]["discovery"]["state"] == "fresh"
    assert msum(scrape(lb), "balancer_discovery_stale", pool="web", source="etcd") == 0
    assert "unreachable" in lb.log_text()


def test_a_partition_past_a_compaction_relists_the_prefix(procs, etcd):
    """The balancer reaches etcd through a TCP-mode balancer that the test freezes (a
    network partition); meanwhile keys change and etcd compacts the history, so resuming
    the watch from the old revision fails and the prefix is listed again."""
    a, b, c = (procs.demo_backend(n) for n in "abc")
    hop = config([], pool={})
    hop["listeners"] = [
        {"name": "etcd", "bind": f"127.0.0.1:{free_port()}", "mode": "tcp", "pool": "etcd"}
    ]
    hop["pools"] = {"etcd": {"backends": [{"name": "etcd", "address": etcd.endpoint}]}}
    forwarder = procs.balancer(hop, name="hop")
    cfg = discovery_config(etcd)
    cfg["pools"]["web"]["discovery"]["etcd"]["endpoints"] = [f"127.0.0.1:{forwarder.port}"]
    cfg["pools"]["web"]["discovery"]["etcd"]["timeout"] = "1s"
    lb = procs.balancer(cfg)
    etcd.put(PREFIX + "a", {"address": f"127.0.0.1:{a}"})
    etcd.put(PREFIX + "b", {"address": f"127.0.0.1:{b}"})
    wait_discovered(lb, {"a": "up", "b": "up"})
    forwarder.proc.send_signal(signal.SIGSTOP)
    try:
        wait_until(
            lambda: lb.status()["pools"]["web"]["discovery"]["state"] == "stale", 10, "stale"
        )
        etcd.delete(PREFIX + "a")
        etcd.put(PREFIX + "c", {"address": f"127.0.0.1:{c}"})
        for i in range(5):
            etcd.put(PREFIX + "b", {"address": f"127.0.0.1:{b}", "weight": i + 1})
        etcd.compact()
        assert set(discovered(lb)) == {"a", "b"}  # still the last known
    finally:
        forwarder.proc.send_signal(signal.SIGCONT)
    wait_discovered(lb, {"b": "up", "c": "up"}, timeout=15)
    assert discovered(lb)["b"]["weight"] == 5
    assert "listing the prefix again" in lb.log_text()


def test_a_reload_keeps_discovered_backends_and_their_counters(procs, etcd):
    a = procs.demo_backend("a")
    lb = procs.balancer(discovery_config(etcd))
    etcd.put(PREFIX + "a", {"address": f"127.0.0.1:{a}"})
    wait_discovered(lb, {"a": "up"})
    with requests.Session() as s:
        for _ in range(7):
            assert s.get(lb.url + "/echo", timeout=5).status_code == 200
    code, body = lb.admin("/reload", "POST")
    assert code == 200, body
    entry = discovered(lb)["a"]
    assert entry["state"] == "up" and entry["requests"] == 7 and entry["source"] == "etcd"
    # a change after the reload still arrives: the same watch runs on
    etcd.put(PREFIX + "a", {"address": f"127.0.0.1:{a}", "weight": 9})
    wait_until(lambda: discovered(lb)["a"]["weight"] == 9, 5, "weight after reload")


def test_a_flapping_registration_is_held_back(procs, etcd):
    a = procs.demo_backend("a")
    lb = procs.balancer(discovery_config(etcd))
    for _ in range(3):
        etcd.put(PREFIX + "a", {"address": f"127.0.0.1:{a}"})
        wait_until(lambda: "a" in discovered(lb), 5, "a registered")
        etcd.delete(PREFIX + "a")
        wait_until(lambda: discovered(lb).get("a", {}).get("state") != "up", 5, "a going")
    etcd.put(PREFIX + "a", {"address": f"127.0.0.1:{a}"})
    wait_until(lambda: lb.status()["pools"]["web"]["discovery"]["held"] == ["a"], 5, "a held back")
    time.sleep(1)
    assert discovered(lb).get("a", {}).get("state") != "up"
    assert msum(scrape(lb), "balancer_discovery_held", pool="web") == 1
    assert "flap damping" in lb.log_text()


def test_a_sticky_client_is_pinned_anew_when_its_backend_leaves(procs, etcd):
    a, b = procs.demo_backend("a"), procs.demo_backend("b")
    lb = procs.balancer(discovery_config(etcd, sticky={"cookie": "LB"}))
    etcd.put(PREFIX + "a", {"address": f"127.0.0.1:{a}"})
    wait_discovered(lb, {"a": "up"})
    with requests.Session() as s:
        first = s.get(lb.url + "/echo", timeout=5)
        assert first.headers["X-Backend-Name"] == "a" and "LB" in s.cookies
        etcd.put(PREFIX + "b", {"address": f"127.0.0.1:{b}"})
        wait_discovered(lb, {"a": "up", "b": "up"})
        assert {s.get(lb.url + "/echo", timeout=5).headers["X-Backend-Name"] for _ in range(6)} == {
            "a"
        }
        old = s.cookies["LB"]
        etcd.delete(PREFIX + "a")
        wait_discovered(lb, {"b": "up"})
        r = s.get(lb.url + "/echo", timeout=5)
        assert r.status_code == 200 and r.headers["X-Backend-Name"] == "b"
        assert s.cookies["LB"] != old
        assert {s.get(lb.url + "/echo", timeout=5).headers["X-Backend-Name"] for _ in range(4)} == {
            "b"
        }


def test_discovered_backends_reach_every_worker_process(procs, etcd):
    a = procs.demo_backend("a")
    cfg = discovery_config(etcd)
    cfg["workers"] = 2
    lb = procs.balancer(cfg)
    etcd.put(PREFIX + "a", {"address": f"127.0.0.1:{a}"})
    wait_discovered(lb, {"a": "up"})
    time.sleep(0.5)  # the owner tells its worker at once; leave it a moment
    for _ in range(40):  # a new connection each: the kernel spreads them over both processes
        r = requests.get(lb.url + "/echo", timeout=5, headers={"Connection": "close"})
        assert r.status_code == 200 and r.headers["X-Backend-Name"] == "a"
    wait_port(lb.admin_port)


def test_a_leader_change_in_a_three_member_cluster_is_ridden_out(procs):
    peers = {f"m{i}": free_port() for i in range(3)}
    members = [Etcd(procs, name=n, cluster=peers) for n in peers]
    for m in members:
        m.start(wait=False)
    for m in members:
        wait_port(m.client_port, m.proc, timeout=20)
        m.wait_ready()
    wait_until(lambda: any(m.leader() for m in members), 10, "a leader")
    leader = next(m for m in members if m.leader())
    others = [m for m in members if m is not leader]
    a, b = procs.demo_backend("a"), procs.demo_backend("b")
    cfg = discovery_config(leader)  # the leader first: that is where the watch goes
    cfg["pools"]["web"]["discovery"]["etcd"]["endpoints"] = [m.endpoint for m in (leader, *others)]
    lb = procs.balancer(cfg)
    leader.put(PREFIX + "a", {"address": f"127.0.0.1:{a}"})
    wait_discovered(lb, {"a": "up"})
    leader.stop(signal.SIGKILL)
    wait_until(lambda: any(m.leader() for m in others), 10, "a new leader")
    others[0].put(PREFIX + "b", {"address": f"127.0.0.1:{b}"})
    wait_discovered(lb, {"a": "up", "b": "up"}, timeout=15)
    assert lb.status()["pools"]["web"]["discovery"]["state"] == "fresh"


def test_a_request_in_flight_when_its_key_goes_is_finished_not_cut(procs, etcd):
    import threading

    a, b = procs.demo_backend("a"), procs.demo_backend("b")
    lb = procs.balancer(discovery_config(etcd, ("b", b)))
    etcd.put(PREFIX + "a", {"address": f"127.0.0.1:{a}"})
    wait_discovered(lb, {"a": "up"})
    answers: list[requests.Response] = []

    def slow() -> None:
        with requests.Session() as s:
            for _ in range(4):  # round robin: until a slow request lands on a
                r = s.get(lb.url + "/echo?delay=2s", timeout=15)
                if r.headers.get("X-Backend-Name") == "a":
                    answers.append(r)
                    return

    t = threading.Thread(target=slow)
    t.start()
    wait_until(lambda: discovered(lb)["a"]["inflight"] == 1, 10, "a slow request on a")
    etcd.delete(PREFIX + "a")
    wait_until(lambda: discovered(lb).get("a", {}).get("state") == "draining", 5, "a draining")
    t.join(20)
    assert answers and answers[0].status_code == 200 and answers[0].headers["X-Backend-Name"] == "a"
    wait_discovered(lb, {}, timeout=5)  # and once it finished, a is gone
