"""The admin API with real processes: runtime changes under traffic, reload, auth, metrics."""

from __future__ import annotations

import signal
import socket
import threading
import time
from collections.abc import Callable

import requests
import yaml

from balancer import build
from tests.integration.harness import Balancer, config, free_port, http_raw
from tests.integration.traffic import Traffic, msum, scrape, wait_until

HEALTH = {"interval": "300ms", "timeout": "300ms", "rise": 1, "fall": 2}
NOTE_WORDS = "lost on the next reload"


def names(lb: Balancer, pool: str = "web") -> list[str]:
    return [b["name"] for b in lb.status()["pools"][pool]["backends"]]


def start(procs, n: int = 2, strategy: str = "round_robin", **top):  # type: ignore[no-untyped-def]
    bs = [(f"app{i}", procs.demo_backend(f"app{i}")) for i in range(1, n + 1)]
    cfg = config(bs, pool={"strategy": strategy, "health_check": dict(HEALTH)}, **top)
    return procs.balancer(cfg), dict(bs)


def rewrite(lb: Balancer, mutate: Callable[[dict], None]) -> None:
    cfg = yaml.safe_load(lb.config_path.read_text())
    mutate(cfg)
    lb.config_path.write_text(yaml.safe_dump(cfg, sort_keys=False))


# -- runtime changes under traffic -------------------------------------------------------------


def test_add_then_remove_a_backend_under_traffic(procs):
    lb, _ = start(procs)
    port3 = procs.demo_backend("app3")
    with Traffic(lb.url) as traffic:
        time.sleep(0.3)
        added_at = time.monotonic()
        code, body = lb.admin(
            "/pools/web/backends", "POST", {"name": "app3", "address": f"127.0.0.1:{port3}"}
        )
        assert code == 201, body
        assert body["name"] == "app3" and body["weight"] == 1
        assert body["address"] == f"127.0.0.1:{port3}"
        assert NOTE_WORDS in body["note"]
        assert "app3" in names(lb)
        # down until its first check passes, then it takes traffic
        lb.wait_state("web", "app3", "up", timeout=5)
        traffic.wait_for("app3", added_at)
        code, body = lb.admin("/pools/web/backends/app3", "DELETE")
        assert code == 202, body
        assert body["state"] == "draining" and NOTE_WORDS in body["note"]
        removed_at = time.monotonic()
        wait_until(lambda: "app3" not in names(lb), 10, "app3 removed")
        time.sleep(0.5)
        late = traffic.served_by(removed_at + 0.05)
    traffic.assert_clean(at_least=50)
    assert late["app3"] == 0 and late["app1"] > 0 and late["app2"] > 0, late
    # and it is gone for the API too
    code, body = lb.admin("/pools/web/backends/app3")
    assert code == 404, body


def test_added_backend_in_a_pool_without_health_check_is_up_at_once(procs):
    # no checks would ever run: it is up now, and the note says so (it said "down until
    # its first health check passes", which never comes)
    port1 = procs.demo_backend("app1")
    lb = procs.balancer(config([("app1", port1)]))
    port2 = procs.demo_backend("app2")
    code, body = lb.admin(
        "/pools/web/backends", "POST", {"name": "app2", "address": f"127.0.0.1:{port2}"}
    )
    assert code == 201, body
    assert body["state"] == "up" and "no health_check, so it takes traffic now" in body["note"]
    served = {requests.get(lb.url + "/", timeout=5).headers["X-Backend-Name"] for _ in range(4)}
    assert served == {"app1", "app2"}


