"""Realistic user sessions (benchmarks/locustfile.py) through the balancer, without and with sticky.

Starts three demo app servers and two balancers in front of them (round robin; round robin +
sticky cookie), runs locust headless against each for a bounded time, and prints requests,
failures ("cart lost items": the session landed on a server without its cart) and latency
percentiles.

    .venv/bin/python benchmarks/sessions.py [--users 30] [--time 20s]
"""

from __future__ import annotations

import argparse
import csv
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench import free_port, wait_port  # noqa: E402  (benchmarks/ is not a package)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--users", type=int, default=30)
    ap.add_argument("--time", default="20s")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="balancer-sessions-"))
    procs: list[subprocess.Popen] = []
    try:
        ports = [free_port() for _ in range(3)]
        for i, p in enumerate(ports, 1):
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "balancer.demo.backend",
                        "--port",
                        str(p),
                        "--name",
                        f"app{i}",
                    ],
                    stdout=subprocess.DEVNULL,
                )
            )
        for p in ports:
            wait_port(p)
        results = {}
        for label, sticky in (
            ("round_robin", ""),
            ("round_robin + sticky", "    sticky: {cookie: LBSTICKY, ttl: 1h}\n"),
        ):
            port, admin = free_port(), free_port()
            cfg = work / f"{len(results)}.yaml"
            backends = "".join(
                f'      - {{name: app{i}, address: "127.0.0.1:{p}"}}\n'
                for i, p in enumerate(ports, 1)
            )
            cfg.write_text(
                f'listeners: [{{name: http, bind: "127.0.0.1:{port}", routes: [{{pool: web}}]}}]\n'
                f"pools:\n  web:\n    strategy: round_robin\n{sticky}    backends:\n{backends}"
                f'admin: {{bind: "127.0.0.1:{admin}"}}\naccess_log: {{format: "off"}}\n'
            )
            lb = subprocess.Popen(
                [sys.executable, "-m", "balancer", "run", "-c", str(cfg)], stderr=subprocess.DEVNULL
            )
            procs.append(lb)
            wait_port(port)
            prefix = work / f"locust{len(results)}"
            subprocess.run(
                [sys.executable, "-m", "locust", "-f", str(HERE / "locustfile.py"), "--headless", "-u", str(args.users), "-r", "10",
                 "-t", args.time, "--host", f"http://127.0.0.1:{port}", "--csv", str(prefix), "--only-summary"],
                capture_output=True, text=True, timeout=600,
            )  # fmt: skip
            with open(f"{prefix}_stats.csv") as f:
                total = next(r for r in csv.DictReader(f) if r["Name"] == "Aggregated")
            results[label] = total
            lb.terminate()
            lb.wait(10)
        print(
            f"{'balancer':24s} {'requests':>9s} {'failures':>9s} {'p50 ms':>7s} {'p95 ms':>7s} {'p99 ms':>7s}"
        )
        for label, t in results.items():
            print(
                f"{label:24s} {t['Request Count']:>9s} {t['Failure Count']:>9s} {t['50%']:>7s} {t['95%']:>7s} {t['99%']:>7s}"
            )
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
