"""The compiled hot path: which build runs, BALANCER_PURE=1, and the stale-build guard."""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from balancer import build

PURE = build.pure_forced()
IN_CI = os.environ.get("CI", "") == "true"


@pytest.mark.skipif(PURE, reason="the interpreted run")
def test_ci_runs_the_compiled_build() -> None:
    """`./dev test` runs the suite on the compiled install first: in CI that must really be
    the compiled modules (else both runs would test the interpreted code)."""
    if not IN_CI and not build.compiled():
        pytest.skip("no compiled modules here (no C compiler at install?)")
    assert build.compiled(), build.describe()
    assert build.compiled_modules() == list(build.COMPILED)
    import balancer.proxy.client as client

    assert client.__file__.endswith(tuple(importlib.machinery.EXTENSION_SUFFIXES))


@pytest.mark.skipif(not PURE, reason="the compiled run")
def test_pure_forces_every_module_from_source() -> None:
    assert build.compiled_modules() == []
    import balancer.proxy.exchange as exchange

    assert exchange.__file__.endswith("exchange.py")
    assert build.describe().startswith("interpreted (BALANCER_PURE=1)")


def test_version_says_which_build_the_environment_gets() -> None:
    for pure in ("1", "0"):
        env = {**os.environ, "BALANCER_PURE": pure}
        out = subprocess.run(
            [sys.executable, "-m", "balancer", "version"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert out.startswith("balancer "), out
        if pure == "1":
            assert "interpreted (BALANCER_PURE=1)" in out, out
        elif IN_CI:  # CI installs with a compiler (even for its BALANCER_PURE=1 run)
            assert f": compiled ({len(build.COMPILED)} modules" in out, out


def _fake_package(tmp_path: Path, *, built_after_source: bool) -> list[str]:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    src = pkg / "mod.py"
    src.write_text("X = 1\n")
    so = pkg / ("mod" + importlib.machinery.EXTENSION_SUFFIXES[0])
    so.write_bytes(b"not really an extension")
    now = time.time()
    older, newer = now - 100, now
    os.utime(src, (older, older) if built_after_source else (newer, newer))
    os.utime(so, (newer, newer) if built_after_source else (older, older))
    return [str(pkg)]


def test_a_build_older_than_its_source_is_not_used(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(build, "_COMPILED", frozenset({"pkg.mod"}))
    monkeypatch.setattr(build, "_IN_CHECKOUT", True)
    finder = build._SourceFinder(pure=False)
    spec = finder.find_spec("pkg.mod", _fake_package(tmp_path, built_after_source=False))
    assert spec is not None and spec.origin.endswith("mod.py")
    assert finder.stale == ["mod"]


def test_an_up_to_date_build_is_left_to_the_import_system(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(build, "_COMPILED", frozenset({"pkg.mod"}))
    monkeypatch.setattr(build, "_IN_CHECKOUT", True)
    path = _fake_package(tmp_path, built_after_source=True)
    assert build._SourceFinder(pure=False).find_spec("pkg.mod", path) is None
    # forced pure: the source whatever the times say; a module not listed: never touched
    spec = build._SourceFinder(pure=True).find_spec("pkg.mod", path)
    assert spec is not None and spec.origin.endswith("mod.py")
    assert build._SourceFinder(pure=True).find_spec("pkg.other", path) is None


def test_an_installed_build_is_trusted_whatever_the_file_times(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(build, "_COMPILED", frozenset({"pkg.mod"}))
    monkeypatch.setattr(build, "_IN_CHECKOUT", False)
    path = _fake_package(tmp_path, built_after_source=False)
    assert build._SourceFinder(pure=False).find_spec("pkg.mod", path) is None
