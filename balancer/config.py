"""Configuration: the schema as frozen dataclasses, load() from YAML, and located errors."""

from __future__ import annotations

import dataclasses
import datetime
import difflib
import ipaddress
import math
import os
import re
import ssl
import string
import urllib.parse
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import yaml

# ---------------------------------------------------------------------------------------------
# The schema. Every duration is float seconds, every size an int of bytes, after parsing.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Address:
    host: str  # "127.0.0.1", "0.0.0.0", "::1" (no brackets), or a hostname
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Route:
    pool: str
    host: str | None = None  # exact host, compared case-insensitively, port ignored;
    # "*.example.com" matches any subdomain
    path_prefix: str | None = None


@dataclass(frozen=True)
class TlsCertificate:
    cert: str
    key: str


@dataclass(frozen=True)
class TlsConfig:
    certificates: tuple[TlsCertificate, ...]
    min_version: str = "1.2"  # "1.2" | "1.3"


@dataclass(frozen=True)
class ListenerConfig:
    name: str
    bind: Address
    mode: str = "http"  # "http" | "tcp"
    routes: tuple[Route, ...] = ()  # http mode
    pool: str | None = None  # tcp mode
    tls: TlsConfig | None = None
    redirect_https: str | None = None  # "https://{host}:8443": answer 301 to this + path


@dataclass(frozen=True)
class BackendConfig:
    name: str
    address: Address
    weight: int = 1
    max_connections: int = 0  # 0 = no cap


@dataclass(frozen=True)
class StickyConfig:
    cookie: str = "LBSTICKY"
    ttl: float = 3600.0
    key_file: str | None = None  # resolved to an absolute path


@dataclass(frozen=True)
class HealthCheckConfig:
    type: str = "http"  # "http" | "tcp"
    path: str = "/healthz"
    host: str | None = None  # Host header of the check; default the backend address
    interval: float = 1.0
    timeout: float = 0.5
    rise: int = 2
    fall: int = 2
    expect_status: tuple[int, int] = (200, 399)  # inclusive range; YAML "200-399" or 200


@dataclass(frozen=True)
class PassiveHealthConfig:
    """Outlier detection on live traffic."""

    consecutive_failures: int = 5  # 0 disables passive ejection
    ejection_time: float = 10.0  # first ejection; doubles on each repeat
    max_ejection_time: float = 300.0
    max_ejected_percent: int = 50  # never eject more than this share of a pool


@dataclass(frozen=True)
class QueueConfig:
    """Requests waiting when every backend is at max_connections."""

    size: int = 100  # 0 = no queue: 503 at once
    timeout: float = 5.0


@dataclass(frozen=True)
class PoolConfig:
    name: str
    backends: tuple[BackendConfig, ...]
    strategy: str = "round_robin"
    hash_key: str | None = None  # consistent_hash: header:NAME | cookie:NAME | path | client_ip
    sticky: StickyConfig | None = None
    health_check: HealthCheckConfig | None = None  # None: no active checks
    passive_health: PassiveHealthConfig = field(default_factory=PassiveHealthConfig)
    slow_start: float = 0.0  # seconds over which a returning backend's share ramps up
    panic_threshold: int = 0  # percent; 0 = off
    retries: int = 2  # extra backends tried after the first, for a retryable failure
    queue: QueueConfig = field(default_factory=QueueConfig)


@dataclass(frozen=True)
class AdminConfig:
    bind: Address = Address("127.0.0.1", 9000)
    token: str | None = None  # bearer token; required when bind is not loopback
    token_file: str | None = None  # alternative to token: a file holding it
    metrics: bool = True  # count requests for /metrics (off only to measure what counting costs)


@dataclass(frozen=True)
class LimitsConfig:
    max_connections: int = 10000
    max_connections_per_ip: int = 0
    max_header_bytes: int = 65536
    max_headers: int = 100
    max_body_bytes: int = 0
    rate_per_ip: float = 0.0


@dataclass(frozen=True)
class TimeoutsConfig:
    connect: float = 2.0
    backend: float = 30.0
    client_header: float = 10.0
    client_idle: float = 60.0
    drain: float = 30.0
    upstream_idle: float = 4.0  # idle pooled upstream keep-alive connections closed after this
    tcp_idle: float = 3600.0  # a mode: tcp session with no byte either way is closed after this


@dataclass(frozen=True)
class HaConfig:
    node_id: str
    interface: str
    virtual_ip: str  # "198.18.0.100/24"
    auth_key_file: str  # resolved to an absolute path
    peers: tuple[Address, ...]
    priority: int = 100  # 1..254
    bind: Address = Address("0.0.0.0", 5405)
    advert_interval: float = 1.0
    dead_after: float = 3.0  # default: 3 x advert_interval when not given
    preempt: bool = True
    notify: str | None = None  # command run with the new role as its last argument


@dataclass(frozen=True)
class AccessLogConfig:
    format: str = "plain"  # "plain" | "json" | "off"
    path: str | None = None  # None: stderr


@dataclass(frozen=True)
class Config:
    listeners: tuple[ListenerConfig, ...]
    pools: dict[str, PoolConfig]
    admin: AdminConfig = field(default_factory=AdminConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    ha: HaConfig | None = None
    access_log: AccessLogConfig = field(default_factory=AccessLogConfig)
    workers: int = 1  # processes serving the listeners (the owner plus workers - 1)
    source: str | None = None  # path of the file this came from, for messages and reload
    # the exact bytes `source` held when this was parsed: an owner hands these to its worker
    # processes, so every process runs the config the owner validated even if the file
    # changes meanwhile
    text: bytes | None = field(default=None, repr=False, compare=False)


# ---------------------------------------------------------------------------------------------
# Located errors.
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a config file, located by YAML path and line."""

    location: str  # "pools.web.backends[1].address"; "" for the whole file
    message: str
    line: int | None = None  # 1-based
    source: str | None = None  # file name, when known

    def __str__(self) -> str:
        parts = [str(p) for p in (self.source, self.line) if p not in (None, "")]
        head = ":".join(parts)
        return ": ".join(p for p in (head, self.location, self.message) if p)


class ConfigError(Exception):
    """Every problem found in a config, all at once, so one `balancer check` shows them all."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        super().__init__(str(self))

    def __str__(self) -> str:
        return "\n".join(str(p) for p in self.problems)


# ---------------------------------------------------------------------------------------------
# Scalar syntaxes shared by many keys.
# ---------------------------------------------------------------------------------------------

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# "ms" is listed before "m" so that "250ms" is not read as 250 minutes followed by junk
_DURATION_PART = r"(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)(?:ms|s|m|h|d)"
_DURATION_RE = re.compile(rf"(?:{_DURATION_PART})+")
_DURATION_PART_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?|\.[0-9]+)(ms|s|m|h|d)")
_BARE_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_DURATION_HINT = "use a number with a unit: ms, s, m, h or d (e.g. '250ms', '2s', '1m', '1h30m')"


