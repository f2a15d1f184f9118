"""Scalar readers shared by many keys: durations, addresses, names, numbers, choices.

Each converter takes a parsed YAML scalar and returns a schema value, or raises
ValueError(message); the reader attaches the location and line.
"""

from __future__ import annotations

import datetime
import difflib
import ipaddress
import math
import re
from collections.abc import Callable, Iterable

from balancer.config.schema import Address

_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
# "ms" is listed before "m" so that "250ms" is not read as 250 minutes followed by junk
_DURATION_PART = r"(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)(?:ms|s|m|h|d)"
_DURATION_RE = re.compile(rf"(?:{_DURATION_PART})+")
_DURATION_PART_RE = re.compile(r"([0-9]+(?:\.[0-9]+)?|\.[0-9]+)(ms|s|m|h|d)")
_BARE_NUMBER_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_HOST_LABEL_RE = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
_DURATION_HINT = "use a number with a unit: ms, s, m, h or d (e.g. '250ms', '2s', '1m', '1h30m')"
NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


class Collection:
    """Stands in for a mapping or list where a scalar was expected, so converters can name it."""

    def __init__(self, kind: str) -> None:
        self.kind = kind


def kind(value: object) -> str:
    """How a parsed YAML value reads in a message: 'a string', 'a list', ..."""
    if isinstance(value, Collection):
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


def suggest(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


def seconds(value: float) -> str:
    """A duration as a message shows it: '500ms', '2s'."""
    return f"{value * 1000:g}ms" if value < 1 else f"{value:g}s"


# -- durations and addresses ---------------------------------------------------------------


def parse_duration(value: object) -> float:
    """Seconds from "250ms", "2s", "1m", "1h", "7d", "1.5s" or "1h30m"; ValueError otherwise.

    A bare number is refused, except 0, because "timeout: 5" is ambiguous between seconds and
    milliseconds and guessing wrong is a thousandfold error.
    """
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a duration, got {kind(value)}: {_DURATION_HINT}")
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
    total = sum(float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART_RE.findall(text))
    if not math.isfinite(total):
        raise ValueError(f"duration {value!r} is too large")
    return total


def is_host_name(host: str) -> bool:
    """Whether `host` is a syntactically valid DNS name (a trailing dot allowed)."""
    name = host[:-1] if host.endswith(".") else host
    return 0 < len(name) <= 253 and all(
        _HOST_LABEL_RE.fullmatch(label) for label in name.split(".")
    )


def check_host(host: str) -> None:
    if not host:
        raise ValueError("the host is missing (use 0.0.0.0 or [::] for every interface)")
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", host):
        raise ValueError(f"{host!r} is not a valid IPv4 address")
    if not is_host_name(host):
        raise ValueError(f"{host!r} is not a valid IP address or host name")


def parse_address(value: object, *, allow_port_zero: bool = False) -> Address:
    """An Address from "host:port" or "[v6addr]:port"; ValueError otherwise.

    Port 0 ("any free port") makes sense only for a socket we bind, never for one we connect
    to, so callers parsing bind addresses opt in with `allow_port_zero`.
    """
    if not isinstance(value, str):
        raise ValueError(f'expected "host:port" (a string), got {kind(value)}')
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
        check_host(host)
    if not _PORT_RE.fullmatch(port_text):
        raise ValueError(f"invalid port {port_text!r} in {value!r}: expected a number 1..65535")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"port {port} is out of range {low}..65535")
    return Address(host, port)


def bind_address(value: object) -> Address:
    return parse_address(value, allow_port_zero=True)


def address(value: object) -> Address:
    return parse_address(value)


def ip_address(value: object) -> Address:
    """A "host:port" whose host is an IP address (a host name would need a lookup)."""
    result = parse_address(value)
    try:
        ipaddress.ip_address(result.host)
    except ValueError:
        raise ValueError(f"expected an IP address, not a host name: {value!r}") from None
    return result


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- strings, names, numbers, choices --------------------------------------------------------


def string(value: object) -> str:
    if isinstance(value, str):
        if not value.strip():
            raise ValueError("must not be empty")
        return value
    hint = " (put it in quotes)" if isinstance(value, int | float) else ""
    raise ValueError(f"expected a string, got {kind(value)}{hint}")


def name(value: object) -> str:
    text = string(value)
    # names end up in admin URLs (/pools/NAME/backends/NAME) and metric labels
    if not NAME_RE.fullmatch(text):
        raise ValueError(f"invalid name {text!r}: use letters, digits, '_', '-' and '.'")
    return text


def integer(low: int, high: int | None = None) -> Callable[[object], int]:
    span = f" >= {low}" if high is None else f" {low}..{high}"

    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected an integer{span}, got {kind(value)}")
        if value < low or (high is not None and value > high):
            raise ValueError(f"must be{span}, got {value}")
        return value

    return convert


def number_at_least_zero(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number >= 0, got {kind(value)}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"must be a finite number >= 0, got {value}")
    return float(value)


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {kind(value)}")
    return value


def choice(*choices: str) -> Callable[[object], str]:
    listed = " | ".join(choices)

    def convert(value: object) -> str:
        if not isinstance(value, str):
            raise ValueError(f"expected one of {listed}, got {kind(value)}")
        if value not in choices:
            raise ValueError(f"must be one of {listed}, got {value!r}{suggest(value, choices)}")
        return value

    return convert


def duration(*, positive: bool) -> Callable[[object], float]:
    def convert(value: object) -> float:
        result = parse_duration(value)
        if positive and result <= 0:
            raise ValueError("must be greater than 0")
        return result

    return convert


def route_host(value: object) -> str:
    """A Host to match or send: 'example.com', or '*.example.com' for any subdomain."""
    text = string(value)
    bare = text[2:] if text.startswith("*.") else text
    if not bare or any(c.isspace() or c in "/*" for c in bare):
        raise ValueError(f"invalid host {text!r}: expected a host name such as 'example.com'")
    return text


def path_prefix(value: object) -> str:
    text = string(value)
    if not text.startswith("/"):
        raise ValueError(f"must start with '/', got {text!r}")
    return text
