"""Entry points (parse, load, parse_as) and the document: the sections read in order, then the
checks that span sections (a pool as a tcp listener uses it, workers and port 0)."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import replace
from typing import Any

import yaml

from balancer.config.errors import ConfigError, Problem, syntax_problem
from balancer.config.ha import read_ha
from balancer.config.listeners import read_listeners
from balancer.config.pools import read_pools
from balancer.config.reader import (
    ABSENT,
    Reader,
    Section,
    is_null,
    mapping_get,
    mapping_has,
    sequence_item,
)
from balancer.config.schema import (
    AccessLogConfig,
    Config,
    LimitsConfig,
    ListenerConfig,
    PoolConfig,
    TimeoutsConfig,
)
from balancer.config.service import (
    read_access_log,
    read_admin,
    read_limits,
    read_timeouts,
    workers,
)

_TOP_KEYS = ("listeners", "pools", "admin", "limits", "timeouts", "ha", "access_log", "workers")


def parse(text: str | bytes, source: str = "<config>", base_dir: str | None = None) -> Config:
    """A Config from YAML text; ConfigError listing every problem, each with its location.

    Relative paths in the file resolve against `base_dir` (the current directory when None).
    """
    if isinstance(text, bytes):
        try:
            # utf-8-sig: an editor's byte order mark is not a syntax error
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as e:
            line = text.count(b"\n", 0, e.start) + 1
            column = e.start - (text.rfind(b"\n", 0, e.start) + 1) + 1
            raise ConfigError(
                [
                    Problem(
                        "",
                        f"not valid UTF-8: byte 0x{text[e.start]:02x} at column {column}",
                        line,
                        source,
                    )
                ]
            ) from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as e:
        raise ConfigError([syntax_problem(e, text, source)]) from None
    except RecursionError:
        raise ConfigError(
            [Problem("", "the document is nested too deeply", None, source)]
        ) from None
    r = Reader(source, base_dir)
    config = _document(r, root)
    if r.problems or config is None:
        # document order reads best; file-wide problems (no line) first
        problems = sorted(r.problems, key=lambda p: -1 if p.line is None else p.line)
        raise ConfigError(problems)
    return config


def load(path: str) -> Config:
    """The Config in the file at `path`; ConfigError when it cannot be read or is invalid."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ConfigError([Problem("", f"cannot read: {e.strerror or e}", None, path)]) from None
    absolute = os.path.abspath(path)
    config = parse(data, source=path, base_dir=os.path.dirname(absolute))
    return dataclasses.replace(config, source=absolute, text=data)


def parse_as(text: bytes, path: str) -> Config:
    """The Config in `text`, read as if it were the file at `path` (an absolute path):
    relative paths resolve against its directory. A worker process parses the bytes its
    owner validated this way instead of reading the file again."""
    config = parse(text, source=path, base_dir=os.path.dirname(path))
    return dataclasses.replace(config, source=path, text=text)


def _document(r: Reader, root: yaml.Node | None) -> Config | None:
    if root is None or is_null(root):
        r.problem("", "the file is empty: it needs at least 'listeners' and 'pools'")
        return None
    if not isinstance(root, yaml.MappingNode):
        r.problem(
            "",
            f"the top level must be a mapping (listeners:, pools:, ...), got {r.kind(root)}",
            root,
        )
        return None
    mark = r.checkpoint()
    top = Section(r, root, "", _TOP_KEYS)
    pools, pools_ok, pool_names = read_pools(r, top)
    admin = read_admin(r, top.value_node("admin"))
    listeners, listeners_ok = read_listeners(r, top, pool_names, admin)
    # on the pools and listeners that are right, so these show beside any other problem
    _check_tcp_pools(r, pools, listeners, top.value_node("pools"))
    limits = read_limits(r, top.value_node("limits"))
    timeouts = read_timeouts(r, top.value_node("timeouts"))
    ha = read_ha(r, top.value_node("ha")) if top.has("ha") else None
    access_log = read_access_log(r, top.value_node("access_log"))
    count = top.get("workers", workers)
    if isinstance(count, int) and count > 1 and listeners_ok:
        _check_port_zero(r, listeners, count, top.value_node("listeners"))
    if not r.clean_since(mark) or not pools_ok or not listeners_ok or admin is None:
        return None
    extra: dict[str, Any] = {} if count is ABSENT else {"workers": count}
    pools = _tcp_pools_check_tcp(pools, listeners, top.value_node("pools"))
    return Config(
        listeners=tuple(listeners),
        pools=pools,
        admin=admin,
        limits=LimitsConfig(**limits),
        timeouts=TimeoutsConfig(**timeouts),
        ha=ha,
        access_log=AccessLogConfig(**access_log),
        **extra,
    )