def _kind(value: object) -> str:
    """How a parsed YAML value reads in a message: 'a string', 'a list', ..."""
    if isinstance(value, _Collection):
        return value.kind
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, bytes):
        return "binary data"
    if isinstance(value, datetime.date):
        return "a date"
    if isinstance(value, list | tuple | set):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def parse_duration(value: object) -> float:
    """Seconds from "250ms", "2s", "1m", "1h", "7d", "1.5s" or "1h30m"; ValueError otherwise.

    A bare number is refused, except 0, because "timeout: 5" is ambiguous between seconds and
    milliseconds and guessing wrong is a thousandfold error.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a duration, got {_kind(value)}: {_DURATION_HINT}")
    if isinstance(value, int | float):
        if value == 0:
            return 0.0
        if not math.isfinite(value):
            raise ValueError(f"expected a duration, got {value}: {_DURATION_HINT}")
        raise ValueError(
            f"a unit is required: write '{value}s' for seconds or '{value}ms' for milliseconds"
        )
    text = value.strip()
    if _BARE_NUMBER_RE.fullmatch(text):
        if float(text) == 0:
            return 0.0
        raise ValueError(
            f"a unit is required: write '{text}s' for seconds or '{text}ms' for milliseconds"
        )
    if text.startswith("-"):
        raise ValueError(f"a duration cannot be negative, got {value!r}")
    if not _DURATION_RE.fullmatch(text):
        raise ValueError(f"invalid duration {value!r}: {_DURATION_HINT}")
    seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART_RE.findall(text))
    if not math.isfinite(seconds):
        raise ValueError(f"duration {value!r} is too large")
    return seconds


def _check_host(host: str) -> None:
    if not host:
        raise ValueError("the host is missing (use 0.0.0.0 or [::] for every interface)")
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", host):
        raise ValueError(f"{host!r} is not a valid IPv4 address")
    name = host[:-1] if host.endswith(".") else host
    if len(name) > 253 or not all(_HOST_LABEL_RE.fullmatch(label) for label in name.split(".")):
        raise ValueError(f"{host!r} is not a valid IP address or host name")


def parse_address(value: object, *, allow_port_zero: bool = False) -> Address:
    """An Address from "host:port" or "[v6addr]:port"; ValueError otherwise.

    Port 0 ("any free port") makes sense only for a socket we bind, never for one we connect
    to, so callers parsing bind addresses opt in with `allow_port_zero`.
    """
    if not isinstance(value, str):
        raise ValueError(f'expected "host:port" (a string), got {_kind(value)}')
    text = value.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(
                f'invalid address {value!r}: expected "[IPv6]:port", e.g. "[::1]:8080"'
            )
        host, port_text = text[1:end], text[end + 2 :]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} inside brackets is not an IPv6 address") from None
        if ip.version != 6:
            raise ValueError(f"brackets are only for IPv6 addresses: write {host}:{port_text}")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f'missing port in {value!r}: expected "host:port", e.g. "{text}:8080"')
        if ":" in host:
            raise ValueError(f'an IPv6 address needs brackets: "[{host}]:{port_text}"')
        _check_host(host)
    if not _PORT_RE.fullmatch(port_text):
        raise ValueError(f"invalid port {port_text!r} in {value!r}: expected a number 1..65535")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port {port} is out of range {low}..65535")
    return Address(host, port)


# ---------------------------------------------------------------------------------------------
# The loader: walks the composed YAML nodes (not the constructed dicts) so that every problem
# carries a line, duplicate keys are seen, and one pass collects everything wrong.
# ---------------------------------------------------------------------------------------------

_MERGE_TAG = "tag:yaml.org,2002:merge"
_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
# RFC 7230 tchar; RFC 6265 cookie names are the same token set
_TOKEN_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_EXPECT_STATUS_RE = re.compile(r"\s*([0-9]{3})\s*(?:-\s*([0-9]{3})\s*)?")
_HASH_KEY_FORMS = "header:NAME, cookie:NAME, path or client_ip"

_TOP_KEYS = ("listeners", "pools", "admin", "limits", "timeouts", "ha", "access_log", "workers")
_LISTENER_KEYS = ("name", "bind", "mode", "routes", "pool", "tls", "redirect_https")
_ROUTE_KEYS = ("host", "path_prefix", "pool")
_TLS_KEYS = ("certificates", "min_version")
_CERT_KEYS = ("cert", "key")
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
    "backends",
)
_BACKEND_KEYS = ("name", "address", "weight", "max_connections")
_STICKY_KEYS = ("cookie", "ttl", "key_file")
_HEALTH_KEYS = ("type", "path", "host", "interval", "timeout", "rise", "fall", "expect_status")
_PASSIVE_KEYS = (
    "consecutive_failures",
    "ejection_time",
    "max_ejection_time",
    "max_ejected_percent",
)
_QUEUE_KEYS = ("size", "timeout")
_ADMIN_KEYS = ("bind", "token", "token_file", "metrics")
_LIMITS_KEYS = (
    "max_connections",
    "max_connections_per_ip",
    "max_header_bytes",
    "max_headers",
    "max_body_bytes",
    "rate_per_ip",
)
_TIMEOUTS_KEYS = (
    "connect",
    "backend",
    "client_header",
    "client_idle",
    "drain",
    "upstream_idle",
    "tcp_idle",
)
_HA_KEYS = (
    "node_id",
    "interface",
    "virtual_ip",
    "priority",
    "bind",
    "peers",
    "advert_interval",
    "dead_after",
    "preempt",
    "auth_key_file",
    "notify",
)
_ACCESS_LOG_KEYS = ("format", "path")

_ABSENT: Any = object()  # a key not given (or given as null): the dataclass default applies


class _Collection:
    """Stands in for a mapping or list where a scalar was expected, so converters can name it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind


def _join(loc: str, key: str) -> str:
    return f"{loc}.{key}" if loc else key


def _line(node: yaml.Node | None) -> int | None:
    return node.start_mark.line + 1 if node is not None and node.start_mark else None


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _unreadable(path: str) -> str | None:
    """Why `path` cannot be read as a file, or None when it can."""
    try:
        with open(path, "rb"):
            return None
    except OSError as e:
        return e.strerror or str(e)


# -- converters: a parsed scalar in, a schema value out, ValueError(message) when wrong --------


