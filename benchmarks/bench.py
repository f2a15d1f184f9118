"""Benchmarks: balancer side by side with HAProxy and nginx, same backends, same machine, same run.

Every proxy is pinned to core 0 (`taskset -c 0`); the backend nginx and the load generator
share the other core. Scenarios run interleaved (each repetition visits every target in
turn) so that drift in the machine's speed hits all targets alike; medians are reported,
with ratios to HAProxy and to the backend reached directly.

    benchmarks/run.sh                 # installs wrk, haproxy, nginx, h2load; runs everything
    benchmarks/run.sh --quick         # shorter runs, one repetition (a smoke test)
    benchmarks/run.sh --only small,64k --reps 5 --duration 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PROXY_CORE = "0"
LOAD_CORE = "1"
SMALL_BODY = "hello from the backend\n"
# HAProxy needs two descriptors per proxied connection and refuses to start when maxconn
# doesn't fit the hard fd limit (20,000 on some containers); the memory test stays under it
FD_HARD = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
HAPROXY_MAXCONN = max(1000, min(100000, (FD_HARD - 200) // 2))
IDLE_CONNECTIONS = min(10000, HAPROXY_MAXCONN - 100)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing on port {port}") from None
            time.sleep(0.05)


def cpu_seconds(pids: list[int]) -> float:
    """user+sys CPU time of the given processes, from /proc (clock ticks -> seconds)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def rss_kib(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1])
    return total


def children(pid: int) -> list[int]:
    try:
        out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    except FileNotFoundError:
        return []
    return [int(x) for x in out.split()]


# -- the processes under test --------------------------------------------------------------


@dataclass
class Target:
    name: str
    port: int
    proc: subprocess.Popen | None = None
    extra: dict = field(default_factory=dict)

    def pids(self) -> list[int]:
        if self.proc is None:
            return []
        return [self.proc.pid, *children(self.proc.pid)]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Lab:
    """Backend nginx, the proxies under test, and their configs in one temp dir."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.targets: dict[str, Target] = {}
        self.backend_ports = [free_port(), free_port()]
        self._procs: list[subprocess.Popen] = []

    def start(
        self, popen_args: list[str], *, core: str, log: str, env: dict | None = None
    ) -> subprocess.Popen:
        out = open(self.work / log, "ab")  # noqa: SIM115 - lives as long as the process
        p = subprocess.Popen(
            ["taskset", "-c", core, *popen_args], stdout=out, stderr=subprocess.STDOUT, env=env
        )
        self._procs.append(p)
        return p

    # backend: nginx with two server blocks (two "app servers") on the load core
    def start_backend(self) -> None:
        (self.work / "www").mkdir(exist_ok=True)
        (self.work / "www" / "64k").write_bytes(bytes(range(256)) * 256)
        servers = "\n".join(
            f"""
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        keepalive_requests 1000000;
        root {self.work}/www;
        location = /small {{ default_type text/plain; return 200 "{SMALL_BODY.strip()}\\n"; }}
        location = /healthz {{ default_type application/json; return 200 '{{"load": {0.2 + 0.1 * i}}}'; }}
        location = /upload {{ client_max_body_size 4m; client_body_buffer_size 4m; proxy_pass http://127.0.0.1:{port}/small; }}
        location = /64k {{ }}
    }}"""
            for i, port in enumerate(self.backend_ports)
        )
        conf = self.work / "backend-nginx.conf"
        conf.write_text(
            f"""
daemon off; worker_processes 1; pid {self.work}/backend-nginx.pid; error_log {self.work}/backend-nginx.err;
worker_rlimit_nofile 65536;
events {{ worker_connections 20000; }}
http {{ access_log off; keepalive_timeout 120s; client_body_temp_path {self.work}/cbt; proxy_temp_path {self.work}/pt;
{servers}
}}
"""
        )
        self.start(
            ["nginx", "-c", str(conf), "-p", str(self.work)], core=LOAD_CORE, log="backend.log"
        )
        for port in self.backend_ports:
            wait_port(port)
        self.targets["direct"] = Target("direct", self.backend_ports[0])

    def start_balancer(
        self,
        name: str,
        *,
        strategy: str = "round_robin",
        sticky: bool = False,
        metrics: bool = True,
        access_log: str = "off",
        health: bool = False,
        workers: int = 1,
        core: str = PROXY_CORE,
        pure: bool = False,
    ) -> Target:
        """A balancer process; `pure`: the interpreted build (BALANCER_PURE=1), to show
        beside the compiled one what compiling buys."""
        port, admin = free_port(), free_port()
        backends = "\n".join(
            f'      - {{name: app{i}, address: "127.0.0.1:{p}"}}'
            for i, p in enumerate(self.backend_ports)
        )
        extra = ""
        if sticky:
            extra += (
                f"    sticky: {{cookie: LBSTICKY, ttl: 1h, key_file: {self.work}/sticky.key}}\n"
            )
        if health or strategy == "least_load":
            extra += "    health_check: {path: /healthz, interval: 500ms, timeout: 400ms}\n"
        cfg = self.work / f"{name}.yaml"
        cfg.write_text(
            f"""listeners:
  - name: http
    bind: "127.0.0.1:{port}"
    routes: [{{pool: web}}]
