"""Locust load with a changing shape, for benchmarks/autoscale.py: quiet, a climb to a peak,
a hold, and back down, each user a browser-like client of the site.

    locust -f benchmarks/locust_autoscale.py --headless --host http://127.0.0.1:8080

AUTOSCALE_PEAK (users at the peak, default 40) and AUTOSCALE_STEP (seconds per phase,
default 25) set its size; the run ends by itself after the last phase.
"""

from __future__ import annotations

import os

from locust import FastHttpUser, LoadTestShape, between, task

PEAK = int(os.environ.get("AUTOSCALE_PEAK", "40"))
STEP = float(os.environ.get("AUTOSCALE_STEP", "25"))
QUIET = max(2, PEAK // 8)

# (seconds from the start, users): linear between the points
POINTS = [
    (0.0, QUIET),
    (STEP, QUIET),
    (3 * STEP, PEAK),
    (4 * STEP, PEAK),
    (6 * STEP, QUIET),
    (8 * STEP, QUIET),  # two phases quiet: time for the pool to shrink back
]


def users_at(t: float) -> int | None:
    """Users the shape wants `t` seconds in; None once it is over."""
    for (t0, u0), (t1, u1) in zip(POINTS, POINTS[1:], strict=False):
        if t0 <= t < t1:
            return round(u0 + (u1 - u0) * (t - t0) / (t1 - t0))
    return None


class Shape(LoadTestShape):
    def tick(self) -> tuple[int, float] | None:
        users = users_at(self.get_run_time())
        return None if users is None else (users, 20.0)


class Visitor(FastHttpUser):
    wait_time = between(0.05, 0.15)

    @task
    def page(self) -> None:
        with self.client.get("/echo", catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"status {resp.status_code}")
