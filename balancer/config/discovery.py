"""A pool's `discovery:`: backends from an etcd prefix and/or DNS records."""

from __future__ import annotations

import ipaddress

import yaml

from balancer.config import values as v
from balancer.config.reader import ABSENT, Reader, Section
from balancer.config.schema import Address, DiscoveryConfig, DnsDiscoveryConfig, EtcdDiscoveryConfig

_DISCOVERY_KEYS = ("etcd", "dns")
_ETCD_KEYS = ("endpoints", "prefix", "timeout")
_DNS_KEYS = ("name", "type", "port", "resolver", "interval")
_DNS_PORT = 53


def read_discovery(r: Reader, node: yaml.Node | None, loc: str) -> DiscoveryConfig | None:
    mark = r.checkpoint()
    s = Section(r, node, loc, _DISCOVERY_KEYS)
    if not s.ok:
        return None
    if not s.has("etcd") and not s.has("dns"):
        # after an unknown key (a typo'd `etc:`, reported with its suggestion) this is noise
        if r.clean_since(mark):
            r.problem(loc, "discovery needs etcd or dns (or both)", node)
        return None
    etcd = _etcd(r, s.value_node("etcd"), s.at("etcd")) if s.has("etcd") else None
    dns = _dns(r, s.value_node("dns"), s.at("dns")) if s.has("dns") else None
    if not r.clean_since(mark):
        return None
    return DiscoveryConfig(etcd=etcd, dns=dns)


def _etcd(r: Reader, node: yaml.Node | None, loc: str) -> EtcdDiscoveryConfig | None:
    mark = r.checkpoint()
    s = Section(r, node, loc, _ETCD_KEYS)
    if not s.ok:
        return None
    endpoints: list[Address] = []
    if not s.has("endpoints"):
        r.problem(
            s.at("endpoints"),
            "'endpoints' is required: a list of etcd client addresses such as [\"127.0.0.1:2379\"]",
            s.line("endpoints"),
        )
    else:
        nodes = r.sequence(s.value_node("endpoints"), s.at("endpoints"), "addresses")
        if nodes is not None and not nodes:
            r.problem(
                s.at("endpoints"), "at least one endpoint is required", s.value_node("endpoints")
            )
        seen: dict[Address, str] = {}
        for i, item in enumerate(nodes or ()):
            at = f"{s.at('endpoints')}[{i}]"
            address = r.scalar(item, at, v.address)
            if address is ABSENT:
                continue
            if address in seen:
                r.problem(at, f"duplicate endpoint {address} (also {seen[address]})", item)
            seen.setdefault(address, at)
            endpoints.append(address)
    prefix = s.get("prefix", _prefix, required=True)
    fields = s.fields(timeout=v.duration(positive=True))
    if not r.clean_since(mark):
        return None
    return EtcdDiscoveryConfig(endpoints=tuple(endpoints), prefix=prefix, **fields)


def _dns(r: Reader, node: yaml.Node | None, loc: str) -> DnsDiscoveryConfig | None:
    mark = r.checkpoint()
    s = Section(r, node, loc, _DNS_KEYS)
    if not s.ok:
        return None
    name = s.get("name", _dns_name, required=True)
    fields = s.fields(
        type=v.choice("A", "AAAA", "SRV"),
        resolver=_resolver,
        interval=v.duration(positive=True),
    )
    port = s.get("port", v.integer(1, 65535))
    record = fields.get("type", DnsDiscoveryConfig.type)
    # with a wrong type (reported already) the port rules, which depend on it, are moot
    type_known = "type" in fields or not s.has("type")
    if type_known and record == "SRV" and s.has("port"):
        r.problem(
            s.at("port"),
            "SRV records carry each backend's port (and weight); remove port",
            s.value_node("port"),
        )
    elif type_known and record != "SRV" and not s.has("port"):
        r.problem(
            s.at("port"),
            f"type {record} needs port: {record} records give only addresses (or use type: SRV)",
            s.line("port"),
        )
    if not r.clean_since(mark):
        return None
    if port is not ABSENT:
        fields["port"] = port
    return DnsDiscoveryConfig(name=name, **fields)


def _prefix(value: object) -> str:
    text = v.string(value)
    if any(c.isspace() for c in text):
        raise ValueError(f"an etcd key prefix has no spaces, got {text!r}")
    return text


def _dns_name(value: object) -> str:
    text = v.string(value).strip()
    try:
        ipaddress.ip_address(text)
    except ValueError:
        pass
    else:
        raise ValueError(
            f"{text!r} is an IP address, not a name to look up: list it under backends instead"
        )
    if not v.is_host_name(text):
        raise ValueError(f"{text!r} is not a valid DNS name")
    return text


def _resolver(value: object) -> Address:
    """A DNS server as "IP:port", or a bare IP meaning port 53 (a name could not be looked
    up before the resolver is known)."""
    if isinstance(value, str):
        try:
            ipaddress.ip_address(value.strip())
        except ValueError:
            pass
        else:
            return Address(value.strip(), _DNS_PORT)
    try:
        return v.ip_address(value)
    except ValueError as e:
        raise ValueError(f"{e} (a resolver is an IP address, optionally with :port)") from None
