"""DNS discovery without a network: answers (real dnspython messages) into records, the
delays, and what run() publishes when."""

from __future__ import annotations

import asyncio

import dns.asyncresolver
import dns.message
import dns.name
import dns.rdatatype
import dns.resolver
import dns.rrset
import pytest

from balancer.config.schema import Address, DnsDiscoveryConfig
from balancer.config.values import NAME_RE
from balancer.discovery.dns import (
    DnsSource,
    SrvEntry,
    address_records,
    answer_ttl,
    next_backoff,
    next_delay,
    pool_weights,
    record_name,
    srv_entries,
    srv_records,
    target_addresses,
)
from balancer.discovery.records import Record, RegistryUnavailable, Snapshot

N = dns.name.from_text


def srv(*lines: str) -> dns.rrset.RRset:
    return dns.rrset.from_text_list("_http._tcp.app.test.", 30, "IN", "SRV", list(lines))


def response(zone: str, qname: str = "app.test.", rdtype: str = "A") -> dns.message.Message:
    """A response with the given sections, in dig's presentation format."""
    return dns.message.from_text(
        f"id 1\nopcode QUERY\nrcode NOERROR\nflags QR AA RD RA\n;QUESTION\n{qname} IN {rdtype}\n"
        + zone
    )


# -- names and A/AAAA -------------------------------------------------------------------------


def test_record_names_are_valid_pool_names_for_both_families() -> None:
    assert record_name(Address("198.18.0.5", 8080)) == "198.18.0.5-8080"
    assert record_name(Address("fd00::1", 443)) == "fd00__1-443"
    for name in ("198.18.0.5-8080", "fd00__1-443", record_name(Address("::1", 1))):
        assert NAME_RE.fullmatch(name), name


def test_address_records_carry_the_port_weight_one_sorted_and_deduplicated() -> None:
    records = address_records(["127.0.0.12", "127.0.0.11", "127.0.0.12"], 9000)
    assert records == (
        Record("127.0.0.11-9000", Address("127.0.0.11", 9000), 1),
        Record("127.0.0.12-9000", Address("127.0.0.12", 9000), 1),
    )
    assert address_records([], 9000) == ()


# -- SRV --------------------------------------------------------------------------------------


def test_srv_uses_only_the_lowest_priority_group_and_drops_the_root_target() -> None:
    entries = srv_entries(
        srv(
            "20 5 8083 backup.test.",
            "10 5 8081 a.test.",
            "10 0 8082 b.test.",
            "10 9 8084 .",
        )
    )
    assert entries == [SrvEntry(10, 5, 8081, N("a.test.")), SrvEntry(10, 0, 8082, N("b.test."))]
    # "." alone: the service is decidedly not available
    assert srv_entries(srv("0 0 0 .")) == []
    assert srv_entries(None) == []


def test_srv_weights_zero_becomes_one_and_large_ones_scale_keeping_ratios() -> None:
    assert pool_weights([0, 0]) == [1, 1]
    assert pool_weights([0, 5, 1000]) == [1, 5, 1000]
    assert pool_weights([65535, 32768, 1, 0]) == [1000, 500, 1, 1]
    assert pool_weights([]) == []


def test_srv_records_take_port_and_weight_from_the_record_and_merge_shared_addresses() -> None:
    entries = [
        SrvEntry(10, 3, 8081, N("a.test.")),
        SrvEntry(10, 2, 8081, N("alias.test.")),  # same address and port as a.test
        SrvEntry(10, 1, 8082, N("b.test.")),
        SrvEntry(10, 1, 8083, N("gone.test.")),
    ]
    found = {
        N("a.test."): ["127.0.0.21"],
        N("alias.test."): ["127.0.0.21"],
        N("b.test."): ["127.0.0.22", "127.0.0.23"],
    }
    records, skipped = srv_records(entries, found)
    assert records == (
        Record("127.0.0.21-8081", Address("127.0.0.21", 8081), 5),
        Record("127.0.0.22-8082", Address("127.0.0.22", 8082), 1),
        Record("127.0.0.23-8082", Address("127.0.0.23", 8082), 1),
    )
    assert skipped == ("gone.test: no A or AAAA address",)


def test_target_addresses_prefer_a_and_fall_back_to_aaaa_names_compared_without_case() -> None:
    message = response(
        ";ADDITIONAL\n"
        "A.test. 30 IN A 127.0.0.21\n"
        "a.test. 30 IN AAAA ::1\n"
        "six.test. 30 IN AAAA fd00::6\n"
        "six.test. 30 IN AAAA fd00::7\n"
        "other.test. 30 IN TXT hello\n",
        "_http._tcp.app.test.",
        "SRV",
    )
    found = target_addresses(message.additional)
    assert found == {N("a.test."): ["127.0.0.21"], N("six.test."): ["fd00::6", "fd00::7"]}
    assert found[N("A.TEST.")] == ["127.0.0.21"]


# -- time -------------------------------------------------------------------------------------


