"""`balancer register`: keep one instance's key in etcd on a lease while it runs.

What an autoscaled app server's start script runs beside the app. The key PREFIX + NAME
holds {"address", "weight"} on a lease of `ttl` seconds, refreshed every ttl/3: a crashed
instance (or its whole machine) disappears from every balancer when the lease expires; a
stopped one (SIGTERM, SIGINT) revokes the lease first, so it disappears at once. While etcd
cannot be reached it keeps trying; a lease that expired meanwhile is replaced by a new one.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Sequence

from balancer.config.schema import Address
from balancer.discovery.etcd import parse_value
from balancer.discovery.etcd_client import EtcdClient, EtcdError
from balancer.discovery.records import RegistryUnavailable

log = logging.getLogger("balancer.register")

RETRY_MAX = 2.0  # seconds between attempts while etcd is away (well under any sane TTL)


def registration_value(name: str, address: str, weight: int) -> bytes:
    """The key's value; ValueError when the balancers would skip it as malformed."""
    value = json.dumps({"address": address, "weight": weight}).encode()
    parse_value(name, value)
    return value


class Registration:
    """One key kept alive on a lease."""

    def __init__(
        self,
        endpoints: Sequence[Address],
        prefix: str,
        name: str,
        address: str,
        *,
        weight: int = 1,
        ttl: int = 5,
        timeout: float = 2.0,
    ) -> None:
        if ttl < 2:
            raise ValueError("ttl must be at least 2 seconds (refreshed every ttl/3)")
        self.key = prefix + name
        self.value = registration_value(name, address, weight)
        self.ttl = ttl
        self.client = EtcdClient(endpoints, timeout=min(timeout, ttl / 3))
        self.lease = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Register, keep the lease alive until `stop` is set, then revoke it."""
        try:
            while not stop.is_set():
                try:
                    await self._keep(stop)
                except (RegistryUnavailable, EtcdError) as e:
                    log.error("etcd: %s; retrying", e)
                    self.lease = 0
                    await _wait(stop, RETRY_MAX)
            await self._unregister()
        finally:
            await self.client.close()

    async def _keep(self, stop: asyncio.Event) -> None:
        self.lease = await self.client.grant(self.ttl)
        await self.client.put(self.key, self.value, self.lease)
        log.warning(
            "registered %s = %s (lease %x, ttl %ds)",
            self.key,
            self.value.decode(),
            self.lease,
            self.ttl,
        )
        while not await _wait(stop, self.ttl / 3):
            if await self.client.keepalive(self.lease) <= 0:
                log.error(
                    "lease %x expired (etcd was out of reach too long): registering anew",
                    self.lease,
                )
                return

    async def _unregister(self) -> None:
        if not self.lease:
            return
        try:
            await self.client.revoke(self.lease)
            log.warning("unregistered %s", self.key)
        except (RegistryUnavailable, EtcdError) as e:
            # the key goes when its lease expires, at most ttl seconds from now
            log.error(
                "could not revoke the lease (%s): %s expires within %ds", e, self.key, self.ttl
            )


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Sleep up to `seconds`; True if `event` was set meanwhile."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return False
    return True


async def run_registration(registration: Registration) -> int:
    """Until SIGTERM or SIGINT; the exit status."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await registration.run(stop)
    return 0
