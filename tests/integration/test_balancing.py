"""Balancing through the real daemon: strategies, sticky sessions, health and ejection."""

from __future__ import annotations

import base64
import threading
import time
from collections import Counter

import requests

from tests.integration.harness import config, free_port


def backends(procs, n: int = 3, *args: str) -> list[tuple[str, int]]:  # type: ignore[no-untyped-def]
    return [(f"app{i}", procs.demo_backend(f"app{i}", *args)) for i in range(1, n + 1)]


def who(resp: requests.Response) -> str:
    assert resp.status_code == 200, resp.text
    return resp.headers["X-Backend-Name"]


def hold_busy(url: str, n: int, seconds: float) -> list[threading.Thread]:
    """Start `n` slow requests in threads (each holds a backend slot for `seconds`)."""
    threads = [
        threading.Thread(
            target=lambda: requests.get(f"{url}?delay={seconds}", timeout=30), daemon=True
        )
        for _ in range(n)
    ]
    for t in threads:
        t.start()
    return threads


def concurrent_clients(url: str, *, clients: int, each: int) -> Counter[str]:
    """`clients` keep-alive clients sending `each` requests at once; who answered how often."""
    got: Counter[str] = Counter()
    lock = threading.Lock()

    def client() -> None:
        with requests.Session() as s:
            for _ in range(each):
                name = who(s.get(f"{url}/echo", timeout=10))
                with lock:
                    got[name] += 1

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    return got


# -- strategies -------------------------------------------------------------------------------


def test_weighted_round_robin_shares_and_interleaving(procs):
    bs = backends(procs, 2)
    cfg = config(bs, pool={"strategy": "weighted_round_robin"})
    cfg["pools"]["web"]["backends"][0]["weight"] = 3
    lb = procs.balancer(cfg)
    with requests.Session() as s:
        seq = [who(s.get(f"{lb.url}/echo", timeout=5)) for _ in range(200)]
    c = Counter(seq)
    assert abs(c["app1"] / 200 - 0.75) <= 0.05, c
    longest = max(len(run) for run in "".join("a" if x == "app1" else "b" for x in seq).split("b"))
    assert longest <= 3  # smooth: never more than its weight in a row


def test_least_connections_avoids_a_busy_backend(procs):
    bs = backends(procs, 3)
    lb = procs.balancer(config(bs, pool={"strategy": "least_connections"}))
    # pin four slow requests on app1 by sending them straight through while it is the pick:
    # with least_connections each new request goes to the least busy backend, so after 6
    # slow ones every backend holds 2; then the fast ones spread evenly
    threads = hold_busy(f"{lb.url}/echo", 6, 2.0)
    time.sleep(0.6)
    st = {b["name"]: b["inflight"] for b in lb.status()["pools"]["web"]["backends"]}
    assert sorted(st.values()) == [2, 2, 2], st
    with requests.Session() as s:
        fast = Counter(who(s.get(f"{lb.url}/echo", timeout=5)) for _ in range(30))
    assert all(8 <= fast[n] <= 12 for n in ("app1", "app2", "app3")), fast
    for t in threads:
        t.join(10)


def test_least_connections_sends_fast_requests_away_from_slow_backend(procs):
    slow = procs.demo_backend("slow", "--latency", "300ms")
    fast = procs.demo_backend("fast")
    lb = procs.balancer(
        config([("slow", slow), ("fast", fast)], pool={"strategy": "least_connections"})
    )
    got = concurrent_clients(lb.url, clients=4, each=15)
    assert sum(got.values()) == 60
    assert got["fast"] > 2 * got["slow"], got