def test_drain_disable_enable_under_traffic(procs):
    lb, ports = start(procs, 3)
    slow: list[tuple[int, str]] = []

    def slow_request() -> None:
        r = requests.get(f"{lb.url}/echo?delay=3", timeout=15)
        slow.append((r.status_code, r.headers.get("X-Backend-Name", "?")))

    # one slow request per backend (round robin, nothing else running yet): one sits on app2
    threads = [threading.Thread(target=slow_request, daemon=True) for _ in range(3)]
    for t in threads:
        t.start()
        time.sleep(0.1)
    wait_until(lambda: lb.backend("web", "app2")["inflight"] == 1, 5, "a slow request on app2")
    with Traffic(lb.url) as traffic:
        time.sleep(0.3)
        code, body = lb.admin("/pools/web/backends/app2", "PATCH", {"state": "draining"})
        assert code == 200, body
        assert body["state"] == "draining" and NOTE_WORDS in body["note"]
        drained_at = time.monotonic()
        count_at_drain = body["requests"]
        assert lb.backend("web", "app2")["state"] == "draining"
        for t in threads:
            t.join(15)
        time.sleep(0.3)
        # no new request reached it; the ones in flight finished with 200
        assert lb.backend("web", "app2")["requests"] == count_at_drain
        assert lb.backend("web", "app2")["inflight"] == 0
        assert traffic.served_by(drained_at + 0.05)["app2"] == 0
        code, body = lb.admin("/pools/web/backends/app2", "PATCH", {"state": "disabled"})
        assert code == 200 and body["state"] == "disabled", body
        time.sleep(0.3)
        assert lb.backend("web", "app2")["requests"] == count_at_drain
        code, body = lb.admin("/pools/web/backends/app2", "PATCH", {"state": "up"})
        assert code == 200 and body["state"] == "up", body
        traffic.wait_for("app2", time.monotonic())
    traffic.assert_clean(at_least=50)
    assert len(slow) == len(threads)
    assert all(code == 200 for code, _ in slow), slow
    assert "app2" in {who for _, who in slow}


def test_weight_change_shifts_the_distribution(procs):
    lb, _ = start(procs, 2, strategy="weighted_round_robin")
    with Traffic(lb.url) as traffic:
        time.sleep(1.0)
        before = traffic.served_by(0)
        code, body = lb.admin("/pools/web/backends/app1", "PATCH", {"weight": 4})
        assert code == 200 and body["weight"] == 4, body
        changed_at = time.monotonic()
        time.sleep(1.5)
        after = traffic.served_by(changed_at)
    traffic.assert_clean(at_least=50)
    assert abs(before["app1"] - before["app2"]) <= 0.2 * sum(before.values()) + 2, before
    share = after["app1"] / sum(after.values())
    assert 0.7 <= share <= 0.9, after  # 4 of 5
    assert lb.backend("web", "app1")["weight"] == 4


# -- reload -------------------------------------------------------------------------------------


def test_reload_with_a_changed_backend_list_via_api_and_sighup(procs):
    lb, ports = start(procs, 2)
    port3 = procs.demo_backend("app3")
    with Traffic(lb.url) as traffic:
        wait_until(lambda: lb.backend("web", "app1")["requests"] >= 20, 10, "traffic on app1")

        def swap_app2_for_app3(cfg: dict) -> None:
            cfg["pools"]["web"]["backends"] = [
                {"name": "app1", "address": f"127.0.0.1:{ports['app1']}"},
                {"name": "app3", "address": f"127.0.0.1:{port3}"},
            ]

        rewrite(lb, swap_app2_for_app3)
        before = lb.backend("web", "app1")["requests"]
        reloaded_at = time.monotonic()
        code, body = lb.admin("/reload", "POST")
        assert code == 200 and body["reloaded"] is True, body
        # same address, same backend object: its counters carry on
        assert lb.backend("web", "app1")["requests"] >= before
        assert names(lb) == ["app1", "app3"]
        traffic.wait_for("app3", reloaded_at)
        time.sleep(0.3)
        assert traffic.served_by(reloaded_at + 0.1)["app2"] == 0

        def back_to_app2(cfg: dict) -> None:
            cfg["pools"]["web"]["backends"] = [
                {"name": "app1", "address": f"127.0.0.1:{ports['app1']}"},
                {"name": "app2", "address": f"127.0.0.1:{ports['app2']}"},
            ]

        rewrite(lb, back_to_app2)
        before = lb.backend("web", "app1")["requests"]
        hup_at = time.monotonic()
        lb.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: lb.status()["reloads"] == 2, 10, "the SIGHUP reload")
        assert lb.backend("web", "app1")["requests"] >= before
        assert names(lb) == ["app1", "app2"]
        traffic.wait_for("app2", hup_at)
    traffic.assert_clean(at_least=50)
    s = scrape(lb)
    assert msum(s, "balancer_config_reloads_total", result="success") == 2
    assert msum(s, "balancer_config_reloads_total", result="failure") == 0


