"""Fixtures for tests that start real processes on 127.0.0.1."""

from __future__ import annotations

import pytest

from tests.integration.harness import Processes


@pytest.fixture
def procs(tmp_path):  # type: ignore[no-untyped-def]
    p = Processes(tmp_path)
    try:
        yield p
    finally:
        p.stop_all()