def test_least_load_follows_reported_load(procs):
    bs = backends(procs, 3)
    hc = {"interval": "200ms", "timeout": "150ms"}
    lb = procs.balancer(config(bs, pool={"strategy": "least_load", "health_check": hc}))
    # app1 and app2 say they are nearly saturated, app3 that it is idle
    for _name, port in bs[:2]:
        assert requests.post(
            f"http://127.0.0.1:{port}/_control/load", json={"load": 0.9}, timeout=5
        ).ok
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        loads = {b["name"]: b["reported_load"] for b in lb.status()["pools"]["web"]["backends"]}
        if loads["app1"] == 0.9 and loads["app2"] == 0.9:
            break
        time.sleep(0.1)
    assert loads["app1"] == 0.9 and loads["app2"] == 0.9, loads
    with requests.Session() as s:
        got = Counter(who(s.get(f"{lb.url}/echo", timeout=5)) for _ in range(40))
    assert got["app3"] >= 30, got
    # a burst of concurrent requests is corrected by what was sent since the report:
    # the idle-looking app3 takes most, but not all of it
    burst: Counter[str] = Counter()
    # (each request sent since a report counts as at least 0.05 of load, so from 0.0 the idle
    # backend takes 18 before it looks as busy as one at 0.9)
    threads = hold_busy(f"{lb.url}/echo", 30, 1.5)
    time.sleep(0.6)
    for b in lb.status()["pools"]["web"]["backends"]:
        burst[b["name"]] = b["inflight"]
    for t in threads:
        t.join(10)
    assert sum(burst.values()) == 30, burst
    assert burst["app3"] > burst["app1"] and burst["app1"] + burst["app2"] >= 4, burst


def test_least_load_reads_load_reports_on_proxied_answers(procs):
    # no health_check: the only reports are the X-Backend-Load headers on answers the
    # balancer relays (the demo backend sends one on /healthz)
    bs = backends(procs, 3)
    lb = procs.balancer(config(bs, pool={"strategy": "least_load"}))
    for _name, port in bs[:2]:
        assert requests.post(
            f"http://127.0.0.1:{port}/_control/load", json={"load": 0.9}, timeout=5
        ).ok
    with requests.Session() as s:
        for _ in range(6):
            r = s.get(f"{lb.url}/healthz", timeout=5)
            assert r.status_code == 200 and "X-Backend-Load" not in r.headers  # kept private
            assert "load" in r.json()
    loads = {b["name"]: b["reported_load"] for b in lb.status()["pools"]["web"]["backends"]}
    assert loads["app1"] == 0.9 and loads["app2"] == 0.9 and loads["app3"] < 0.5, loads
    with requests.Session() as s:
        got = Counter(who(s.get(f"{lb.url}/echo", timeout=5)) for _ in range(20))
    assert got["app3"] == 20, got  # sequential short requests never look busier than 0.9


def test_random_two_prefers_the_less_loaded(procs):
    slow = procs.demo_backend("slow", "--latency", "300ms")
    fast1 = procs.demo_backend("fast1")
    fast2 = procs.demo_backend("fast2")
    lb = procs.balancer(
        config(
            [("slow", slow), ("fast1", fast1), ("fast2", fast2)], pool={"strategy": "random_two"}
        )
    )
    got = concurrent_clients(lb.url, clients=4, each=12)
    assert sum(got.values()) == 48
    assert got["slow"] < 48 / 3, got


def test_consistent_hash_partitions_by_header_and_survives_a_backend_leaving(procs):
    bs = backends(procs, 4)
    lb = procs.balancer(
        config(bs, pool={"strategy": "consistent_hash", "hash_key": "header:X-User"})
    )
    users = [f"user-{i}" for i in range(200)]
    with requests.Session() as s:
        first = {u: who(s.get(f"{lb.url}/echo", headers={"X-User": u}, timeout=5)) for u in users}
        again = {u: who(s.get(f"{lb.url}/echo", headers={"X-User": u}, timeout=5)) for u in users}
    assert first == again
    assert len(set(first.values())) == 4
    # app4 goes away: only its users move
    code, _ = lb.admin("/pools/web/backends/app4", "PATCH", {"state": "disabled"})
    assert code == 200
    with requests.Session() as s:
        after = {u: who(s.get(f"{lb.url}/echo", headers={"X-User": u}, timeout=5)) for u in users}
    moved = [u for u in users if after[u] != first[u]]
    assert all(first[u] == "app4" for u in moved)
    assert len(moved) == sum(1 for u in users if first[u] == "app4")