def _check_port_zero(
    r: Reader, listeners: list[ListenerConfig], count: int, node: yaml.Node | None
) -> None:
    for i, lc in enumerate(listeners):
        if lc.bind.port == 0:
            # each process would bind its own random port, and clients would reach only one
            r.problem(
                f"listeners[{i}].bind",
                f"port 0 (any free port) cannot be shared by {count} worker"
                " processes: give a fixed port, or use workers: 1",
                mapping_get(sequence_item(node, i), "bind"),
            )


def _check_tcp_pools(
    r: Reader,
    pools: dict[str, PoolConfig],
    listeners: list[ListenerConfig],
    pools_node: yaml.Node | None,
) -> None:
    """A pool behind a tcp listener gets raw bytes: it cannot speak HTTP/2 to its backends."""
    users: dict[str, str] = {}
    for lc in listeners:
        if lc.mode == "tcp" and lc.pool is not None:
            users.setdefault(lc.pool, lc.name)
    for name, listener in users.items():
        pc = pools.get(name)
        if pc is None or pc.protocol != "h2":
            continue
        pool_node = mapping_get(pools_node, name)
        r.problem(
            f"pools.{name}.protocol",
            f"protocol h2 is for pools behind http listeners; pool '{name}' is used by tcp"
            f" listener '{listener}', which forwards raw bytes (remove protocol, or route to"
            " this pool from an http listener)",
            mapping_get(pool_node, "protocol") or pool_node,
        )


def _tcp_pools_check_tcp(
    pools: dict[str, PoolConfig], listeners: list[ListenerConfig], pools_node: yaml.Node | None
) -> dict[str, PoolConfig]:
    """A pool behind a tcp listener whose health_check names no type gets TCP-connect
    checks: an HTTP check would mark a database or cache backend down."""
    tcp_pools = {lc.pool for lc in listeners if lc.mode == "tcp"}
    out = dict(pools)
    for name in tcp_pools:
        pc = pools.get(name or "")
        if pc is None or pc.health_check is None or pc.health_check.type != "http":
            continue
        if not mapping_has(mapping_get(mapping_get(pools_node, name), "health_check"), "type"):
            out[name] = replace(pc, health_check=replace(pc.health_check, type="tcp"))
    return out


def check_reloadable(old: Config, new: Config) -> None:
    """The settings a reload cannot apply to a running daemon: a file changing them is
    rejected as a whole, with the reason, rather than reloaded with them silently kept."""
    problems = []
    if (old.workers > 1) != (new.workers > 1):
        # listener sockets join a SO_REUSEPORT group only when bound with it
        problems.append(
            Problem(
                "workers",
                f"changing workers from {old.workers} to {new.workers} needs a restart"
                " (between one process and several, listener sockets must be bound anew)",
                None,
                new.source,
            )
        )
    if old.ha != new.ha:
        # the VIP, its interface, the heartbeat socket and the peer's view of this node are
        # set up once; in a pair, restart one node at a time (SIGTERM hands the VIP over)
        problems.append(
            Problem(
                "ha",
                "changes to the ha section need a restart (restart one node of the pair at a"
                " time: SIGTERM on the active hands the virtual IP over to its peer)",
                None,
                new.source,
            )
        )
    if problems:
        raise ConfigError(problems)
