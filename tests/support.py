"""Helpers shared by every test package."""

from __future__ import annotations

import os

import pytest


def missing_tool(problem: str) -> None:
    """A test can't run because a tool is missing: skip it locally, but under CI=true (where
    the set-up installs every tool) fail it, so a missing install step can't pass unseen."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{problem} (CI=true: not skipping)")
    pytest.skip(problem)


class BufferTransport:
    """An in-memory asyncio transport for protocol tests: what is written piles up in `data`
    (`take()` empties it); close and abort only mark it closing."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closing = False

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def get_extra_info(self, name: str, default: object = None) -> object:
        return default

    def take(self) -> bytes:
        out = bytes(self.data)
        del self.data[:]
        return out
