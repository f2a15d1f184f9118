"""Debian's dnsmasq as a test DNS server on a loopback port of its own, its names from a
hosts file the test writes (SIGHUP makes it re-read the file)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

from balancer.config.schema import Address
from tests.integration.harness import Processes, free_port, wait_port
from tests.support import missing_tool

DOMAIN = "test"  # answered from local data only: unknown names under it are NXDOMAIN


def dnsmasq_binary() -> str:
    found = shutil.which("dnsmasq") or shutil.which("dnsmasq", path="/usr/sbin:/sbin")
    if found is None:
        missing_tool("dnsmasq is not installed (Debian package dnsmasq-base)")
    assert found is not None
    return found


class Dnsmasq:
    """One dnsmasq on 127.0.0.1:port, its names from `hosts`; restartable on the same port."""

    def __init__(self, procs: Processes, tmp: Path, *extra: str, ttl: int = 1) -> None:
        self.procs = procs
        self.binary = dnsmasq_binary()
        self.hosts = tmp / "dns-hosts"
        self.hosts.write_text("")
        self.port = free_port()
        self.argv = [
            self.binary,
            "--keep-in-foreground",
            f"--port={self.port}",
            "--listen-address=127.0.0.1",
            "--bind-interfaces",
            "--no-resolv",
            "--no-hosts",
            "-C",
            "/dev/null",
            "--pid-file=",  # none: the default /run/dnsmasq.pid is the system's
            "--log-facility=-",
            "--log-queries",
            f"--local=/{DOMAIN}/",
            f"--addn-hosts={self.hosts}",
            f"--local-ttl={ttl}",
            *(["--user=root"] if os.geteuid() == 0 else []),  # else it drops to nobody,
            # who cannot re-read a hosts file in pytest's private tmp directory
            *extra,
        ]
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> Address:
        return Address("127.0.0.1", self.port)

    def start(self) -> None:
        self.proc = self.procs.start(self.argv, log_name="dnsmasq.log")
        wait_port(self.port, self.proc)  # it serves TCP on the same port once ready

    def kill(self) -> None:
        assert self.proc is not None
        self.procs.stop(self.proc, signal.SIGKILL)

    def set_hosts(self, text: str) -> None:
        """New records, read at once (SIGHUP also empties dnsmasq's cache)."""
        assert self.proc is not None
        self.hosts.write_text(text)
        os.kill(self.proc.pid, signal.SIGHUP)


def dnsmasq_factory(procs: Processes, tmp_path: Path) -> Callable[..., Dnsmasq]:
    """make(*dnsmasq options, ttl=, hosts=): a started Dnsmasq; the procs fixture stops it,
    by PID, however the test ends."""

    def make(*extra: str, ttl: int = 1, hosts: str = "") -> Dnsmasq:
        server = Dnsmasq(procs, tmp_path, *extra, ttl=ttl)
        server.hosts.write_text(hosts)
        server.start()
        return server

    return make
