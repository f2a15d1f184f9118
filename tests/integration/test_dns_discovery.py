"""A balancer whose pool follows DNS: dnsmasq's A records change and `/status` and the traffic
follow (backends on loopback addresses of their own, one port for all); SRV ports and weights."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.integration.dnsmasq import Dnsmasq, dnsmasq_factory
from tests.integration.harness import Balancer, Processes, free_port, wait_port
from tests.integration.traffic import Traffic, msum, scrape, wait_until


@pytest.fixture
def dnsmasq(procs: Processes, tmp_path: Path) -> Callable[..., Dnsmasq]:
    return dnsmasq_factory(procs, tmp_path)


HOSTS = ("127.0.0.11", "127.0.0.12", "127.0.0.13")


def start_backends(procs: Processes, port: int) -> dict[str, str]:
    """A demo backend on HOST:port for each host; {host: its X-Backend-Name}."""
    names = {}
    for host in HOSTS:
        name = "b" + host.rsplit(".", 1)[1]
        p = procs.start(
            [
                sys.executable,
                "-m",
                "balancer.demo.backend",
                "--host",
                host,
                "--port",
                str(port),
                "--name",
                name,
            ],
            log_name=f"backend-{name}.log",
        )
        wait_port(port, p, host=host)
        names[host] = name
    return names


def dns_config(server: Dnsmasq, port: int) -> dict:
    return {
        "listeners": [
            {"name": "http", "bind": f"127.0.0.1:{free_port()}", "routes": [{"pool": "web"}]}
        ],
        "pools": {
            "web": {
                "strategy": "round_robin",
                "health_check": {"path": "/healthz", "interval": "200ms", "rise": 1},
                "discovery": {
                    "dns": {
                        "name": "app.test",
                        "type": "A",
                        "port": port,
                        "resolver": str(server.address),
                        "interval": "1s",
                    }
                },
            }
        },
        "admin": {"bind": f"127.0.0.1:{free_port()}"},
    }


def serving(lb: Balancer) -> dict[str, dict]:
    """The pool's backends taking traffic, by name."""
    return {b["name"]: b for b in lb.status()["pools"]["web"]["backends"] if b["state"] == "up"}


def test_a_pool_follows_dns_records_into_status_and_traffic(procs, dnsmasq) -> None:  # type: ignore[no-untyped-def]
    port = free_port()
    names = start_backends(procs, port)
    b11, b12, b13 = (f"{h}-{port}" for h in HOSTS)
    server = dnsmasq(ttl=1, hosts=f"{HOSTS[0]} app.test\n{HOSTS[1]} app.test\n")
    lb = procs.balancer(dns_config(server, port))
    web = lambda: lb.status()["pools"]["web"]  # noqa: E731

    wait_until(lambda: serving(lb).keys() == {b11, b12}, 10, "the first two DNS backends up")
    assert {b["source"] for b in web()["backends"]} == {"dns"}
    assert web()["discovery"]["state"] == "fresh"

    with Traffic(lb.url) as traffic:
        traffic.wait_for(names[HOSTS[0]], 0)
        traffic.wait_for(names[HOSTS[1]], 0)
        # .12 leaves DNS, .13 joins: the pool follows within the TTL and interval, and no
        # client sees an error (.13 is checked before traffic, .12 drained, not cut)
        server.set_hosts(f"{HOSTS[0]} app.test\n{HOSTS[2]} app.test\n")
        changed = time.monotonic()
        wait_until(lambda: serving(lb).keys() == {b11, b13}, 10, "the pool following DNS")
        traffic.wait_for(names[HOSTS[2]], changed)
        settled = time.monotonic()
        wait_until(lambda: b12 not in {b["name"] for b in web()["backends"]}, 10, ".12 gone")
        time.sleep(0.3)
    traffic.assert_clean(at_least=50)
    assert set(traffic.served_by(settled)) == {names[HOSTS[0]], names[HOSTS[2]]}

    # the resolver gone: the pool keeps its backends and says it is stale
    server.kill()
    wait_until(lambda: web()["discovery"]["state"] == "stale", 8, "discovery stale")
    assert "dns" in web()["discovery"]["sources"]
    assert msum(scrape(lb), "balancer_discovery_stale", pool="web", source="dns") == 1
    with Traffic(lb.url) as traffic:
        time.sleep(0.5)
    traffic.assert_clean(at_least=10)
    assert set(traffic.served_by(0)) == {names[HOSTS[0]], names[HOSTS[2]]}
    assert serving(lb).keys() == {b11, b13}

    # back, with a change made meanwhile: applied, and fresh again
    server.hosts.write_text(f"{HOSTS[1]} app.test\n")
    server.start()
    wait_until(lambda: serving(lb).keys() == {b12}, 10, "the records read after the restart")
    assert web()["discovery"]["state"] == "fresh"
    assert msum(scrape(lb), "balancer_discovery_stale", pool="web", source="dns") == 0
    with Traffic(lb.url) as traffic:
        time.sleep(0.5)
    traffic.assert_clean(at_least=10)
    assert set(traffic.served_by(0)) == {names[HOSTS[1]]}


def test_a_pool_from_srv_records_takes_their_ports_and_weights(procs, dnsmasq) -> None:  # type: ignore[no-untyped-def]
    heavy, light, backup = (procs.demo_backend(n) for n in ("heavy", "light", "backup"))
    service = "_http._tcp.app.test"
    server = dnsmasq(
        f"--srv-host={service},a.test,{heavy},10,30",
        f"--srv-host={service},a.test,{light},10,10",
        f"--srv-host={service},a.test,{backup},20,50",  # a higher priority: unused
        hosts="127.0.0.1 a.test\n",
    )
    cfg = dns_config(server, 0)
    cfg["pools"]["web"]["strategy"] = "weighted_round_robin"
    cfg["pools"]["web"]["discovery"]["dns"] = {
        "name": service,
        "type": "SRV",
        "resolver": str(server.address),
        "interval": "1s",
    }
    lb = procs.balancer(cfg)

    wanted = {f"127.0.0.1-{heavy}": 30, f"127.0.0.1-{light}": 10}
    wait_until(lambda: serving(lb).keys() == wanted.keys(), 10, "the SRV backends up")
    assert {n: b["weight"] for n, b in serving(lb).items()} == wanted
    assert {b["source"] for b in serving(lb).values()} == {"dns"}
    with Traffic(lb.url) as traffic:
        wait_until(lambda: len(traffic.answers) >= 80, 10, "80 answers")
    traffic.assert_clean(at_least=80)
    seen = traffic.served_by(0)
    assert set(seen) == {"heavy", "light"}
    assert seen["heavy"] >= 2 * seen["light"], seen  # 3:1 by weight
