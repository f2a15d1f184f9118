"""The Python work per proxied HTTP/2 stream, without the kernel: hotpath.py's HTTP/2 sibling.

A real Daemon is started in-process; a real H2ClientConnection (the listener's HTTP/2
protocol) is fed requests over an in-memory transport, ten streams per read (as h2load -m10
sends them), and every stream's backend request is answered on its in-memory upstream
connection. What the balancer writes back is counted, not parsed.

The frames fed in are built outside the timed part: the first request's header block comes
from a real HPACK encoder, and every later one is the encoder's second output, which only
refers to its dynamic table (what h2load and gRPC clients send after their first request),
so it is the same bytes each time and a stream costs the benchmark a struct.pack.

Scenarios:
  small   h2 client (h2load's fields, :scheme https) -> HTTP/1.1 backend, a 23-byte answer
  grpc    gRPC unary call (h2c client, a 12-byte message) -> `protocol: h2` pool -> an h2c
          backend answering HEADERS, DATA and trailers (grpc-status: 0)

    .venv/bin/python benchmarks/h2hotpath.py                  # µs per stream, per scenario
    .venv/bin/python benchmarks/h2hotpath.py --profile small  # cProfile of one scenario
    valgrind --tool=callgrind --callgrind-out-file=/dev/null \\
        .venv/bin/python benchmarks/h2hotpath.py --only small --reps 1 -n 2000
        # instructions per stream: run with -n N and -n 2N, subtract, divide by N
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import logging
import pstats
import statistics
import struct
import sys
import tempfile
import time
from pathlib import Path

import hpack
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hotpath import RESPONSE, MemoryTransport, free_port  # noqa: E402

from balancer import config as config_mod  # noqa: E402
from balancer.daemon import Daemon  # noqa: E402
from balancer.proxy.h2upstream import H2BackendConnection  # noqa: E402
from balancer.proxy.upstream import UpstreamConnection  # noqa: E402

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
BATCH = 10  # streams per read, like h2load -m10
UPSTREAM_IDLE = 12  # idle HTTP/1.1 connections per backend: one per stream in flight, and spare
WARM = 100  # streams on each new client connection before the clock starts (its HPACK tables)

# frame types and flags (RFC 9113 6)
DATA, HEADERS, SETTINGS, WINDOW_UPDATE = 0x0, 0x1, 0x4, 0x8
END_STREAM, END_HEADERS, ACK = 0x1, 0x4, 0x1
MAX_WINDOW = 2**31 - 1

SMALL_REQUEST = [
    (b":method", b"GET"),
    (b":scheme", b"https"),
    (b":authority", b"bench.example:8443"),
    (b":path", b"/small"),
    (b"accept", b"*/*"),
    (b"accept-encoding", b"gzip, deflate, br"),
    (b"user-agent", b"h2load nghttp2/1.59.0"),
]
GRPC_REQUEST = [
    (b":method", b"POST"),
    (b":scheme", b"http"),
    (b":path", b"/helloworld.Greeter/SayHello"),
    (b":authority", b"bench.example:8082"),
    (b"te", b"trailers"),
    (b"content-type", b"application/grpc"),
    (b"user-agent", b"grpc-python/1.68.0 grpc-c/44.0.0 (linux; chttp2)"),
    (b"grpc-accept-encoding", b"identity, deflate, gzip"),
    (b"grpc-timeout", b"9S"),
]
GRPC_MESSAGE = b"\x00\x00\x00\x00\x07\n\x05world"
GRPC_RESPONSE = [(b":status", b"200"), (b"content-type", b"application/grpc")]
GRPC_ANSWER = b"\x00\x00\x00\x00\r\n\x0bHello world"
GRPC_TRAILERS = [(b"grpc-status", b"0"), (b"grpc-message", b"")]


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, sid) + payload


def settings(*pairs: tuple[int, int]) -> bytes:
    return frame(SETTINGS, 0, 0, b"".join(struct.pack(">HI", k, v) for k, v in pairs))


def open_windows() -> bytes:
    """A peer's first frames: windows as wide as HTTP/2 allows (so the balancer never waits
    for credit the benchmark does not send), then an ACK of the balancer's SETTINGS."""
    return (
        settings((0x4, MAX_WINDOW), (0x3, 100))
        + frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", MAX_WINDOW - 65535))
        + frame(SETTINGS, ACK, 0)
    )