def _string(value: object) -> str:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("must not be empty")
        return value
    hint = " (put it in quotes)" if isinstance(value, int | float) else ""
    raise ValueError(f"expected a string, got {_kind(value)}{hint}")


def _name(value: object) -> str:
    text = _string(value)
    # names end up in admin URLs (/pools/NAME/backends/NAME) and metric labels
    if not _NAME_RE.fullmatch(text):
        raise ValueError(f"invalid name {text!r}: use letters, digits, '_', '-' and '.'")
    return text


def _int(low: int, high: int | None = None) -> Callable[[object], int]:
    span = f" >= {low}" if high is None else f" {low}..{high}"

    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer{span}, got {_kind(value)}")
        if value < low or (high is not None and value > high):
            raise ValueError(f"must be{span}, got {value}")
        return value

    return convert


def _number_at_least_zero(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number >= 0, got {_kind(value)}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"must be a finite number >= 0, got {value}")
    return float(value)


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {_kind(value)}")
    return value


def _choice(*choices: str) -> Callable[[object], str]:
    listed = " | ".join(choices)

    def convert(value: object) -> str:
        if not isinstance(value, str):
            raise ValueError(f"expected one of {listed}, got {_kind(value)}")
        if value not in choices:
            raise ValueError(f"must be one of {listed}, got {value!r}{_suggest(value, choices)}")
        return value

    return convert


def _duration(*, positive: bool) -> Callable[[object], float]:
    def convert(value: object) -> float:
        seconds = parse_duration(value)
        if positive and seconds <= 0:
            raise ValueError("must be greater than 0")
        return seconds

    return convert


def _bind_address(value: object) -> Address:
    return parse_address(value, allow_port_zero=True)


def _address(value: object) -> Address:
    return parse_address(value)


def _peer_address(value: object) -> Address:
    address = parse_address(value)
    try:
        ipaddress.ip_address(address.host)
    except ValueError:
        # heartbeats are accepted by source address, which a host name never equals
        raise ValueError(f"a peer must be an IP address, not a host name: {value!r}") from None
    return address


MAX_WORKERS = 256  # far beyond any core count a balancer runs on; catches a typo'd 10000


def _workers(value: object) -> int:
    """`workers: N` (1..MAX_WORKERS) or `workers: auto` (one process per CPU)."""
    if value == "auto":
        return max(1, os.cpu_count() or 1)
    if isinstance(value, bool) or not isinstance(value, int):
        shown = f" {value!r}" if isinstance(value, str) else ""
        raise ValueError(f"expected an integer >= 1 or 'auto', got {_kind(value)}{shown}")
    if value < 1:
        raise ValueError(f"must be >= 1, got {value}")
    if value > MAX_WORKERS:
        raise ValueError(f"must be at most {MAX_WORKERS}, got {value} (or use 'auto')")
    return value


def _weight(value: object) -> int:
    if value == 0 and not isinstance(value, bool):
        raise ValueError(
            "weight 0 is not allowed: to stop sending traffic to a backend, set its state to"
            " disabled via the admin API (PATCH /pools/POOL/backends/NAME)"
        )
    return _int(1, 1000)(value)


def _route_host(value: object) -> str:
    text = _string(value)
    bare = text[2:] if text.startswith("*.") else text
    if not bare or any(c.isspace() or c in "/*" for c in bare):
        raise ValueError(f"invalid host {text!r}: expected a host name such as 'example.com'")
    return text


def _path_prefix(value: object) -> str:
    text = _string(value)
    if not text.startswith("/"):
        raise ValueError(f"must start with '/', got {text!r}")
    return text


def _redirect_template(value: object) -> str:
    text = _string(value)
    if not text.startswith("https://"):
        raise ValueError(f"must be an https:// URL such as 'https://{{host}}:8443', got {text!r}")
    try:
        fields = [
            (name, spec, conversion)
            for _, name, spec, conversion in string.Formatter().parse(text)
            if name is not None
        ]
    except ValueError as e:
        raise ValueError(f"invalid template {text!r}: {e}") from None
    if any(field != ("host", "", None) for field in fields):
        raise ValueError(f"the only placeholder allowed is {{host}}, got {text!r}")
    if not urllib.parse.urlsplit(text.replace("{host}", "example.com")).netloc:
        raise ValueError(f"{text!r} names no host: write 'https://{{host}}' or a host name")
    return text


def _hash_key(value: object) -> str:
    text = _string(value)
    kind, sep, name = text.partition(":")
    if text in ("path", "client_ip"):
        return text
    if sep and kind in ("header", "cookie") and _TOKEN_RE.fullmatch(name):
        return text
    raise ValueError(f"invalid hash_key {text!r}: expected {_HASH_KEY_FORMS}")


def _cookie_name(value: object) -> str:
    text = _string(value)
    if not _TOKEN_RE.fullmatch(text):
        raise ValueError(
            f"invalid cookie name {text!r}: use letters, digits and !#$%&'*+-.^_`|~ (no spaces,"
            " quotes or separators)"
        )
    return text


def _expect_status(value: object) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        low = high = value
    elif isinstance(value, str) and (m := _EXPECT_STATUS_RE.fullmatch(value)):
        low = int(m.group(1))
        high = int(m.group(2) or m.group(1))
    else:
        raise ValueError(
            f"expected a status such as 200 or a range such as '200-399', got {value!r}"
        )
    if not (100 <= low <= 599 and 100 <= high <= 599):
        raise ValueError(f"status codes are 100..599, got {value!r}")
    if low > high:
        raise ValueError(f"the range {value!r} is empty: write the lower status first")
    return (low, high)


def _min_version(value: object) -> str:
    # unquoted 1.2 in YAML is a float; accept it rather than make the operator quote it
    if isinstance(value, float) and value in (1.2, 1.3):
        return str(value)
    return _choice("1.2", "1.3")(value)


def _log_format(value: object) -> str:
    # YAML 1.1 reads an unquoted `off` as false
    if value is False:
        return "off"
    return _choice("plain", "json", "off")(value)


def _virtual_ip(value: object) -> str:
    text = _string(value)
    try:
        vip = ipaddress.ip_interface(text.strip())
    except ValueError:
        raise ValueError(
            f"expected an address with prefix such as '198.18.0.100/24', got {text!r}"
        ) from None
    if vip.version != 4:
        # the VIP is announced with gratuitous ARP, which IPv6 does not have
        raise ValueError(f"only an IPv4 virtual IP is supported, got {text!r}")
    return str(vip)


def _ha_node_id(value: object) -> str:
    # every heartbeat carries it; a longer one could not be sent (imported here: heartbeat
    # imports this module)
    from balancer.ha.heartbeat import MAX_NODE_ID_BYTES

    text = _name(value)
    if len(text.encode()) > MAX_NODE_ID_BYTES:
        raise ValueError(
            f"a node_id is at most {MAX_NODE_ID_BYTES} bytes, got {len(text.encode())}"
        )
    return text


