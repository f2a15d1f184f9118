"""The sections about the service as a whole: admin, limits, timeouts, access_log, workers."""

from __future__ import annotations

import os
from typing import Any

import yaml

from balancer.config import values as v
from balancer.config.reader import Reader, Section
from balancer.config.schema import MAX_WORKERS, AdminConfig

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
_ACCESS_LOG_KEYS = ("format", "path")


def read_admin(r: Reader, node: yaml.Node | None) -> AdminConfig | None:
    mark = r.checkpoint()
    s = Section(r, node, "admin", _ADMIN_KEYS)
    fields = s.fields(
        bind=v.bind_address, token=v.string, token_file=r.readable_path, metrics=v.boolean
    )
    if s.has("token") and s.has("token_file"):
        r.problem(
            s.at("token_file"), "give token or token_file, not both", s.value_node("token_file")
        )
    bind = fields.get("bind", AdminConfig.bind)
    if (
        "bind" in fields
        and not v.is_loopback(bind.host)
        and not s.has("token")
        and not s.has("token_file")
    ):
        r.problem(
            s.at("bind"),
            f"admin on a non-loopback address ({bind}) needs token or token_file: the admin"
            " API can drain and remove backends, so only holders of the token may reach it"
            " (least privilege)",
            s.value_node("bind"),
        )
    if not r.clean_since(mark):
        return None
    return AdminConfig(**fields)


def read_limits(r: Reader, node: yaml.Node | None) -> dict[str, Any]:
    """LimitsConfig keyword arguments for the keys given (wrong ones reported)."""
    return Section(r, node, "limits", _LIMITS_KEYS).fields(
        max_connections=v.integer(0),
        max_connections_per_ip=v.integer(0),
        max_header_bytes=v.integer(0),
        max_headers=v.integer(0),
        max_body_bytes=v.integer(0),
        rate_per_ip=v.number_at_least_zero,
    )


def read_timeouts(r: Reader, node: yaml.Node | None) -> dict[str, Any]:
    """TimeoutsConfig keyword arguments for the keys given (wrong ones reported)."""
    return Section(r, node, "timeouts", _TIMEOUTS_KEYS).fields(
        **{key: v.duration(positive=True) for key in _TIMEOUTS_KEYS}
    )


def read_access_log(r: Reader, node: yaml.Node | None) -> dict[str, Any]:
    """AccessLogConfig keyword arguments for the keys given (wrong ones reported)."""
    return Section(r, node, "access_log", _ACCESS_LOG_KEYS).fields(
        format=_log_format, path=r.path_in_existing_dir
    )


def workers(value: object) -> int:
    """`workers: N` (1..MAX_WORKERS) or `workers: auto` (one process per CPU)."""
    if value == "auto":
        return max(1, os.cpu_count() or 1)
    if isinstance(value, bool) or not isinstance(value, int):
        shown = f" {value!r}" if isinstance(value, str) else ""
        raise ValueError(f"expected an integer >= 1 or 'auto', got {v.kind(value)}{shown}")
    if value < 1:
        raise ValueError(f"must be >= 1, got {value}")
    if value > MAX_WORKERS:
        raise ValueError(f"must be at most {MAX_WORKERS}, got {value} (or use 'auto')")
    return value


def _log_format(value: object) -> str:
    # YAML 1.1 reads an unquoted `off` as false
    if value is False:
        return "off"
    return v.choice("plain", "json", "off")(value)
