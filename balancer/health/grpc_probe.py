"""The standard gRPC health check (grpc.health.v1.Health/Check) over h2c, on asyncio streams.

The two messages are tiny protobufs, written and read here by hand rather than pulling the
protobuf runtime into the daemon: HealthCheckRequest is field 1 (string service) and
HealthCheckResponse field 1 (enum status, SERVING = 1).
"""

from __future__ import annotations

import asyncio

import h2.config
import h2.connection
import h2.events

SERVING = 1
STATUS_NAMES = {0: "UNKNOWN", 1: "SERVING", 2: "NOT_SERVING", 3: "SERVICE_UNKNOWN"}
PATH = b"/grpc.health.v1.Health/Check"


class ProbeFailed(Exception):
    """The backend answered, but not SERVING (or not as gRPC)."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def encode_request(service: str) -> bytes:
    """The length-prefixed gRPC message of a HealthCheckRequest."""
    raw = service.encode()
    msg = (b"\x0a" + _varint(len(raw)) + raw) if raw else b""
    return b"\x00" + len(msg).to_bytes(4, "big") + msg


def decode_status(body: bytes) -> int:
    """The status field of a length-prefixed HealthCheckResponse (0 when absent)."""
    if len(body) < 5 or body[0] != 0:
        raise ProbeFailed("not an uncompressed gRPC message")
    msg = body[5 : 5 + int.from_bytes(body[1:5], "big")]
    at = 0
    while at < len(msg):
        key = msg[at]
        at += 1
        if key == 0x08:  # field 1, varint
            value = shift = 0
            while at < len(msg):
                b = msg[at]
                at += 1
                value |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    return value
            raise ProbeFailed("truncated health response")
        raise ProbeFailed(f"unexpected field in health response (key {key})")
    return 0


async def check(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authority: str, service: str
) -> None:
    """One Check call on a fresh connection; raises ProbeFailed unless SERVING."""
    conn = h2.connection.H2Connection(
        h2.config.H2Configuration(client_side=True, header_encoding=None)
    )
    conn.initiate_connection()
    sid = conn.get_next_available_stream_id()
    conn.send_headers(
        sid,
        [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":authority", authority.encode()),
            (b":path", PATH),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            (b"user-agent", b"balancer-health"),
        ],
    )
    conn.send_data(sid, encode_request(service), end_stream=True)
    writer.write(conn.data_to_send())
    body = b""
    grpc_status = grpc_message = None
    http_status = 0
    ended = False
    while not ended:
        data = await reader.read(65536)
        if not data:
            raise ConnectionResetError("backend closed the connection")
        for ev in conn.receive_data(data):
            if isinstance(ev, h2.events.ResponseReceived | h2.events.TrailersReceived):
                fields = dict(ev.headers)
                http_status = int(fields.get(b":status", http_status or 0))
                grpc_status = fields.get(b"grpc-status", grpc_status)
                grpc_message = fields.get(b"grpc-message", grpc_message)
            elif isinstance(ev, h2.events.DataReceived):
                body += ev.data
                conn.acknowledge_received_data(ev.flow_controlled_length, sid)
            elif isinstance(ev, h2.events.StreamEnded | h2.events.StreamReset):
                ended = True
        out = conn.data_to_send()
        if out:
            writer.write(out)
    if http_status != 200:
        raise ProbeFailed(f"HTTP status {http_status}")
    if grpc_status != b"0":
        detail = (grpc_message or b"").decode("latin-1")
        raise ProbeFailed(f"grpc-status {(grpc_status or b'?').decode()} {detail}".strip())
    status = decode_status(body)
    if status != SERVING:
        raise ProbeFailed(STATUS_NAMES.get(status, str(status)))
