"""Backends from DNS: A/AAAA records with the configured port, or SRV records giving port and
weight, asked of one resolver and re-resolved at the interval, never later than the TTL.

Decisions (each is what the tests pin down):

- A backend's name is its address and port, "198.18.0.5-8080" ("fd00::1" becomes "fd00__1-8080"):
  the pool's names allow only letters, digits, "_", "." and "-", and the address is what stays
  the same while a backend is the same backend, whatever record led to it.
- An authoritative "no such name" (NXDOMAIN) or "no records of this type" (NODATA) is an
  answer: the snapshot is empty and the pool's discovered backends drain. That is what removing
  the name means, and the alternative (treating it as an outage) would keep traffic on backends
  an operator took out of DNS. A resolver that cannot answer (SERVFAIL, REFUSED, a timeout,
  no route) is not an answer: `unavailable(reason)` and the pool keeps its last backends.
- SRV: only the lowest-priority group is used (RFC 2782: higher priorities are for when that
  whole group is unreachable, which the DNS cannot tell us; the pool's health checks and panic
  threshold handle dead backends within the group). Weight 0 becomes 1 (RFC 2782 gives weight
  0 "a very small chance" beside others, and the pool has no weight 0); weights are scaled
  down, ratios kept, when the largest exceeds the pool's maximum of 1000. A target's addresses
  come from the answer's additional section when there, else from A then AAAA lookups; a
  target with A records uses only those (a dual-stack host is one backend, not two). Target "."
  (RFC 2782: "the service is decidedly not available") contributes nothing.
- Publish the first snapshot, then only when records change, and always the first after a
  failure (so the runner learns the registry is back even when nothing changed).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.message
import dns.name
import dns.nameserver
import dns.rdatatype
import dns.resolver
import dns.rrset

from balancer.config.schema import Address, DnsDiscoveryConfig
from balancer.discovery.records import Record, RegistryUnavailable, Snapshot

log = logging.getLogger("balancer.discovery")

SOURCE = "dns"
MAX_WEIGHT = 1000  # the pool's largest weight (config/pools.py)
MIN_TTL_DELAY = 1.0  # a TTL of 0 or 1 must not become a query loop
FIRST_BACKOFF = 0.5
QUERY_LIFETIME = 3.0  # seconds one lookup may take, retries included


# -- answers into records (pure) --------------------------------------------------------------


def record_name(address: Address) -> str:
    """A backend's name in the pool: "198.18.0.5-8080", or "fd00__1-8080" for "fd00::1"."""
    return f"{address.host.replace(':', '_')}-{address.port}"


def address_records(addresses: Iterable[str], port: int) -> tuple[Record, ...]:
    """A/AAAA addresses with the configured port: one weight-1 record each, in a stable
    order, duplicates dropped."""
    unique = {Address(a, port) for a in addresses}
    return tuple(sorted((Record(record_name(a), a, 1) for a in unique), key=_order))


@dataclass(frozen=True, slots=True)
class SrvEntry:
    priority: int
    weight: int
    port: int
    target: dns.name.Name


def srv_entries(rrset: dns.rrset.RRset | None) -> list[SrvEntry]:
    """The lowest-priority group of an SRV answer, without "." targets."""
    entries = [
        SrvEntry(rd.priority, rd.weight, rd.port, rd.target)
        for rd in (rrset or ())
        if rd.target != dns.name.root
    ]
    if not entries:
        return []
    lowest = min(e.priority for e in entries)
    return [e for e in entries if e.priority == lowest]


def pool_weights(weights: Sequence[int]) -> list[int]:
    """SRV weights (0..65535) as pool weights (1..1000): 0 becomes 1, and when the largest
    exceeds 1000 all are scaled so it is 1000, ratios kept as far as integers allow."""
    raised = [max(1, w) for w in weights]
    top = max(raised, default=1)
    if top <= MAX_WEIGHT:
        return raised
    return [max(1, round(w * MAX_WEIGHT / top)) for w in raised]


