"""HTTP/2 side by side with HAProxy: h2 over TLS (h2load, 10 streams per connection) for small
and 64 KiB answers, and gRPC unary calls (h2c in front, HTTP/2 to a grpcio backend).

Each proxy is pinned to core 0, the load and the backends to core 1; repetitions are
interleaved and medians reported.

    benchmarks/run.sh installs the tools; then:
    .venv/bin/python benchmarks/h2bench.py [--reps 3] [--duration 8]
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import trustme

sys.path.insert(0, str(Path(__file__).parent))
from bench import LOAD_CORE, PROXY_CORE, Lab, Target, cpu_seconds, free_port, wait_port  # noqa: E402

GRPC_SERVER = Path(__file__).parent.parent / "tests" / "integration" / "grpcserver.py"
# one unary call to demo.Echo/Unary: the gRPC length prefix and a 5-byte message
GRPC_BODY = b"\x00\x00\x00\x00\x05hello"


def balancer_h2(lab: Lab, cert: dict, *, grpc_port: int | None = None) -> Target:
    port, admin = free_port(), free_port()
    if grpc_port is None:
        listener = (
            f'  - {{name: h2, bind: "127.0.0.1:{port}", routes: [{{pool: web}}],\n'
            f'     tls: {{certificates: [{{cert: "{cert["cert"]}", key: "{cert["key"]}"}}]}}}}'
        )
        backends = "\n".join(
            f'      - {{name: app{i}, address: "127.0.0.1:{p}"}}'
            for i, p in enumerate(lab.backend_ports)
        )
        pool = f"  web:\n    backends:\n{backends}\n"
    else:
        listener = (
            f'  - {{name: h2c, bind: "127.0.0.1:{port}", http2: true, routes: [{{pool: web}}]}}'
        )
        pool = f'  web:\n    protocol: h2\n    backends:\n      - {{name: g1, address: "127.0.0.1:{grpc_port}"}}\n'
    name = "balancer_grpc" if grpc_port else "balancer_h2"
    cfg = lab.work / f"{name}.yaml"
    cfg.write_text(
        f'listeners:\n{listener}\npools:\n{pool}admin: {{bind: "127.0.0.1:{admin}"}}\n'
        'access_log: {format: "off"}\nlimits: {max_connections: 100000}\n'
    )
    p = lab.start(
        [sys.executable, "-m", "balancer", "run", "-c", str(cfg), "--log-level", "warning"],
        core=PROXY_CORE,
        log=f"{name}.log",
    )
    wait_port(port)
    t = Target(name, port, p)
    lab.targets[name] = t
    return t


def haproxy_h2(lab: Lab, pem: Path, *, grpc_port: int | None = None) -> Target:
    port = free_port()
    if grpc_port is None:
        bind = f"bind 127.0.0.1:{port} ssl crt {pem} alpn h2,http/1.1"
        servers = "\n".join(
            f"    server app{i} 127.0.0.1:{p}" for i, p in enumerate(lab.backend_ports)
        )
    else:
        bind = f"bind 127.0.0.1:{port} proto h2"
        servers = f"    server g1 127.0.0.1:{grpc_port} proto h2"
    name = "haproxy_grpc" if grpc_port else "haproxy_h2"
    cfg = lab.work / f"{name}.cfg"
    cfg.write_text(
        f"""global
    nbthread 1
    maxconn 5000
defaults
    mode http
    timeout connect 2s
    timeout client 60s
    timeout server 30s
frontend fe
    {bind}
    default_backend be
