"""Client traffic and observation helpers shared by the integration tests: a keep-alive
client loop that records who answered, waiting on a condition, and scraping /metrics."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable

import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.harness import Balancer


class Traffic:
    """A client thread sending GET /echo in a loop over keep-alive, until stopped or
    `max_seconds` passed; records (time, status, backend) of every answer and every error."""

    def __init__(self, url: str, *, max_seconds: float = 40.0, pause: float = 0.004) -> None:
        self.url = url + "/echo"
        self.max_seconds = max_seconds
        self.pause = pause
        self.answers: list[tuple[float, int, str]] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        with requests.Session() as s:
            while not self._stop.is_set() and time.monotonic() < deadline:
                try:
                    r = s.get(self.url, timeout=10)
                    self.answers.append(
                        (time.monotonic(), r.status_code, r.headers.get("X-Backend-Name", "?"))
                    )
                    if r.status_code != 200:
                        self.errors.append(f"{r.status_code}: {r.text[:200]}")
                except requests.RequestException as e:
                    self.errors.append(repr(e))
                time.sleep(self.pause)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(15)
        assert not self._thread.is_alive()

    def served_by(self, since: float, until: float | None = None) -> Counter[str]:
        return Counter(
            b for t, _, b in list(self.answers) if t >= since and (until is None or t < until)
        )

    def wait_for(self, backend: str, since: float, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.served_by(since)[backend] == 0:
            assert time.monotonic() < deadline, f"{backend} got no traffic: {self.served_by(since)}"
            time.sleep(0.05)

    def assert_clean(self, at_least: int) -> None:
        assert self.errors == [], self.errors[:10]
        assert len(self.answers) >= at_least, len(self.answers)


def wait_until(cond: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def scrape(lb: Balancer, token: str | None = None) -> dict[str, list]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = requests.get(f"http://127.0.0.1:{lb.admin_port}/metrics", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    out: dict[str, list] = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out.setdefault(s.name, []).append((s.labels, s.value))
    return out


def msum(samples: dict[str, list], name: str, **labels: str) -> float:
    return sum(
        v for lab, v in samples.get(name, []) if all(lab.get(k) == x for k, x in labels.items())
    )