def srv_records(
    entries: Sequence[SrvEntry], addresses: Mapping[dns.name.Name, Sequence[str]]
) -> tuple[tuple[Record, ...], tuple[str, ...]]:
    """(records, skipped) from SRV entries and each target's addresses. Two entries reaching
    the same address and port are one backend whose weight is their sum (capped)."""
    weights = pool_weights([e.weight for e in entries])
    merged: dict[Address, int] = {}
    skipped: list[str] = []
    for entry, weight in zip(entries, weights, strict=True):
        found = addresses.get(entry.target, ())
        if not found:
            skipped.append(f"{entry.target.to_text(omit_final_dot=True)}: no A or AAAA address")
            continue
        for host in found:
            address = Address(host, entry.port)
            merged[address] = min(MAX_WEIGHT, merged.get(address, 0) + weight)
    records = sorted((Record(record_name(a), a, w) for a, w in merged.items()), key=_order)
    return tuple(records), tuple(sorted(set(skipped)))


def target_addresses(rrsets: Iterable[dns.rrset.RRset]) -> dict[dns.name.Name, list[str]]:
    """Each name's addresses among these RRsets (an additional section, or lookup answers):
    its A addresses if it has any, else its AAAA ones."""
    v4: dict[dns.name.Name, list[str]] = {}
    v6: dict[dns.name.Name, list[str]] = {}
    for rrset in rrsets:
        into = {dns.rdatatype.A: v4, dns.rdatatype.AAAA: v6}.get(rrset.rdtype)
        if into is not None:
            into.setdefault(rrset.name, []).extend(rd.address for rd in rrset)
    return {name: v4.get(name) or v6[name] for name in v4.keys() | v6.keys()}


def answer_ttl(message: dns.message.Message | None) -> float | None:
    """How long an answer holds: the smallest TTL in its answer section, or for a negative
    answer the SOA's negative TTL (RFC 2308: the lesser of the SOA's TTL and its minimum);
    None when the message says nothing (then the interval alone decides)."""
    if message is None:
        return None
    if message.answer:
        return float(min(rrset.ttl for rrset in message.answer))
    for rrset in message.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return float(min(rrset.ttl, rrset[0].minimum))
    return None


def next_delay(interval: float, ttl: float | None) -> float:
    """When to ask again after an answer: at the interval, sooner if the TTL ends first, but
    a tiny TTL waits at least MIN_TTL_DELAY."""
    if ttl is None:
        return interval
    return min(interval, max(ttl, MIN_TTL_DELAY))


def next_backoff(previous: float | None, interval: float) -> float:
    """The wait after a failed lookup: FIRST_BACKOFF, doubling, never past the interval (nor
    below FIRST_BACKOFF)."""
    cap = max(interval, FIRST_BACKOFF)
    if previous is None:
        return min(FIRST_BACKOFF, cap)
    return min(previous * 2, cap)


def _order(record: Record) -> tuple[str, int]:
    return record.address.host, record.address.port


# -- the source -------------------------------------------------------------------------------


