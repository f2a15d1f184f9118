"""workers: 2 with real processes: the owner and a worker share the listeners (SO_REUSEPORT),
every process follows the owner's health, admin and reload decisions, counters add up, and
the process group lives and dies together."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from tests.integration.harness import Balancer, Processes, config, http_raw

ROOT = Path(__file__).resolve().parents[2]


# -- helpers -----------------------------------------------------------------------------------


def wait_for(what: str, predicate: Callable[[], object], timeout: float = 20.0) -> object:
    """Poll `predicate` until it returns something true; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        got = predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def worker_entries(lb: Balancer) -> list[dict]:
    return lb.status()["workers"]


def settled(lb: Balancer, n: int = 2) -> list[dict] | None:
    """The /status `workers` list once every process serves and has applied the owner's
    latest config and backend state; None until then."""
    entries = worker_entries(lb)
    workers = [w for w in entries if w["role"] == "worker"]
    if len(entries) == n and all(w["alive"] and w["ready"] and w["in_sync"] for w in workers):
        return entries
    return None


class Workers:
    """PIDs of the worker processes the test's balancers started, so that teardown can stop
    any the owner left behind (it should leave none; the test then fails, not leaks)."""

    def __init__(self) -> None:
        self.pids: set[int] = set()

    def note(self, entries: list[dict]) -> None:
        self.pids.update(w["pid"] for w in entries if w["role"] == "worker" and w["pid"])

    def cleanup(self) -> None:
        for pid in self.pids:
            if is_worker(pid):
                os.kill(pid, signal.SIGKILL)