def test_reload_with_a_broken_file_keeps_the_old_config(procs):
    lb, ports = start(procs, 2)
    good = lb.config_path.read_text()
    with Traffic(lb.url) as traffic:

        def break_it(cfg: dict) -> None:
            cfg["pools"]["web"]["backends"][1]["address"] = "nowhere"
            cfg["pools"]["web"]["strategy"] = "fastest"

        rewrite(lb, break_it)
        code, body = lb.admin("/reload", "POST")
        assert code == 400, body
        assert body["reloaded"] is False
        errors = "\n".join(body["errors"])
        assert "pools.web.backends[1].address" in errors, errors
        assert "pools.web.strategy" in errors, errors
        st = lb.status()
        assert st["reloads"] == 0 and st["last_reload_error"] == body["errors"]
        # the daemon runs the build this environment gets (compiled, or BALANCER_PURE=1)
        assert st["compiled"] is build.compiled()
        assert names(lb) == ["app1", "app2"]
        # SIGHUP with the same file: rejected too, still serving
        lb.proc.send_signal(signal.SIGHUP)
        wait_until(
            lambda: msum(scrape(lb), "balancer_config_reloads_total", result="failure") == 2,
            10,
            "the rejected SIGHUP reload",
        )
        # fixed file: accepted
        lb.config_path.write_text(good)
        code, body = lb.admin("/reload", "POST")
        assert code == 200, body
        time.sleep(0.3)
    traffic.assert_clean(at_least=30)
    assert lb.status()["last_reload_error"] == []
    assert "reload rejected, old config keeps serving" in lb.log_text()


def test_reload_that_cannot_bind_names_the_listener_and_address(procs):
    lb, _ = start(procs, 1)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]

        def add_listener(cfg: dict) -> None:
            cfg["listeners"].append(
                {"name": "extra", "bind": f"127.0.0.1:{port}", "routes": [{"pool": "web"}]}
            )

        rewrite(lb, add_listener)
        code, body = lb.admin("/reload", "POST")
    assert code != 200 and body["reloaded"] is False, body
    assert f"listener extra on 127.0.0.1:{port}" in "\n".join(body["errors"]), body
    assert requests.get(lb.url + "/", timeout=5).status_code == 200


# -- auth ----------------------------------------------------------------------------------------


def test_token_enforced_everywhere_but_healthz_and_rotated_on_reload(procs, tmp_path):
    token_file = tmp_path / "admin.token"
    token_file.write_text("first-token-0123456789\n")
    bs = [("app1", procs.demo_backend("app1"))]
    cfg = config(bs)
    cfg["admin"]["token_file"] = str(token_file)
    lb = procs.balancer(cfg)
    base = f"http://127.0.0.1:{lb.admin_port}"

    def call(method: str, path: str, token: str | None, **kw) -> requests.Response:  # type: ignore[no-untyped-def]
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return requests.request(method, base + path, headers=headers, timeout=10, **kw)

    good = "first-token-0123456789"
    for method, path, body in (
        ("GET", "/status", None),
        ("GET", "/metrics", None),
        ("POST", "/reload", None),
        ("POST", "/pools/web/backends", {"name": "x", "address": "127.0.0.1:1"}),
        ("PATCH", "/pools/web/backends/app1", {"state": "disabled"}),
        ("DELETE", "/pools/web/backends/app1", None),
        ("GET", "/no-such-endpoint", None),
    ):
        for token in (None, "wrong-token", good[:-1]):
            r = call(method, path, token, json=body)
            assert r.status_code == 401, (method, path, token, r.text)
            assert r.headers["WWW-Authenticate"].startswith("Bearer")
            assert "error" in r.json()
    r = requests.get(base + "/status", headers={"Authorization": "Basic Zm9vOmJhcg=="}, timeout=5)
    assert r.status_code == 401
    # nothing above changed anything
    assert call("GET", "/status", good).json()["pools"]["web"]["backends"][0]["state"] == "up"
    assert call("GET", "/metrics", good).status_code == 200
    assert call("GET", "/healthz", None).status_code == 200
    # the page itself carries no data; everything it shows needs the token
    page = call("GET", "/", None)
    assert page.status_code == 200 and "#token=" in page.text
    # rotate: the file is read again on reload
    token_file.write_text("second-token-9876543210\n")
    assert call("POST", "/reload", good).status_code == 200
    assert call("GET", "/status", good).status_code == 401
    assert call("GET", "/status", "second-token-9876543210").status_code == 200


