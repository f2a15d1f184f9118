"""Channel: length-prefixed JSON messages over the socketpair between the owner and a worker."""

from __future__ import annotations

import asyncio
import json
import struct
from typing import Any

# 4-byte big-endian length, then that many bytes of UTF-8 JSON (one object per frame).
HEADER = struct.Struct("!I")
# A config text plus a state snapshot of a few thousand backends stays far below this; a
# length beyond it means a corrupted stream, not a big message.
MAX_MESSAGE = 64 * 1024 * 1024

Message = dict[str, Any]

# The message set's version, in the owner's first message. An owner and a worker started from
# different installs (a package upgraded under a running owner, then a worker respawned) must
# not guess at each other's messages: the worker refuses to start, and the owner says why.
PROTOCOL = 1


class ProtocolError(Exception):
    """The peer sent something that is not a frame of this protocol."""


def encode(msg: Message) -> bytes:
    """One frame: header and JSON body."""
    body = json.dumps(msg, separators=(",", ":")).encode()
    if len(body) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(body)} bytes exceeds {MAX_MESSAGE}")
    return HEADER.pack(len(body)) + body


def body_length(header: bytes) -> int:
    """The body length a frame header announces (ProtocolError when it can't be one)."""
    (n,) = HEADER.unpack(header)
    if n > MAX_MESSAGE:
        raise ProtocolError(f"frame of {n} bytes announced (limit {MAX_MESSAGE})")
    return n


def decode_body(body: bytes) -> Message:
    try:
        msg = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"frame is not JSON: {e}") from None
    if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
        raise ProtocolError("a frame must be a JSON object with a string 'type'")
    return msg


def decode_frames(buffer: bytes) -> tuple[list[Message], bytes]:
    """The complete messages at the start of `buffer`, and the bytes left over."""
    out: list[Message] = []
    pos = 0
    while len(buffer) - pos >= HEADER.size:
        n = body_length(buffer[pos : pos + HEADER.size])
        end = pos + HEADER.size + n
        if len(buffer) < end:
            break
        out.append(decode_body(buffer[pos + HEADER.size : end]))
        pos = end
    return out, buffer[pos:]


class Channel:
    """One end of the socketpair as asyncio streams.

    `send()` only queues the frame: each write is one whole frame, so frames from several
    coroutines never interleave, and nothing on the owner waits for a slow worker to read.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, sock: Any) -> Channel:
        reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        return cls(reader, writer)

    @property
    def closed(self) -> bool:
        return self.writer.is_closing()

    def send(self, msg: Message) -> bool:
        """Queue `msg`; False when the channel is closed already (the peer is gone)."""
        if self.writer.is_closing():
            return False
        self.writer.write(encode(msg))
        return True

    async def flush(self) -> None:
        try:
            await self.writer.drain()
        except (ConnectionError, OSError):
            pass

    async def recv(self) -> Message | None:
        """The next message, or None at end of stream (the peer closed or died)."""
        try:
            header = await self.reader.readexactly(HEADER.size)
            body = await self.reader.readexactly(body_length(header))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            return None
        return decode_body(body)

    def close(self) -> None:
        self.writer.close()
