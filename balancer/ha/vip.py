"""The virtual IP on a local interface: netlink add/remove/check (pyroute2) and gratuitous ARP.

Only this module touches addresses and ARP. Netlink work runs in one private worker thread: the
synchronous pyroute2 `IPRoute` drives an asyncio loop of its own and cannot run inside ours, and
one thread also keeps adds and removes in the order they were asked for.

The VIP is added with a finite lifetime (`valid_lft`) that the active node renews on every
heartbeat tick, a dead man's switch: if the process dies (kill -9) or hangs, the kernel drops the
address by itself within `lifetime` seconds, so a dead node does not keep answering ARP for the
VIP beside the new active.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import ipaddress
import logging
import socket
import struct
from collections.abc import Callable
from typing import TypeVar

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("balancer.ha")

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
ARPOP_REQUEST = 1
ARPOP_REPLY = 2
BROADCAST_MAC = b"\xff" * 6
_ETH_MIN_FRAME = 60  # without FCS; short frames are padded so every NIC sends them

T = TypeVar("T")


def build_garp(mac: bytes, ip: str, op: int = ARPOP_REQUEST) -> bytes:
    """A broadcast gratuitous ARP frame announcing that `ip` is at `mac`.

    A request (RFC 5227 announcement) has an all-zero target MAC; a reply repeats the sender MAC
    as target, which Linux requires before it treats a reply as gratuitous.
    """
    if len(mac) != 6:
        raise ValueError("a MAC is 6 bytes")
    spa = ipaddress.IPv4Address(ip).packed
    tha = b"\x00" * 6 if op == ARPOP_REQUEST else mac
    eth = BROADCAST_MAC + mac + struct.pack("!H", ETH_P_ARP)
    arp = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, op) + mac + spa + tha + spa
    return (eth + arp).ljust(_ETH_MIN_FRAME, b"\x00")


class VipAddress:
    """Blocking netlink operations on one address of one interface; use from one thread only.

    Netlink failures surface as OSError with the errno the kernel gave."""

    def __init__(self, interface: str, cidr: str) -> None:
        iface = ipaddress.ip_interface(cidr)
        if iface.version != 4:
            raise ValueError("only IPv4 virtual IPs are supported (gratuitous ARP)")
        self.interface = interface
        self.ip = str(iface.ip)
        self.prefixlen = iface.network.prefixlen
        self._ipr: IPRoute | None = None
        self._index: int | None = None

    def _link(self) -> tuple[IPRoute, int]:
        if self._ipr is None:
            self._ipr = IPRoute()
        if self._index is None:
            found = self._ipr.link_lookup(ifname=self.interface)
            if not found:
                raise OSError(errno.ENODEV, f"no interface {self.interface!r}")
            self._index = found[0]
        return self._ipr, self._index

    def add(self, lifetime: int | None = None) -> None:
        """Add the address, or renew its lifetime; adding one that exists is not an error."""
        ipr, index = self._link()
        extra = {}
        if lifetime is not None:
            extra["IFA_CACHEINFO"] = {
                "ifa_preferred": lifetime,
                "ifa_valid": lifetime,
                "cstamp": 0,
                "tstamp": 0,
            }
        try:
            # replace = create or update, so it also renews the lifetime of an existing address.
            ipr.addr("replace", index=index, address=self.ip, prefixlen=self.prefixlen, **extra)
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                self._index = None  # the interface was recreated; look it up again next time
            raise self._error("add", e) from None

    def remove(self) -> bool:
        """Remove the address; True if it was there. Removing one that is gone is not an error."""
        ipr, index = self._link()
        try:
            ipr.addr("del", index=index, address=self.ip, prefixlen=self.prefixlen)
        except NetlinkError as e:
            if e.code in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ESRCH):
                return False
            if e.code == errno.ENODEV:
                self._index = None
                return False
            raise self._error("remove", e) from None
        return True

    def holds_vip(self) -> bool:
        ipr, index = self._link()
        return any(a.get("IFA_ADDRESS") == self.ip for a in ipr.get_addr(index=index))

    def mac(self) -> bytes:
        ipr, index = self._link()
        text = ipr.get_links(index)[0].get("IFLA_ADDRESS")
        return bytes.fromhex(text.replace(":", ""))

    def close(self) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def _error(self, what: str, e: NetlinkError) -> OSError:
        hint = " (needs root or CAP_NET_ADMIN)" if e.code == errno.EPERM else ""
        return OSError(
            e.code, f"{what} {self.ip}/{self.prefixlen} on {self.interface}: {e.args[-1]}{hint}"
        )


class Vip:
    """The asyncio face of the VIP: netlink calls in a worker thread, ARP from the loop."""

    def __init__(
        self,
        interface: str,
        cidr: str,
        *,
        lifetime: int | None = None,
        garp_count: int = 5,
        garp_interval: float = 0.1,
    ) -> None:
        self.address = VipAddress(interface, cidr)
        self.interface = interface
        self.ip = self.address.ip
        self.lifetime = lifetime
        self.garp_count = garp_count
        self.garp_interval = garp_interval
        self.garps_sent = 0
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ha-vip")
        self._arp: socket.socket | None = None
        self._mac: bytes | None = None

    def _run(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        # Submitted now, so calls run in the order they were made, whenever they are awaited.
        return asyncio.get_running_loop().run_in_executor(self._executor, fn)

    def add(self) -> asyncio.Future[None]:
        return self._run(lambda: self.address.add(self.lifetime))

    def remove(self) -> asyncio.Future[bool]:
        return self._run(self.address.remove)

    def holds_vip(self) -> asyncio.Future[bool]:
        return self._run(self.address.holds_vip)

    async def announce(self, count: int | None = None, *, delay_first: bool = False) -> None:
        """Gratuitous ARP, request and reply, `count` (default garp_count) times
        `garp_interval` apart; `delay_first` when a round was just sent."""
        for i in range(self.garp_count if count is None else count):
            if i or delay_first:
                await asyncio.sleep(self.garp_interval)
            await self.send_garp()

    async def send_garp(self) -> None:
        if self._arp is None:
            self._mac = await self._run(self.address.mac)
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
            sock.setblocking(False)
            try:
                sock.bind((self.interface, ETH_P_ARP))
            except OSError:
                sock.close()
                raise
            self._arp = sock
        assert self._mac is not None
        try:
            for op in (ARPOP_REQUEST, ARPOP_REPLY):
                self._arp.send(build_garp(self._mac, self.ip, op))
                self.garps_sent += 1
        except OSError:
            # The interface may have been recreated with another MAC; reopen next time.
            self._arp.close()
            self._arp = None
            raise

    def close(self) -> None:
        if self._arp is not None:
            self._arp.close()
            self._arp = None
        self._executor.submit(self.address.close)
        self._executor.shutdown(wait=True)
