"""Which modules are compiled (Cython), whether they are in use, and BALANCER_PURE=1.

The hot modules listed in COMPILED are ordinary Python sources that setup.py also builds as
extension modules when a C compiler is there (Cython's pure-Python mode: the `.py` stays the
one source, a `.pxd` beside it adds C types). Python imports an extension module in
preference to the `.py` beside it, so a compiled install uses them with no switch.

`install()` (run by balancer/__init__.py) puts a finder in front of the import system that
loads a listed module from its `.py` instead when
  - BALANCER_PURE=1 is set (to test or profile the interpreted build), or
  - in a source checkout, the `.py` or `.pxd` is newer than the extension built from it (an
    edited module must never be shadowed by a stale build; `pip install -e .` rebuilds).

This module imports nothing from balancer: setup.py loads it by path for the list.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import logging

# The modules a proxied request runs through, in dependency order.
COMPILED = (
    "balancer.backend",
    "balancer.sticky",
    "balancer.strategies.base",
    "balancer.strategies.round_robin",
    "balancer.strategies.weighted_round_robin",
    "balancer.strategies.least_connections",
    "balancer.strategies.least_load",
    "balancer.strategies.random_two",
    "balancer.strategies.consistent_hash",
    "balancer.pool",
    "balancer.proxy.http",
    "balancer.proxy.limits",
    "balancer.proxy.routing",
    "balancer.proxy.observe",
    "balancer.proxy.hpack_codec",
    "balancer.proxy.upstream",
    "balancer.proxy.exchange",
    "balancer.proxy.client",
    "balancer.proxy.h2fields",
    "balancer.proxy.h2stream",
    "balancer.proxy.h2client",
    "balancer.proxy.h2upstream",
)

_COMPILED = frozenset(COMPILED)
PURE_ENV = "BALANCER_PURE"


def pure_forced() -> bool:
    return os.environ.get(PURE_ENV, "") not in ("", "0")


class _SourceFinder:
    """Meta-path finder: a listed module from its `.py` when compiled ones must not be used."""

    def __init__(self, pure: bool) -> None:
        self.pure = pure
        self.stale: list[str] = []

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in _COMPILED or not path:
            return None
        leaf = fullname.rpartition(".")[2]
        for entry in path:
            source = os.path.join(entry, leaf + ".py")
            if not os.path.isfile(source):
                continue
            if not self.pure and not self._stale(entry, leaf, source):
                return None  # the ordinary finders take the extension module
            return importlib.util.spec_from_file_location(fullname, source)
        return None

    def _stale(self, entry: str, leaf: str, source: str) -> bool:
        if not _IN_CHECKOUT:
            return False  # an installed wheel: its files' times say nothing
        built = [
            os.path.join(entry, leaf + suffix)
            for suffix in importlib.machinery.EXTENSION_SUFFIXES
            if os.path.isfile(os.path.join(entry, leaf + suffix))
        ]
        if not built:
            return False
        newest = os.path.getmtime(source)
        pxd = os.path.join(entry, leaf + ".pxd")
        if os.path.isfile(pxd):
            newest = max(newest, os.path.getmtime(pxd))
        if newest > max(os.path.getmtime(b) for b in built):
            self.stale.append(leaf)
            return True
        return False


_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# a source checkout (editable install): setup.py lies beside the package
_IN_CHECKOUT = os.path.isfile(os.path.join(os.path.dirname(_PACKAGE_DIR), "setup.py"))
_finder: _SourceFinder | None = None


def install() -> None:
    """Put the source finder in front of the import system (once)."""
    global _finder
    if _finder is None:
        _finder = _SourceFinder(pure_forced())
        sys.meta_path.insert(0, _finder)


def compiled_modules() -> list[str]:
    """The listed modules imported so far that run compiled."""
    names = []
    for name in COMPILED:
        mod = sys.modules.get(name)
        if mod is not None and isinstance(
            getattr(mod, "__loader__", None), importlib.machinery.ExtensionFileLoader
        ):
            names.append(name)
    return names


def load_all() -> None:
    """Import every listed module (to report on them)."""
    for name in COMPILED:
        importlib.import_module(name)


def compiled() -> bool:
    """True when the hot path runs compiled: every listed module is an extension module."""
    load_all()
    return len(compiled_modules()) == len(COMPILED)


def describe() -> str:
    """One line for `balancer version` and the start-up log."""
    load_all()
    names = compiled_modules()
    if len(names) == len(COMPILED):
        return f"compiled ({len(names)} modules: {', '.join(names)})"
    why = (
        f"{PURE_ENV}=1"
        if pure_forced()
        else "stale build of " + ", ".join(_finder.stale)
        if _finder is not None and _finder.stale
        else "no compiled modules built (no C compiler at install?)"
    )
    if names:
        return f"partly compiled ({len(names)} of {len(COMPILED)}: {', '.join(names)}; {why})"
    return f"interpreted ({why})"


_said = False


def note_interpreted(log: logging.Logger) -> None:
    """Log once per process that the hot path runs interpreted, if it does."""
    global _said
    if not _said and not compiled():
        _said = True
        # asked for (BALANCER_PURE=1) is news; no compiler at install is a warning
        (log.info if pure_forced() else log.warning)("hot path %s", describe())
