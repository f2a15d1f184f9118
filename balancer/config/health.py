"""A pool's `health_check:` (active checks) and `passive_health:` (outlier detection)."""

from __future__ import annotations

import re

import yaml

from balancer.config import values as v
from balancer.config.reader import Reader, Section
from balancer.config.schema import HealthCheckConfig, PassiveHealthConfig

_HEALTH_KEYS = (
    "type",
    "path",
    "host",
    "interval",
    "timeout",
    "rise",
    "fall",
    "expect_status",
    "service",
)
_PASSIVE_KEYS = (
    "consecutive_failures",
    "ejection_time",
    "max_ejection_time",
    "max_ejected_percent",
)
_EXPECT_STATUS_RE = re.compile(r"\s*([0-9]{3})\s*(?:-\s*([0-9]{3})\s*)?")


def read_health_check(
    r: Reader, node: yaml.Node | None, loc: str, protocol: str | None
) -> HealthCheckConfig | None:
    """The pool's active check; `protocol` is the pool's (None when it is itself wrong)."""
    mark = r.checkpoint()
    s = Section(r, node, loc, _HEALTH_KEYS)
    fields = s.fields(
        type=v.choice("http", "tcp", "grpc"),
        path=v.path_prefix,
        host=v.route_host,
        interval=v.duration(positive=True),
        timeout=v.duration(positive=True),
        rise=v.integer(1),
        fall=v.integer(1),
        expect_status=_expect_status,
        service=_grpc_service,
    )
    _check_grpc(r, s, fields.get("type"), protocol)
    interval = fields.get("interval", HealthCheckConfig.interval)
    if "timeout" not in fields and not s.has("timeout") and "interval" in fields:
        # an unset timeout follows a short interval down (as HAProxy's `timeout check`
        # defaults to `inter`): `interval: 200ms` alone is a valid fast check
        fields["timeout"] = min(HealthCheckConfig.timeout, interval)
    timeout = fields.get("timeout", HealthCheckConfig.timeout)
    # compared only when both are known: a wrong one is reported already
    both_known = all(k in fields or not s.has(k) for k in ("interval", "timeout"))
    if both_known and timeout > interval:
        r.problem(
            s.at("timeout"),
            f"timeout ({v.seconds(timeout)}) must not exceed interval ({v.seconds(interval)}):"
            " a check would still be running when the next one starts",
            s.value_node("timeout") or s.value_node("interval") or node,
        )
    if not r.clean_since(mark):
        return None
    return HealthCheckConfig(**fields)


def read_passive_health(r: Reader, node: yaml.Node | None, loc: str) -> PassiveHealthConfig | None:
    mark = r.checkpoint()
    s = Section(r, node, loc, _PASSIVE_KEYS)
    fields = s.fields(
        consecutive_failures=v.integer(0),
        ejection_time=v.duration(positive=True),
        max_ejection_time=v.duration(positive=True),
        max_ejected_percent=v.integer(0, 100),
    )
    ejection = fields.get("ejection_time", PassiveHealthConfig.ejection_time)
    cap = fields.get("max_ejection_time", PassiveHealthConfig.max_ejection_time)
    if r.clean_since(mark) and cap < ejection:
        r.problem(
            s.at("max_ejection_time"),
            f"max_ejection_time ({v.seconds(cap)}) must be at least ejection_time"
            f" ({v.seconds(ejection)})",
            s.value_node("max_ejection_time") or s.value_node("ejection_time") or node,
        )
    if not r.clean_since(mark):
        return None
    return PassiveHealthConfig(**fields)


def _check_grpc(r: Reader, s: Section, kind: str | None, protocol: str | None) -> None:
    """The keys that belong to one check type, and a grpc check's need for HTTP/2."""
    if kind == "grpc":
        if protocol is not None and protocol != "h2":
            r.problem(
                s.at("type"),
                f"a grpc health check needs protocol: h2 on the pool (gRPC runs over HTTP/2;"
                f" this pool speaks {protocol})",
                s.value_node("type"),
            )
        for key in ("path", "expect_status"):
            if s.has(key):
                r.problem(
                    s.at(key),
                    f"{key} is for http checks; a grpc check calls grpc.health.v1.Health/Check"
                    " (name the service asked about with service:)",
                    s.value_node(key),
                )
    elif s.has("service") and (kind is not None or not s.has("type")):
        r.problem(
            s.at("service"),
            f"service is for type: grpc checks, not {kind or HealthCheckConfig.type}",
            s.value_node("service"),
        )


def _grpc_service(value: object) -> str:
    # "" is the server as a whole (grpc.health.v1); a service is a dotted name such as
    # "helloworld.Greeter"
    if not isinstance(value, str):
        raise ValueError(f"expected a gRPC service name (a string), got {v.kind(value)}")
    if any(c.isspace() or not c.isprintable() for c in value):
        raise ValueError(f"invalid gRPC service name {value!r}: no spaces or control characters")
    return value


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
