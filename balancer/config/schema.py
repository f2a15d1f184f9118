"""The config schema: frozen dataclasses, every duration float seconds, every size int bytes."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_WORKERS = 256  # far beyond any core count a balancer runs on; catches a typo'd 10000
# the longest node_id a heartbeat datagram carries (balancer.ha.heartbeat encodes it); kept
# here so that config, which checks it, needs nothing from the ha package
MAX_NODE_ID_BYTES = 64
MAX_HA_INSTANCES = 16  # floating IPs one pair can hold; each costs a heartbeat field and an ARP


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
    # HTTP/2 beside HTTP/1.1: by ALPN on TLS, by prior knowledge (h2c) on plain. None (not
    # given) becomes the default, on for TLS listeners and off for plain ones: after
    # construction it is always a bool
    http2: bool | None = None
    proxy_protocol: bool = False  # each connection starts with a PROXY v1/v2 header

    def __post_init__(self) -> None:
        if self.http2 is None:
            object.__setattr__(self, "http2", self.tls is not None)


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
    type: str = "http"  # "http" | "tcp" | "grpc" (grpc.health.v1.Health/Check)
    path: str = "/healthz"
    host: str | None = None  # Host header of the check; default the backend address
    interval: float = 1.0
    timeout: float = 0.5
    rise: int = 2
    fall: int = 2
    expect_status: tuple[int, int] = (200, 399)  # inclusive range; YAML "200-399" or 200
    service: str = ""  # grpc: the service asked about; "" asks about the server as a whole


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
class EtcdDiscoveryConfig:
    """Backends from an etcd v3 prefix: key PREFIX + NAME, value {"address", "weight"}."""

    endpoints: tuple[Address, ...]
    prefix: str
    timeout: float = 2.0


@dataclass(frozen=True)
class DnsDiscoveryConfig:
    """Backends from DNS records, looked up every `interval` (capped by the records' TTL)."""

    name: str
    type: str = "A"  # "A" | "AAAA" | "SRV"
    port: int | None = None  # required for A/AAAA; SRV records carry their own
    resolver: Address | None = None  # None: the system's resolv.conf
    interval: float = 5.0


@dataclass(frozen=True)
class DiscoveryConfig:
    """Where a pool takes backends from besides `backends:` (at least one is set)."""

    etcd: EtcdDiscoveryConfig | None = None
    dns: DnsDiscoveryConfig | None = None


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
    protocol: str = "http1"  # "http1" | "h2": what the balancer speaks to the backends
    send_proxy_protocol: str = "none"  # "none" | "v1" | "v2": tell backends the client address
    discovery: DiscoveryConfig | None = None


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
class HaInstanceConfig:
    """One floating IP and this node's priority for it."""

    virtual_ip: str  # "198.18.0.100/24"
    priority: int = 100  # 1..254


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
    # every floating IP this pair shares; the single-IP form (virtual_ip + priority) is one
    # instance, filled in here, so HA code always reads `instances`. virtual_ip and priority
    # stay the first instance's values for code that knows only one
    instances: tuple[HaInstanceConfig, ...] = ()

    def __post_init__(self) -> None:
        if not self.instances:
            only = HaInstanceConfig(virtual_ip=self.virtual_ip, priority=self.priority)
            object.__setattr__(self, "instances", (only,))


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
