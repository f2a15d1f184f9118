"""The UDP heartbeat: wire format, HMAC-SHA256 authentication, replay checks, crash probing.

Two wire formats (network byte order), each followed by a 32-byte HMAC-SHA256 over everything
before it. Version 1, one floating IP (what a node with a single instance sends, byte for byte
what releases before active-active sent):

    magic "BLHA" | version u8 = 1 | flags u8 | role u8 | priority u8 | epoch u64 | seq u64 |
    timestamp_ns u64 | node_id length u8 | node_id (UTF-8, 1..64 bytes)

Version 2, several floating IPs (instances), all in one datagram per interval:

    magic "BLHA" | version u8 = 2 | count u8 (1..32) | epoch u64 | seq u64 | timestamp_ns u64 |
    node_id length u8 | node_id | count x (address IPv4 4 bytes | flags u8 | role u8 | priority u8)

Magic and version sit at the same offsets in both, so a node that speaks only version 1 rejects a
version-2 heartbeat as an unknown version (logged, counted) instead of misreading its fields; a
node with several instances likewise refuses version 1, which cannot say which address it means.

`epoch` is the sender's start time in wall-clock nanoseconds: a restarted node has a new, larger
one, so (epoch, seq) keeps increasing across restarts and a receiver rejects anything not newer
than what it last accepted from that node. `timestamp_ns` (wall clock) bounds how old a replayed
message can be after the receiver itself restarted and forgot the last (epoch, seq): the two
nodes' clocks must agree within `max_clock_skew` (NTP does that easily). Both formats share one
(epoch, seq) sequence per node.

Each peer gets its own connected UDP socket for sending, because only a connected socket hears the
ICMP port-unreachable its peer's host returns once the peer process is gone (ECONNREFUSED). The
first refusal triggers an immediate extra probe; a second refusal within `confirm_window` is
reported as a crash, so the passive need not wait out dead_after.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import logging
import os
import socket
import stat
import struct
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from balancer.config import MAX_NODE_ID_BYTES, Address
from balancer.ha.state import Role

log = logging.getLogger("balancer.ha")

MAGIC = b"BLHA"
VERSION = 1  # one floating IP
VERSION_INSTANCES = 2  # several floating IPs, one record each
VERSIONS = (VERSION, VERSION_INSTANCES)
MAX_INSTANCES = 32
# A shorter key is accepted (a keepalived-style password must not keep the pair from
# forming) but logged as weak: heartbeats are HMAC-signed, and a short key can be guessed
# offline from one captured datagram.
STRONG_KEY_BYTES = 16

FLAG_RESIGNING = 0x01
FLAG_READY = 0x02
FLAG_PREEMPT = 0x04

_PREFIX = struct.Struct("!4sB")  # magic, version: the same in every version
_HEADER = struct.Struct("!4sBBBBQQQB")
_HEADER2 = struct.Struct("!4sBBQQQB")
_RECORD = struct.Struct("!4sBBB")  # address, flags, role, priority
_MAC_SIZE = hashlib.sha256().digest_size
_MIN_SIZE = min(_HEADER.size, _HEADER2.size) + 1 + _MAC_SIZE
_ROLE_CODES = {Role.PASSIVE: 0, Role.ACTIVE: 1}
_CODE_ROLES = {code: role for role, code in _ROLE_CODES.items()}

# Rejection reasons, also the keys of the `rejected` counters.
UNKNOWN_PEER = "unknown_peer"  # source address not in peers
MALFORMED = "malformed"  # too short, bad magic, bad field
BAD_VERSION = "version"  # a protocol version we do not speak
BAD_AUTH = "auth"  # HMAC mismatch: tampered, forged or a different key
STALE = "stale"  # timestamp outside the clock window
REPLAY = "replay"  # (epoch, seq) not newer than the last accepted from that node
SELF = "self"  # our own node_id: a loop or a copied config
REJECT_REASONS = (UNKNOWN_PEER, MALFORMED, BAD_VERSION, BAD_AUTH, STALE, REPLAY, SELF)
# What an operator most likely has to fix, logged with the first rejection of each kind.
_REJECT_HINTS = {
    UNKNOWN_PEER: "its address is not in ha.peers",
    BAD_AUTH: "a different auth_key_file on the two nodes, or forged",
    STALE: "the two nodes' clocks differ: run NTP",
    SELF: "both nodes have the same node_id",
    BAD_VERSION: "one node has several ha.instances and the other one floating IP,"
    " or it runs a balancer release that speaks another heartbeat version",
}
REJECT_LOG_INTERVAL = 60.0  # a warning per sender and reason at most this often; all are counted
REJECT_LOG_BURST = 20  # and at most this many per interval in all (spoofed sources vary)
_REJECT_LOG_KEYS = 256  # bound on the (sender, reason) pairs remembered for that


class Rejected(Exception):
    """A datagram that is not an acceptable heartbeat; `reason` is one of REJECT_REASONS."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class InstanceRecord:
    """One floating IP's part of a heartbeat."""

    address: str | None  # IPv4 address; None in version 1, which has one instance
    priority: int
    role: Role
    flags: int = 0

    @property
    def resigning(self) -> bool:
        return bool(self.flags & FLAG_RESIGNING)

    @property
    def ready(self) -> bool:
        return bool(self.flags & FLAG_READY)

    @property
    def preempt(self) -> bool:
        return bool(self.flags & FLAG_PREEMPT)


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """A heartbeat. In version 1 priority/role/flags are the whole message; in version 2
    `instances` is, and priority/role/flags repeat its first record."""

    node_id: str
    priority: int
    role: Role
    epoch: int
    seq: int
    timestamp_ns: int
    flags: int = 0
    version: int = VERSION
    instances: tuple[InstanceRecord, ...] = ()

    @classmethod
    def of_instances(
        cls,
        node_id: str,
        epoch: int,
        seq: int,
        timestamp_ns: int,
        records: Sequence[InstanceRecord],
    ) -> Heartbeat:
        """A version-2 heartbeat carrying these records."""
        if not records:
            raise ValueError("a heartbeat carries at least one instance")
        first = records[0]
        return cls(
            node_id,
            first.priority,
            first.role,
            epoch,
            seq,
            timestamp_ns,
            first.flags,
            VERSION_INSTANCES,
            tuple(records),
        )

    @property
    def records(self) -> tuple[InstanceRecord, ...]:
        """Every instance this heartbeat speaks for (version 1: one, without an address)."""
        if self.version == VERSION:
            return (InstanceRecord(None, self.priority, self.role, self.flags),)
        return self.instances

    @property
    def resigning(self) -> bool:
        return bool(self.flags & FLAG_RESIGNING)

    @property
    def ready(self) -> bool:
        return bool(self.flags & FLAG_READY)

    @property
    def preempt(self) -> bool:
        return bool(self.flags & FLAG_PREEMPT)


