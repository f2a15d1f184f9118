"""The `pools:` section: strategy, hash key, backends, sticky cookies, queue and retries."""

from __future__ import annotations

import os
import re
from typing import Any

import yaml

from balancer.config import values as v
from balancer.config.discovery import read_discovery
from balancer.config.health import read_health_check, read_passive_health
from balancer.config.reader import ABSENT, Reader, Section, is_null, join
from balancer.config.schema import Address, BackendConfig, PoolConfig, QueueConfig, StickyConfig

_POOL_KEYS = (
    "strategy",
    "hash_key",
    "sticky",
    "health_check",
    "passive_health",
    "slow_start",
    "panic_threshold",
    "retries",
    "queue",
    "protocol",
    "send_proxy_protocol",
    "discovery",
    "backends",
)
_BACKEND_KEYS = ("name", "address", "weight", "max_connections")
_STICKY_KEYS = ("cookie", "ttl", "key_file")
_QUEUE_KEYS = ("size", "timeout")
# RFC 7230 tchar; RFC 6265 cookie names are the same token set
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_HASH_KEY_FORMS = "header:NAME, cookie:NAME, path or client_ip"


def read_pools(r: Reader, top: Section) -> tuple[dict[str, PoolConfig], bool, set[str] | None]:
    """The pools that are right, by name; whether every pool is; and the names defined (None
    when the section is unusable, so that references to pools are not checked against
    nothing)."""
    if not top.has("pools"):
        r.problem(
            "pools",
            "at least one pool is required",
            top.line("pools") if "pools" in top.entries else None,
        )
        return {}, False, None
    found = r.entries(top.value_node("pools"), "pools", "a mapping of pool names to pools")
    if found is None:
        return {}, False, None
    if not found:
        r.problem("pools", "at least one pool is required", top.value_node("pools"))
        return {}, False, None
    result: dict[str, PoolConfig] = {}
    mark = r.checkpoint()
    for name, key_node, value_node in found:
        loc = join("pools", name)
        if not v.NAME_RE.fullmatch(name):
            r.problem(
                loc, f"invalid pool name {name!r}: use letters, digits, '_', '-' and '.'", key_node
            )
        pool = _pool(r, name, value_node, loc)
        if pool is not None:
            result[name] = pool
    # a pool with problems still counts as defined, so that references to it are not flagged
    names = {name for name, _, _ in found}
    return result, r.clean_since(mark), names


def _pool(r: Reader, name: str, node: yaml.Node, loc: str) -> PoolConfig | None:
    mark = r.checkpoint()
    s = Section(r, node, loc, _POOL_KEYS)
    if not s.ok:
        return None
    strategy = s.get("strategy", lambda value: _strategy(r, value))
    hash_key = s.get("hash_key", _hash_key)
    # judged on the name as written, so a consistent_hash pool is checked even while the
    # strategy itself is reported as not installed
    strategy_node = s.value_node("strategy")
    written = (
        strategy_node.value
        if s.has("strategy") and isinstance(strategy_node, yaml.ScalarNode)
        else PoolConfig.strategy
    )
    if written == "consistent_hash" and not s.has("hash_key"):
        r.problem(
            s.at("hash_key"),
            f"strategy consistent_hash needs hash_key: {_HASH_KEY_FORMS}",
            strategy_node,
        )
    elif written != "consistent_hash" and s.has("hash_key"):
        r.problem(
            s.at("hash_key"),
            f"hash_key only applies to strategy consistent_hash, not {written}",
            s.value_node("hash_key"),
        )
    kwargs: dict[str, Any] = s.fields(
        slow_start=v.duration(positive=False),
        panic_threshold=v.integer(0, 100),
        retries=v.integer(0, 10),
        protocol=v.choice("http1", "h2"),
        # for an http pool the header goes before the first request on each backend
        # connection, for a tcp pool before the first byte: both are allowed
        send_proxy_protocol=v.choice("none", "v1", "v2"),
    )
    if strategy is not ABSENT:
        kwargs["strategy"] = strategy
    if hash_key is not ABSENT:
        kwargs["hash_key"] = hash_key
    if "sticky" in s.entries:
        kwargs["sticky"] = _sticky(r, s.value_node("sticky"), s.at("sticky"))
    if s.has("health_check"):
        # None when the protocol is wrong (reported already): the grpc rule is then moot
        protocol = kwargs.get("protocol", PoolConfig.protocol if not s.has("protocol") else None)
        kwargs["health_check"] = read_health_check(
            r, s.value_node("health_check"), s.at("health_check"), protocol
        )
    if s.has("passive_health"):
        kwargs["passive_health"] = read_passive_health(
            r, s.value_node("passive_health"), s.at("passive_health")
        )
    if s.has("queue"):
        qs = Section(r, s.value_node("queue"), s.at("queue"), _QUEUE_KEYS)
        kwargs["queue"] = QueueConfig(
            **qs.fields(size=v.integer(0), timeout=v.duration(positive=True))
        )
    if "discovery" in s.entries:
        kwargs["discovery"] = read_discovery(r, s.value_node("discovery"), s.at("discovery"))
    backends = _backends(r, s, discovered="discovery" in s.entries)
    if not r.clean_since(mark) or backends is None:
        return None
    return PoolConfig(name=name, backends=backends, **kwargs)