def test_answer_ttl_is_the_smallest_in_the_answer_or_the_negative_ttl_of_the_soa() -> None:
    positive = response(";ANSWER\napp.test. 60 IN CNAME real.test.\nreal.test. 7 IN A 127.0.0.1\n")
    assert answer_ttl(positive) == 7.0
    # RFC 2308: a negative answer holds for the lesser of the SOA's TTL and its minimum
    negative = response(";AUTHORITY\ntest. 300 IN SOA ns.test. admin.test. 1 60 60 600 20\n")
    assert answer_ttl(negative) == 20.0
    short_soa = response(";AUTHORITY\ntest. 4 IN SOA ns.test. admin.test. 1 60 60 600 20\n")
    assert answer_ttl(short_soa) == 4.0
    assert answer_ttl(response("")) is None
    assert answer_ttl(None) is None


def test_next_delay_is_the_interval_unless_the_ttl_ends_first_with_a_floor_on_the_ttl() -> None:
    assert next_delay(5.0, None) == 5.0
    assert next_delay(5.0, 60.0) == 5.0
    assert next_delay(5.0, 3.0) == 3.0
    assert next_delay(5.0, 0.0) == 1.0  # a TTL of 0 must not become a query loop
    assert next_delay(0.2, 0.0) == 0.2  # but an interval set that short is the operator's


def test_backoff_doubles_from_half_a_second_up_to_the_interval() -> None:
    waits, previous = [], None
    for _ in range(6):
        previous = next_backoff(previous, 5.0)
        waits.append(previous)
    assert waits == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0]
    assert next_backoff(None, 0.1) == 0.5
    assert next_backoff(0.5, 0.1) == 0.5


# -- lookups through a resolver that answers from a table (no sockets) ------------------------


class TableResolver:
    """Answers like dnspython's resolver, from presentation-format answers: a missing name
    is NXDOMAIN, a name present without the type is NODATA, "servfail" fails."""

    def __init__(self, table: dict[tuple[str, str], str]) -> None:
        self.table = table
        self.asked: list[tuple[str, str]] = []

    async def resolve(
        self, name: str | dns.name.Name, rdtype: str, raise_on_no_answer: bool = True
    ) -> dns.resolver.Answer:
        qname = N(str(name))
        key = (qname.to_text(), rdtype)
        self.asked.append(key)
        if self.table.get(key) == "servfail":
            raise dns.resolver.NoNameservers(
                request=dns.message.make_query(qname, rdtype), errors=[]
            )
        if not any(n == key[0] for n, _ in self.table):
            message = response("", key[0], rdtype)
            message.set_rcode(dns.rcode.NXDOMAIN)
            raise dns.resolver.NXDOMAIN(qnames=[qname], responses={qname: message})
        message = response(self.table.get(key, ""), key[0], rdtype)
        return dns.resolver.Answer(
            qname, dns.rdatatype.from_text(rdtype), dns.rdataclass.IN, message
        )


def source(name: str, type_: str = "A", **kw) -> DnsSource:  # type: ignore[no-untyped-def]
    port = 9000 if type_ != "SRV" else None
    config = DnsDiscoveryConfig(name=name, type=type_, port=port, interval=5.0)
    return DnsSource(config, **kw)


def test_a_lookup_gives_records_and_ttl_and_nxdomain_nodata_are_empty_answers() -> None:
    table = {
        ("app.test.", "A"): ";ANSWER\napp.test. 3 IN A 127.0.0.11\napp.test. 3 IN A 127.0.0.12\n",
        ("v4only.test.", "A"): ";ANSWER\nv4only.test. 3 IN A 127.0.0.13\n",
    }
    resolver = TableResolver(table)

    async def main() -> list[Snapshot]:
        names = [("app.test", "A"), ("absent.test", "A"), ("v4only.test", "AAAA")]
        return [await source(n, t, resolver=resolver).resolve() for n, t in names]

    found, absent, nodata = asyncio.run(main())
    assert [r.name for r in found.records] == ["127.0.0.11-9000", "127.0.0.12-9000"]
    assert found.ttl == 3.0 and found.source == "dns"
    assert absent.records == () and nodata.records == ()


