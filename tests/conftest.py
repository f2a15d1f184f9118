"""Shared test settings."""

from __future__ import annotations

import os

from hypothesis import settings

# CI runs a bounded amount of fuzzing; `HYPOTHESIS_PROFILE=long` runs far more.
settings.register_profile("ci", deadline=None, max_examples=200)
settings.register_profile("long", deadline=None, max_examples=20000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