# -- sticky sessions --------------------------------------------------------------------------


def sticky_cfg(bs, **sticky):  # type: ignore[no-untyped-def]
    return config(bs, pool={"sticky": {"cookie": "LBSTICKY", "ttl": "1h", **sticky}})


def test_sticky_cookie_pins_and_is_opaque(procs):
    bs = backends(procs, 3)
    lb = procs.balancer(sticky_cfg(bs))
    r = requests.get(f"{lb.url}/echo", timeout=5)
    set_cookie = r.headers["Set-Cookie"]
    assert set_cookie.startswith("LBSTICKY=")
    attrs = {a.strip().split("=")[0].lower() for a in set_cookie.split(";")[1:]}
    assert {"httponly", "path", "samesite", "max-age"} <= attrs
    assert (
        "Max-Age=3600" in set_cookie and "SameSite=Lax" in set_cookie and "Secure" not in set_cookie
    )
    value = set_cookie.split(";")[0].split("=", 1)[1]
    pinned = who(r)
    # opaque: nothing of the backend's name, address or port is in it, raw or decoded
    decoded = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    port = dict(bs)[pinned]
    for secret in (pinned, "127.0.0.1", str(port)):
        assert secret not in value and secret.encode() not in decoded
    assert port.to_bytes(2, "big") not in decoded
    with requests.Session() as s:
        s.cookies.set("LBSTICKY", value)
        names = {who(s.get(f"{lb.url}/echo", timeout=5)) for _ in range(12)}
        # no new cookie while the pin holds
        assert "LBSTICKY" not in s.get(f"{lb.url}/echo", timeout=5).headers.get("Set-Cookie", "")
    assert names == {pinned}


def test_sticky_cookie_is_stripped_and_backend_cookies_pass(procs):
    bs = backends(procs, 2)
    lb = procs.balancer(sticky_cfg(bs))
    r = requests.get(f"{lb.url}/echo", timeout=5)
    value = r.cookies["LBSTICKY"]
    r = requests.get(f"{lb.url}/echo", headers={"Cookie": f"a=1; LBSTICKY={value}; b=2"}, timeout=5)
    cookies = [v for n, v in r.json()["headers"] if n.lower() == "cookie"]
    assert cookies == ["a=1; b=2"]
    r = requests.get(f"{lb.url}/set-cookie", timeout=5)
    raw = r.raw.headers.getlist("Set-Cookie")
    assert any(c.startswith("app_a=1") for c in raw) and any(c.startswith("app_b=2") for c in raw)


def test_forged_tampered_and_foreign_cookies_are_treated_as_absent(procs):
    bs = backends(procs, 3)
    lb = procs.balancer(sticky_cfg(bs))
    value = requests.get(f"{lb.url}/echo", timeout=5).cookies["LBSTICKY"]
    tampered = value[:-2] + ("A" if value[-2] != "A" else "B") + value[-1]
    for bad in (tampered, "x" * len(value), "", "app1", value + "x"):
        r = requests.get(f"{lb.url}/echo", headers={"Cookie": f"LBSTICKY={bad}"}, timeout=5)
        assert r.status_code == 200
        assert r.headers["Set-Cookie"].startswith("LBSTICKY=")  # re-pinned with a valid cookie
    # forging a choice: cookies from 300 fresh clients pin evenly, and none can be steered
    got = Counter(who(requests.get(f"{lb.url}/echo", timeout=5)) for _ in range(30))
    assert len(got) == 3