def is_worker(pid: int) -> bool:
    """`pid` is (still) a live `balancer worker` process (not a zombie, not a reused pid)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    if "\nState:\tZ" in status:
        return False
    return b"balancer" in cmdline and b"worker" in cmdline


@pytest.fixture
def workers() -> Iterator[Workers]:
    w = Workers()
    try:
        yield w
    finally:
        w.cleanup()


def start(procs: Processes, workers: Workers, cfg: dict) -> tuple[Balancer, list[dict]]:
    cfg = {"workers": 2, "access_log": {"format": "off"}, **cfg}
    lb = procs.balancer(cfg)
    entries = wait_for("the worker to serve", lambda: settled(lb))
    workers.note(entries)  # type: ignore[arg-type]
    return lb, entries  # type: ignore[return-value]


def get(port: int, path: str = "/", headers: dict[str, str] | None = None) -> tuple[int, dict]:
    """One request on a new connection: (status, headers lower-cased)."""
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    raw = http_raw(
        port,
        f"GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{extra}\r\n".encode(),
    )
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    assert head and head[0].startswith("HTTP/1.1 "), raw[:200]
    fields: dict[str, str] = {}
    for line in head[1:]:
        name, _, value = line.partition(":")
        fields.setdefault(name.strip().lower(), value.strip())
    return int(head[0].split()[1]), fields


def burst(port: int, n: int, headers: dict[str, str] | None = None) -> tuple[Counter, Counter]:
    """`n` requests, each on a new connection: (statuses, X-Backend-Name of the answers)."""
    statuses: Counter = Counter()
    names: Counter = Counter()
    for _ in range(n):
        status, fields = get(port, headers=headers)
        statuses[status] += 1
        names[fields.get("x-backend-name", "-")] += 1
    return statuses, names


def per_process_requests(lb: Balancer) -> dict[int, int]:
    return {w["pid"]: w["requests"] for w in worker_entries(lb)}


def served_by_both(before: dict[int, int], after: dict[int, int]) -> bool:
    return len(after) == 2 and all(after[pid] > before.get(pid, 0) for pid in after)


def burst_on_both(lb: Balancer, n: int, headers: dict[str, str] | None = None) -> Counter:
    """`n` requests on new connections, all answered 200, and served by both processes (the
    kernel spreads new connections): the X-Backend-Name of the answers."""
    before = per_process_requests(lb)
    statuses, names = burst(lb.port, n, headers)
    assert statuses == Counter({200: n})
    wait_for(
        "both processes to serve", lambda: served_by_both(before, per_process_requests(lb)), 10
    )
    return names


def metric_total(lb: Balancer, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    code, text = lb.admin("/metrics")
    assert code == 200
    out = 0.0
    for family in text_string_to_metric_families(text):  # type: ignore[arg-type]
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out += s.value
    return out


def backend_requests(lb: Balancer, name: str, pool: str = "web") -> int:
    return lb.backend(pool, name)["requests"]


def health(interval: str = "200ms") -> dict:
    return {"health_check": {"interval": interval, "timeout": "150ms", "rise": 1, "fall": 1}}


# -- tests -------------------------------------------------------------------------------------


def test_both_processes_serve_and_the_counts_add_up(procs: Processes, workers: Workers) -> None:
    backends = [(n, procs.demo_backend(n)) for n in ("app1", "app2")]
    lb, entries = start(procs, workers, config(backends))
    assert [w["role"] for w in entries] == ["owner", "worker"]
    assert entries[0]["pid"] == lb.proc.pid and entries[1]["pid"] != lb.proc.pid
    before = per_process_requests(lb)
    statuses, names = burst(lb.port, 200)
    assert statuses == Counter({200: 200})
    assert set(names) == {"app1", "app2"}
    # the kernel spread the new connections over both processes, each counted its own
    wait_for(
        "both processes to report requests",
        lambda: served_by_both(before, per_process_requests(lb)),
        10,
    )
    # /metrics adds the worker's counts to the owner's: exactly what was sent
    wait_for(
        "/metrics to count 200 requests",
        lambda: metric_total(lb, "balancer_requests_total") == 200,
        10,
    )
    assert metric_total(lb, "balancer_requests_total", code_class="2xx") == 200
    assert metric_total(lb, "balancer_request_duration_seconds_count") == 200
    assert backend_requests(lb, "app1") + backend_requests(lb, "app2") == 200
    code, entry = lb.admin("/pools/web/backends/app1")
    assert code == 200 and entry["requests"] == backend_requests(lb, "app1")  # type: ignore[index]
    assert sum(per_process_requests(lb).values()) == 200


def test_a_dead_backend_is_skipped_by_every_process(procs: Processes, workers: Workers) -> None:
    backends = [(n, procs.demo_backend(n)) for n in ("app1", "app2", "app3")]
    app2 = procs.procs[1]
    lb, _ = start(procs, workers, config(backends, pool=health()))
    statuses, names = burst(lb.port, 30)
    assert statuses == Counter({200: 30}) and names["app2"] > 0
    procs.stop(app2, signal.SIGKILL)
    lb.wait_state("web", "app2", "down")
    wait_for("every worker to apply the health flip", lambda: settled(lb))
    sent_to_app2 = backend_requests(lb, "app2")
    failures = metric_total(lb, "balancer_backend_failures_total", backend="app2")
    names = burst_on_both(lb, 100)
    assert names["app2"] == 0
    # not even tried (and retried elsewhere) by any process: the owner's check decided
    assert backend_requests(lb, "app2") == sent_to_app2
    assert metric_total(lb, "balancer_backend_failures_total", backend="app2") == failures


def test_draining_through_the_admin_api_reaches_every_worker(
    procs: Processes, workers: Workers
) -> None:
    backends = [(n, procs.demo_backend(n)) for n in ("app1", "app2")]
    lb, _ = start(procs, workers, config(backends))
    code, body = lb.admin("/pools/web/backends/app1", "PATCH", {"state": "draining"})
    assert code == 200, body
    # the answer comes once every worker applied it: no waiting needed before the burst
    sent_to_app1 = backend_requests(lb, "app1")
    names = burst_on_both(lb, 200)
    assert names == Counter({"app2": 200})
    assert backend_requests(lb, "app1") == sent_to_app1
    # and back up, everywhere
    code, body = lb.admin("/pools/web/backends/app1", "PATCH", {"state": "up"})
    assert code == 200, body
    statuses, names = burst(lb.port, 40)
    assert statuses == Counter({200: 40}) and names["app1"] > 0


def test_sighup_reload_reaches_every_worker_and_a_bad_file_changes_nothing(
    procs: Processes, workers: Workers
) -> None:
    ports = {n: procs.demo_backend(n) for n in ("app1", "app2", "app3")}
    cfg = config([("app1", ports["app1"]), ("app2", ports["app2"])], pool=health())
    lb, _ = start(procs, workers, cfg)
    new = yaml.safe_load(lb.config_path.read_text())
    new["pools"]["web"]["backends"] = [
        {"name": "app1", "address": f"127.0.0.1:{ports['app1']}"},
        {"name": "app3", "address": f"127.0.0.1:{ports['app3']}"},
    ]
    lb.config_path.write_text(yaml.safe_dump(new, sort_keys=False))
    lb.proc.send_signal(signal.SIGHUP)

    def reloaded() -> bool:
        st = lb.status()
        states = {b["name"]: b["state"] for b in st["pools"]["web"]["backends"]}
        return st["reloads"] == 1 and states == {"app1": "up", "app3": "up"} and bool(settled(lb))

    wait_for("the reload and app3's first check, in every process", reloaded)
    names = burst_on_both(lb, 100)
    assert set(names) == {"app1", "app3"}

    # a broken file: rejected by the owner, nothing changes anywhere
    lb.config_path.write_text(lb.config_path.read_text() + "surprise: 1\n")
    lb.proc.send_signal(signal.SIGHUP)
    wait_for("the reload to be rejected", lambda: lb.status()["last_reload_error"])
    assert "surprise" in lb.status()["last_reload_error"][0]
    names = burst_on_both(lb, 100)
    assert set(names) == {"app1", "app3"}
    assert lb.status()["reloads"] == 1
    assert "reload rejected" in lb.log_text()
    assert "cannot apply the owner's reload" not in lb.log_text()


def test_a_sticky_cookie_set_by_one_process_pins_on_the_other(
    procs: Processes, workers: Workers
) -> None:
    backends = [(n, procs.demo_backend(n)) for n in ("app1", "app2", "app3")]
    lb, _ = start(procs, workers, config(backends, pool={"sticky": {"cookie": "LB"}}))
    raw = http_raw(lb.port, b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    assert head.startswith("HTTP/1.1 200 "), head
    # the demo app sets a cookie of its own too
    cookie = next(
        line.split(":", 1)[1].strip().split(";", 1)[0]
        for line in head.split("\r\n")
        if line.lower().startswith("set-cookie: lb=")
    )
    pinned = next(
        line.split(":", 1)[1].strip()
        for line in head.split("\r\n")
        if line.lower().startswith("x-backend-name:")
    )
    names = burst_on_both(lb, 60, headers={"Cookie": cookie})
    assert names == Counter({pinned: 60})
    # both processes verified the same cookie (one of them did not sign it)
    assert metric_total(lb, "balancer_sticky_total", result="hit") >= 60


def test_a_killed_worker_is_respawned_and_serves(procs: Processes, workers: Workers) -> None:
    backends = [(n, procs.demo_backend(n)) for n in ("app1", "app2")]
    lb, entries = start(procs, workers, config(backends))
    statuses, _ = burst(lb.port, 40)
    assert statuses == Counter({200: 40})
    wait_for("/metrics to count 40", lambda: metric_total(lb, "balancer_requests_total") == 40, 10)
    old = entries[1]["pid"]
    # a reload goes through the owner: a worker sent SIGHUP says so and keeps serving
    os.kill(old, signal.SIGHUP)
    wait_for("the worker to log the ignored SIGHUP", lambda: "SIGHUP ignored" in lb.log_text(), 10)
    assert is_worker(old)
    still = wait_for("the same worker, still serving", lambda: settled(lb))
    assert still[1]["pid"] == old  # type: ignore[index]
    os.kill(old, signal.SIGKILL)

    def respawned() -> list[dict] | None:
        now = settled(lb)
        return now if now and now[1]["pid"] != old else None

    entries = wait_for("a new worker", respawned)  # type: ignore[assignment]
    workers.note(entries)
    assert entries[1]["restarts"] == 1
    assert "killed by SIGKILL" in lb.log_text()
    before = per_process_requests(lb)
    statuses, _ = burst(lb.port, 60)
    assert statuses == Counter({200: 60})
    wait_for(
        "the new worker to serve", lambda: served_by_both(before, per_process_requests(lb)), 10
    )
    # what the dead worker counted is not lost from the totals
    wait_for(
        "/metrics to count 100", lambda: metric_total(lb, "balancer_requests_total") == 100, 10
    )
    assert metric_total(lb, "balancer_worker_restarts_total") == 1
    assert metric_total(lb, "balancer_processes_serving") == 2


def test_a_hung_worker_is_killed_and_replaced(procs: Processes, workers: Workers) -> None:
    from balancer.cluster.supervisor import SILENT_AFTER

    backends = [(n, procs.demo_backend(n)) for n in ("app1", "app2")]
    lb, entries = start(procs, workers, config(backends))
    old = entries[1]["pid"]
    # stopped, it is alive but answers nothing (as a worker stuck in a loop would be); the
    # connections the kernel hashes to its socket would wait until it is replaced
    os.kill(old, signal.SIGSTOP)
    try:

        def replaced() -> list[dict] | None:
            now = settled(lb)
            return now if now and now[1]["pid"] != old else None

        entries = wait_for("a new worker", replaced, SILENT_AFTER + 30)  # type: ignore[assignment]
    finally:
        if is_worker(old):
            os.kill(old, signal.SIGKILL)
    workers.note(entries)
    assert not is_worker(old)
    assert f"silent for {SILENT_AFTER:.0f}s: killing it" in lb.log_text()
    assert metric_total(lb, "balancer_worker_hangs_total") == 1
    names = burst_on_both(lb, 60)
    assert sum(names.values()) == 60


def test_workers_exit_when_the_owner_is_killed(procs: Processes, workers: Workers) -> None:
    backends = [(n, procs.demo_backend(n)) for n in ("app1",)]
    lb, entries = start(procs, workers, config(backends))
    worker = entries[1]["pid"]
    assert is_worker(worker)
    lb.proc.send_signal(signal.SIGKILL)
    lb.proc.wait(10)
    wait_for("the orphaned worker to exit", lambda: not is_worker(worker), 15)


def test_sigterm_drains_every_process_and_exits_zero(procs: Processes, workers: Workers) -> None:
    backends = [(n, procs.demo_backend(n)) for n in ("app1", "app2")]
    lb, entries = start(procs, workers, config(backends))
    results: list[int] = []

    def slow() -> None:
        # long enough that all 16 are surely in flight together even on a slow machine
        status, _ = get(lb.port, "/?delay=4")
        results.append(status)

    # many slow requests: the kernel puts some on each process (all 16 on one: p = 2**-15)
    threads = [threading.Thread(target=slow) for _ in range(16)]
    for t in threads:
        t.start()
    wait_for(
        "the slow requests to be in flight",
        lambda: sum(b["inflight"] for b in lb.status()["pools"]["web"]["backends"]) == 16,
        10,
    )
    assert all(w["connections"] > 0 for w in worker_entries(lb))
    lb.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(20)
    assert results == [200] * 16  # in-flight requests finished in both processes
    assert lb.proc.wait(20) == 0
    wait_for("the worker to exit", lambda: not is_worker(entries[1]["pid"]), 10)
    log = lb.log_text()
    assert "worker 1 (pid" in log and "exited with 0" in log


def check_workers(tmp_path: Path, value: str) -> tuple[subprocess.CompletedProcess, Path]:
    """`balancer check` of a one-pool file with `workers: value` (on line 3)."""
    path = tmp_path / "lb.yaml"
    path.write_text(
        "listeners: [{name: web, bind: '127.0.0.1:8080', routes: [{pool: web}]}]\n"
        "pools: {web: {backends: [{name: a, address: '127.0.0.1:9001'}]}}\n"
        f"workers: {value}\n"
    )
    r = subprocess.run(
        [sys.executable, "-m", "balancer", "check", "-c", str(path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    return r, path


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("0", "workers: must be >= 1, got 0"),
        ("-1", "workers: must be >= 1, got -1"),
        ("many", "workers: expected an integer >= 1 or 'auto', got a string 'many'"),
    ],
)
def test_check_reports_bad_workers_values(tmp_path: Path, value: str, message: str) -> None:
    r, path = check_workers(tmp_path, value)
    assert r.returncode == 1
    assert f"{path}:3: {message}" in r.stderr


def test_check_accepts_workers_auto(tmp_path: Path) -> None:
    r, _ = check_workers(tmp_path, "auto")
    assert r.returncode == 0, r.stderr


def test_a_reload_changes_the_number_of_workers(procs: Processes, workers: Workers) -> None:
    backends = [(n, procs.demo_backend(n)) for n in ("app1", "app2")]
    lb, _ = start(procs, workers, config(backends))
    text = lb.config_path.read_text()
    assert "workers: 2" in text
    lb.config_path.write_text(text.replace("workers: 2", "workers: 3"))
    code, body = lb.admin("/reload", "POST")
    assert code == 200, body
    entries = wait_for("three processes", lambda: settled(lb, 3))
    workers.note(entries)  # type: ignore[arg-type]
    before = per_process_requests(lb)
    statuses, _ = burst(lb.port, 150)
    assert statuses == Counter({200: 150})

    def all_three_served() -> bool:
        after = per_process_requests(lb)
        return len(after) == 3 and all(after[pid] > before.get(pid, 0) for pid in after)

    wait_for("all three processes to serve", all_three_served, 10)
    # back to two: the surplus worker drains and exits
    third = entries[2]["pid"]  # type: ignore[index]
    lb.config_path.write_text(text)
    code, body = lb.admin("/reload", "POST")
    assert code == 200, body
    wait_for("two processes", lambda: settled(lb, 2))
    wait_for("the third worker to exit", lambda: not is_worker(third), 10)
    statuses, _ = burst(lb.port, 40)
    assert statuses == Counter({200: 40})
    # between one process and several: a restart is needed, the reload is refused
    lb.config_path.write_text(text.replace("workers: 2", "workers: 1"))
    code, body = lb.admin("/reload", "POST")
    assert code == 400
    assert "changing workers from 2 to 1 needs a restart" in body["errors"][0]  # type: ignore[index]
    wait_for("both processes still serving", lambda: settled(lb, 2))


def test_tcp_listeners_are_shared_too(procs: Processes, workers: Workers) -> None:
    port = procs.demo_backend("db1")
    cfg = config([("db1", port)])
    cfg["listeners"] = [
        {"name": "db", "bind": cfg["listeners"][0]["bind"], "mode": "tcp", "pool": "web"}
    ]
    lb, _ = start(procs, workers, cfg)
    before = per_process_requests(lb)
    statuses, names = burst(lb.port, 60)  # HTTP spliced through as raw TCP
    assert statuses == Counter({200: 60}) and names == Counter({"db1": 60})
    wait_for(
        "both processes to serve", lambda: served_by_both(before, per_process_requests(lb)), 10
    )


def test_a_worker_signs_with_the_keys_its_owner_sent_also_after_a_reload(tmp_path: Path) -> None:
    """In process (no balancer started): a worker-role Daemon never reads the key file, at
    start or on reload, so all processes share the owner's keys even if the file changes (or
    when the owner's key is kept in memory only)."""
    import asyncio

    from balancer import config as config_mod
    from balancer import sticky
    from balancer.daemon import WORKER, Daemon

    key_file = tmp_path / "sticky.key"
    key_file.write_text("11" * 32 + "\n")
    path = tmp_path / "lb.yaml"
    path.write_text(
        "listeners: [{name: web, bind: '127.0.0.1:0', routes: [{pool: web}]}]\n"
        "admin: {bind: '127.0.0.1:0'}\n"
        "pools: {web: {sticky: {key_file: sticky.key},"
        " backends: [{name: a, address: '127.0.0.1:9001'}]}}\n"
    )
    owners = [bytes.fromhex("22" * 32)]
    expected = sticky.StickyCodec(owners, "web", 3600).tag("127.0.0.1:9001")
    from_file = sticky.StickyCodec([bytes.fromhex("11" * 32)], "web", 3600).tag("127.0.0.1:9001")
    assert expected != from_file

    async def scenario() -> None:
        cfg = config_mod.load(str(path))
        daemon = Daemon(cfg, role=WORKER, sticky_keys={str(key_file): owners})
        await daemon.start()
        try:
            assert daemon.pools["web"].sticky_tag(daemon.pools["web"].backends[0]) == expected
            assert daemon._admin_runner is None and daemon.ha is None  # the owner's jobs
            await daemon.apply(config_mod.load(str(path)))
            assert daemon.pools["web"].sticky_tag(daemon.pools["web"].backends[0]) == expected
        finally:
            await daemon.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("where", ["file", "stderr"])