def _interface(value: object) -> str:
    text = _string(value)
    # IFNAMSIZ is 16 including the terminating NUL
    if len(text) > 15 or any(c.isspace() or c in "/:" for c in text):
        raise ValueError(f"invalid network interface name {text!r}")
    return text


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _overlaps(a: Address, b: Address) -> bool:
    """Whether two TCP bind addresses would collide (a wildcard overlaps every host)."""
    if a.port != b.port or a.port == 0:
        return False
    wildcard = ("0.0.0.0", "::")
    return a.host == b.host or a.host in wildcard or b.host in wildcard


class _Section:
    """A YAML mapping read against a fixed set of keys."""

    def __init__(
        self, parser: _Parser, node: yaml.Node | None, loc: str, keys: Iterable[str]
    ) -> None:
        self.parser = parser
        self.node = node
        self.loc = loc
        self.entries: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        self.values: dict[str, Any] = {}  # converted values that passed, for cross-checks
        self.ok = True
        if node is None or _is_null(node):
            return
        entries = parser.mapping(node, loc, keys)
        if entries is None:
            self.ok = False
        else:
            self.entries = entries

    def at(self, key: str) -> str:
        return _join(self.loc, key)

    def has(self, key: str) -> bool:
        return key in self.entries and not _is_null(self.entries[key][1])

    def value_node(self, key: str) -> yaml.Node | None:
        entry = self.entries.get(key)
        return entry[1] if entry else None

    def line(self, key: str | None = None) -> int | None:
        if key is not None and key in self.entries:
            return _line(self.entries[key][0])
        return _line(self.node)

    def get(self, key: str, convert: Callable[[object], Any], required: str | bool = False) -> Any:
        """The converted value of `key`, or _ABSENT when missing, null or wrong (reported)."""
        if not self.has(key):
            if required:
                message = required if isinstance(required, str) else f"'{key}' is required"
                self.parser.problem(self.at(key), message, self.line(key))
            return _ABSENT
        value = self.parser.scalar(self.entries[key][1], self.at(key), convert)
        if value is not _ABSENT:
            self.values[key] = value
        return value

    def fields(self, **converters: Callable[[object], Any]) -> dict[str, Any]:
        """Keyword arguments for a dataclass: only the keys given, so defaults stay its own."""
        values = {key: self.get(key, convert) for key, convert in converters.items()}
        return {key: value for key, value in values.items() if value is not _ABSENT}


