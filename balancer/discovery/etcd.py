"""Backends from an etcd prefix: one range, then a watch from the revision after it; a key
PREFIX + NAME holding JSON {"address": "host:port", "weight": N} is a backend NAME."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from typing import Any

from balancer.config import values as v
from balancer.config.schema import EtcdDiscoveryConfig
from balancer.discovery.etcd_client import Compacted, EtcdClient, EtcdError, unb64
from balancer.discovery.records import Record, RegistryUnavailable, Snapshot

log = logging.getLogger("balancer.discovery")

MAX_WEIGHT = 1000  # as for listed backends
BACKOFF_FIRST = 0.25
BACKOFF_MAX = 5.0


def parse_value(name: str, value: bytes) -> Record:
    """The backend a key's value describes; ValueError saying what is wrong with it."""
    if not v.NAME_RE.fullmatch(name):
        raise ValueError(
            f"the key's NAME {name!r} is not a backend name (letters, digits, '_', '-', '.')"
        )
    try:
        doc = json.loads(value)
    except (ValueError, UnicodeDecodeError):
        raise ValueError(f"not JSON: {value[:60]!r}") from None
    if not isinstance(doc, dict):
        raise ValueError('expected a JSON object {"address": "host:port", "weight": N}')
    unknown = sorted(set(doc) - {"address", "weight"})
    if unknown:
        raise ValueError(f"unknown field(s) {', '.join(map(repr, unknown))}")
    if "address" not in doc:
        raise ValueError('"address" is missing')
    try:
        address = v.parse_address(doc["address"])
    except ValueError as e:
        raise ValueError(f'"address": {e}') from None
    weight = doc.get("weight", 1)
    if isinstance(weight, bool) or not isinstance(weight, int) or not 1 <= weight <= MAX_WEIGHT:
        raise ValueError(f'"weight" must be an integer 1..{MAX_WEIGHT}, got {weight!r}')
    return Record(name, address, weight)


class PrefixState:
    """The prefix's keys as last seen, and the revision they are current at."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.values: dict[str, bytes] = {}  # NAME -> raw value
        self.revision = 0

    def load(self, revision: int, kvs: list[dict[str, Any]]) -> None:
        self.values = {}
        for kv in kvs:
            self._put(kv)
        self.revision = revision

    def apply(self, result: dict[str, Any]) -> None:
        """One watch response's events, in order."""
        for event in result.get("events", []):
            kv = event.get("kv", {})
            if event.get("type") == "DELETE":
                self.values.pop(self._name(kv), None)
            else:  # PUT, the enum's zero value, which the JSON mapping leaves out
                self._put(kv)
        revisions = [
            int(e.get("kv", {}).get("mod_revision", 0) or 0) for e in result.get("events", [])
        ]
        if not revisions and not result.get("created"):
            # a progress notification: nothing before its revision is still to come (the
            # "created" answer's header is current before the events being replayed)
            revisions = [int(result.get("header", {}).get("revision", 0) or 0)]
        self.revision = max([self.revision, *revisions])

    def _name(self, kv: dict[str, Any]) -> str:
        key = unb64(kv.get("key", "")).decode("utf-8", "replace")
        return key[len(self.prefix) :]

    def _put(self, kv: dict[str, Any]) -> None:
        self.values[self._name(kv)] = unb64(kv.get("value", ""))

    def snapshot(self) -> Snapshot:
        records, skipped = [], []
        for name in sorted(self.values):
            try:
                records.append(parse_value(name, self.values[name]))
            except ValueError as e:
                skipped.append(f"{self.prefix}{name}: {e}")
        return Snapshot("etcd", tuple(records), tuple(skipped))


class EtcdSource:
    """A pool's etcd registry (implements balancer.discovery.records.Source)."""

    kind = "etcd"

    def __init__(self, config: EtcdDiscoveryConfig, *, ping_interval: float = 1.0) -> None:
        self.config = config
        # a watch on a partitioned member can stay open and silent: a linearizable read
        # (which needs a leader) at this interval tells a quiet registry from a lost one
        self.ping_interval = ping_interval
        self.client = EtcdClient(config.endpoints, timeout=config.timeout)
        self.state = PrefixState(config.prefix)

    async def run(
        self, publish: Callable[[Snapshot], None], unavailable: Callable[[str], None]
    ) -> None:
        backoff = BACKOFF_FIRST
        try:
            while True:
                try:
                    await self._sync(publish)
                    backoff = BACKOFF_FIRST  # the stream ended cleanly: a member restarting
                except (RegistryUnavailable, EtcdError) as e:
                    unavailable(str(e))
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
                except Exception as e:  # a bug here must not end discovery for good
                    log.exception("etcd %s: unexpected failure", self.config.prefix)
                    unavailable(f"unexpected failure: {e!r}")
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, BACKOFF_MAX)
        finally:
            await self.client.close()

    async def _sync(self, publish: Callable[[Snapshot], None]) -> None:
        """Bring the state up to date and follow the watch until it ends or fails."""
        if not self.state.revision:
            revision, kvs = await self.client.range_prefix(self.config.prefix)
            self.state.load(revision, kvs)
            publish(self.state.snapshot())
        # else resume where the last watch left off: what happened meanwhile arrives as
        # events, unless etcd compacted it away
        watch = asyncio.ensure_future(self._follow(publish))
        ping = asyncio.ensure_future(self._ping_forever())
        try:
            done, _ = await asyncio.wait({watch, ping}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                task.result()  # the failure of whichever ended first
        finally:
            for task in (watch, ping):
                task.cancel()
            await asyncio.gather(watch, ping, return_exceptions=True)

    async def _follow(self, publish: Callable[[Snapshot], None]) -> None:
        prefix = self.config.prefix
        try:
            async for result in self.client.watch(prefix, self.state.revision + 1):
                # the first answer (watch created, no events) says the registry is back
                self.state.apply(result)
                publish(self.state.snapshot())
        except Compacted as e:
            log.warning("etcd %s: %s; listing the prefix again", prefix, e)
            revision, kvs = await self.client.range_prefix(prefix)
            self.state.load(revision, kvs)
            publish(self.state.snapshot())

    async def _ping_forever(self) -> None:
        while True:
            await asyncio.sleep(self.ping_interval)
            await self.client.ping(self.config.prefix)