def load_key(path: str) -> bytes:
    """Read the shared secret once; surrounding whitespace (a trailing newline) is not part of it."""
    with open(path, "rb") as f:
        mode = os.fstat(f.fileno()).st_mode
        key = f.read().strip()
    if not key:
        raise ValueError(f"{path}: the HA key file is empty")
    if len(key) < STRONG_KEY_BYTES:
        log.warning(
            "%s: a %d-byte HA key is weak; use at least %d random bytes (openssl rand -hex 32)",
            path,
            len(key),
            STRONG_KEY_BYTES,
        )
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("%s: the HA key file is readable by group or others; chmod 600 it", path)
    return key


def encode(hb: Heartbeat, key: bytes) -> bytes:
    node_id = hb.node_id.encode()
    if not 1 <= len(node_id) <= MAX_NODE_ID_BYTES:
        raise ValueError(f"node_id must be 1..{MAX_NODE_ID_BYTES} bytes of UTF-8")
    if hb.version == VERSION_INSTANCES:
        if not 1 <= len(hb.instances) <= MAX_INSTANCES:
            raise ValueError(f"a heartbeat carries 1..{MAX_INSTANCES} instances")
        head = _HEADER2.pack(
            MAGIC, hb.version, len(hb.instances), hb.epoch, hb.seq, hb.timestamp_ns, len(node_id)
        )
        records = b"".join(
            _RECORD.pack(
                ipaddress.IPv4Address(r.address).packed, r.flags, _ROLE_CODES[r.role], r.priority
            )
            for r in hb.instances
        )
        body = head + node_id + records
    else:
        body = (
            _HEADER.pack(
                MAGIC,
                hb.version,
                hb.flags,
                _ROLE_CODES[hb.role],
                hb.priority,
                hb.epoch,
                hb.seq,
                hb.timestamp_ns,
                len(node_id),
            )
            + node_id
        )
    return body + hmac.new(key, body, hashlib.sha256).digest()