class _Parser:
    def __init__(self, source: str, base_dir: str | None) -> None:
        self.source = source
        self.base_dir = base_dir
        self.problems: list[Problem] = []
        # one constructor turns scalar nodes into Python values with the safe YAML 1.1 rules
        self.constructor = yaml.SafeLoader("")
        self._strategies: list[str] | None = None

    # -- reporting and node access --------------------------------------------------------

    def problem(self, loc: str, message: str, where: yaml.Node | int | None = None) -> None:
        line = where if isinstance(where, int) or where is None else _line(where)
        self.problems.append(Problem(loc, message, line, self.source))

    def checkpoint(self) -> int:
        return len(self.problems)

    def clean_since(self, mark: int) -> bool:
        return len(self.problems) == mark

    def construct(self, node: yaml.Node) -> object:
        try:
            return self.constructor.construct_object(node)
        except Exception:
            # a failed node stays marked "in construction"; clear it so that a reuse through an
            # alias reports the same error again instead of a bogus "recursive node"
            self.constructor.recursive_objects.pop(node, None)
            raise

    def scalar(self, node: yaml.Node, loc: str, convert: Callable[[object], Any]) -> Any:
        if isinstance(node, yaml.MappingNode):
            value: object = _Collection("a mapping")
        elif isinstance(node, yaml.SequenceNode):
            value = _Collection("a list")
        else:
            try:
                value = self.construct(node)
            except Exception as e:
                # broad on purpose: on odd tags and values (`!!int x`, `2001-13-45`) PyYAML
                # raises ValueError, TypeError and others besides its own errors
                self.problem(loc, f"invalid value {node.value!r}: {_reason(e)}", node)
                return _ABSENT
        try:
            return convert(value)
        except ValueError as e:
            self.problem(loc, str(e), node)
            return _ABSENT

    def pairs(
        self, node: yaml.MappingNode, loc: str, seen: set[int] | None = None
    ) -> list[tuple[yaml.Node, yaml.Node]]:
        """The (key, value) nodes of a mapping with YAML merge keys (<<) applied."""
        seen = (seen or set()) | {id(node)}
        explicit: list[tuple[yaml.Node, yaml.Node]] = []
        merged: list[tuple[yaml.Node, yaml.Node]] = []
        for key_node, value_node in node.value:
            if not (isinstance(key_node, yaml.ScalarNode) and key_node.tag == _MERGE_TAG):
                explicit.append((key_node, value_node))
                continue
            sources = (
                value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            )
            for src in sources:
                if not isinstance(src, yaml.MappingNode):
                    self.problem(
                        _join(loc, "<<"), "a merge key needs a mapping or a list of mappings", src
                    )
                elif id(src) in seen:
                    self.problem(_join(loc, "<<"), "a mapping cannot merge itself", src)
                else:
                    merged.extend(self.pairs(src, loc, seen))
        # explicit keys override merged ones, and an earlier merged mapping wins over a later one
        taken = {k.value for k, _ in explicit if isinstance(k, yaml.ScalarNode)}
        result = list(explicit)
        for key_node, value_node in merged:
            key = key_node.value if isinstance(key_node, yaml.ScalarNode) else None
            if key not in taken:
                taken.add(key)
                result.append((key_node, value_node))
        return result

    def entries(
        self, node: yaml.Node, loc: str, what: str
    ) -> list[tuple[str, yaml.Node, yaml.Node]] | None:
        """(key, key node, value node) of a mapping with string keys; duplicates reported."""
        if not isinstance(node, yaml.MappingNode):
            self.problem(loc, f"expected {what}, got {self.kind(node)}", node)
            return None
        found: list[tuple[str, yaml.Node, yaml.Node]] = []
        first_seen: dict[str, yaml.Node] = {}
        for key_node, value_node in self.pairs(node, loc):
            key = self.scalar(key_node, loc, self._key)
            if key is _ABSENT:
                continue
            if key in first_seen:
                self.problem(
                    _join(loc, key),
                    f"duplicate key '{key}' (first at line {_line(first_seen[key])});"
                    " YAML would silently keep only the last one",
                    key_node,
                )
                continue
            first_seen[key] = key_node
            found.append((key, key_node, value_node))
        return found

    @staticmethod
    def _key(value: object) -> str:
        if not isinstance(value, str):
            raise ValueError(f"a key must be a string, got {_kind(value)}")
        return value

    def mapping(
        self, node: yaml.Node, loc: str, keys: Iterable[str]
    ) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        known = tuple(keys)
        found = self.entries(node, loc, "a mapping")
        if found is None:
            return None
        result: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key, key_node, value_node in found:
            if key not in known:
                self.problem(
                    _join(loc, key), f"unknown key '{key}'{_suggest(key, known)}", key_node
                )
            else:
                result[key] = (key_node, value_node)
        return result

    def sequence(self, node: yaml.Node | None, loc: str, what: str) -> list[yaml.Node] | None:
        if not isinstance(node, yaml.SequenceNode):
            self.problem(loc, f"expected a list of {what}, got {self.kind(node)}", node)
            return None
        return list(node.value)

    def kind(self, node: yaml.Node | None) -> str:
        if node is None:
            return "nothing"
        if isinstance(node, yaml.MappingNode):
            return "a mapping"
        if isinstance(node, yaml.SequenceNode):
            return "a list"
        try:
            return _kind(self.construct(node))
        except Exception:  # broad: see scalar()
            return "an invalid value"

    def path(self, value: object) -> str:
        """A file path, made absolute against the config file's directory."""
        text = os.path.expanduser(_string(value))
        if not os.path.isabs(text):
            text = os.path.join(self.base_dir or os.getcwd(), text)
        return os.path.normpath(text)

    def readable_path(self, value: object) -> str:
        path = self.path(value)
        reason = _unreadable(path)
        if reason is not None:
            raise ValueError(f"cannot read {path}: {reason}")
        return path

    def ha_key_file(self, value: object) -> str:
        """The HA auth_key_file: readable, and holding a key (`balancer run` refuses an empty
        one; a short one it accepts and logs as weak)."""
        path = self.readable_path(value)
        try:
            with open(path, "rb") as f:
                size = len(f.read().strip())
        except OSError as e:
            raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
        if not size:
            raise ValueError(
                f"{path} holds no key (head -c 32 /dev/urandom | base64 > FILE makes one)"
            )
        return path

    def path_in_existing_dir(self, value: object) -> str:
        path = self.path(value)
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):
            raise ValueError(f"directory {directory} does not exist")
        return path

    def sticky_key_file(self, value: object) -> str:
        """A sticky key_file: its directory must exist (the file is created there when it
        does not); an existing file must hold a key, or `balancer run` could not start."""
        path = self.path_in_existing_dir(value)
        check_sticky_key_file(path)
        return path

    def strategies(self) -> list[str]:
        if self._strategies is None:
            # imported here, not at the top, so that a strategy module may import this one
            from balancer.strategies import registered_names

            self._strategies = registered_names()
        return self._strategies

    # -- the document -----------------------------------------------------------------------

    def document(self, root: yaml.Node | None) -> Config | None:
        if root is None or _is_null(root):
            self.problem("", "the file is empty: it needs at least 'listeners' and 'pools'")
            return None
        if not isinstance(root, yaml.MappingNode):
            self.problem(
                "",
                f"the top level must be a mapping (listeners:, pools:, ...), got {self.kind(root)}",
                root,
            )
            return None
        mark = self.checkpoint()
        top = _Section(self, root, "", _TOP_KEYS)
        pools, pool_names = self.pools(top)
        admin = self.admin(top.value_node("admin"))
        listeners = self.listeners(top, pool_names, admin)
        limits_section = _Section(self, top.value_node("limits"), "limits", _LIMITS_KEYS)
        limits = limits_section.fields(
            max_connections=_int(0),
            max_connections_per_ip=_int(0),
            max_header_bytes=_int(0),
            max_headers=_int(0),
            max_body_bytes=_int(0),
            rate_per_ip=_number_at_least_zero,
        )
        timeouts_section = _Section(self, top.value_node("timeouts"), "timeouts", _TIMEOUTS_KEYS)
        timeouts = timeouts_section.fields(
            **{key: _duration(positive=True) for key in _TIMEOUTS_KEYS}
        )
        ha = self.ha(top.value_node("ha")) if top.has("ha") else None
        log_section = _Section(self, top.value_node("access_log"), "access_log", _ACCESS_LOG_KEYS)
        access_log = log_section.fields(format=_log_format, path=self.path_in_existing_dir)
        workers = top.get("workers", _workers)
        if isinstance(workers, int) and workers > 1 and listeners is not None:
            for i, lc in enumerate(listeners):
                if lc.bind.port == 0:
                    # each process would bind its own random port, and clients would reach
                    # only one of them
                    self.problem(
                        f"listeners[{i}].bind",
                        f"port 0 (any free port) cannot be shared by {workers} worker"
                        " processes: give a fixed port, or use workers: 1",
                        _mapping_get(_sequence_item(top.value_node("listeners"), i), "bind"),
                    )
        if not self.clean_since(mark) or pools is None or listeners is None or admin is None:
            return None
        extra: dict[str, Any] = {} if workers is _ABSENT else {"workers": workers}
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

    # -- listeners --------------------------------------------------------------------------

    def listeners(
        self, top: _Section, pools: set[str] | None, admin: AdminConfig | None
    ) -> list[ListenerConfig] | None:
        if not top.has("listeners"):
            self.problem(
                "listeners",
                "at least one listener is required",
                top.line("listeners") if "listeners" in top.entries else None,
            )
            return None
        nodes = self.sequence(top.value_node("listeners"), "listeners", "listeners")
        if nodes is None:
            return None
        if not nodes:
            self.problem(
                "listeners", "at least one listener is required", top.value_node("listeners")
            )
            return None
        result: list[ListenerConfig] = []
        names: dict[str, str] = {}
        binds: list[tuple[Address, str]] = [] if admin is None else [(admin.bind, "admin.bind")]
        for i, node in enumerate(nodes):
            listener, s = self.listener(node, f"listeners[{i}]", pools)
            if listener is not None:
                result.append(listener)
            name = s.values.get("name")
            if name is not None:
                if name in names:
                    self.problem(
                        s.at("name"),
                        f"duplicate listener name '{name}' (also {names[name]})",
                        s.value_node("name"),
                    )
                names.setdefault(name, s.loc)
            bind = s.values.get("bind")
            if bind is not None:
                clash = next((owner for taken, owner in binds if _overlaps(taken, bind)), None)
                if clash is not None:
                    self.problem(
                        s.at("bind"), f"{bind} is already bound by {clash}", s.value_node("bind")
                    )
                binds.append((bind, s.at("bind")))
        return result if len(result) == len(nodes) else None

    def listener(
        self, node: yaml.Node, loc: str, pools: set[str] | None
    ) -> tuple[ListenerConfig | None, _Section]:
        mark = self.checkpoint()
        s = _Section(self, node, loc, _LISTENER_KEYS)
        if not s.ok:
            return None, s
        name = s.get("name", _name, required=True)
        bind = s.get("bind", _bind_address, required=True)
        mode = s.get("mode", _choice("http", "tcp"))
        kwargs: dict[str, Any] = {}
        if mode == "tcp":
            for key, why in (
                (
                    "routes",
                    "a tcp listener forwards whole connections to its pool; it has no routes",
                ),
                ("tls", "a tcp listener does not terminate TLS (the backends do); remove tls"),
                ("redirect_https", "redirect_https is for http listeners"),
            ):
                if key in s.entries:
                    self.problem(s.at(key), why, s.line(key))
            pool = s.get("pool", _string, required="a tcp listener needs 'pool'")
            if pool is not _ABSENT:
                self.check_pool_ref(pool, s.at("pool"), s.value_node("pool"), pools)
                kwargs["pool"] = pool
        # with a wrong mode (reported already) neither set of rules applies
        elif mode == "http" or not s.has("mode"):
            if "pool" in s.entries:
                self.problem(
                    s.at("pool"),
                    "'pool' is for tcp listeners; an http listener uses routes: [{pool: NAME}]",
                    s.line("pool"),
                )
            has_routes, has_redirect = "routes" in s.entries, "redirect_https" in s.entries
            if has_routes and has_redirect:
                self.problem(
                    s.at("redirect_https"),
                    "give either routes or redirect_https, not both: a redirecting listener"
                    " forwards nothing",
                    s.line("redirect_https"),
                )
            elif not has_routes and not has_redirect:
                self.problem(loc, "an http listener needs routes (or redirect_https)", node)
            if has_routes:
                routes = self.routes(s.value_node("routes"), s.at("routes"), pools)
                if routes is not None:
                    kwargs["routes"] = routes
            if has_redirect:
                kwargs["redirect_https"] = s.get("redirect_https", _redirect_template)
            if "tls" in s.entries:
                kwargs["tls"] = self.tls(s.value_node("tls"), s.at("tls"))
        if not self.clean_since(mark):
            return None, s
        if mode is not _ABSENT:
            kwargs["mode"] = mode
        return ListenerConfig(name=name, bind=bind, **kwargs), s

    def routes(
        self, node: yaml.Node | None, loc: str, pools: set[str] | None
    ) -> tuple[Route, ...] | None:
        nodes = self.sequence(node, loc, "routes")
        if nodes is None:
            return None
        if not nodes:
            self.problem(
                loc, "routes must not be empty (a route {pool: NAME} matches every request)", node
            )
            return None
        mark = self.checkpoint()
        routes: list[Route] = []
        for i, route_node in enumerate(nodes):
            s = _Section(self, route_node, f"{loc}[{i}]", _ROUTE_KEYS)
            if not s.ok:
                continue
            # any string: a badly named pool is reported once, at the pool itself
            pool = s.get("pool", _string, required=True)
            if pool is not _ABSENT:
                self.check_pool_ref(pool, s.at("pool"), s.value_node("pool"), pools)
            fields = s.fields(host=_route_host, path_prefix=_path_prefix)
            if pool is not _ABSENT:
                routes.append(Route(pool=pool, **fields))
        return tuple(routes) if self.clean_since(mark) else None

    def check_pool_ref(
        self, pool: str, loc: str, node: yaml.Node | None, pools: set[str] | None
    ) -> None:
        # when the pools section itself is broken, every reference would be noise
        if pools is not None and pool not in pools:
            known = ", ".join(sorted(pools)) or "none"
            self.problem(
                loc, f"pool '{pool}' is not defined{_suggest(pool, pools)} (pools: {known})", node
            )

    def tls(self, node: yaml.Node | None, loc: str) -> TlsConfig | None:
        mark = self.checkpoint()
        s = _Section(self, node, loc, _TLS_KEYS)
        if not s.ok:
            return None
        if not s.has("certificates"):
            self.problem(
                s.at("certificates"), "at least one certificate is required", s.line("certificates")
            )
            return None
        nodes = self.sequence(s.value_node("certificates"), s.at("certificates"), "{cert, key}")
        if nodes is not None and not nodes:
            self.problem(
                s.at("certificates"),
                "at least one certificate is required",
                s.value_node("certificates"),
            )
        certificates: list[TlsCertificate] = []
        for i, cert_node in enumerate(nodes or ()):
            cs = _Section(self, cert_node, f"{s.at('certificates')}[{i}]", _CERT_KEYS)
            if not cs.ok:
                continue
            cert = cs.get("cert", self.readable_path, required=True)
            key = cs.get("key", self.readable_path, required=True)
            if cert is _ABSENT or key is _ABSENT:
                continue
            reason = _load_error(cert, key)
            if reason is not None:
                self.problem(cs.loc, reason, cert_node)
            certificates.append(TlsCertificate(cert=cert, key=key))
        min_version = s.fields(min_version=_min_version)
        if not self.clean_since(mark):
            return None
        return TlsConfig(certificates=tuple(certificates), **min_version)

    # -- pools ------------------------------------------------------------------------------

    def pools(self, top: _Section) -> tuple[dict[str, PoolConfig] | None, set[str] | None]:
        """The pools by name (None when any is wrong), and the names defined (None when the
        section is unusable, so that references to pools are not checked against nothing)."""
        if not top.has("pools"):
            self.problem(
                "pools",
                "at least one pool is required",
                top.line("pools") if "pools" in top.entries else None,
            )
            return None, None
        found = self.entries(top.value_node("pools"), "pools", "a mapping of pool names to pools")
        if found is None:
            return None, None
        if not found:
            self.problem("pools", "at least one pool is required", top.value_node("pools"))
            return None, None
        result: dict[str, PoolConfig] = {}
        mark = self.checkpoint()
        for name, key_node, value_node in found:
            loc = _join("pools", name)
            if not _NAME_RE.fullmatch(name):
                self.problem(
                    loc,
                    f"invalid pool name {name!r}: use letters, digits, '_', '-' and '.'",
                    key_node,
                )
            pool = self.pool(name, value_node, loc)
            if pool is not None:
                result[name] = pool
        # a pool with problems still counts as defined, so that references to it are not flagged
        names = {name for name, _, _ in found}
        return (result if self.clean_since(mark) else None), names

    def pool(self, name: str, node: yaml.Node, loc: str) -> PoolConfig | None:
        mark = self.checkpoint()
        s = _Section(self, node, loc, _POOL_KEYS)
        if not s.ok:
            return None
        strategy = s.get("strategy", self.strategy)
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
            self.problem(
                s.at("hash_key"),
                f"strategy consistent_hash needs hash_key: {_HASH_KEY_FORMS}",
                strategy_node,
            )
        elif written != "consistent_hash" and s.has("hash_key"):
            self.problem(
                s.at("hash_key"),
                f"hash_key only applies to strategy consistent_hash, not {written}",
                s.value_node("hash_key"),
            )
        kwargs = s.fields(
            slow_start=_duration(positive=False),
            panic_threshold=_int(0, 100),
            retries=_int(0, 10),
        )
        if strategy is not _ABSENT:
            kwargs["strategy"] = strategy
        if hash_key is not _ABSENT:
            kwargs["hash_key"] = hash_key
        if "sticky" in s.entries:
            kwargs["sticky"] = self.sticky(s.value_node("sticky"), s.at("sticky"))
        if s.has("health_check"):
            kwargs["health_check"] = self.health_check(
                s.value_node("health_check"), s.at("health_check")
            )
        if s.has("passive_health"):
            kwargs["passive_health"] = self.passive_health(
                s.value_node("passive_health"), s.at("passive_health")
            )
        if s.has("queue"):
            qs = _Section(self, s.value_node("queue"), s.at("queue"), _QUEUE_KEYS)
            kwargs["queue"] = QueueConfig(
                **qs.fields(size=_int(0), timeout=_duration(positive=True))
            )
        backends = self.backends(s)
        if not self.clean_since(mark) or backends is None:
            return None
        return PoolConfig(name=name, backends=backends, **kwargs)

    def strategy(self, value: object) -> str:
        valid = self.strategies()
        if not isinstance(value, str):
            raise ValueError(f"expected a strategy name ({', '.join(valid)}), got {_kind(value)}")
        if value not in valid:
            raise ValueError(
                f"unknown strategy '{value}'{_suggest(value, valid)}; valid: {', '.join(valid)}"
            )
        return value

    def backends(self, s: _Section) -> tuple[BackendConfig, ...] | None:
        loc = s.at("backends")
        if not s.has("backends"):
            self.problem(loc, "a pool needs at least one backend", s.line("backends"))
            return None
        nodes = self.sequence(s.value_node("backends"), loc, "backends")
        if nodes is None:
            return None
        if not nodes:
            self.problem(loc, "a pool needs at least one backend", s.value_node("backends"))
            return None
        mark = self.checkpoint()
        result: list[BackendConfig] = []
        names: dict[str, str] = {}
        addresses: dict[Address, str] = {}
        for i, node in enumerate(nodes):
            bs = _Section(self, node, f"{loc}[{i}]", _BACKEND_KEYS)
            if not bs.ok:
                continue
            name = bs.get("name", _name, required=True)
            address = bs.get("address", _address, required=True)
            fields = bs.fields(weight=_weight, max_connections=_int(0))
            if name is not _ABSENT:
                if name in names:
                    self.problem(
                        bs.at("name"),
                        f"duplicate backend name '{name}' in this pool (also {names[name]})",
                        bs.value_node("name"),
                    )
                names.setdefault(name, bs.loc)
            if address is not _ABSENT:
                if address in addresses:
                    self.problem(
                        bs.at("address"),
                        f"duplicate backend address {address} in this pool (also {addresses[address]})",
                        bs.value_node("address"),
                    )
                addresses.setdefault(address, bs.loc)
            if name is not _ABSENT and address is not _ABSENT:
                result.append(BackendConfig(name=name, address=address, **fields))
        return tuple(result) if self.clean_since(mark) else None

    def sticky(self, node: yaml.Node | None, loc: str) -> StickyConfig | None:
        if node is None or _is_null(node):
            return None
        if isinstance(node, yaml.ScalarNode):
            # `sticky: true` is stickiness with every default; `false` turns it off
            enabled = self.scalar(node, loc, _sticky_flag)
            return StickyConfig() if enabled is True else None
        s = _Section(self, node, loc, _STICKY_KEYS)
        fields = s.fields(
            cookie=_cookie_name,
            ttl=_duration(positive=True),
            key_file=self.sticky_key_file,
        )
        if not s.has("key_file"):
            self.default_sticky_key_file(node, loc)
        return StickyConfig(**fields)

    def default_sticky_key_file(self, node: yaml.Node, loc: str) -> None:
        # without key_file the daemon keeps the key in `sticky.key` beside the config file:
        # one that is there already must be usable, or the daemon could not start
        if self.base_dir is None:
            return
        try:
            check_sticky_key_file(os.path.join(self.base_dir, "sticky.key"))
        except ValueError as e:
            self.problem(
                loc, f"{e} (the key kept beside the config; set key_file to use another)", node
            )

    def health_check(self, node: yaml.Node | None, loc: str) -> HealthCheckConfig | None:
        mark = self.checkpoint()
        s = _Section(self, node, loc, _HEALTH_KEYS)
        fields = s.fields(
            type=_choice("http", "tcp"),
            path=_path_prefix,
            host=_route_host,
            interval=_duration(positive=True),
            timeout=_duration(positive=True),
            rise=_int(1),
            fall=_int(1),
            expect_status=_expect_status,
        )
        interval = fields.get("interval", HealthCheckConfig.interval)
        if "timeout" not in fields and not s.has("timeout") and "interval" in fields:
            # an unset timeout follows a short interval down (as HAProxy's `timeout check`
            # defaults to `inter`): `interval: 200ms` alone is a valid fast check
            fields["timeout"] = min(HealthCheckConfig.timeout, interval)
        timeout = fields.get("timeout", HealthCheckConfig.timeout)
        # compared only when both are known: a wrong one is reported already
        both_known = all(k in fields or not s.has(k) for k in ("interval", "timeout"))
        if both_known and timeout > interval:
            self.problem(
                s.at("timeout"),
                f"timeout ({_seconds(timeout)}) must not exceed interval ({_seconds(interval)}):"
                " a check would still be running when the next one starts",
                s.value_node("timeout") or s.value_node("interval") or node,
            )
        if not self.clean_since(mark):
            return None
        return HealthCheckConfig(**fields)

    def passive_health(self, node: yaml.Node | None, loc: str) -> PassiveHealthConfig | None:
        mark = self.checkpoint()
        s = _Section(self, node, loc, _PASSIVE_KEYS)
        fields = s.fields(
            consecutive_failures=_int(0),
            ejection_time=_duration(positive=True),
            max_ejection_time=_duration(positive=True),
            max_ejected_percent=_int(0, 100),
        )
        ejection = fields.get("ejection_time", PassiveHealthConfig.ejection_time)
        cap = fields.get("max_ejection_time", PassiveHealthConfig.max_ejection_time)
        if self.clean_since(mark) and cap < ejection:
            self.problem(
                s.at("max_ejection_time"),
                f"max_ejection_time ({_seconds(cap)}) must be at least ejection_time"
                f" ({_seconds(ejection)})",
                s.value_node("max_ejection_time") or s.value_node("ejection_time") or node,
            )
        if not self.clean_since(mark):
            return None
        return PassiveHealthConfig(**fields)

    # -- admin, ha --------------------------------------------------------------------------

    def admin(self, node: yaml.Node | None) -> AdminConfig | None:
        mark = self.checkpoint()
        s = _Section(self, node, "admin", _ADMIN_KEYS)
        fields = s.fields(
            bind=_bind_address, token=_string, token_file=self.readable_path, metrics=_bool
        )
        if s.has("token") and s.has("token_file"):
            self.problem(
                s.at("token_file"), "give token or token_file, not both", s.value_node("token_file")
            )
        bind = fields.get("bind", AdminConfig.bind)
        if (
            "bind" in fields
            and not _is_loopback(bind.host)
            and not s.has("token")
            and not s.has("token_file")
        ):
            self.problem(
                s.at("bind"),
                f"admin on a non-loopback address ({bind}) needs token or token_file: the admin"
                " API can drain and remove backends, so only holders of the token may reach it"
                " (least privilege)",
                s.value_node("bind"),
            )
        if not self.clean_since(mark):
            return None
        return AdminConfig(**fields)

    def ha(self, node: yaml.Node | None) -> HaConfig | None:
        mark = self.checkpoint()
        s = _Section(self, node, "ha", _HA_KEYS)
        if not s.ok:
            return None
        required = {
            "node_id": _ha_node_id,
            "interface": _interface,
            "virtual_ip": _virtual_ip,
            "auth_key_file": self.ha_key_file,
        }
        values = {key: s.get(key, convert, required=True) for key, convert in required.items()}
        peers: list[Address] = []
        if not s.has("peers"):
            self.problem(
                s.at("peers"),
                "'peers' is required: a list of the other node's heartbeat address",
                s.line("peers"),
            )
        else:
            nodes = self.sequence(s.value_node("peers"), s.at("peers"), "addresses")
            if nodes is not None and not nodes:
                self.problem(s.at("peers"), "at least one peer is required", s.value_node("peers"))
            for i, peer in enumerate(nodes or ()):
                address = self.scalar(peer, f"{s.at('peers')}[{i}]", _peer_address)
                if address is not _ABSENT:
                    peers.append(address)
        fields = s.fields(
            priority=_int(1, 254),
            bind=_address,
            advert_interval=_duration(positive=True),
            dead_after=_duration(positive=True),
            preempt=_bool,
            notify=_string,
        )
        advert = fields.get("advert_interval", HaConfig.advert_interval)
        if "dead_after" in fields:
            if fields["dead_after"] <= advert:
                self.problem(
                    s.at("dead_after"),
                    f"dead_after ({_seconds(fields['dead_after'])}) must be longer than"
                    f" advert_interval ({_seconds(advert)}): otherwise a live peer looks dead"
                    " between two heartbeats",
                    s.value_node("dead_after"),
                )
        elif not s.has("dead_after"):
            fields["dead_after"] = 3 * advert
        if not self.clean_since(mark):
            return None
        return HaConfig(peers=tuple(peers), **values, **fields)