def test_repin_on_backend_death_with_zero_client_errors(procs):
    bs = backends(procs, 3)
    cfg = sticky_cfg(bs)
    cfg["pools"]["web"]["health_check"] = {"interval": "200ms", "timeout": "150ms", "fall": 1}
    lb = procs.balancer(cfg)
    with requests.Session() as s:
        pinned = who(s.get(f"{lb.url}/", timeout=5))
        victim = next(p for p in procs.procs if f"--name {pinned}" in " ".join(map(str, p.args)))
        codes = []
        names = []
        for i in range(40):
            if i == 10:
                procs.stop(victim)
            r = s.get(f"{lb.url}/", timeout=5)
            codes.append(r.status_code)
            names.append(r.headers.get("X-Backend-Name"))
    assert codes == [200] * 40
    assert set(names[:10]) == {pinned}
    after = names[11:]
    assert pinned not in after and len(set(after)) == 1  # re-pinned to one healthy backend


def test_two_balancers_sharing_a_key_route_a_cookie_identically(procs, tmp_path):
    bs = backends(procs, 3)
    key = tmp_path / "sticky.key"
    lb1 = procs.balancer(sticky_cfg(bs, key_file=str(key)), name="lb1")
    lb2 = procs.balancer(sticky_cfg(bs, key_file=str(key)), name="lb2")
    for _ in range(6):
        r = requests.get(f"{lb1.url}/echo", timeout=5)
        pinned = who(r)
        value = r.cookies["LBSTICKY"]
        r2 = requests.get(f"{lb2.url}/echo", headers={"Cookie": f"LBSTICKY={value}"}, timeout=5)
        assert who(r2) == pinned
        assert "Set-Cookie" not in r2.headers


def test_sticky_survives_a_restart_with_the_generated_key(procs):
    bs = backends(procs, 3)
    lb = procs.balancer(sticky_cfg(bs))
    r = requests.get(f"{lb.url}/echo", timeout=5)
    pinned, value = who(r), r.cookies["LBSTICKY"]
    assert (lb.config_path.parent / "sticky.key").exists()
    procs.stop(lb.proc)
    lb_again = procs.balancer(lb.cfg, name="lb-restarted")
    r = requests.get(f"{lb_again.url}/echo", headers={"Cookie": f"LBSTICKY={value}"}, timeout=5)
    assert who(r) == pinned


# -- health, ejection, limits -----------------------------------------------------------------


def test_health_down_and_up_timing_without_client_errors(procs):
    bs = backends(procs, 2)
    hc = {"interval": "300ms", "timeout": "200ms", "rise": 2, "fall": 2}
    lb = procs.balancer(config(bs, pool={"health_check": hc}))
    port = bs[0][1]
    requests.post(f"http://127.0.0.1:{port}/_control/health", json={"healthy": False}, timeout=5)
    took = lb.wait_state("web", "app1", "down", timeout=5)
    assert took < 0.3 * 2 + 0.3 + 1.0  # interval x fall + one interval (+ slack for a busy box)
    with requests.Session() as s:
        assert {who(s.get(f"{lb.url}/echo", timeout=5)) for _ in range(10)} == {"app2"}
    requests.post(f"http://127.0.0.1:{port}/_control/health", json={"healthy": True}, timeout=5)
    lb.wait_state("web", "app1", "up", timeout=5)
    hist = lb.backend("web", "app1")["health_checks"]
    assert hist[-1]["ok"] and hist[-2]["ok"]  # came up after `rise` passes


def test_passive_ejection_without_active_checks(procs):
    good = procs.demo_backend("good")
    dead = free_port()
    cfg = config(
        [("good", good), ("dead", dead)],
        pool={"passive_health": {"consecutive_failures": 2, "ejection_time": "30s"}},
    )
    lb = procs.balancer(cfg)
    with requests.Session() as s:
        codes = [s.get(f"{lb.url}/echo", timeout=5).status_code for _ in range(20)]
    assert codes == [200] * 20
    st = lb.backend("web", "dead")
    assert st["ejected"] and st["state"] == "down"
    # ejected: no more attempts on it
    before = lb.backend("web", "dead")["requests"]
    with requests.Session() as s:
        for _ in range(10):
            s.get(f"{lb.url}/echo", timeout=5)
    assert lb.backend("web", "dead")["requests"] == before


