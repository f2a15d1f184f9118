"""DnsSource against a real DNS server: Debian's dnsmasq on a loopback port of its own, with
records from a hosts file the test writes and changes (SIGHUP makes dnsmasq re-read it)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import uvloop

from balancer.config.schema import Address, DnsDiscoveryConfig
from balancer.discovery.dns import DnsSource
from balancer.discovery.records import Snapshot
from tests.integration.dnsmasq import DOMAIN, Dnsmasq, dnsmasq_factory
from tests.integration.harness import Processes


@pytest.fixture
def dnsmasq(procs: Processes, tmp_path: Path) -> Callable[..., Dnsmasq]:
    return dnsmasq_factory(procs, tmp_path)


class Watch:
    """DnsSource.run() as a task, its calls collected in order."""

    def __init__(self, source: DnsSource) -> None:
        self.source = source
        self.events: asyncio.Queue[Snapshot | str] = asyncio.Queue()
        self.task = asyncio.create_task(
            source.run(self.events.put_nowait, lambda why: self.events.put_nowait(f"down: {why}"))
        )

    async def next(self, want: Callable[[Snapshot | str], bool], timeout: float) -> Snapshot | str:
        """The first event (skipping others) that `want` accepts, within timeout seconds."""
        deadline = time.monotonic() + timeout
        seen: list[Snapshot | str] = []
        while True:
            left = deadline - time.monotonic()
            try:
                event = await asyncio.wait_for(self.events.get(), max(left, 0.01))
            except TimeoutError:
                raise AssertionError(f"no wanted event in {timeout}s; saw {seen}") from None
            if want(event):
                return event
            seen.append(event)

    async def snapshot(self, timeout: float = 5.0) -> Snapshot:
        event = await self.next(lambda e: isinstance(e, Snapshot), timeout)
        assert isinstance(event, Snapshot)
        return event

    async def stop(self) -> None:
        self.task.cancel()
        try:
            await asyncio.wait_for(self.task, 2)
        except asyncio.CancelledError:
            pass
        assert self.task.cancelled(), "run() ended by itself or would not end when cancelled"


def names(snapshot: Snapshot) -> list[str]:
    return [r.name for r in snapshot.records]


def source(server: Dnsmasq, name: str, type_: str = "A", **kw) -> DnsSource:  # type: ignore[no-untyped-def]
    config = DnsDiscoveryConfig(
        name=name,
        type=type_,
        port=kw.pop("port", 8080 if type_ != "SRV" else None),
        resolver=server.address,
        interval=kw.pop("interval", 30.0),
    )
    return DnsSource(config, lifetime=kw.pop("lifetime", 1.0), **kw)


def test_a_records_get_the_port_and_follow_the_hosts_file_within_the_ttl(dnsmasq) -> None:  # type: ignore[no-untyped-def]
    server = dnsmasq(ttl=1, hosts="127.0.0.11 app.test\n127.0.0.12 app.test\n")

    async def main() -> None:
        # interval 30 s: only the records' 1 s TTL can bring the changes below in time
        watch = Watch(source(server, "app.test", interval=30.0))
        try:
            first = await watch.snapshot()
            assert names(first) == ["127.0.0.11-8080", "127.0.0.12-8080"]
            assert {r.address for r in first.records} == {
                Address("127.0.0.11", 8080),
                Address("127.0.0.12", 8080),
            }
            assert all(r.weight == 1 for r in first.records) and first.source == "dns"
            assert first.ttl == 1.0

            server.set_hosts("127.0.0.11 app.test\n127.0.0.13 app.test\n")
            changed = await watch.snapshot(timeout=5)
            assert names(changed) == ["127.0.0.11-8080", "127.0.0.13-8080"]

            # the name removed: NXDOMAIN is an answer, and it says there are no backends
            server.set_hosts("127.0.0.99 other.test\n")
            gone = await watch.snapshot(timeout=5)
            assert gone.records == ()
            assert watch.events.empty()  # nothing said of the resolver being down
        finally:
            await watch.stop()

    uvloop.run(main())


def test_aaaa_records_and_a_name_with_no_records_of_that_type(dnsmasq) -> None:  # type: ignore[no-untyped-def]
    server = dnsmasq(hosts="::1 six.test\n127.0.0.11 four.test\n")

    async def main() -> None:
        six = await source(server, "six.test", "AAAA", port=443).resolve()
        assert names(six) == ["__1-443"] and six.records[0].address == Address("::1", 443)
        # four.test exists but has no AAAA: NODATA, an empty answer, not an outage
        nodata = await source(server, "four.test", "AAAA", port=443).resolve()
        assert nodata.records == ()

    uvloop.run(main())


def test_srv_records_give_port_and_weight_from_the_lowest_priority_group(dnsmasq) -> None:  # type: ignore[no-untyped-def]
    service = f"_http._tcp.app.{DOMAIN}"
    server = dnsmasq(
        f"--srv-host={service},a.test,8081,10,30",
        f"--srv-host={service},b.test,8082,10,10",
        f"--srv-host={service},z.test,8083,10,0",
        f"--srv-host={service},backup.test,8089,20,50",  # a higher priority: unused
        f"--srv-host={service},gone.test,8084,10,5",  # a target with no address
        hosts=("127.0.0.21 a.test\n127.0.0.22 b.test\n127.0.0.23 z.test\n127.0.0.29 backup.test\n"),
    )

    async def main() -> None:
        snapshot = await source(server, service, "SRV").resolve()
        got = {(str(r.address), r.weight) for r in snapshot.records}
        assert got == {("127.0.0.21:8081", 30), ("127.0.0.22:8082", 10), ("127.0.0.23:8083", 1)}
        assert names(snapshot) == ["127.0.0.21-8081", "127.0.0.22-8082", "127.0.0.23-8083"]
        assert snapshot.skipped == ("gone.test: no A or AAAA address",)

    uvloop.run(main())


def test_a_dead_resolver_is_unavailable_and_snapshots_resume_when_it_returns(dnsmasq) -> None:  # type: ignore[no-untyped-def]
    server = dnsmasq(hosts="127.0.0.11 app.test\n")

    async def main() -> None:
        watch = Watch(source(server, "app.test", interval=1.0, lifetime=1.0))
        try:
            first = await watch.snapshot()
            assert names(first) == ["127.0.0.11-8080"]

            await asyncio.to_thread(server.kill)
            down = await watch.next(lambda e: isinstance(e, str), timeout=6)
            assert "app.test" in str(down)
            assert "did not answer" in str(down) or "refused" in str(down).lower(), down

            await asyncio.to_thread(server.start)
            # the same records as before, published again: the registry is back
            back = await watch.snapshot(timeout=8)
            assert back.records == first.records
        finally:
            await watch.stop()

    uvloop.run(main())


def test_a_refusing_resolver_is_unavailable_not_an_empty_answer(dnsmasq) -> None:  # type: ignore[no-untyped-def]
    server = dnsmasq(hosts="127.0.0.11 app.test\n")

    async def main() -> None:
        # outside --local=/test/ and with no upstream, dnsmasq answers REFUSED
        watch = Watch(source(server, "app.example", interval=1.0))
        try:
            down = await watch.next(lambda e: True, timeout=5)
            assert isinstance(down, str) and "REFUSED" in down, down
        finally:
            await watch.stop()

    uvloop.run(main())


def test_a_cname_is_followed_to_its_addresses(dnsmasq) -> None:  # type: ignore[no-untyped-def]
    server = dnsmasq("--cname=alias.test,app.test", hosts="127.0.0.11 app.test\n")

    async def main() -> None:
        snapshot = await source(server, "alias.test").resolve()
        assert names(snapshot) == ["127.0.0.11-8080"]

    uvloop.run(main())
