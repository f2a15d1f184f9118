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