def decode(data: bytes, key: bytes, versions: Sequence[int] = VERSIONS) -> Heartbeat:
    """Parse and authenticate one datagram, or raise Rejected; `versions`: those accepted."""
    if len(data) < _MIN_SIZE:
        raise Rejected(MALFORMED, f"{len(data)} bytes")
    magic, version = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise Rejected(MALFORMED, "bad magic")
    if version not in versions or version not in VERSIONS:
        raise Rejected(BAD_VERSION, f"version {version}")
    body, mac = data[:-_MAC_SIZE], data[-_MAC_SIZE:]
    # Authenticate before trusting any field beyond the version byte.
    if not hmac.compare_digest(mac, hmac.new(key, body, hashlib.sha256).digest()):
        raise Rejected(BAD_AUTH)
    if version == VERSION_INSTANCES:
        return _decode_instances(body)
    if len(body) < _HEADER.size:
        raise Rejected(MALFORMED, "length")
    _, _, flags, role, priority, epoch, seq, ts, id_len = _HEADER.unpack_from(body)
    if len(body) != _HEADER.size + id_len or id_len == 0:
        raise Rejected(MALFORMED, "length")
    if role not in _CODE_ROLES:
        raise Rejected(MALFORMED, f"role {role}")
    node_id = _node_id(body[_HEADER.size :])
    return Heartbeat(node_id, priority, _CODE_ROLES[role], epoch, seq, ts, flags, version)


def _decode_instances(body: bytes) -> Heartbeat:
    if len(body) < _HEADER2.size:
        raise Rejected(MALFORMED, "length")
    _, _, count, epoch, seq, ts, id_len = _HEADER2.unpack_from(body)
    if id_len == 0 or not 1 <= count <= MAX_INSTANCES:
        raise Rejected(MALFORMED, f"{count} instances")
    at = _HEADER2.size + id_len
    if len(body) != at + count * _RECORD.size:
        raise Rejected(MALFORMED, "length")
    node_id = _node_id(body[_HEADER2.size : at])
    records = []
    for packed, flags, role, priority in _RECORD.iter_unpack(body[at:]):
        if role not in _CODE_ROLES:
            raise Rejected(MALFORMED, f"role {role}")
        address = str(ipaddress.IPv4Address(packed))
        records.append(InstanceRecord(address, priority, _CODE_ROLES[role], flags))
    if len({r.address for r in records}) != len(records):
        raise Rejected(MALFORMED, "an address given twice")
    return Heartbeat.of_instances(node_id, epoch, seq, ts, records)


def _node_id(raw: bytes) -> str:
    try:
        return raw.decode()
    except UnicodeDecodeError:
        raise Rejected(MALFORMED, "node_id not UTF-8") from None


@dataclass(slots=True)
class _Incarnation:
    epoch: int
    seq: int
    last_accepted: float  # monotonic


class _Receiver(asyncio.DatagramProtocol):
    def __init__(self, endpoint: HeartbeatEndpoint) -> None:
        self.endpoint = endpoint

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        host = addr[0]
        if host.startswith("::ffff:"):
            # A dual-stack socket bound to "::" sees IPv4 peers as mapped addresses.
            mapped = ipaddress.IPv6Address(host.split("%", 1)[0]).ipv4_mapped
            host = str(mapped) if mapped is not None else host
        self.endpoint._received(data, host)

    def error_received(self, exc: Exception) -> None:
        log.debug("heartbeat socket error: %s", exc)