def test_max_connections_queue_then_503(procs):
    port = procs.demo_backend("only")
    cfg = config([("only", port)], pool={"queue": {"size": 1, "timeout": "500ms"}})
    cfg["pools"]["web"]["backends"][0]["max_connections"] = 1
    lb = procs.balancer(cfg)
    results: list[int] = []

    def get(path: str) -> None:
        results.append(requests.get(f"{lb.url}{path}", timeout=10).status_code)

    t1 = threading.Thread(target=get, args=("/echo?delay=1.5",))
    t1.start()
    time.sleep(0.3)
    t0 = time.monotonic()
    t2 = threading.Thread(target=get, args=("/echo",))  # waits in the queue, times out
    t2.start()
    t2.join(10)
    waited = time.monotonic() - t0
    t1.join(10)
    assert sorted(results) == [200, 503]
    assert 0.4 < waited < 3
    # a queued request that gets a slot in time is served
    results.clear()
    cfg2 = config([("only", port)], pool={"queue": {"size": 5, "timeout": "5s"}})
    cfg2["pools"]["web"]["backends"][0]["max_connections"] = 1
    lb2 = procs.balancer(cfg2, name="lb2")
    threads = [
        threading.Thread(
            target=lambda: results.append(
                requests.get(f"{lb2.url}/echo?delay=0.3", timeout=10).status_code
            )
        )
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert results == [200, 200, 200]


def test_slow_start_ramps_a_returning_backend(procs):
    bs = backends(procs, 2)
    hc = {"interval": "200ms", "timeout": "150ms", "rise": 1, "fall": 1}
    lb = procs.balancer(
        config(
            bs, pool={"strategy": "weighted_round_robin", "health_check": hc, "slow_start": "4s"}
        )
    )
    port = bs[0][1]
    requests.post(f"http://127.0.0.1:{port}/_control/health", json={"healthy": False}, timeout=5)
    lb.wait_state("web", "app1", "down")
    requests.post(f"http://127.0.0.1:{port}/_control/health", json={"healthy": True}, timeout=5)
    lb.wait_state("web", "app1", "up")
    with requests.Session() as s:
        early = Counter(who(s.get(f"{lb.url}/echo", timeout=5)) for _ in range(40))
        time.sleep(4.5)
        late = Counter(who(s.get(f"{lb.url}/echo", timeout=5)) for _ in range(40))
    assert early["app1"] < 12, early  # well under its full half share while ramping
    assert 16 <= late["app1"] <= 24, late  # back to an even share


def test_sticky_key_rotation_through_reload(procs, tmp_path):
    import signal

    bs = backends(procs, 3)
    key = tmp_path / "rot.key"
    old, new = "11" * 32, "22" * 32
    key.write_text(old + "\n")
    lb = procs.balancer(sticky_cfg(bs, key_file=str(key)))
    r = requests.get(f"{lb.url}/echo", timeout=5)
    pinned, value = who(r), r.cookies["LBSTICKY"]

    def visit() -> requests.Response:
        return requests.get(f"{lb.url}/echo", headers={"Cookie": f"LBSTICKY={value}"}, timeout=5)

    # step 1: the new key signs, the old one still verifies: live sessions keep their pin
    key.write_text(new + "\n" + old + "\n")
    lb.proc.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    for _ in range(3):
        r = visit()
        assert who(r) == pinned and "Set-Cookie" not in r.headers
    fresh = requests.get(f"{lb.url}/echo", timeout=5).cookies["LBSTICKY"]
    assert fresh != value
    # step 2 (after one ttl): the old key is dropped; its cookies are no longer accepted
    key.write_text(new + "\n")
    lb.proc.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    assert "LBSTICKY=" in visit().headers.get("Set-Cookie", "")
    r = requests.get(f"{lb.url}/echo", headers={"Cookie": f"LBSTICKY={fresh}"}, timeout=5)
    assert "Set-Cookie" not in r.headers  # signed with the new key: still valid