pools:
  web:
    strategy: {strategy}
{extra}    backends:
{backends}
admin:
  bind: "127.0.0.1:{admin}"
  metrics: {"true" if metrics else "false"}
access_log: {{format: "{access_log}", path: "{self.work}/{name}.access"}}
limits: {{max_connections: 100000}}
workers: {workers}
"""
        )
        p = self.start(
            [sys.executable, "-m", "balancer", "run", "-c", str(cfg), "--log-level", "warning"],
            core=core,
            log=f"{name}.log",
            env={**os.environ, "BALANCER_PURE": "1" if pure else "0"},
        )
        wait_port(port)
        t = Target(name, port, p, {"admin": admin})
        t.extra["compiled"] = compiled_status(admin)
        self.targets[name] = t
        return t

    def start_haproxy(
        self,
        name: str = "haproxy",
        *,
        sticky: bool = False,
        threads: int = 1,
        core: str = PROXY_CORE,
    ) -> Target:
        port = free_port()
        servers = "\n".join(
            f"    server app{i} 127.0.0.1:{p}" + (f" cookie a{i}" if sticky else "")
            for i, p in enumerate(self.backend_ports)
        )
        cfg = self.work / f"{name}.cfg"
        cfg.write_text(
            f"""global
    nbthread {threads}
    maxconn {HAPROXY_MAXCONN}
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 30s
    timeout http-keep-alive 60s
    option http-keep-alive
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    balance roundrobin
    http-reuse always
{"    cookie LBSTICKY insert indirect nocache httponly" if sticky else ""}
{servers}
"""
        )
        p = self.start(["haproxy", "-f", str(cfg), "-db"], core=core, log=f"{name}.log")
        wait_port(port)
        t = Target(name, port, p)
        self.targets[name] = t
        return t

    def start_nginx_proxy(
        self, name: str = "nginx", *, processes: int = 1, core: str = PROXY_CORE
    ) -> Target:
        port = free_port()
        servers = "\n".join(f"        server 127.0.0.1:{p};" for p in self.backend_ports)
        cfg = self.work / f"{name}.conf"
        cfg.write_text(
            f"""
