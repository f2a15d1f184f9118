"""gRPC through the balancer with real grpcio servers and clients: h2c in front (prior
knowledge), `protocol: h2` behind; unary, streaming and bidirectional calls, status trailers,
deadlines, a backend dying mid-call, retries of calls that never reached a backend, the
standard health check, least_connections counting streams, and a drain during streams."""

from __future__ import annotations

import signal
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from tests.integration.h2peer import H2Peer
from tests.integration.harness import Balancer, Processes, config, free_port, wait_port

GRPC_SERVER = Path(__file__).with_name("grpcserver.py")


def grpc_backend(procs: Processes, name: str, *args: str) -> int:
    port = free_port()
    p = procs.start(
        [sys.executable, str(GRPC_SERVER), "--port", str(port), "--name", name, *args],
        log_name=f"grpc-{name}.log",
    )
    wait_port(port, p)
    return port


def grpc_balancer(
    procs: Processes, backends: list[tuple[str, int]], pool: dict | None = None, **top
) -> Balancer:  # type: ignore[no-untyped-def]
    cfg = config(backends, pool={"protocol": "h2", **(pool or {})}, **top)
    cfg["listeners"][0]["http2"] = True
    return procs.balancer(cfg)


def channel(lb: Balancer) -> grpc.Channel:
    return grpc.insecure_channel(f"127.0.0.1:{lb.port}")


def unary(ch: grpc.Channel, method: str = "Unary"):  # type: ignore[no-untyped-def]
    return ch.unary_unary(f"/demo.Echo/{method}")


def test_unary_calls_balance_across_backends(procs):
    g1, g2 = grpc_backend(procs, "g1"), grpc_backend(procs, "g2")
    lb = grpc_balancer(procs, [("g1", g1), ("g2", g2)])
    with channel(lb) as ch:
        answers = [unary(ch)(b"hi", timeout=10) for _ in range(6)]
    assert sorted(answers) == [b"g1:hi"] * 3 + [b"g2:hi"] * 3
    time.sleep(0.6)
    assert '"POST /demo.Echo/Unary HTTP/2.0" 200' in lb.log_text()


def test_streaming_and_bidirectional_calls(procs):
    g1 = grpc_backend(procs, "g1")
    lb = grpc_balancer(procs, [("g1", g1)])
    with channel(lb) as ch:
        stream = ch.unary_stream("/demo.Echo/ServerStream")(b"5", timeout=10)
        assert list(stream) == [b"g1:%d" % i for i in range(5)]
        bidi = ch.stream_stream("/demo.Echo/Bidi")
        out = list(bidi(iter([b"a", b"b", b"c"]), timeout=10))
        assert out == [b"g1:a", b"g1:b", b"g1:c"]


def test_status_and_message_trailers_reach_the_client(procs):
    g1 = grpc_backend(procs, "g1")
    lb = grpc_balancer(procs, [("g1", g1)])
    with channel(lb) as ch, pytest.raises(grpc.RpcError) as err:
        unary(ch, "Fail")(b"x", timeout=10)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == "bad input"


def test_grpc_timeout_is_honoured_by_the_balancer(procs):
    g1 = grpc_backend(procs, "g1")
    lb = grpc_balancer(procs, [("g1", g1)])
    # a raw client, so that the deadline that fires is the balancer's, not the client's
    peer = H2Peer(lb.port)
    try:
        started = time.monotonic()
        r = peer.get(
            "/demo.Echo/Unary",
            method="POST",
            headers=[
                ("content-type", "application/grpc"),
                ("te", "trailers"),
                ("grpc-timeout", "300m"),
                ("x-delay-ms", "3000"),
            ],
            body=b"\x00\x00\x00\x00\x02hi",
        )
        took = time.monotonic() - started
    finally:
        peer.close()
    fields = dict(r.headers + r.trailers)
    assert fields.get(b"grpc-status") == b"4", r  # DEADLINE_EXCEEDED
    assert took < 2.5, took


def test_backend_dying_mid_call_gives_unavailable(procs):
    g1 = grpc_backend(procs, "g1")
    lb = grpc_balancer(procs, [("g1", g1)], pool={"retries": 0})
    with channel(lb) as ch:
        call = ch.unary_stream("/demo.Echo/DieMidStream")(b"", timeout=10)
        got = []
        with pytest.raises(grpc.RpcError) as err:
            for message in call:
                got.append(message)
    assert got == [b"g1:first"]
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_a_call_that_never_reached_a_backend_is_retried_elsewhere(procs):
    g2 = grpc_backend(procs, "g2")
    dead = free_port()  # nothing listens: connect refused
    lb = grpc_balancer(procs, [("dead", dead), ("g2", g2)])
    with channel(lb) as ch:
        answers = [unary(ch)(b"x", timeout=10) for _ in range(6)]
    assert answers == [b"g2:x"] * 6


def test_grpc_health_check_marks_a_not_serving_backend_down(procs):
    flag = procs.tmp / "g1.health"
    g1 = grpc_backend(procs, "g1", "--health-file", str(flag))
    g2 = grpc_backend(procs, "g2")
    lb = grpc_balancer(
        procs,
        [("g1", g1), ("g2", g2)],
        pool={
            "health_check": {
                "type": "grpc",
                "service": "demo.Echo",
                "interval": "200ms",
                "rise": 1,
                "fall": 1,
            }
        },
    )
    lb.wait_state("web", "g1", "up")
    flag.write_text("NOT_SERVING")
    lb.wait_state("web", "g1", "down")
    with channel(lb) as ch:
        assert {unary(ch)(b"x", timeout=10) for _ in range(4)} == {b"g2:x"}
    flag.write_text("SERVING")
    lb.wait_state("web", "g1", "up")


def test_least_connections_counts_streams_not_connections(procs):
    g1, g2 = grpc_backend(procs, "g1"), grpc_backend(procs, "g2")
    lb = grpc_balancer(procs, [("g1", g1), ("g2", g2)], pool={"strategy": "least_connections"})
    with channel(lb) as ch:
        slow = unary(ch)
        calls = [slow.future(b"x", timeout=20, metadata=[("x-delay-ms", "2000")]) for _ in range(6)]
        time.sleep(0.8)
        inflight = {b["name"]: b["inflight"] for b in lb.status()["pools"]["web"]["backends"]}
        results = [c.result() for c in calls]
    # six calls on one client connection, spread as streams: three on each backend
    assert inflight == {"g1": 3, "g2": 3}, inflight
    assert sorted(results) == [b"g1:x"] * 3 + [b"g2:x"] * 3


def test_drain_lets_long_streams_finish(procs):
    g1 = grpc_backend(procs, "g1")
    lb = grpc_balancer(procs, [("g1", g1)])
    with channel(lb) as ch:
        got: list[bytes] = []
        call = ch.unary_stream("/demo.Echo/ServerStream")(b"20", timeout=20)

        def read() -> None:
            got.extend(call)

        reader = threading.Thread(target=read)
        reader.start()
        time.sleep(0.3)
        lb.proc.send_signal(signal.SIGTERM)
        reader.join(timeout=15)
    assert got == [b"g1:%d" % i for i in range(20)]
    assert lb.proc.wait(timeout=15) == 0