def test_unusable_token_file_stops_the_start(procs, tmp_path):
    token_file = tmp_path / "admin.token"
    token_file.write_text("\n")
    cfg = config([("app1", procs.demo_backend("app1"))])
    cfg["admin"]["token_file"] = str(token_file)
    lb = procs.balancer(cfg, wait=False)
    assert lb.proc.wait(15) == 1
    assert "admin.token_file" in lb.log_text() and "is empty" in lb.log_text()


def test_cross_origin_and_rebound_host_refused_without_token(procs):
    lb, _ = start(procs, 1)
    base = f"http://127.0.0.1:{lb.admin_port}"
    r = requests.post(base + "/reload", headers={"Origin": "http://evil.example"}, timeout=5)
    assert r.status_code == 403, r.text
    r = requests.get(base + "/status", headers={"Host": "evil.example"}, timeout=5)
    assert r.status_code == 403, r.text
    r = requests.post(base + "/reload", headers={"Origin": base}, timeout=5)
    assert r.status_code == 200, r.text


# -- validation ------------------------------------------------------------------------------


def test_bad_bodies_unknown_names_and_duplicates(procs):
    lb, ports = start(procs, 2)
    base = f"http://127.0.0.1:{lb.admin_port}"
    free = "127.0.0.1:1"
    cases: list[tuple[str, str, object, int, str]] = [
        ("POST", "/pools/web/backends", b"{not json", 400, "not valid JSON"),
        ("POST", "/pools/web/backends", b"", 400, "empty body"),
        ("POST", "/pools/web/backends", [1, 2], 400, "JSON object"),
        ("POST", "/pools/web/backends", {"name": "x"}, 400, "missing field 'address'"),
        ("POST", "/pools/web/backends", {"name": 5, "address": free}, 400, "name must be"),
        ("POST", "/pools/web/backends", {"name": "a b", "address": free}, 400, "invalid name"),
        ("POST", "/pools/web/backends", {"name": "x", "address": "nohost"}, 400, "address"),
        ("POST", "/pools/web/backends", {"name": "x", "address": "1.2.3.4:99999"}, 400, "port"),
        ("POST", "/pools/web/backends", {"name": "x", "address": free, "weight": 0}, 400, "1..1000"),
        ("POST", "/pools/web/backends", {"name": "x", "address": free, "weight": 1001}, 400, "1..1000"),
        ("POST", "/pools/web/backends", {"name": "x", "address": free, "weight": "2"}, 400, "integer"),
        ("POST", "/pools/web/backends", {"name": "x", "address": free, "weight": True}, 400, "integer"),
        ("POST", "/pools/web/backends", {"name": "x", "address": free, "max_connections": -1}, 400, ">= 0"),
        ("POST", "/pools/web/backends", {"name": "x", "address": free, "colour": "red"}, 400, "unknown field 'colour'"),
        ("POST", "/pools/nope/backends", {"name": "x", "address": free}, 404, "no pool named 'nope'"),
        ("POST", "/pools/web/backends", {"name": "app1", "address": free}, 409, "named 'app1'"),
        ("POST", "/pools/web/backends", {"name": "x", "address": f"127.0.0.1:{ports['app2']}"}, 409, "already has a backend at"),
        ("PATCH", "/pools/web/backends/app1", {}, 400, "nothing to change"),
        ("PATCH", "/pools/web/backends/app1", {"state": "sleeping"}, 400, "state must be one of"),
        ("PATCH", "/pools/web/backends/app1", {"state": "down"}, 400, "health checks"),
        ("PATCH", "/pools/web/backends/app1", {"state": None}, 400, "state must be one of"),
        ("PATCH", "/pools/web/backends/app1", {"weight": 0}, 400, "disabled"),
        ("PATCH", "/pools/web/backends/app1", {"weight": 2.5}, 400, "integer"),
        ("PATCH", "/pools/web/backends/app1", {"name": "renamed"}, 400, "unknown field 'name'"),
        ("PATCH", "/pools/web/backends/ghost", {"state": "up"}, 404, "no backend named 'ghost'"),
        ("PATCH", "/pools/nope/backends/app1", {"state": "up"}, 404, "no pool named"),
        ("DELETE", "/pools/web/backends/ghost", None, 404, "no backend named 'ghost'"),
        ("DELETE", "/pools/nope/backends/app1", None, 404, "no pool named"),
        ("GET", "/nothing-here", None, 404, "no such admin endpoint"),
        ("PUT", "/status", None, 405, "not allowed"),
        ("POST", "/pools/web/backends", b"x" * 100_000, 413, "too large"),
    ]  # fmt: skip
    for method, path, body, status, words in cases:
        if isinstance(body, bytes):
            r = requests.request(method, base + path, data=body, timeout=10)
        else:
            r = requests.request(method, base + path, json=body, timeout=10)
        assert r.status_code == status, (method, path, body, r.status_code, r.text)
        err = r.json()["error"]
        assert words in err, (method, path, body, err)
    # none of it changed anything
    st = lb.status()["pools"]["web"]["backends"]
    assert [(b["name"], b["state"], b["weight"]) for b in st] == [
        ("app1", "up", 1),
        ("app2", "up", 1),
    ]