class Blocks:
    """Header blocks from one HPACK encoder: its first output, then the constant second."""

    def __init__(self, fields: list[tuple[bytes, bytes]]) -> None:
        enc = hpack.Encoder()
        self.first = enc.encode(fields)
        self.rest = enc.encode(fields)
        assert enc.encode(fields) == self.rest, "a later block differs: not all indexed"
        self.sent = 0

    def next(self) -> bytes:
        self.sent += 1
        return self.first if self.sent == 1 else self.rest


def config_text(work: Path, scenario: str) -> str:
    if scenario == "small":
        pool = f"""  web:
    strategy: round_robin
    backends:
      - {{name: app0, address: "127.0.0.1:{free_port()}"}}
      - {{name: app1, address: "127.0.0.1:{free_port()}"}}
"""
    else:
        pool = f"""  web:
    strategy: least_connections
    protocol: h2
    backends:
      - {{name: g0, address: "127.0.0.1:{free_port()}"}}
"""
    return f"""listeners:
  - name: h2c
    bind: "127.0.0.1:{free_port()}"
    http2: true
    routes: [{{pool: web}}]
pools:
{pool}admin:
  bind: "127.0.0.1:{free_port()}"
  metrics: true
access_log: {{format: "off", path: "{work}/access.log"}}
"""


