"""Autoscaling, demonstrated and measured: locust drives a changing load through a balancer
whose pool comes from etcd, while a small autoscaler reads the balancer's /status and starts
or stops demo app servers that register themselves (`balancer register`). The run ends by
itself; it prints the timeline's summary and draws load, backends and latency over time.

    .venv/bin/python benchmarks/autoscale.py                      # about 3 minutes
    .venv/bin/python benchmarks/autoscale.py --peak 40 --step 25 --out docs/benchmarks

The autoscaler is a concurrency target, the way Knative scales: it keeps the requests in
flight per app server near --target (sampled every 0.25 s, averaged over 3 s), scales out by
one at a time as soon as that is exceeded, and scales in towards the largest size wanted over
the last --scale-in-after seconds (the stabilization window of Kubernetes' HPA: a dip does
not make it flap). App servers add
--latency to every request, so in-flight requests grow with the load as they would for an
app that waits on its database.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))

from balancer.demo.fleet import Fleet, FleetPorts, status  # noqa: E402
from balancer.demo.fleet import free_port_run as free_run  # noqa: E402


def desired(inflight: float, target: float, low: int, high: int) -> int:
    return max(low, min(high, math.ceil(inflight / target) if inflight > 0 else low))


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--min", type=int, default=2)
    ap.add_argument("--max", type=int, default=6)
    ap.add_argument("--target", type=float, default=1.5, help="in-flight requests per app server")
    ap.add_argument("--latency", default="40ms", help="added by each app server per request")
    ap.add_argument("--peak", type=int, default=40, help="locust users at the peak")
    ap.add_argument("--step", type=float, default=25.0, help="seconds per phase of the shape")
    ap.add_argument("--scale-in-after", type=float, default=8.0)
    ap.add_argument("--out", default=str(ROOT / "docs" / "benchmarks"))
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="balancer-autoscale-"))
    ports = FleetPorts(free_run(2), free_run(1), free_run(1), free_run(args.max + 20))
    fleet = Fleet(
        work,
        balancers=1,
        apps=args.min,
        ports=ports,
        app_args=("--latency", args.latency),
        health_interval="500ms",
    )
    timeline: list[dict] = []
    actions: list[tuple[float, str]] = []
    locust: subprocess.Popen | None = None
    try:
        fleet.start()
        admin = fleet.admin(0)
        wait_backends(admin, args.min)
        env = dict(os.environ, AUTOSCALE_PEAK=str(args.peak), AUTOSCALE_STEP=str(args.step))
        prefix = work / "locust"
        locust_log = open(work / "locust.log", "wb")  # noqa: SIM115 - closed below, with the run
        locust = subprocess.Popen(
            [
                sys.executable, "-m", "locust", "-f", str(HERE / "locust_autoscale.py"),
                "--headless", "--host", f"http://{fleet.site(0)}", "--csv", str(prefix),
                "--csv-full-history", "--only-summary",
            ],
            env=env, stdout=locust_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        start = time.monotonic()
        samples: deque[tuple[float, float]] = deque()
        last_requests, last_t = None, start
        wanted: deque[tuple[float, int]] = deque()  # the scale-in stabilization window
        last_change = 0.0
        while locust.poll() is None and time.monotonic() - start < 12 * args.step:
            time.sleep(0.25)
            now = time.monotonic()
            pool = status(admin)["pools"]["web"]
            serving = [b for b in pool["backends"] if b["state"] == "up"]
            inflight = sum(b["inflight"] for b in pool["backends"])
            samples.append((now, inflight))
            while samples and samples[0][0] < now - 3.0:
                samples.popleft()
            avg = sum(x for _, x in samples) / len(samples)
            # per backend, so that one leaving the pool (and its counter the sum) is no dip
            requests = {b["name"]: b["requests"] for b in pool["backends"]}
            rate = None
            if last_requests is not None:
                done = sum(n - last_requests.get(name, 0) for name, n in requests.items())
                rate = max(0, done) / (now - last_t)
            last_requests, last_t = requests, now
            want = desired(avg, args.target, args.min, args.max)
            wanted.append((now, want))
            while wanted[0][0] < now - args.scale_in_after:
                wanted.popleft()
            floor = max(w for _, w in wanted)
            have = len(fleet.running)
            t = now - start
            if want > have and now - last_change > 1.0:
                app = fleet.add_app()
                actions.append((t, f"+{app.name}"))
                last_change = now
            elif floor < have and now - last_change > 2.0 and now - start > args.scale_in_after:
                app = fleet.remove_app()
                actions.append((time.monotonic() - start, f"-{app.name if app else '?'}"))
                last_change = time.monotonic()
            timeline.append(
                {"t": round(t, 2), "rate": rate, "inflight": round(avg, 2),
                 "running": have, "serving": len(serving)}
            )  # fmt: skip
        if locust.poll() is None:
            locust.terminate()
        locust.wait(30)
        locust_log.close()
        history = read_history(Path(f"{prefix}_stats_history.csv"), start_wall=None)
        totals = read_totals(Path(f"{prefix}_stats.csv"))
    finally:
        if locust is not None and locust.poll() is None:
            locust.kill()
        fleet.stop()
    counts = [row["serving"] for row in timeline]
    path = [counts[0]]
    for c in counts[1:]:
        if c != path[-1]:
            path.append(c)
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "requests": totals["requests"],
        "failures": totals["failures"],
        "backends_path": path,
        "max_backends": max(counts),
        "final_backends": counts[-1],
        "actions": actions,
        "timeline": timeline,
        "latency": history,
        "settings": vars(args),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "autoscale.json").write_text(json.dumps(result, indent=1))
    chart(result, out / "autoscale.png")
    print(
        f"requests {totals['requests']}, failures {totals['failures']}; serving backends went"
        f" {' -> '.join(map(str, path))} (max {max(counts)}, end {counts[-1]});"
        f" actions: {', '.join(f'{a}@{t:.0f}s' for t, a in actions)}"
    )
    print(f"wrote {out / 'autoscale.json'} and {out / 'autoscale.png'}")
    return 0 if totals["failures"] == 0 else 1


def wait_backends(admin: str, n: int, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        up = [b for b in status(admin)["pools"]["web"]["backends"] if b["state"] == "up"]
        if len(up) >= n:
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"only {len(up)} of {n} app servers up after {timeout}s")
        time.sleep(0.2)


def read_history(path: Path, start_wall: float | None) -> list[dict]:
    """Locust's per-second history of the aggregated row: time, users, req/s, p50, p95."""
    rows = []
    with path.open() as f:
        for row in csv.DictReader(f):
            if row["Name"] != "Aggregated":
                continue
            rows.append(
                {
                    "timestamp": int(row["Timestamp"]),
                    "users": int(row["User Count"]),
                    "rps": float(row["Requests/s"]),
                    "p50": _num(row.get("50%")),
                    "p95": _num(row.get("95%")),
                    "failures": int(float(row["Total Failure Count"])),
                }
            )
    if rows:
        t0 = rows[0]["timestamp"]
        for r in rows:
            r["t"] = r.pop("timestamp") - t0
    return rows