class _PeerLink(asyncio.DatagramProtocol):
    """The connected socket to one peer; it exists to hear that peer's port-unreachable."""

    def __init__(self, endpoint: HeartbeatEndpoint, address: Address, host: str) -> None:
        self.endpoint = endpoint
        self.address = address
        self.host = host  # resolved IP
        self.transport: asyncio.DatagramTransport | None = None
        self.refused_at: float | None = None  # first refusal of a pending confirmation
        self.down = False  # crash confirmed and nothing heard from it since: log once

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        pass  # peers send to our bound port, never to this ephemeral one

    def error_received(self, exc: Exception) -> None:
        if isinstance(exc, ConnectionRefusedError):
            self.endpoint._refused(self)
        else:
            log.debug("heartbeat to %s: %s", self.address, exc)


class HeartbeatEndpoint:
    """Sends our heartbeat to every peer and hands authenticated ones from peers to a callback."""

    def __init__(
        self,
        *,
        node_id: str,
        key: bytes,
        bind: Address,
        peers: Sequence[Address],
        on_heartbeat: Callable[[Heartbeat, str, float], None],
        on_peer_crashed: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], int] = time.time_ns,
        max_clock_skew: float = 5.0,
        confirm_window: float = 0.05,
        incarnation_timeout: float = 3.0,
        versions: Sequence[int] = VERSIONS,
    ) -> None:
        if not key:
            raise ValueError("the HA key must not be empty")
        self.node_id = node_id
        self.bind = bind
        self.peers = tuple(peers)
        self._key = key
        self._on_heartbeat = on_heartbeat
        self._on_peer_crashed = on_peer_crashed
        self._clock = clock
        self._wall_clock = wall_clock
        self._max_skew_ns = int(max_clock_skew * 1e9)
        self.confirm_window = confirm_window
        # An older epoch is accepted only from a node silent this long: a restart whose wall
        # clock went back, not a replay while the current incarnation is talking.
        self.incarnation_timeout = incarnation_timeout
        self.versions = tuple(versions)  # the heartbeat versions accepted from peers
        self.epoch = wall_clock()
        self._seq = 0
        self._last_sent: tuple[InstanceRecord, ...] | None = None  # None address: version 1
        self._incarnations: dict[str, _Incarnation] = {}
        self._peer_hosts: set[str] = set()
        self._links: list[_PeerLink] = []
        self._transport: asyncio.DatagramTransport | None = None
        # Counters, read by status and metrics.
        self.sent = 0
        self.received = 0
        self.rejected: dict[str, int] = dict.fromkeys(REJECT_REASONS, 0)
        self.crashes_detected = 0
        self._reject_logged: dict[tuple[str, str], float] = {}
        self._reject_window = (0.0, 0)  # (start, warnings logged in it)

    @property
    def peer_hosts(self) -> dict[Address, str]:
        """Each configured peer and the IP it resolved to at start."""
        return {link.address: link.host for link in self._links}

    @property
    def local_address(self) -> tuple[str, int]:
        if self._transport is None:
            raise RuntimeError("not started")
        return self._transport.get_extra_info("sockname")[:2]

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._transport, _ = await loop.create_datagram_endpoint(
            lambda: _Receiver(self), local_addr=(self.bind.host, self.bind.port)
        )
        # Send from the bound address when it is a specific one, so peers see the address they
        # have in their own `peers` list.
        wildcard = self.bind.host in ("", "0.0.0.0", "::")
        for address in self.peers:
            infos = await loop.getaddrinfo(address.host, address.port, type=socket.SOCK_DGRAM)
            family, _, _, _, sockaddr = infos[0]
            host = sockaddr[0]
            self._peer_hosts.add(host)
            local = None if wildcard else (self.bind.host, 0)
            _, link = await loop.create_datagram_endpoint(
                lambda a=address, h=host: _PeerLink(self, a, h),
                remote_addr=sockaddr[:2],
                local_addr=local,
                family=family,
            )
            self._links.append(link)

    def close(self) -> None:
        for link in self._links:
            if link.transport is not None:
                link.transport.close()
        self._links.clear()
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # -- sending --------------------------------------------------------------------------------

    def send(self, role: Role, priority: int, flags: int = 0) -> None:
        """One version-1 heartbeat (a single floating IP), the same datagram to every peer."""
        self.send_records((InstanceRecord(None, priority, role, flags),))

    def send_records(self, records: Sequence[InstanceRecord]) -> None:
        """One heartbeat for these instances: version 1 for a lone record without an address,
        else version 2; the same datagram to every peer."""
        self._last_sent = tuple(records)
        data = self._build(self._last_sent)
        for link in self._links:
            self._send_to(link, data)

    def _build(self, records: tuple[InstanceRecord, ...]) -> bytes:
        self._seq += 1
        if len(records) == 1 and records[0].address is None:
            r = records[0]
            hb = Heartbeat(
                self.node_id, r.priority, r.role, self.epoch, self._seq, self._wall_clock(), r.flags
            )
        else:
            hb = Heartbeat.of_instances(
                self.node_id, self.epoch, self._seq, self._wall_clock(), records
            )
        return encode(hb, self._key)

    def _send_to(self, link: _PeerLink, data: bytes) -> None:
        if link.transport is None or link.transport.is_closing():
            return
        link.transport.sendto(data)
        self.sent += 1

    def _refused(self, link: _PeerLink) -> None:
        now = self._clock()
        if link.refused_at is not None and now - link.refused_at <= self.confirm_window:
            link.refused_at = None
            if not link.down:
                link.down = True
                self.crashes_detected += 1
                log.info("heartbeat to %s refused twice: peer process is gone", link.address)
            # Reported every time: cheap, and the listener may have learnt the peer since.
            if self._on_peer_crashed is not None:
                self._on_peer_crashed(link.host)
            return
        # One refusal may be an old ICMP for a datagram sent before a restart; a probe sent now
        # and refused too says the port is closed now.
        link.refused_at = now
        if self._last_sent is not None:
            self._send_to(link, self._build(self._last_sent))

    # -- receiving ------------------------------------------------------------------------------

    def _received(self, data: bytes, host: str) -> None:
        try:
            hb = self._check(data, host)
        except Rejected as e:
            self.rejected[e.reason] = self.rejected.get(e.reason, 0) + 1
            self._log_rejected(host, e)
            return
        self.received += 1
        for link in self._links:
            if link.host == host:
                link.down = False
        self._on_heartbeat(hb, host, self._clock())

    def _log_rejected(self, host: str, e: Rejected) -> None:
        """A warning, not just a counter: with mismatched keys or peers each node believes it is
        alone and both take the VIP, and the log must say why. Rate-limited against floods."""
        now = self._clock()
        key = (host, e.reason)
        last = self._reject_logged.get(key)
        start, logged = self._reject_window
        if now - start >= REJECT_LOG_INTERVAL:
            start, logged = now, 0
        if (last is not None and now - last < REJECT_LOG_INTERVAL) or logged >= REJECT_LOG_BURST:
            log.debug("heartbeat from %s rejected: %s", host, e)
            return
        self._reject_window = (start, logged + 1)
        if len(self._reject_logged) >= _REJECT_LOG_KEYS:
            self._reject_logged.clear()
        self._reject_logged[key] = now
        hint = _REJECT_HINTS.get(e.reason)
        log.warning(
            "heartbeat from %s rejected: %s%s (further ones counted in /status"
            " ha.heartbeats.rejected, logged again in %.0fs)",
            host,
            e,
            f"; {hint}" if hint else "",
            REJECT_LOG_INTERVAL,
        )

    def _check(self, data: bytes, host: str) -> Heartbeat:
        if host not in self._peer_hosts:
            raise Rejected(UNKNOWN_PEER, host)
        hb = decode(data, self._key, self.versions)
        if hb.node_id == self.node_id:
            raise Rejected(SELF)
        if abs(self._wall_clock() - hb.timestamp_ns) > self._max_skew_ns:
            raise Rejected(STALE, f"{(self._wall_clock() - hb.timestamp_ns) / 1e9:.3f}s off")
        now = self._clock()
        last = self._incarnations.get(hb.node_id)
        if last is not None:
            if hb.epoch == last.epoch:
                if hb.seq <= last.seq:
                    raise Rejected(REPLAY, f"seq {hb.seq} <= {last.seq}")
            elif hb.epoch < last.epoch and now - last.last_accepted < self.incarnation_timeout:
                raise Rejected(REPLAY, f"epoch {hb.epoch} < {last.epoch}")
        self._incarnations[hb.node_id] = _Incarnation(hb.epoch, hb.seq, now)
        return hb
