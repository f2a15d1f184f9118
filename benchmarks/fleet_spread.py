"""How fast a change in etcd reaches every balancer of a fleet, and how far apart they are.

    .venv/bin/python benchmarks/fleet_spread.py --balancers 3 --changes 30

Starts a fleet (balancer.demo.fleet: etcd and N balancers sharing a prefix, no app servers),
then puts and deletes keys one at a time. For each change one thread per balancer polls its
/status every few milliseconds until the change shows; the delay is from the moment etcd
acknowledged the write. Reports the median and worst delay, and the spread (latest minus
earliest balancer) per change. The polling itself adds up to --poll to each delay.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from balancer.demo.fleet import PREFIX, Fleet, FleetPorts, status  # noqa: E402
from balancer.demo.fleet import free_port_run as free_run  # noqa: E402


def put(endpoint: str, key: str, value: dict | None) -> None:
    import base64
    import urllib.request

    k = base64.b64encode(key.encode()).decode()
    if value is None:
        path, body = "kv/deleterange", {"key": k}
    else:
        v = base64.b64encode(json.dumps(value).encode()).decode()
        path, body = "kv/put", {"key": k, "value": v}
    req = urllib.request.Request(f"http://{endpoint}/v3/{path}", data=json.dumps(body).encode())
    urllib.request.urlopen(req, timeout=5).read()


def watch(
    admin: str, name: str, present: bool, t0: list[float], seen: list[float], j: int, poll: float
) -> None:
    """Poll one balancer until `name` is (or is no longer) in its pool; seen[j] = the delay."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        names = {b["name"] for b in status(admin)["pools"]["web"]["backends"]}
        if (name in names) == present and t0:
            seen[j] = time.monotonic() - t0[0]
            return
        time.sleep(poll)
    seen[j] = float("inf")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--balancers", type=int, default=3)
    ap.add_argument("--changes", type=int, default=30)
    ap.add_argument("--poll", type=float, default=0.005)
    args = ap.parse_args()
    n = args.balancers
    fleet = Fleet(
        Path(tempfile.mkdtemp(prefix="balancer-spread-")),
        balancers=n,
        apps=0,
        ports=FleetPorts(free_run(2), free_run(n), free_run(n), free_run(4)),
    )
    delays: list[list[float]] = []
    try:
        fleet.start()
        for i in range(args.changes):
            name = f"k{i // 2}"
            present = i % 2 == 0
            value = {"address": f"127.0.0.1:{fleet.ports.app + i // 2}"} if present else None
            seen = [0.0] * n
            t0: list[float] = []
            threads = [
                threading.Thread(
                    target=watch, args=(fleet.admin(j), name, present, t0, seen, j, args.poll)
                )
                for j in range(n)
            ]
            put(fleet.etcd_endpoint, PREFIX + name, value)
            t0.append(time.monotonic())
            for th in threads:
                th.start()
            for th in threads:
                th.join()
            delays.append(seen)
            time.sleep(0.1)
    finally:
        fleet.stop()
    every = [d for row in delays for d in row]
    spreads = [max(row) - min(row) for row in delays]
    worst = [max(row) for row in delays]
    print(
        f"{n} balancers, {len(delays)} changes: delay to each balancer median"
        f" {statistics.median(every) * 1000:.1f} ms, p95 {sorted(every)[int(0.95 * len(every))] * 1000:.1f} ms,"
        f" worst {max(every) * 1000:.1f} ms; last balancer median {statistics.median(worst) * 1000:.1f} ms;"
        f" spread median {statistics.median(spreads) * 1000:.1f} ms, worst {max(spreads) * 1000:.1f} ms"
    )
    return 0 if max(every) < 1.0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