backend be
    balance roundrobin
    http-reuse always
{servers}
"""
    )
    p = lab.start(["haproxy", "-f", str(cfg), "-db"], core=PROXY_CORE, log=f"{name}.log")
    wait_port(port)
    t = Target(name, port, p)
    lab.targets[name] = t
    return t


# the fixed-rate scenario: 10 clients x FIXED_RPS requests per second each, well below what
# either proxy can do, so latency is the proxy's own, not a queue's
FIXED_RPS = 200


def h2load(target: Target, url: str, seconds: float, extra: list[str]) -> dict:
    log = None
    if "--rps" in " ".join(extra):
        log = Path(tempfile.mktemp(prefix="h2load-", suffix=".log"))
        extra = [*extra, f"--log-file={log}"]
    before = cpu_seconds(target.pids())
    out = subprocess.run(
        [
            "taskset",
            "-c",
            LOAD_CORE,
            "h2load",
            "-c",
            "10",
            "-m",
            "10",
            "-D",
            str(int(seconds)),
            *extra,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    cpu = cpu_seconds(target.pids()) - before
    m = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out.stdout)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out.stdout)
    if not m or not done:
        raise RuntimeError(f"h2load failed on {target.name}: {out.stdout[-800:]}{out.stderr}")
    n = int(done.group(2))
    result = {
        "rps": float(m.group(1)),
        "succeeded": n,
        "errors": int(done.group(1)) - n,
        "cpu_us_per_request": round(cpu / max(1, n) * 1e6, 1),
    }
    if log is not None:
        took = sorted(int(line.split("\t")[2]) for line in log.read_text().splitlines() if line)
        log.unlink()
        result["p50_ms"] = took[len(took) // 2] / 1000
        result["p99_ms"] = took[int(len(took) * 0.99)] / 1000
    return result


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8.0)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="h2bench-"))
    work.chmod(0o755)  # nginx workers run as an unprivileged user and must read /64k
    lab = Lab(work)
    ca = trustme.CA()
    leaf = ca.issue_cert("localhost", "127.0.0.1")
    cert = {"cert": str(work / "site.pem"), "key": str(work / "site.key")}
    Path(cert["cert"]).write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    Path(cert["key"]).write_bytes(leaf.private_key_pem.bytes())
    pem = work / "haproxy.pem"
    pem.write_bytes(Path(cert["cert"]).read_bytes() + Path(cert["key"]).read_bytes())
    grpc_port = free_port()
    results: dict[str, dict[str, list[dict]]] = {}
    try:
        lab.start_backend()
        g = lab.start(
            [sys.executable, str(GRPC_SERVER), "--port", str(grpc_port), "--name", "g1"],
            core=LOAD_CORE,
            log="grpc.log",
        )
        wait_port(grpc_port)
        assert g.poll() is None
        pairs = {
            "h2 small": (
                balancer_h2(lab, cert),
                haproxy_h2(lab, pem),
                "https://localhost:{port}/small",
                [],
            ),
            "h2 small fixed": (
                lab.targets["balancer_h2"],
                lab.targets["haproxy_h2"],
                "https://localhost:{port}/small",
                [f"--rps={FIXED_RPS}"],
            ),
            "h2 64k": (
                lab.targets["balancer_h2"],
                lab.targets["haproxy_h2"],
                "https://localhost:{port}/64k",
                [],
            ),
            "grpc unary": (
                balancer_h2(lab, cert, grpc_port=grpc_port),
                haproxy_h2(lab, pem, grpc_port=grpc_port),
                "http://127.0.0.1:{port}/demo.Echo/Unary",
                [
                    "-d",
                    str(work / "grpc.body"),
                    "-H",
                    "content-type: application/grpc",
                    "-H",
                    "te: trailers",
                ],
            ),
        }
        (work / "grpc.body").write_bytes(GRPC_BODY)
        for rep in range(args.reps):
            for scen, (bal, hap, url, extra) in pairs.items():
                order = (bal, hap) if rep % 2 == 0 else (hap, bal)
                for t in order:
                    r = h2load(t, url.format(port=t.port), args.duration, extra)
                    kind = "balancer" if t is bal else "haproxy"
                    results.setdefault(scen, {}).setdefault(kind, []).append(r)
                    print(scen, kind, r, flush=True)
                    time.sleep(1)
    finally:
        lab.stop_all()
    table = []
    for scen, by in results.items():
        med = {k: statistics.median(r["rps"] for r in v) for k, v in by.items()}
        cpu = {k: statistics.median(r["cpu_us_per_request"] for r in v) for k, v in by.items()}
        errors = {k: sum(r["errors"] for r in v) for k, v in by.items()}
        latency = {
            f"{k}_{q}": statistics.median(r[q] for r in v)
            for k, v in by.items()
            for q in ("p50_ms", "p99_ms")
            if q in v[0]
        }
        table.append(
            {
                **latency,
                "scenario": scen,
                "balancer_rps": med["balancer"],
                "haproxy_rps": med["haproxy"],
                "ratio": round(med["balancer"] / med["haproxy"], 3),
                "balancer_cpu_us": cpu["balancer"],
                "haproxy_cpu_us": cpu["haproxy"],
                "errors": errors,
            }
        )
    print(f"\n{'scenario':<12} {'balancer':>10} {'haproxy':>10} {'ratio':>6} {'cpu µs/req':>16}")
    for row in table:
        p99 = (
            f"  p99 {row['balancer_p99_ms']:.2f} vs {row['haproxy_p99_ms']:.2f} ms"
            if "balancer_p99_ms" in row
            else ""
        )
        print(
            f"{row['scenario']:<14} {row['balancer_rps']:>10.0f} {row['haproxy_rps']:>10.0f} "
            f"{row['ratio']:>6.2f} {row['balancer_cpu_us']:>7.1f} vs {row['haproxy_cpu_us']:<6.1f}"
            f"{p99}"
        )
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    stamp = time.strftime("%Y-%m-%d-%H%M", time.gmtime())
    (out / f"h2-{stamp}.json").write_text(json.dumps(table, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