def _reason(error: Exception) -> str:
    if isinstance(error, yaml.MarkedYAMLError):
        return error.problem or error.context or type(error).__name__
    return str(error).split("\n")[0] or type(error).__name__


def _sticky_flag(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected a mapping, true or false, got {_kind(value)}")
    return value


def _seconds(value: float) -> str:
    return f"{value * 1000:g}ms" if value < 1 else f"{value:g}s"


def _load_error(cert: str, key: str) -> str | None:
    """Why a certificate and key cannot serve TLS, checked now so `balancer check` sees it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        # the password callback stops OpenSSL from prompting on a terminal for an encrypted key
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as e:
        if e.reason == "KEY_VALUES_MISMATCH":
            return f"the key {key} does not match the certificate {cert}"
        return (
            f"cannot load certificate {cert} with key {key} (not PEM, or the key is encrypted): {e}"
        )
    except (OSError, ValueError) as e:
        return f"cannot load certificate {cert} with key {key}: {e}"
    return None


# ---------------------------------------------------------------------------------------------
# Entry points.
# ---------------------------------------------------------------------------------------------


def _syntax_problem(error: yaml.YAMLError, text: str, source: str) -> Problem:
    if isinstance(error, yaml.reader.ReaderError):
        line = text.count("\n", 0, error.position) + 1
        column = error.position - (text.rfind("\n", 0, error.position) + 1) + 1
        return Problem(
            "",
            f"invalid character {error.character!r} at column {column}: {error.reason}",
            line,
            source,
        )
    if isinstance(error, yaml.MarkedYAMLError):
        mark = error.problem_mark or error.context_mark
        what = error.problem or error.context or "invalid YAML"
        context = f" ({error.context})" if error.context and error.problem else ""
        if mark is not None:
            return Problem(
                "",
                f"YAML syntax error at column {mark.column + 1}: {what}{context}",
                mark.line + 1,
                source,
            )
        return Problem("", f"YAML syntax error: {what}{context}", None, source)
    return Problem("", f"YAML syntax error: {error}", None, source)


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
        raise ConfigError([_syntax_problem(e, text, source)]) from None
    except RecursionError:
        raise ConfigError(
            [Problem("", "the document is nested too deeply", None, source)]
        ) from None
    parser = _Parser(source, base_dir)
    config = parser.document(root)
    if parser.problems or config is None:
        # document order reads best; file-wide problems (no line) first
        problems = sorted(parser.problems, key=lambda p: -1 if p.line is None else p.line)
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
        if not _mapping_has(_mapping_get(_mapping_get(pools_node, name), "health_check"), "type"):
            out[name] = replace(pc, health_check=replace(pc.health_check, type="tcp"))
    return out


def _mapping_get(node: yaml.Node | None, key: str | None) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return v
    return None


def _sequence_item(node: yaml.Node | None, index: int) -> yaml.Node | None:
    if isinstance(node, yaml.SequenceNode) and 0 <= index < len(node.value):
        return node.value[index]
    return None


def _mapping_has(node: yaml.Node | None, key: str) -> bool:
    return _mapping_get(node, key) is not None