# -- metrics ----------------------------------------------------------------------------------


def test_metrics_count_exactly_the_requests_sent(procs):
    lb, _ = start(procs, 2)
    # few 500s: five in a row from one backend would (rightly) get it ejected
    n_ok, n_404, n_500 = 120, 20, 6
    with requests.Session() as s:
        for _ in range(n_ok):
            assert s.get(f"{lb.url}/echo", timeout=5).status_code == 200
        for _ in range(n_404):
            assert s.get(f"{lb.url}/status/404", timeout=5).status_code == 404
    # exact bytes: one request per connection, read to the close
    for _ in range(n_500):
        raw = http_raw(lb.port, b"GET /status/500 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert raw.startswith(b"HTTP/1.1 500 ")
    s = scrape(lb)
    assert msum(s, "balancer_requests_total") == n_ok + n_404 + n_500
    assert msum(s, "balancer_requests_total", code_class="2xx") == n_ok
    assert msum(s, "balancer_requests_total", code_class="4xx") == n_404
    assert msum(s, "balancer_requests_total", code_class="5xx") == n_500
    for b in ("app1", "app2"):
        assert msum(s, "balancer_requests_total", backend=b) == (n_ok + n_404 + n_500) / 2
    assert msum(s, "balancer_request_duration_seconds_count", pool="web") == n_ok + n_404 + n_500
    assert msum(s, "balancer_backend_response_seconds_count") == n_ok + n_404 + n_500
    # the status matches the metrics
    st = lb.status()["pools"]["web"]["backends"]
    assert sum(b["requests"] for b in st) == n_ok + n_404 + n_500
    assert msum(s, "balancer_backend_up") == 2
    assert msum(s, "balancer_health_checks_total", result="pass") > 0
    assert msum(s, "balancer_ha_role", role="standalone") == 1
    assert msum(s, "balancer_client_connections", listener="http") >= 0
    # bytes sent: exactly what clients read (one request per connection, read to the close)
    before = msum(s, "balancer_bytes_sent_total")
    received = 0
    for i in range(n_500):
        req = f"GET /bytes?n={i * 1000} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        raw = http_raw(lb.port, req.encode())
        assert raw.startswith(b"HTTP/1.1 200 ")
        received += len(raw)
    s = scrape(lb)
    assert msum(s, "balancer_bytes_sent_total") - before == received
    assert msum(s, "balancer_requests_total") == n_ok + n_404 + 2 * n_500


def test_metrics_switched_off(procs):
    bs = [("app1", procs.demo_backend("app1"))]
    lb = procs.balancer(config(bs, admin={"bind": f"127.0.0.1:{free_port()}", "metrics": False}))
    assert requests.get(f"{lb.url}/echo", timeout=5).status_code == 200
    r = requests.get(f"http://127.0.0.1:{lb.admin_port}/metrics", timeout=5)
    assert r.status_code == 200
    assert "balancer_requests_total" not in r.text and "metrics are off" in r.text
    assert lb.status()["recent_errors"] == []


# -- lifecycle ---------------------------------------------------------------------------------


def test_healthz_says_draining_during_shutdown_and_dashboard_is_served(procs):
    lb, _ = start(procs, 1)
    base = f"http://127.0.0.1:{lb.admin_port}"
    page = requests.get(base + "/", timeout=5)
    assert page.status_code == 200
    assert page.headers["Content-Type"].startswith("text/html")
    assert "script-src 'sha256-" in page.headers["Content-Security-Policy"]
    assert "<title>balancer</title>" in page.text
    assert requests.get(base + "/healthz", timeout=5).json() == {"status": "ok"}
    got: list[int] = []
    t = threading.Thread(
        target=lambda: got.append(requests.get(f"{lb.url}/echo?delay=2", timeout=15).status_code)
    )
    t.start()
    wait_until(lambda: lb.backend("web", "app1")["inflight"] == 1, 5, "slow request in flight")
    lb.proc.send_signal(signal.SIGTERM)
    wait_until(
        lambda: requests.get(base + "/healthz", timeout=5).status_code == 503, 5, "503 draining"
    )
    assert requests.get(base + "/healthz", timeout=5).json() == {"status": "draining"}
    t.join(15)
    assert got == [200]
    assert lb.proc.wait(15) == 0


def test_reload_keeping_a_backend_cancels_its_pending_removal(procs):
    lb, ports = start(procs, 2)
    # a slow request keeps app1 busy (round robin starts there), so its removal waits on it
    held = threading.Thread(target=lambda: requests.get(f"{lb.url}/echo?delay=2", timeout=10))
    held.start()
    time.sleep(0.3)
    code, _ = lb.admin("/pools/web/backends/app1", "DELETE")
    assert code == 202
    assert lb.backend("web", "app1")["state"] == "draining"
    code, body = lb.admin("/reload", "POST")  # the file still lists app1
    assert code == 200, body
    held.join(10)
    time.sleep(0.5)  # past the moment the drain finished
    assert names(lb) == ["app1", "app2"]
    assert lb.backend("web", "app1")["state"] == "up"


def test_reload_moves_the_admin_api_to_a_new_bind(procs):
    lb, _ = start(procs, 1)
    old_port = lb.admin_port
    new_port = free_port()

    def move(cfg: dict) -> None:
        cfg["admin"]["bind"] = f"127.0.0.1:{new_port}"

    rewrite(lb, move)
    code, body = lb.admin("/reload", "POST")
    assert code == 200, body
    lb.admin_port = new_port
    assert lb.status()["pools"]["web"]["backends"][0]["state"] in ("up", "down")

    def old_closed() -> bool:
        try:
            http_raw(old_port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", timeout=2)
        except ConnectionRefusedError:
            return True
        return False

    wait_until(old_closed, 5, "the old admin address closed")