def _strategy(r: Reader, value: object) -> str:
    valid = r.strategies()
    if not isinstance(value, str):
        raise ValueError(f"expected a strategy name ({', '.join(valid)}), got {v.kind(value)}")
    if value not in valid:
        raise ValueError(
            f"unknown strategy '{value}'{v.suggest(value, valid)}; valid: {', '.join(valid)}"
        )
    return value


def _backends(r: Reader, s: Section, *, discovered: bool) -> tuple[BackendConfig, ...] | None:
    """The listed backends; with `discovered` (the pool has discovery:) none are needed."""
    loc = s.at("backends")
    if not s.has("backends"):
        if discovered:
            return ()
        r.problem(loc, "a pool needs at least one backend", s.line("backends"))
        return None
    nodes = r.sequence(s.value_node("backends"), loc, "backends")
    if nodes is None:
        return None
    if not nodes:
        if discovered:
            return ()
        r.problem(loc, "a pool needs at least one backend", s.value_node("backends"))
        return None
    mark = r.checkpoint()
    result: list[BackendConfig] = []
    names: dict[str, str] = {}
    addresses: dict[Address, str] = {}
    for i, node in enumerate(nodes):
        bs = Section(r, node, f"{loc}[{i}]", _BACKEND_KEYS)
        if not bs.ok:
            continue
        name = bs.get("name", v.name, required=True)
        address = bs.get("address", v.address, required=True)
        fields = bs.fields(weight=_weight, max_connections=v.integer(0))
        if name is not ABSENT:
            if name in names:
                r.problem(
                    bs.at("name"),
                    f"duplicate backend name '{name}' in this pool (also {names[name]})",
                    bs.value_node("name"),
                )
            names.setdefault(name, bs.loc)
        if address is not ABSENT:
            if address in addresses:
                r.problem(
                    bs.at("address"),
                    f"duplicate backend address {address} in this pool (also {addresses[address]})",
                    bs.value_node("address"),
                )
            addresses.setdefault(address, bs.loc)
        if name is not ABSENT and address is not ABSENT:
            result.append(BackendConfig(name=name, address=address, **fields))
    return tuple(result) if r.clean_since(mark) else None


def _weight(value: object) -> int:
    if value == 0 and not isinstance(value, bool):
        raise ValueError(
            "weight 0 is not allowed: to stop sending traffic to a backend, set its state to"
            " disabled via the admin API (PATCH /pools/POOL/backends/NAME)"
        )
    return v.integer(1, 1000)(value)


def _hash_key(value: object) -> str:
    text = v.string(value)
    kind, sep, name = text.partition(":")
    if text in ("path", "client_ip"):
        return text
    if sep and kind in ("header", "cookie") and _TOKEN_RE.fullmatch(name):
        return text
    raise ValueError(f"invalid hash_key {text!r}: expected {_HASH_KEY_FORMS}")


# -- sticky --------------------------------------------------------------------------------


def _sticky(r: Reader, node: yaml.Node | None, loc: str) -> StickyConfig | None:
    if node is None or is_null(node):
        return None
    if isinstance(node, yaml.ScalarNode):
        # `sticky: true` is stickiness with every default; `false` turns it off
        enabled = r.scalar(node, loc, _sticky_flag)
        return StickyConfig() if enabled is True else None
    s = Section(r, node, loc, _STICKY_KEYS)
    fields = s.fields(
        cookie=_cookie_name,
        ttl=v.duration(positive=True),
        key_file=lambda value: _sticky_key_file(r, value),
    )
    if not s.has("key_file"):
        _default_sticky_key_file(r, node, loc)
    return StickyConfig(**fields)


def _sticky_flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected a mapping, true or false, got {v.kind(value)}")
    return value


def _cookie_name(value: object) -> str:
    text = v.string(value)
    if not _TOKEN_RE.fullmatch(text):
        raise ValueError(
            f"invalid cookie name {text!r}: use letters, digits and !#$%&'*+-.^_`|~ (no spaces,"
            " quotes or separators)"
        )
    return text


def _sticky_key_file(r: Reader, value: object) -> str:
    """A sticky key_file: its directory must exist (the file is created there when it
    does not); an existing file must hold a key, or `balancer run` could not start."""
    path = r.path_in_existing_dir(value)
    check_sticky_key_file(path)
    return path


def _default_sticky_key_file(r: Reader, node: yaml.Node, loc: str) -> None:
    # without key_file the daemon keeps the key in `sticky.key` beside the config file:
    # one that is there already must be usable, or the daemon could not start
    if r.base_dir is None:
        return
    try:
        check_sticky_key_file(os.path.join(r.base_dir, "sticky.key"))
    except ValueError as e:
        r.problem(loc, f"{e} (the key kept beside the config; set key_file to use another)", node)


def check_sticky_key_file(path: str) -> None:
    """ValueError when `path` exists but holds no usable sticky key (a missing file is
    fine: it is created with a new random key)."""
    from balancer import sticky

    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror}") from None
    sticky.keys_from_bytes(data, path)