class DnsSource:
    """Asks one resolver (the configured one, or the system's) for a pool's records."""

    kind = SOURCE

    def __init__(
        self,
        config: DnsDiscoveryConfig,
        *,
        lifetime: float = QUERY_LIFETIME,
        resolver: dns.asyncresolver.Resolver | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = config
        self.lifetime = lifetime
        self._resolver = resolver  # made on first use: the system's may be absent at start
        self._sleep = sleep  # the tests read the waits from here

    def _make_resolver(self) -> dns.asyncresolver.Resolver:
        server = self.config.resolver
        if server is None:
            # reads /etc/resolv.conf; raises NoResolverConfiguration without one
            resolver = dns.asyncresolver.Resolver()
        else:
            resolver = dns.asyncresolver.Resolver(configure=False)
            resolver.nameservers = [dns.nameserver.Do53Nameserver(server.host, server.port)]
        resolver.cache = None  # the TTL is ours to follow, not a cache's
        resolver.lifetime = self.lifetime
        return resolver

    async def resolve(self) -> Snapshot:
        """One complete snapshot now; RegistryUnavailable when the resolver cannot answer."""
        try:
            if self._resolver is None:
                self._resolver = self._make_resolver()
            if self.config.type == "SRV":
                return await self._srv(self._resolver)
            return await self._addresses(self._resolver)
        except dns.resolver.NoResolverConfiguration as e:
            raise RegistryUnavailable(f"no system resolver: {e}") from e
        except (dns.exception.DNSException, OSError) as e:
            if self.config.resolver is None:
                self._resolver = None  # read resolv.conf again: it may name other servers now
            raise RegistryUnavailable(_reason(self.config.name, e)) from e

    async def _query(
        self, resolver: dns.asyncresolver.Resolver, name: str | dns.name.Name, rdtype: str
    ) -> tuple[dns.rrset.RRset | None, dns.message.Message | None]:
        """(the answer's RRset or None, the response); NXDOMAIN and NODATA give no RRset."""
        try:
            answer = await resolver.resolve(name, rdtype, raise_on_no_answer=False)
        except dns.resolver.NXDOMAIN as e:
            responses = list(e.responses().values())
            return None, responses[-1] if responses else None
        return answer.rrset, answer.response

    async def _addresses(self, resolver: dns.asyncresolver.Resolver) -> Snapshot:
        rrset, response = await self._query(resolver, self.config.name, self.config.type)
        port = self.config.port
        assert port is not None  # the config requires it for A/AAAA
        records = address_records((rd.address for rd in rrset or ()), port)
        return Snapshot(SOURCE, records, ttl=answer_ttl(response))

    async def _srv(self, resolver: dns.asyncresolver.Resolver) -> Snapshot:
        rrset, response = await self._query(resolver, self.config.name, "SRV")
        entries = srv_entries(rrset)
        ttls = [answer_ttl(response)]
        found = target_addresses(response.additional if response is not None else ())
        missing = {e.target for e in entries} - found.keys()
        lookups = [self._target(resolver, target) for target in sorted(missing)]
        for target, addresses, ttl in await asyncio.gather(*lookups):
            if addresses:
                found[target] = addresses
            ttls.append(ttl)
        records, skipped = srv_records(entries, found)
        known = [t for t in ttls if t is not None]
        return Snapshot(SOURCE, records, skipped, ttl=min(known) if known else None)

    async def _target(
        self, resolver: dns.asyncresolver.Resolver, target: dns.name.Name
    ) -> tuple[dns.name.Name, list[str], float | None]:
        """An SRV target's addresses by lookup: A, else AAAA."""
        rrset, response = await self._query(resolver, target, "A")
        if rrset is None:
            rrset, response = await self._query(resolver, target, "AAAA")
        return target, [rd.address for rd in rrset or ()], answer_ttl(response)

    async def run(
        self, publish: Callable[[Snapshot], None], unavailable: Callable[[str], None]
    ) -> None:
        """Resolve until cancelled (see the module's docstring for what is published when)."""
        interval = self.config.interval
        last: tuple[tuple[Record, ...], tuple[str, ...]] | None = None
        backoff: float | None = None
        while True:
            try:
                snapshot = await self.resolve()
            except RegistryUnavailable as e:
                reason = str(e)
            except Exception as e:  # a bug here must not end discovery for the pool
                log.exception("dns discovery of %s failed unexpectedly", self.config.name)
                reason = f"{self.config.name}: internal error: {e!r}"
            else:
                reason = None
            if reason is not None:
                unavailable(reason)
                last = None
                backoff = next_backoff(backoff, interval)
                await self._sleep(backoff)
                continue
            backoff = None
            content = (snapshot.records, snapshot.skipped)
            if content != last:
                publish(snapshot)
                last = content
            await self._sleep(next_delay(interval, snapshot.ttl))


def _reason(name: str, error: BaseException) -> str:
    if isinstance(error, dns.resolver.LifetimeTimeout | dns.exception.Timeout):
        return f"{name}: the resolver did not answer in time"
    if isinstance(error, dns.resolver.NoNameservers):
        # its text names the server and what it answered (SERVFAIL, REFUSED)
        return f"{name}: {error}"
    return f"{name}: {type(error).__name__}: {error}"
