"""The Python work per proxied request, without the kernel: a profile-friendly microbenchmark.

A real Daemon (config, pools, listener, upstream pool, metrics) is started in-process; then
requests are pushed through a real ClientProtocol and UpstreamConnection whose transports are
in-memory stand-ins, so what is timed is exactly the interpreter's share of a request (the
part of the per-request cost this project controls). The syscalls a real request adds are
measured by benchmarks/bench.py.

    .venv/bin/python benchmarks/hotpath.py                 # µs per request, per scenario
    .venv/bin/python benchmarks/hotpath.py --profile small  # cProfile of one scenario
    .venv/bin/python benchmarks/instructions.py             # instructions per request (callgrind)

`--callgrind` runs each scenario's measured requests once inside functools.reduce(), so that
valgrind's `--toggle-collect=functools_reduce` counts exactly them (benchmarks/instructions.py).
"""

from __future__ import annotations

import argparse
import cProfile
import functools
import logging
import pstats
import socket
import statistics
import tempfile
import time
from pathlib import Path

import uvloop

from balancer import config as config_mod
from balancer.daemon import Daemon
from balancer.proxy.upstream import UpstreamConnection

REQUEST = b"GET /small HTTP/1.1\r\nHost: bench.example\r\nUser-Agent: wrk\r\nAccept: */*\r\n\r\n"
RESPONSE = (
    b"HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Tue, 01 Dec 2026 13:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 23\r\nConnection: keep-alive\r\n\r\n"
    b"hello from the backend\n"
)


class MemoryTransport:
    """Just enough of asyncio.Transport for the protocols: writes are counted, not sent."""

    def __init__(self, peer: tuple[str, int]) -> None:
        self.peer = peer
        self.written = 0
        self.writes = 0
        self.closing = False

    def write(self, data: bytes) -> None:
        self.written += len(data)
        self.writes += 1

    def writelines(self, chunks: tuple[bytes, ...]) -> None:
        for data in chunks:
            self.written += len(data)
        self.writes += 1

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.peer if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_text(
    *, sticky: bool, metrics: bool, strategy: str, work: Path, access_log: str = "off"
) -> str:
    sticky_line = (
        f"    sticky: {{cookie: LBSTICKY, ttl: 1h, key_file: {work}/sticky.key}}\n"
        if sticky
        else ""
    )
    return f"""listeners:
  - name: http
    bind: "127.0.0.1:{free_port()}"
    routes: [{{pool: web}}]
pools:
  web:
    strategy: {strategy}
{sticky_line}    backends:
      - {{name: app0, address: "127.0.0.1:{free_port()}"}}
      - {{name: app1, address: "127.0.0.1:{free_port()}"}}
admin:
  bind: "127.0.0.1:{free_port()}"
  metrics: {"true" if metrics else "false"}
access_log: {{format: "{access_log}", path: "{work}/access.log"}}
"""


SCENARIOS = {
    "small": dict(sticky=False, metrics=True, strategy="round_robin"),
    "metrics_off": dict(sticky=False, metrics=False, strategy="round_robin"),
    "sticky": dict(sticky=True, metrics=True, strategy="round_robin"),
    "least_connections": dict(sticky=False, metrics=True, strategy="least_connections"),
    "access_log": dict(sticky=False, metrics=True, strategy="round_robin", access_log="plain"),
}


async def run_scenario(
    name: str, n: int, reps: int, profile: bool, callgrind: bool = False
) -> list[float]:
    spec = SCENARIOS[name]
    work = Path(tempfile.mkdtemp(prefix="balancer-hotpath-"))
    path = work / "lb.yaml"
    path.write_text(config_text(work=work, **spec))
    daemon = Daemon(config_mod.load(str(path)))
    await daemon.start()
    try:
        listener = daemon.listeners["http"]
        pool = daemon.pools["web"]
        # warm idle upstream connections, one per backend, that answer every request
        upstreams = []
        for b in pool.backends:
            conns = daemon.upstreams.for_backend(b)
            conn = UpstreamConnection(conns)
            conn.connection_made(MemoryTransport((b.host, b.port)))
            conns.release(conn)
            upstreams.append(conn)
        client = listener.protocol("198.18.0.7")
        client.connection_made(MemoryTransport(("198.18.0.7", 40000)))
        request = REQUEST
        if spec["sticky"]:
            # a returning client: its cookie from a first answer, then sent every time
            tag = pool.sticky_cookie_header(pool.backends[0], secure=False).split(b";")[0]
            request = request[:-2] + b"Cookie: " + tag + b"\r\n\r\n"

        def one_round(count: int) -> None:
            feed = client.data_received
            for _ in range(count):
                feed(request)
                ex = client.active
                ex.conn.data_received(RESPONSE)

        one_round(1000)
        if callgrind:
            # the one C function around the measured requests: callgrind counts inside it
            # (the per-step call of `step` adds a few hundred instructions per request)
            def step(_: None, __: int) -> None:
                feed(request)
                client.active.conn.data_received(RESPONSE)

            feed = client.data_received
            functools.reduce(step, range(n), None)
            reps = 0
        if profile:
            prof = cProfile.Profile()
            prof.enable()
            one_round(n)
            prof.disable()
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
            reps = 0
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            one_round(n)
            times.append((time.perf_counter() - t0) / n * 1e6)
        client.connection_lost(None)
        for conn in upstreams:
            conn.close()
        return times
    finally:
        await daemon.stop()


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", type=int, default=20000, help="requests per repetition")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--only", default="", help="comma-separated scenarios")
    ap.add_argument("--profile", default="", help="cProfile this scenario instead of timing")
    ap.add_argument(
        "--callgrind",
        action="store_true",
        help="run -n requests once per scenario inside functools.reduce, untimed",
    )
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.profile:
        uvloop.run(run_scenario(args.profile, args.n, 1, True))
        return 0
    names = [s for s in args.only.split(",") if s] or list(SCENARIOS)
    for name in names:
        if args.callgrind:
            uvloop.run(run_scenario(name, args.n, 0, False, callgrind=True))
            continue
        times = uvloop.run(run_scenario(name, args.n, args.reps, False))
        print(
            f"{name:18s} median {statistics.median(times):6.2f} µs/request"
            f"  (min {min(times):.2f}, max {max(times):.2f}, {args.reps} x {args.n})",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