def test_access_log_lines_of_both_processes_never_interleave(
    procs: Processes, workers: Workers, tmp_path: Path, where: str
) -> None:
    import json

    import requests

    backends = [(n, procs.demo_backend(n)) for n in ("app1", "app2")]
    path = tmp_path / "access.log"
    log_cfg = {"format": "json", **({"path": str(path)} if where == "file" else {})}
    lb, _ = start(procs, workers, {**config(backends), "access_log": log_cfg})
    # long targets make long lines: every flush writes many KiB from each process at once
    target = "/?pad=" + "x" * 900
    threads, per_thread = 8, 100
    failures: list[str] = []

    def client() -> None:
        with requests.Session() as s:
            for i in range(per_thread):
                r = s.get(f"{lb.url}{target}&i={i}", timeout=10)
                if r.status_code != 200:
                    failures.append(str(r.status_code))

    pool = [threading.Thread(target=client) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join(60)
    assert not failures
    assert procs.stop(lb.proc) == 0  # SIGTERM: every process flushes what it holds
    text = path.read_text() if where == "file" else lb.log_text()
    records = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    # every line whole: each parsed, and all requests are there exactly once
    assert len(records) == threads * per_thread
    assert Counter(r["path"].split("&i=")[1] for r in records) == Counter(
        {str(i): threads for i in range(per_thread)}
    )
    assert all(r["path"].startswith(target) for r in records)
    if where == "file":
        assert text.count("\n") == threads * per_thread
