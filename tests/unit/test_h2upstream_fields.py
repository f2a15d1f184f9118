"""A backend's HTTP/2 response heads and trailers are checked by h2fields (h2's own inbound
validation is off): a well-formed answer reaches the exchange, a malformed one ends the
backend connection with GOAWAY PROTOCOL_ERROR and reaches no client."""

from __future__ import annotations

import asyncio

import h2.config
import h2.connection
import h2.events
import pytest
from hyperframe.frame import Frame, GoAwayFrame

from balancer.proxy.h2upstream import H2BackendConnection, H2BackendConnections
from balancer.proxy.upstream import FAIL_RESET, Watchdog
from tests.support import BufferTransport

REQUEST = b"POST /svc/Call HTTP/1.1\r\nHost: a\r\ncontent-type: application/grpc\r\ncontent-length: 2\r\n\r\nhi"


class Exchange:
    """What an H2UpstreamStream tells its exchange."""

    def __init__(self) -> None:
        self.backend = None
        self.is_head = False
        self.events: list[tuple] = []

    def response_head(self, conn: object, *, has_body: bool, rechunk: bool) -> None:
        self.events.append(("head", conn.status, list(conn.h2_fields)))  # type: ignore[attr-defined]

    def response_body(self, data: bytes) -> None:
        self.events.append(("body", data))

    def response_trailers(self, fields: list) -> None:
        self.events.append(("trailers", fields))

    def response_done(self, reusable: bool) -> None:
        self.events.append(("done",))

    def upstream_failed(self, kind: str, reused: bool, exc: BaseException | None) -> None:
        self.events.append(("failed", kind))

    def upstream_broken(self, why: str) -> None:
        self.events.append(("broken",))

    def upstream_pause_writing(self) -> None:
        pass

    def upstream_resume_writing(self) -> None:
        pass


async def call(head: list, trailers: list | None) -> tuple[Exchange, bytes]:
    """One call through an H2BackendConnection to an in-memory backend answering `head`,
    a message and `trailers`; what the exchange heard, and what the balancer wrote after."""
    loop = asyncio.get_running_loop()
    pool = H2BackendConnections(
        "127.0.0.1",
        1,
        watchdog=Watchdog(loop),
        loop=loop,
        connect_timeout=1.0,
        backend_timeout=5.0,
        idle_timeout=5.0,
    )
    conn = H2BackendConnection(pool)
    transport = BufferTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    backend = h2.connection.H2Connection(
        h2.config.H2Configuration(
            client_side=False,
            header_encoding=None,
            validate_outbound_headers=False,
            normalize_outbound_headers=False,
        )
    )
    backend.initiate_connection()
    backend.receive_data(transport.take())
    conn.data_received(backend.data_to_send())
    stream = conn.new_stream()
    ex = Exchange()
    stream.exchange = ex  # type: ignore[assignment]
    stream.send(REQUEST)
    await asyncio.sleep(0)
    events = backend.receive_data(transport.take())
    sid = next(e.stream_id for e in events if isinstance(e, h2.events.RequestReceived))
    backend.send_headers(sid, head)
    backend.send_data(sid, b"\x00\x00\x00\x00\x00")
    if trailers is not None:
        backend.send_headers(sid, trailers, end_stream=True)
    conn.data_received(backend.data_to_send())
    await asyncio.sleep(0)
    return ex, transport.take()


def goaway_code(data: bytes) -> int | None:
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        if isinstance(frame, GoAwayFrame):
            return frame.error_code
        data = data[9 + length :]
    return None


def test_a_well_formed_answer_reaches_the_exchange() -> None:
    ex, written = asyncio.run(
        call(
            [(b":status", b"200"), (b"content-type", b"application/grpc")], [(b"grpc-status", b"0")]
        )
    )
    assert ex.events == [
        ("head", 200, [(b"content-type", b"application/grpc")]),
        ("body", b"\x00\x00\x00\x00\x00"),
        ("trailers", [(b"grpc-status", b"0")]),
        ("done",),
    ]
    assert goaway_code(written) is None


@pytest.mark.parametrize(
    ("head", "trailers"),
    [
        ([(b":status", b"200"), (b"X-Upper", b"1")], None),
        ([(b":status", b"200"), (b"connection", b"close")], None),
        ([(b":status", b"200"), (b"x-a", b"a\r\nb")], None),
        ([(b"content-type", b"text/plain")], None),  # no :status
        ([(b":status", b"200"), (b":path", b"/")], None),  # a request's pseudo-header
        ([(b":status", b"200")], [(b"grpc-status", b"0"), (b":status", b"200")]),
    ],
)
def test_a_malformed_answer_ends_the_backend_connection(head: list, trailers: list | None) -> None:
    ex, written = asyncio.run(call(head, trailers))
    assert goaway_code(written) == 1  # PROTOCOL_ERROR
    if trailers is None:
        assert ex.events == [("failed", FAIL_RESET)]  # nothing of it reached the client
    else:
        assert ("trailers", trailers) not in ex.events and ex.events[-1] == ("broken",)