def read_totals(path: Path) -> dict:
    with path.open() as f:
        for row in csv.DictReader(f):
            if row["Name"] == "Aggregated":
                return {
                    "requests": int(row["Request Count"]),
                    "failures": int(row["Failure Count"]),
                }
    return {"requests": 0, "failures": 0}


def _num(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "", "N/A") else None
    except ValueError:
        return None


def chart(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tl, lat = result["timeline"], result["latency"]
    fig, (ax1, ax2, ax3) = plt.subplots(3, 1, figsize=(9, 7.5), sharex=True)
    ax1.plot(
        [r["t"] for r in tl if r["rate"] is not None],
        [r["rate"] for r in tl if r["rate"] is not None],
        label="req/s through the balancer",
    )
    ax1b = ax1.twinx()
    ax1b.plot(
        [r["t"] for r in lat],
        [r["users"] for r in lat],
        color="tab:gray",
        ls="--",
        label="locust users",
    )
    ax1.set_ylabel("req/s")
    ax1b.set_ylabel("users")
    ax1.legend(loc="upper left")
    ax1b.legend(loc="upper right")
    ax2.step([r["t"] for r in tl], [r["serving"] for r in tl], where="post", label="app servers up")
    ax2.plot(
        [r["t"] for r in tl],
        [r["inflight"] / result["settings"]["target"] for r in tl],
        color="tab:orange",
        alpha=0.6,
        label="in flight / target",
    )
    ax2.set_ylabel("backends")
    ax2.legend(loc="upper left")
    ax3.plot([r["t"] for r in lat], [r["p50"] for r in lat], label="p50")
    ax3.plot([r["t"] for r in lat], [r["p95"] for r in lat], label="p95")
    ax3.set_ylabel("latency (ms)")
    ax3.set_xlabel("seconds")
    ax3.legend(loc="upper left")
    fig.suptitle(
        f"autoscaling through etcd, {result['date']}\n{result['requests']} requests,"
        f" {result['failures']} failed; app servers {' → '.join(map(str, result['backends_path']))}"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)


if __name__ == "__main__":
    raise SystemExit(main())