daemon off; worker_processes {processes}; pid {self.work}/{name}.pid; error_log {self.work}/{name}.err;
worker_rlimit_nofile 65536;
events {{ worker_connections 20000; }}
http {{
    access_log off; keepalive_timeout 120s; keepalive_requests 1000000;
    client_body_temp_path {self.work}/{name}-cbt; proxy_temp_path {self.work}/{name}-pt;
    client_max_body_size 4m; client_body_buffer_size 4m;
    upstream be {{
{servers}
        keepalive 256;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{ proxy_pass http://be; proxy_http_version 1.1; proxy_set_header Connection ""; }}
    }}
}}
"""
        )
        p = self.start(
            ["nginx", "-c", str(cfg), "-p", str(self.work)], core=core, log=f"{name}.log"
        )
        wait_port(port)
        t = Target(name, port, p)
        self.targets[name] = t
        return t

    def stop_all(self) -> None:
        for p in reversed(self._procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self._procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


# -- load generation -----------------------------------------------------------------------


def wrk(
    port: int,
    path: str,
    *,
    conns: int,
    duration: float,
    headers: list[str] = (),
    script: Path | None = None,
) -> dict:
    cmd = [
        "taskset",
        "-c",
        LOAD_CORE,
        "wrk",
        "-t1",
        f"-c{conns}",
        f"-d{int(duration)}s",
        "--latency",
        "--timeout",
        "10s",
    ]
    for h in headers:
        cmd += ["-H", h]
    if script is not None:
        cmd += ["-s", str(script)]
    cmd.append(f"http://127.0.0.1:{port}{path}")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60)
    out = proc.stdout
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if m is None:
        raise RuntimeError(f"wrk failed on port {port}: {out}{proc.stderr}")
    rps = float(m.group(1))
    lat = {}
    for pct in ("50", "99"):
        m = re.search(rf"^\s+{pct}%\s+([\d.]+)(us|ms|s)", out, re.M)
        if m:
            v = float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
            lat[f"p{pct}_ms"] = v
    errors = 0
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if m:
        errors += int(m.group(1))
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if m:
        errors += sum(int(x) for x in m.groups())
    return {"rps": rps, **lat, "errors": errors}


def compiled_status(admin_port: int) -> bool | None:
    """What a balancer's /status says of its build (None: no answer)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", admin_port), timeout=2) as s:
                s.sendall(b"GET /status HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            return json.loads(data.split(b"\r\n\r\n", 1)[1]).get("compiled")
        except (OSError, ValueError, IndexError):
            time.sleep(0.2)
    return None


def cookie_of(port: int, name: str = "LBSTICKY") -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(b"GET /small HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    m = re.search(rb"Set-Cookie: (" + name.encode() + rb"=[^;\r\n]+)", data, re.I)
    return m.group(1).decode() if m else ""


# Fixed-rate runs: (label, path, clients). The offered rate is the same for every proxy and
# well below everyone's saturation, so CPU time per request and latency compare the work each
# proxy does per request, not how fast the load generator can push (latency under a closed
# loop at saturation is mostly 1/throughput again).
FIXED_RATE = 3000
FIXED_RUNS = (("small", "/small", 10), ("64k", "/64k", 10), ("c1000", "/small", 1000))


def percentile(sorted_vals: list[float], pct: float) -> float:
    """The nearest-rank percentile of an ascending list."""
    if not sorted_vals:
        return float("nan")
    rank = max(1, -(-len(sorted_vals) * pct // 100))  # ceil without floats
    return sorted_vals[int(rank) - 1]


def fixed_rate(target: Target, *, path: str, clients: int, rate: int, seconds: float) -> dict:
    """CPU ms per 1,000 requests and latency percentiles at a fixed offered rate.

    h2load paces each client (--rps) and logs each request's time from sending it to the
    last byte of its response; the percentiles are taken over every logged request.
    """
    n = int(rate * seconds)
    pids = target.pids()
    with tempfile.NamedTemporaryFile(prefix="h2load-", suffix=".log") as log:
        before = cpu_seconds(pids)
        proc = subprocess.run(
            [
                "taskset",
                "-c",
                LOAD_CORE,
                "h2load",
                "--h1",
                "-n",
                str(n),
                "-c",
                str(clients),
                "--rps",
                str(max(1, rate // clients)),
                f"--log-file={log.name}",
                f"http://127.0.0.1:{target.port}{path}",
            ],
            capture_output=True,
            text=True,
            timeout=seconds * 4 + 60,
        )
        cpu = cpu_seconds(pids) - before
        if proc.returncode != 0:
            raise RuntimeError(f"h2load failed on {target.name}: {proc.stdout}{proc.stderr}")
        rows = [line.split("\t") for line in Path(log.name).read_text().splitlines()]
    done = [(int(r[0]), int(r[2]) / 1000) for r in rows if len(r) >= 3 and r[1].startswith("2")]
    # the first quarter is warm-up: with 1,000 clients it is mostly connection set-up, which
    # the new-connection scenario measures on its own
    start = min((t for t, _ in done), default=0) + seconds * 1e6 / 4
    times = sorted(ms for t, ms in done if t >= start)
    return {
        "cpu_ms_per_1000": cpu / n * 1e6,
        "p50_ms": percentile(times, 50),
        "p99_ms": percentile(times, 99),
        "errors": n - len(done),
    }


async def _hold_idle(port: int, n: int, hold: float) -> int:
    """Open n keep-alive connections, make one request on each, keep them idle."""
    conns = []
    sem = asyncio.Semaphore(500)

    async def one() -> None:
        async with sem:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /small HTTP/1.1\r\nHost: bench\r\n\r\n")
            await r.readuntil(b"\r\n\r\n")
            await r.readexactly(len(SMALL_BODY))
            conns.append(w)

    await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    await asyncio.sleep(hold)
    opened = len(conns)
    for w in conns:
        w.close()
    return opened


def rss_per_idle_connection(target: Target, n: int = 10000) -> tuple[float, float]:
    pids = target.pids()
    base = rss_kib(pids)
    result: dict = {}

    async def run() -> None:
        task = asyncio.ensure_future(_hold_idle(target.port, n, 3.0))
        await asyncio.sleep(2.5 + n / 4000)
        result["rss"] = rss_kib(pids)
        result["opened"] = await task

    asyncio.run(run())
    total_mib = result["rss"] / 1024
    return total_mib, (result["rss"] - base) / max(result["opened"], 1)


# -- the run -------------------------------------------------------------------------------


SCENARIOS = {
    "small": dict(path="/small", conns=50),
    "64k": dict(path="/64k", conns=50),
    "upload_1m": dict(path="/upload", conns=10, script="post1m.lua"),
    "new_conn": dict(path="/small", conns=50, headers=["Connection: close"]),
    "c1000": dict(path="/small", conns=1000),
    "sticky": dict(path="/small", conns=50, sticky=True),
    "least_load": dict(path="/small", conns=50),
    "metrics_off": dict(path="/small", conns=50),
    "access_log": dict(path="/small", conns=50),
    # both cores for every proxy (2 workers / threads / processes), shared with wrk and the
    # backend: what a second core buys each, on a machine too small to give it freely
    "two_cores": dict(path="/small", conns=100),
}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--duration", type=float, default=5.0)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--only", default="", help="comma-separated scenarios")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--no-cpu", action="store_true")
    ap.add_argument("--no-memory", action="store_true")
    ap.add_argument("--chart-only", metavar="JSON", help="redraw the chart of a results.json")
    args = ap.parse_args()
    if args.chart_only:
        saved = json.loads(Path(args.chart_only).read_text())
        chart(saved["table"], Path(args.chart_only).with_suffix(".png"), saved["meta"])
        return 0
    if args.quick:
        args.duration, args.reps = 2.0, 1
    names = [s for s in args.only.split(",") if s] or list(SCENARIOS)
    for tool in ("wrk", "haproxy", "nginx", "h2load", "taskset"):
        if shutil.which(tool) is None:
            print(f"missing {tool}: run benchmarks/run.sh, which installs it", file=sys.stderr)
            return 1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 65536), hard))
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="balancer-bench-"))
    work.chmod(0o755)  # nginx workers run as an unprivileged user and must read the files
    (work / "post1m.lua").write_text(
        'wrk.method = "POST"\nwrk.body = string.rep("x", 1048576)\n'
        'wrk.headers["Content-Type"] = "application/octet-stream"\n'
    )
    lab = Lab(work)
    results: dict = {"scenarios": {}, "fixed_rate": {}, "memory": {}}
    try:
        lab.start_backend()
        lab.start_balancer("balancer")
        lab.start_balancer("balancer_pure", pure=True)
        lab.start_haproxy("haproxy")
        lab.start_nginx_proxy("nginx")
        if "sticky" in names:
            lab.start_balancer("balancer_sticky", sticky=True)
            lab.start_balancer("balancer_sticky_pure", sticky=True, pure=True)
            lab.start_haproxy("haproxy_sticky", sticky=True)
        if "least_load" in names:
            lab.start_balancer("balancer_least_load", strategy="least_load")
        if "metrics_off" in names:
            lab.start_balancer("balancer_metrics_off", metrics=False)
        if "access_log" in names:
            lab.start_balancer("balancer_access_log", access_log="plain")
        if "two_cores" in names:
            both = f"{PROXY_CORE},{LOAD_CORE}"
            lab.start_balancer("balancer_2w", workers=2, core=both)
            lab.start_balancer("balancer_1w_2c", core=both)
            lab.start_haproxy("haproxy_2t", threads=2, core=both)
            lab.start_nginx_proxy("nginx_2p", processes=2, core=both)
        time.sleep(1.0)
        builds = {n: t.extra["compiled"] for n, t in lab.targets.items() if "compiled" in t.extra}
        results["builds"] = builds
        print("compiled hot path per balancer target:", builds, flush=True)
        if builds.get("balancer") is not True:
            print("warning: the `balancer` target is not running compiled modules", flush=True)
        plan = {
            "sticky": [
                "balancer_sticky",
                "balancer_sticky_pure",
                "haproxy_sticky",
                "balancer",
                "haproxy",
            ],
            "least_load": ["balancer_least_load", "balancer", "haproxy"],
            "metrics_off": ["balancer_metrics_off", "balancer"],
            "access_log": ["balancer_access_log", "balancer"],
            "two_cores": ["balancer_2w", "balancer_1w_2c", "haproxy_2t", "nginx_2p", "direct"],
        }
        for rep in range(args.reps):
            for scen in names:
                spec = SCENARIOS[scen]
                targets = plan.get(
                    scen, ["balancer", "balancer_pure", "haproxy", "nginx", "direct"]
                )
                for tname in targets:
                    t = lab.targets[tname]
                    headers = list(spec.get("headers", []))
                    if spec.get("sticky") and tname.endswith("_sticky"):
                        c = cookie_of(t.port)
                        if c:
                            headers.append(f"Cookie: {c}")
                    script = work / spec["script"] if "script" in spec else None
                    r = wrk(
                        t.port,
                        spec["path"],
                        conns=spec["conns"],
                        duration=args.duration,
                        headers=headers,
                        script=script,
                    )
                    results["scenarios"].setdefault(scen, {}).setdefault(tname, []).append(r)
                    print(
                        f"rep {rep + 1} {scen:12s} {tname:22s} {r['rps']:>10.0f} req/s  p50 {r.get('p50_ms', 0):6.2f} ms  p99 {r.get('p99_ms', 0):7.2f} ms  errors {r['errors']}",
                        flush=True,
                    )
        if not args.no_cpu:
            for label, path, clients in FIXED_RUNS:
                for tname in ("balancer", "balancer_pure", "haproxy", "nginx"):
                    runs = [
                        fixed_rate(
                            lab.targets[tname],
                            path=path,
                            clients=clients,
                            rate=FIXED_RATE,
                            seconds=4 if not args.quick else 2,
                        )
                        for _ in range(max(1, min(args.reps, 3)))
                    ]
                    row = {k: median_of(runs, k) for k in ("cpu_ms_per_1000", "p50_ms", "p99_ms")}
                    row["errors"] = sum(r["errors"] for r in runs)
                    results["fixed_rate"].setdefault(label, {})[tname] = row
                    print(
                        f"fixed {FIXED_RATE}/s {label:6s} {tname:10s}"
                        f" {row['cpu_ms_per_1000']:6.1f} ms CPU per 1000 requests,"
                        f" p50 {row['p50_ms']:.2f} ms, p99 {row['p99_ms']:.2f} ms,"
                        f" errors {row['errors']}",
                        flush=True,
                    )
        if not args.no_memory:
            for tname in ("balancer", "haproxy", "nginx"):
                n = IDLE_CONNECTIONS
                total, per = rss_per_idle_connection(lab.targets[tname], n)
                results["memory"][tname] = {
                    "idle_connections": n,
                    "rss_mib": round(total, 1),
                    "kib_per_connection": round(per, 2),
                    "rss_mib_at_10k": round(total + per * (10000 - n) / 1024, 1),
                }
                print(
                    f"memory {tname:10s} {total:.1f} MiB RSS with {n} idle keep-alive"
                    f" connections ({per:.2f} KiB each)",
                    flush=True,
                )
    finally:
        lab.stop_all()
    report(results, out_dir)
    return 0


# What each scenario's "x HAProxy" column divides by.
BASELINE = {"sticky": "haproxy_sticky", "two_cores": "haproxy_2t"}


# Which row stands for each proxy in a scenario's bar group of the chart.
CHART_AS = {
    "sticky": {
        "balancer": "balancer_sticky",
        "balancer_pure": "balancer_sticky_pure",
        "haproxy": "haproxy_sticky",
    },
    "least_load": {"balancer": "balancer_least_load"},
    "metrics_off": {"balancer": "balancer_metrics_off"},
    "access_log": {"balancer": "balancer_access_log"},
    "two_cores": {"balancer": "balancer_2w", "haproxy": "haproxy_2t", "nginx": "nginx_2p"},
}


def median_of(runs: list[dict], key: str) -> float:
    vals = [r[key] for r in runs if key in r]
    return statistics.median(vals) if vals else float("nan")


def report(results: dict, out_dir: Path) -> None:
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}",
        "python": platform.python_version(),
    }
    results["meta"] = meta
    lines = [f"balancer benchmark, {meta['date']}, {meta['machine']}"]
    if results.get("builds"):
        lines.append(
            "compiled hot path: "
            + ", ".join(f"{t} {'yes' if c else 'no'}" for t, c in results["builds"].items())
        )
    lines.append("")
    lines.append(
        f"{'scenario':12s} {'target':22s} {'req/s':>9s} {'p50 ms':>8s} {'p99 ms':>8s} {'x HAProxy':>10s} {'x direct':>9s} {'errors':>7s}"
    )
    table = []
    for scen, by_target in results["scenarios"].items():
        base = by_target.get(BASELINE.get(scen, "haproxy")) or by_target.get("haproxy")
        direct = by_target.get("direct")
        hap = median_of(base, "rps") if base else float("nan")
        dr = median_of(direct, "rps") if direct else float("nan")
        for tname, runs in by_target.items():
            rps = median_of(runs, "rps")
            row = {
                "scenario": scen,
                "target": tname,
                "rps": round(rps),
                "p50_ms": round(median_of(runs, "p50_ms"), 3),
                "p99_ms": round(median_of(runs, "p99_ms"), 3),
                "vs_haproxy": round(rps / hap, 3) if hap == hap else None,
                "vs_direct": round(rps / dr, 3) if dr == dr else None,
                "errors": sum(r["errors"] for r in runs),
            }
            table.append(row)
            lines.append(
                f"{scen:12s} {tname:22s} {row['rps']:>9d} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} "
                f"{row['vs_haproxy'] if row['vs_haproxy'] is not None else '-':>10} "
                f"{row['vs_direct'] if row['vs_direct'] is not None else '-':>9} {row['errors']:>7d}"
            )
    results["table"] = table
    if results["fixed_rate"]:
        lines += [
            "",
            f"At a fixed {FIXED_RATE:,} req/s: CPU time per 1,000 requests (user+sys, ms) and"
            " latency (p50/p99 ms):",
        ]
        for label, by in results["fixed_rate"].items():
            hap = by.get("haproxy", {})
            for t, r in by.items():
                ratio = "  ".join(
                    f"{r[k] / hap[k]:.2f}x" if hap.get(k) else "-"
                    for k in ("cpu_ms_per_1000", "p99_ms")
                )
                lines.append(
                    f"  {label:6s} {t:10s} CPU {r['cpu_ms_per_1000']:6.1f}  p50 {r['p50_ms']:6.2f}"
                    f"  p99 {r['p99_ms']:6.2f}  (CPU, p99 x HAProxy: {ratio})"
                    + (f"  errors {r['errors']}" if r["errors"] else "")
                )
    if results["memory"]:
        lines += ["", "RSS with idle keep-alive client connections:"]
        for t, m in results["memory"].items():
            lines.append(
                f"  {t}: {m['rss_mib']} MiB with {m['idle_connections']} ({m['kib_per_connection']}"
                f" KiB per connection; {m['rss_mib_at_10k']} MiB at 10,000)"
            )
    text = "\n".join(lines)
    print("\n" + text)
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    (out_dir / "results.txt").write_text(text + "\n")
    try:
        chart(table, out_dir / "results.png", meta)
    except ImportError:
        print("(matplotlib not installed: no chart; pip install '.[bench]')")


