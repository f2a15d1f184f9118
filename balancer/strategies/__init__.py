"""Balancing strategies: the registry from config names to Strategy classes.

Built-in strategies register here by name; a third-party package adds one through the
`balancer.strategies` entry point group, whose entries name a Strategy subclass.
"""

from __future__ import annotations

from importlib.metadata import entry_points

from balancer.strategies.base import RequestContext, Strategy, StrategyOptions

__all__ = ["RequestContext", "Strategy", "StrategyOptions", "get", "registered_names"]

_BUILTIN: dict[str, type[Strategy]] = {}


def _load_builtin() -> None:
    # imported here so that `balancer.strategies.base` stays importable on its own
    from balancer.strategies.consistent_hash import ConsistentHash
    from balancer.strategies.least_connections import LeastConnections
    from balancer.strategies.least_load import LeastLoad
    from balancer.strategies.random_two import RandomTwo
    from balancer.strategies.round_robin import RoundRobin
    from balancer.strategies.weighted_round_robin import WeightedRoundRobin

    for cls in (
        RoundRobin,
        WeightedRoundRobin,
        LeastConnections,
        LeastLoad,
        RandomTwo,
        ConsistentHash,
    ):
        _BUILTIN[cls.name] = cls


def _plugins() -> dict[str, object]:
    return {ep.name: ep for ep in entry_points(group="balancer.strategies")}


def registered_names() -> list[str]:
    """Every strategy name a config file may use: built-in ones, then plugins."""
    if not _BUILTIN:
        _load_builtin()
    return sorted(_BUILTIN) + sorted(n for n in _plugins() if n not in _BUILTIN)


def get(name: str) -> type[Strategy]:
    """The Strategy class registered under `name`; KeyError if there is none."""
    if not _BUILTIN:
        _load_builtin()
    if name in _BUILTIN:
        return _BUILTIN[name]
    ep = _plugins().get(name)
    if ep is None:
        raise KeyError(name)
    cls = ep.load()  # type: ignore[attr-defined]
    if not (isinstance(cls, type) and issubclass(cls, Strategy)):
        raise KeyError(f"{name}: entry point does not name a Strategy subclass")
    return cls