class Client:
    """The client side: request batches as one read each."""

    def __init__(self, fields: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.blocks = Blocks(fields)
        self.body = body
        self.sid = -1

    def batch(self, count: int) -> bytes:
        out = []
        for _ in range(count):
            self.sid += 2
            block = self.blocks.next()
            if self.body:
                out.append(frame(HEADERS, END_HEADERS, self.sid, block))
                out.append(frame(DATA, END_STREAM, self.sid, self.body))
            else:
                out.append(frame(HEADERS, END_HEADERS | END_STREAM, self.sid, block))
        return b"".join(out)


class GrpcBackend:
    """The answers of an h2c gRPC backend, one read per batch of streams."""

    def __init__(self) -> None:
        enc = hpack.Encoder()
        # one encoder, as a real backend has: response head and trailers share its table
        self.head = [enc.encode(GRPC_RESPONSE), None]
        self.trailers = [enc.encode(GRPC_TRAILERS), None]
        self.head[1] = enc.encode(GRPC_RESPONSE)
        self.trailers[1] = enc.encode(GRPC_TRAILERS)
        assert enc.encode(GRPC_RESPONSE) == self.head[1]
        assert enc.encode(GRPC_TRAILERS) == self.trailers[1]
        self.sid = -1

    def answers(self, count: int) -> bytes:
        out = []
        for _ in range(count):
            self.sid += 2
            later = self.sid > 1
            out.append(frame(HEADERS, END_HEADERS, self.sid, self.head[later]))
            out.append(frame(DATA, 0, self.sid, GRPC_ANSWER))
            out.append(frame(HEADERS, END_HEADERS | END_STREAM, self.sid, self.trailers[later]))
        return b"".join(out)


class Written(MemoryTransport):
    """A client transport that counts what was written (the answers), as hotpath's does."""


async def run_scenario(name: str, n: int, reps: int, profile: bool) -> list[float]:
    work = Path(tempfile.mkdtemp(prefix="balancer-h2hotpath-"))
    path = work / "lb.yaml"
    path.write_text(config_text(work, name))
    daemon = Daemon(config_mod.load(str(path)))
    await daemon.start()
    try:
        listener = daemon.listeners["h2c"]
        pool = daemon.pools["web"]
        grpc = name == "grpc"
        upstreams: list = []
        backend = None
        if grpc:
            conns = daemon.upstreams.for_backend(pool.backends[0], True)
            h2b = H2BackendConnection(conns)
            h2b.connection_made(MemoryTransport((pool.backends[0].host, pool.backends[0].port)))
            conns.connections.append(h2b)
            h2b.data_received(open_windows())
            upstreams.append(h2b)
            backend = GrpcBackend()
        else:
            for b in pool.backends:
                conns = daemon.upstreams.for_backend(b)
                for _ in range(UPSTREAM_IDLE):
                    conn = UpstreamConnection(conns)
                    conn.connection_made(MemoryTransport((b.host, b.port)))
                    conns.release(conn)
                    upstreams.append(conn)
        request_fields, body = (GRPC_REQUEST, GRPC_MESSAGE) if grpc else (SMALL_REQUEST, b"")

        async def connect() -> tuple:
            """A client connection, its preface and first streams handled (a connection
            takes at most MAX_REQUESTS streams, so each repetition opens its own)."""
            client = Client(request_fields, body)
            proto = listener.h2_protocol(listener, "198.18.0.7")
            transport = Written(("198.18.0.7", 40000))
            proto.connection_made(transport)
            proto.data_received(PREFACE + open_windows())
            await asyncio.sleep(0)
            await one_round(proto, prepared(client, WARM))
            return proto, transport, client

        def prepared(client: Client, count: int) -> list[tuple[bytes, bytes | None]]:
            """The reads of `count` streams, made before the clock starts."""
            rounds = []
            for _ in range(count // BATCH):
                rounds.append((client.batch(BATCH), backend.answers(BATCH) if backend else None))
            return rounds

        async def one_round(proto: object, rounds: list[tuple[bytes, bytes | None]]) -> None:
            feed = proto.data_received
            streams = proto.streams
            for requests, answers in rounds:
                feed(requests)
                if answers is not None:
                    upstreams[0].data_received(answers)
                else:
                    for stream in list(streams.values()):
                        ex = stream.exchange
                        if ex is not None and ex.conn is not None:
                            ex.conn.data_received(RESPONSE)
                # the loop iteration that writes what h2 queued (one write per connection)
                await asyncio.sleep(0)
            assert not streams, f"{len(streams)} streams left unanswered"

        async def repetition(n: int, timed: bool) -> float:
            proto, transport, client = await connect()
            rounds = prepared(client, n)
            sent = transport.written
            t0 = time.perf_counter()
            if timed:
                await one_round(proto, rounds)
            else:
                prof = cProfile.Profile()
                prof.enable()
                await one_round(proto, rounds)
                prof.disable()
                pstats.Stats(prof).sort_stats("tottime").print_stats(30)
            took = (time.perf_counter() - t0) / n * 1e6
            assert transport.written > sent and not transport.closing, "the connection failed"
            proto.connection_lost(None)
            return took

        await repetition(1000, True)  # warm-up: imports, caches, the upstream connections
        if profile:
            await repetition(n, False)
            reps = 0
        times = [await repetition(n, True) for _ in range(reps)]
        for conn in upstreams:
            conn.close()
        await asyncio.sleep(0)
        return times
    finally:
        await daemon.stop()


SCENARIOS = ("small", "grpc")


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "-n", type=int, default=5000, help="streams per repetition (one connection each)"
    )
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--only", default="", help="comma-separated scenarios")
    ap.add_argument("--profile", default="", help="cProfile this scenario instead of timing")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.profile:
        uvloop.run(run_scenario(args.profile, args.n, 1, True))
        return 0
    names = [s for s in args.only.split(",") if s] or list(SCENARIOS)
    for name in names:
        times = uvloop.run(run_scenario(name, args.n, args.reps, False))
        if times:
            print(
                f"{name:8s} median {statistics.median(times):7.2f} µs/stream"
                f"  (min {min(times):.2f}, max {max(times):.2f}, {args.reps} x {args.n})",
                flush=True,
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
