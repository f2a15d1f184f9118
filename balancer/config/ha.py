"""The `ha:` section: node identity, floating IP, peers, heartbeat timing and its key."""

from __future__ import annotations

import ipaddress

import yaml

from balancer.config import values as v
from balancer.config.reader import ABSENT, Reader, Section
from balancer.config.schema import (
    MAX_HA_INSTANCES,
    MAX_NODE_ID_BYTES,
    Address,
    HaConfig,
    HaInstanceConfig,
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
    "instances",
)
_INSTANCE_KEYS = ("virtual_ip", "priority")


def read_ha(r: Reader, node: yaml.Node | None) -> HaConfig | None:
    mark = r.checkpoint()
    s = Section(r, node, "ha", _HA_KEYS)
    if not s.ok:
        return None
    # the single-IP form (virtual_ip + priority) or instances: a list of them, not both
    several = "instances" in s.entries
    required = {
        "node_id": (_node_id, True),
        "interface": (_interface, True),
        "virtual_ip": (
            _virtual_ip,
            not several
            and "'virtual_ip' is required (or instances: a list of {virtual_ip, priority})",
        ),
        "auth_key_file": (lambda value: _key_file(r, value), True),
    }
    values = {key: s.get(key, convert, required=need) for key, (convert, need) in required.items()}
    instances: tuple[HaInstanceConfig, ...] = ()
    if several:
        for key in ("virtual_ip", "priority"):
            if key in s.entries:
                r.problem(
                    s.at(key),
                    f"give instances or virtual_ip/priority, not both: with instances, each"
                    f" one has its own {key}",
                    s.line(key),
                )
        instances = _instances(r, s.value_node("instances"), s.at("instances"))
    peers: list[Address] = []
    if not s.has("peers"):
        r.problem(
            s.at("peers"),
            "'peers' is required: a list of the other node's heartbeat address",
            s.line("peers"),
        )
    else:
        nodes = r.sequence(s.value_node("peers"), s.at("peers"), "addresses")
        if nodes is not None and not nodes:
            r.problem(s.at("peers"), "at least one peer is required", s.value_node("peers"))
        for i, peer in enumerate(nodes or ()):
            address = r.scalar(peer, f"{s.at('peers')}[{i}]", _peer_address)
            if address is not ABSENT:
                peers.append(address)
    fields = s.fields(
        priority=v.integer(1, 254),
        bind=v.address,
        advert_interval=v.duration(positive=True),
        dead_after=v.duration(positive=True),
        preempt=v.boolean,
        notify=v.string,
    )
    advert = fields.get("advert_interval", HaConfig.advert_interval)
    if "dead_after" in fields:
        if fields["dead_after"] <= advert:
            r.problem(
                s.at("dead_after"),
                f"dead_after ({v.seconds(fields['dead_after'])}) must be longer than"
                f" advert_interval ({v.seconds(advert)}): otherwise a live peer looks dead"
                " between two heartbeats",
                s.value_node("dead_after"),
            )
    elif not s.has("dead_after"):
        fields["dead_after"] = 3 * advert
    if not r.clean_since(mark):
        return None
    if instances:
        first = instances[0]
        values["virtual_ip"], fields["priority"] = first.virtual_ip, first.priority
    return HaConfig(peers=tuple(peers), instances=instances, **values, **fields)


def _instances(r: Reader, node: yaml.Node | None, loc: str) -> tuple[HaInstanceConfig, ...]:
    """The floating IPs of an active-active pair, each with this node's priority for it."""
    nodes = r.sequence(node, loc, "{virtual_ip, priority}")
    if nodes is None:
        return ()
    if not nodes:
        r.problem(loc, "at least one instance is required", node)
        return ()
    if len(nodes) > MAX_HA_INSTANCES:
        r.problem(loc, f"at most {MAX_HA_INSTANCES} instances, got {len(nodes)}", node)
    result: list[HaInstanceConfig] = []
    seen: dict[ipaddress.IPv4Address | ipaddress.IPv6Address, str] = {}
    for i, item in enumerate(nodes):
        s = Section(r, item, f"{loc}[{i}]", _INSTANCE_KEYS)
        if not s.ok:
            continue
        vip = s.get("virtual_ip", _virtual_ip, required=True)
        fields = s.fields(priority=v.integer(1, 254))
        if vip is ABSENT:
            continue
        # the same address with another prefix length is still the same address
        ip = ipaddress.ip_interface(vip).ip
        if ip in seen:
            r.problem(
                s.at("virtual_ip"),
                f"duplicate virtual IP {ip} (also {seen[ip]})",
                s.value_node("virtual_ip"),
            )
        seen.setdefault(ip, s.loc)
        result.append(HaInstanceConfig(virtual_ip=vip, **fields))
    return tuple(result)


def _key_file(r: Reader, value: object) -> str:
    """The HA auth_key_file: readable, and holding a key (`balancer run` refuses an empty
    one; a short one it accepts and logs as weak)."""
    path = r.readable_path(value)
    try:
        with open(path, "rb") as f:
            size = len(f.read().strip())
    except OSError as e:
        raise ValueError(f"cannot read {path}: {e.strerror or e}") from None
    if not size:
        raise ValueError(f"{path} holds no key (head -c 32 /dev/urandom | base64 > FILE makes one)")
    return path


def _virtual_ip(value: object) -> str:
    text = v.string(value)
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


def _node_id(value: object) -> str:
    # every heartbeat carries it; a longer one could not be sent
    text = v.name(value)
    if len(text.encode()) > MAX_NODE_ID_BYTES:
        raise ValueError(
            f"a node_id is at most {MAX_NODE_ID_BYTES} bytes, got {len(text.encode())}"
        )
    return text


def _interface(value: object) -> str:
    text = v.string(value)
    # IFNAMSIZ is 16 including the terminating NUL
    if len(text) > 15 or any(c.isspace() or c in "/:" for c in text):
        raise ValueError(f"invalid network interface name {text!r}")
    return text


def _peer_address(value: object) -> Address:
    address = v.parse_address(value)
    try:
        ipaddress.ip_address(address.host)
    except ValueError:
        # heartbeats are accepted by source address, which a host name never equals
        raise ValueError(f"a peer must be an IP address, not a host name: {value!r}") from None
    return address
