"""How a stream's response leaves an H2ClientConnection: a body whose end comes in the same
loop iteration rides one DATA frame with END_STREAM; a body that goes on is not held past
the iteration; the flow-control windows and the order of body and trailers still hold."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import h2.config
import h2.connection
import h2.events
import h2.settings
from hyperframe.frame import DataFrame, Frame, HeadersFrame

from balancer.proxy.h2client import H2ClientConnection
from balancer.proxy.h2stream import H2Stream
from tests.support import BufferTransport


def fake_listener() -> SimpleNamespace:
    return SimpleNamespace(
        limits=SimpleNamespace(
            config=SimpleNamespace(max_header_bytes=8192), release=lambda ip: None
        ),
        connections=set(),
        loop_time=lambda: 0.0,
        timeouts=SimpleNamespace(client_header=10.0, client_idle=60.0),
        watchdog=SimpleNamespace(add=lambda c: None, discard=lambda c: None),
        rejected=0,
    )


def frames(data: bytes) -> list[Frame]:
    out = []
    while data:
        frame, length = Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9 : 9 + length]))
        out.append(frame)
        data = data[9 + length :]
    return out


def data_frames(out: list[Frame]) -> list[tuple[bytes, bool]]:
    return [(f.data, "END_STREAM" in f.flags) for f in out if isinstance(f, DataFrame)]


async def open_stream(
    window: int = 65535,
) -> tuple[H2ClientConnection, BufferTransport, H2Stream, h2.connection.H2Connection]:
    """A server connection with one request stream open (its HEADERS handled by h2 alone:
    what is tested is the answer), and the client that sent it."""
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window}
    )
    client.initiate_connection()
    client.send_headers(
        1,
        [(":method", "GET"), (":scheme", "https"), (":authority", "a"), (":path", "/")],
        end_stream=True,
    )
    conn = H2ClientConnection(fake_listener(), "198.18.0.1")  # type: ignore[arg-type]
    transport = BufferTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    conn.h2.receive_data(client.data_to_send())
    client.receive_data(bytes(transport.data))
    conn.h2.receive_data(client.data_to_send())  # the client's SETTINGS ACK
    conn._flush_now()
    del transport.data[:]
    stream = H2Stream(conn, 1, conn.listener, "198.18.0.1")
    conn.streams[1] = stream
    return conn, transport, stream, client


def test_body_and_end_in_one_iteration_are_one_data_frame() -> None:
    async def main() -> None:
        conn, transport, stream, _ = await open_stream()
        conn.send_headers(stream, [(b":status", b"200")], end=False)
        conn.send_body(stream, b"hello")
        conn.end_stream(stream)
        await asyncio.sleep(0)  # the iteration's flush
        out = frames(bytes(transport.data))
        assert [type(f) for f in out] == [HeadersFrame, DataFrame]
        assert "END_STREAM" not in out[0].flags
        assert data_frames(out) == [(b"hello", True)]

    asyncio.run(main())


def test_a_body_that_goes_on_is_sent_at_the_iterations_end() -> None:
    async def main() -> None:
        conn, transport, stream, _ = await open_stream()
        conn.send_headers(stream, [(b":status", b"200")], end=False)
        conn.send_body(stream, b"one")
        conn.send_body(stream, b"two")
        await asyncio.sleep(0)
        assert data_frames(frames(bytes(transport.data))) == [(b"one", False), (b"two", False)]
        del transport.data[:]
        conn.end_stream(stream)
        await asyncio.sleep(0)
        assert data_frames(frames(bytes(transport.data))) == [(b"", True)]

    asyncio.run(main())


def test_trailers_follow_the_held_body() -> None:
    async def main() -> None:
        conn, transport, stream, _ = await open_stream()
        conn.send_headers(stream, [(b":status", b"200")], end=False)
        conn.send_body(stream, b"msg")
        conn.send_headers(stream, [(b"grpc-status", b"0")], end=True)
        await asyncio.sleep(0)
        out = frames(bytes(transport.data))
        assert [type(f) for f in out] == [HeadersFrame, DataFrame, HeadersFrame]
        assert out[1].data == b"msg" and "END_STREAM" in out[2].flags

    asyncio.run(main())


def test_a_held_body_beyond_the_window_waits_for_credit() -> None:
    async def main() -> None:
        conn, transport, stream, client = await open_stream(window=4)
        conn.send_headers(stream, [(b":status", b"200")], end=False)
        conn.send_body(stream, b"0123456789")
        conn.end_stream(stream)
        await asyncio.sleep(0)
        assert data_frames(frames(bytes(transport.data))) == [(b"0123", False)]
        assert stream.pending == [b"456789"] and stream.end_pending
        del transport.data[:]
        client.increment_flow_control_window(100, stream_id=1)
        conn.data_received(client.data_to_send())
        await asyncio.sleep(0)
        assert data_frames(frames(bytes(transport.data))) == [(b"456789", False), (b"", True)]

    asyncio.run(main())


def test_a_reset_stream_drops_what_it_held() -> None:
    async def main() -> None:
        conn, transport, stream, _ = await open_stream()
        conn.send_headers(stream, [(b":status", b"200")], end=False)
        conn.send_body(stream, b"never")
        conn.reset_stream(stream, 8)
        await asyncio.sleep(0)
        assert data_frames(frames(bytes(transport.data))) == []

    asyncio.run(main())