def chart(table: list[dict], path: Path, meta: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # balancer-against-itself scenarios (metrics_off, access_log) have no HAProxy bar to show
    scen = [
        s
        for s in dict.fromkeys(r["scenario"] for r in table)
        if any(r["scenario"] == s and r["vs_haproxy"] for r in table)
    ]
    targets = ["balancer", "balancer_pure", "haproxy", "nginx", "direct"]
    fig, ax = plt.subplots(figsize=(12, 5))
    width = 0.8 / len(targets)
    for i, t in enumerate(targets):
        ys = []
        for s in scen:
            # a scenario's own variant of each proxy when it has one (sticky, two cores)
            want = CHART_AS.get(s, {}).get(t, t)
            row = next((r for r in table if r["scenario"] == s and r["target"] == want), None)
            ys.append(row["vs_haproxy"] if row and row["vs_haproxy"] else 0)
        ax.bar([x + i * width for x in range(len(scen))], ys, width, label=t)
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_xticks([x + width * (len(targets) - 1) / 2 for x in range(len(scen))], scen)
    ax.set_ylabel("throughput relative to HAProxy (median)")
    ax.set_title(
        f"balancer vs HAProxy vs nginx, each proxy pinned to one core ({meta['date']})\n"
        "sticky: each with its own cookie; two_cores: 2 workers / threads / processes on both cores",
        fontsize=10,
    )
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    raise SystemExit(main())