def test_srv_targets_missing_from_the_additional_section_are_looked_up_a_then_aaaa() -> None:
    table = {
        ("_http._tcp.app.test.", "SRV"): (
            ";ANSWER\n"
            "_http._tcp.app.test. 30 IN SRV 1 10 8081 given.test.\n"
            "_http._tcp.app.test. 30 IN SRV 1 20 8082 looked.test.\n"
            "_http._tcp.app.test. 30 IN SRV 1 30 8083 six.test.\n"
            "_http._tcp.app.test. 30 IN SRV 1 40 8084 nowhere.test.\n"
            "_http._tcp.app.test. 30 IN SRV 2 50 8085 backup.test.\n"
            ";ADDITIONAL\ngiven.test. 30 IN A 127.0.0.21\n"
        ),
        ("looked.test.", "A"): ";ANSWER\nlooked.test. 4 IN A 127.0.0.22\n",
        ("six.test.", "AAAA"): ";ANSWER\nsix.test. 30 IN AAAA ::1\n",
    }
    resolver = TableResolver(table)
    snapshot = asyncio.run(source("_http._tcp.app.test", "SRV", resolver=resolver).resolve())
    assert snapshot.records == (
        Record("127.0.0.21-8081", Address("127.0.0.21", 8081), 10),
        Record("127.0.0.22-8082", Address("127.0.0.22", 8082), 20),
        Record("__1-8083", Address("::1", 8083), 30),
    )
    assert snapshot.skipped == ("nowhere.test: no A or AAAA address",)
    assert snapshot.ttl == 4.0  # the target lookup's TTL is the shortest
    # the backup group's target and the target given in the answer are never asked for
    assert ("backup.test.", "A") not in resolver.asked
    assert ("given.test.", "A") not in resolver.asked


def test_a_target_lookup_failing_makes_the_whole_snapshot_unavailable() -> None:
    table = {
        ("_http._tcp.app.test.", "SRV"): (
            ";ANSWER\n_http._tcp.app.test. 30 IN SRV 1 1 8081 flaky.test.\n"
        ),
        ("flaky.test.", "A"): "servfail",
    }
    src = source("_http._tcp.app.test", "SRV", resolver=TableResolver(table))
    with pytest.raises(RegistryUnavailable, match="_http._tcp.app.test"):
        asyncio.run(src.resolve())


# -- run(): what is published when ------------------------------------------------------------


A1 = Snapshot("dns", (Record("127.0.0.1-80", Address("127.0.0.1", 80)),), ttl=2.0)
A2 = Snapshot("dns", (Record("127.0.0.2-80", Address("127.0.0.2", 80)),), ttl=30.0)


class Scripted(DnsSource):
    """resolve() plays a script: a Snapshot is answered, an exception raised; then it waits
    for ever (until run() is cancelled)."""

    def __init__(self, script: list[Snapshot | Exception]) -> None:
        self.waits: list[float] = []
        self.done = asyncio.Event()
        super().__init__(
            DnsDiscoveryConfig(name="app.test", port=80, interval=5.0), sleep=self._record
        )
        self.script = list(script)

    async def _record(self, delay: float) -> None:
        self.waits.append(delay)

    async def resolve(self) -> Snapshot:
        if not self.script:
            self.done.set()
            await asyncio.Event().wait()
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        return step


def play(script: list[Snapshot | Exception]) -> tuple[Scripted, list[object]]:
    events: list[object] = []

    async def main() -> Scripted:
        src = Scripted(script)
        task = asyncio.create_task(src.run(events.append, lambda why: events.append(why)))
        await asyncio.wait_for(src.done.wait(), 5)
        task.cancel()
        # cancellation ends run() promptly, as a CancelledError, not a return or another error
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 1)
        return src

    return asyncio.run(main()), events


def test_run_publishes_changes_only_and_the_first_answer_after_a_failure() -> None:
    down = RegistryUnavailable("app.test: the resolver did not answer in time")
    src, events = play([A1, A1, down, down, A1, A1, A2])
    assert events == [A1, str(down), str(down), A1, A2]
    # after an answer: min(interval, ttl); after failures: backoff 0.5, 1, then reset
    assert src.waits == [2.0, 2.0, 0.5, 1.0, 2.0, 2.0, 5.0]


def test_run_survives_an_unexpected_error_and_reports_it_as_unavailable() -> None:
    src, events = play([ValueError("bug"), A1])
    assert len(events) == 2 and "internal error" in str(events[0]) and events[1] == A1
    assert src.waits == [0.5, 2.0]


def test_empty_answers_are_published_like_any_change() -> None:
    empty = Snapshot("dns", (), ttl=None)
    _, events = play([A1, empty, empty, A1])
    assert events == [A1, empty, A1]


def test_the_configured_resolver_is_the_only_one_asked_and_without_one_the_systems() -> None:
    configured = DnsSource(
        DnsDiscoveryConfig(name="app.test", port=80, resolver=Address("127.0.0.1", 5353))
    )._make_resolver()
    assert [(ns.address, ns.port) for ns in configured.nameservers] == [("127.0.0.1", 5353)]
    assert configured.cache is None and configured.search == []


def test_no_system_resolver_configuration_is_unavailable_not_a_crash(monkeypatch) -> None:  # type: ignore[no-untyped-def]
    def no_conf(*args: object, **kw: object) -> None:
        raise dns.resolver.NoResolverConfiguration("no nameservers")

    monkeypatch.setattr(dns.asyncresolver, "Resolver", no_conf)
    src = DnsSource(DnsDiscoveryConfig(name="app.test", port=80))  # resolver: the system's
    with pytest.raises(RegistryUnavailable, match="no system resolver"):
        asyncio.run(src.resolve())
