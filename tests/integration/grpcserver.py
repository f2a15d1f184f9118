"""A real gRPC server (grpcio) for tests: raw-bytes methods, no generated stubs needed.

    python grpcserver.py --port N --name g1

Methods of service `demo.Echo` (request and response are bytes):
  Unary         answers b"<name>:<request>"; metadata `x-delay-ms` delays it
  ServerStream  request b"N": N messages b"<name>:<i>", 50 ms apart
  Bidi          echoes each message as b"<name>:<message>"
  Fail          aborts with status INVALID_ARGUMENT and message "bad input"
  DieMidStream  sends one message, then the whole process exits (a backend dying mid-call)
plus the standard grpc.health.v1.Health service, SERVING for "" and "demo.Echo" (the file
`--health-file`, when it exists and says NOT_SERVING, flips both).
"""

from __future__ import annotations

import argparse
import os
import threading
import time
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--name", default="g")
    ap.add_argument("--health-file", default="")
    args = ap.parse_args()
    name = args.name.encode()

    def unary(request: bytes, context: grpc.ServicerContext) -> bytes:
        delay = dict(context.invocation_metadata()).get("x-delay-ms")
        if delay:
            time.sleep(int(delay) / 1000)
        return name + b":" + request

    def server_stream(request: bytes, context: grpc.ServicerContext):  # type: ignore[no-untyped-def]
        for i in range(int(request or b"3")):
            yield name + b":%d" % i
            time.sleep(0.05)

    def bidi(requests, context: grpc.ServicerContext):  # type: ignore[no-untyped-def]
        for message in requests:
            yield name + b":" + message

    def fail(request: bytes, context: grpc.ServicerContext) -> bytes:
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, "bad input")
        return b""

    def die(request: bytes, context: grpc.ServicerContext):  # type: ignore[no-untyped-def]
        yield name + b":first"
        time.sleep(0.2)
        os._exit(3)

    handler = grpc.method_handlers_generic_handler(
        "demo.Echo",
        {
            "Unary": grpc.unary_unary_rpc_method_handler(unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(server_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(bidi),
            "Fail": grpc.unary_unary_rpc_method_handler(fail),
            "DieMidStream": grpc.unary_stream_rpc_method_handler(die),
        },
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((handler,))
    checker = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(checker, server)

    def watch_health() -> None:
        path = Path(args.health_file) if args.health_file else None
        while True:
            down = path is not None and path.exists() and "NOT_SERVING" in path.read_text()
            status = (
                health_pb2.HealthCheckResponse.NOT_SERVING
                if down
                else health_pb2.HealthCheckResponse.SERVING
            )
            for service in ("", "demo.Echo"):
                checker.set(service, status)
            time.sleep(0.1)

    threading.Thread(target=watch_health, daemon=True).start()
    server.add_insecure_port(f"127.0.0.1:{args.port}")
    server.start()
    server.wait_for_termination()


if __name__ == "__main__":
    main()
