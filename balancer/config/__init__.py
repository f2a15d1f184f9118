"""Configuration: the schema as frozen dataclasses, load() from YAML, and located errors.

Why a hand-written reader and not pydantic v2 or msgspec (weighed before the split):
msgspec stops at the first error by design (its maintainer declined to aggregate them), and
`balancer check` must list every problem at once. pydantic v2, tried on the pools section,
collects them all, but it validates constructed dicts, so it never sees a line,
duplicate keys (which YAML silently keeps the last of) or merge keys; each error's `loc`
would have to be mapped back onto the composed nodes anyway. Its generic messages ("Input
should be greater than or equal to 1") would have to be replaced key by key with the
converters written here ("weight 0 is not allowed: ... PATCH /pools/POOL/backends/NAME"). Its
after-validators do not run once a field has failed, so the cross-field checks would drop
out of a report that has any other problem in it. And importing it and building one model
takes about 0.3 s here, twice what a whole `balancer check` of the demo file takes (0.14 s).
The rules would stay ours and only their plumbing would change, so the reader is kept, split
by section, walking the YAML nodes.

Layout: schema (the dataclasses), errors (Problem, ConfigError), values (scalar converters),
reader (node walking, Section), one module per section (listeners, pools, health, discovery,
ha, service), and load (parse/load and the checks that span sections).
"""

from balancer.config.errors import ConfigError, Problem
from balancer.config.load import check_reloadable, load, parse, parse_as
from balancer.config.pools import check_sticky_key_file
from balancer.config.schema import (
    MAX_HA_INSTANCES,
    MAX_NODE_ID_BYTES,
    MAX_WORKERS,
    AccessLogConfig,
    Address,
    AdminConfig,
    BackendConfig,
    Config,
    DiscoveryConfig,
    DnsDiscoveryConfig,
    EtcdDiscoveryConfig,
    HaConfig,
    HaInstanceConfig,
    HealthCheckConfig,
    LimitsConfig,
    ListenerConfig,
    PassiveHealthConfig,
    PoolConfig,
    QueueConfig,
    Route,
    StickyConfig,
    TimeoutsConfig,
    TlsCertificate,
    TlsConfig,
)
from balancer.config.values import parse_address, parse_duration

__all__ = [
    "check_reloadable",
    "MAX_HA_INSTANCES",
    "MAX_NODE_ID_BYTES",
    "MAX_WORKERS",
    "AccessLogConfig",
    "Address",
    "AdminConfig",
    "BackendConfig",
    "Config",
    "ConfigError",
    "DiscoveryConfig",
    "DnsDiscoveryConfig",
    "EtcdDiscoveryConfig",
    "HaConfig",
    "HaInstanceConfig",
    "HealthCheckConfig",
    "LimitsConfig",
    "ListenerConfig",
    "PassiveHealthConfig",
    "PoolConfig",
    "Problem",
    "QueueConfig",
    "Route",
    "StickyConfig",
    "TimeoutsConfig",
    "TlsCertificate",
    "TlsConfig",
    "check_sticky_key_file",
    "load",
    "parse",
    "parse_address",
    "parse_as",
    "parse_duration",
]
