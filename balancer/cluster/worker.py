"""Worker: one extra serving process of multi-process mode (`balancer worker`, started by the
owner only). It runs the owner's config on its own listeners (SO_REUSEPORT), applies the
backend state the owner sends, reports its counters, and drains and exits when the owner
says so or goes away."""

from __future__ import annotations

import argparse
import asyncio
import base64
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from balancer import config as config_mod
from balancer.cluster import state
from balancer.cluster.channel import PROTOCOL, Channel, Message, ProtocolError

if TYPE_CHECKING:
    from balancer.backend import Backend
    from balancer.pool import Pool

log = logging.getLogger("balancer.cluster")

REPORT_INTERVAL = 0.5  # counters sent to the owner this often (and whenever it asks)
FINAL_REPORT_TIMEOUT = 2.0


class Served(state.Process, Protocol):
    """What a worker drives of the daemon it runs. balancer.daemon builds that daemon (with
    the worker role: it serves, nothing else) and hands it in through `Wiring`."""

    @property
    def pools(self) -> Mapping[str, Pool]: ...

    preset_sticky_keys: dict[str, list[bytes]]  # the owner's keys, set before apply()
    reloads: int

    async def start(self) -> None: ...

    async def apply(self, new: config_mod.Config) -> None: ...

    async def stop(self) -> None: ...

    async def wait_stopped(self) -> None: ...

    def backend_removed(self, b: Backend) -> None: ...


class Wiring(Protocol):
    """How the worker gets its daemon, from the outside (cluster/ does not import the daemon)."""

    def build(self, config: config_mod.Config, sticky_keys: dict[str, list[bytes]]) -> Served:
        """A worker-role daemon for `config`, signing cookies with the owner's keys."""
        ...

    def cleanup(self, daemon: Served) -> Awaitable[None]:
        """Undo a start() that failed half-way."""
        ...

    def settle(self) -> None:
        """Startup is done: freeze what lives as long as the process (see daemon.settle_heap)."""
        ...


def main(argv: list[str], wiring: Wiring) -> int:
    parser = argparse.ArgumentParser(prog="balancer worker", description=argparse.SUPPRESS)
    parser.add_argument("--fd", type=int, required=True, help="this end of the owner's socketpair")
    parser.add_argument("--slot", type=int, default=0)
    parser.add_argument("--log-level", default="info")
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper(), logging.INFO),
        format=f"%(asctime)s %(levelname)s %(name)s [worker {args.slot} pid {os.getpid()}]:"
        " %(message)s",
        stream=sys.stderr,
    )
    import uvloop

    return uvloop.run(run(args.fd, args.slot, wiring))


def config_from(msg: Message) -> config_mod.Config:
    """The Config a `config` message carries, parsed as the owner parsed it."""
    text = base64.b64decode(msg["text"])
    return config_mod.parse_as(text, msg["path"])


def sticky_keys_from(msg: Message) -> dict[str, list[bytes]]:
    return {path: [bytes.fromhex(k) for k in keys] for path, keys in msg["sticky_keys"].items()}


async def run(fd: int, slot: int, wiring: Wiring) -> int:
    channel = await Channel.open(socket.socket(fileno=fd))
    try:
        first = await channel.recv()
    except ProtocolError as e:
        log.error("bad first message from the owner: %s", e)
        return 1
    if first is None or first["type"] != "config":
        log.error("the owner sent no config: exiting")
        return 1
    if first.get("protocol") != PROTOCOL:
        problem = (
            f"this worker speaks protocol {PROTOCOL}, the owner {first.get('protocol')}: the"
            " balancer was upgraded under a running owner; restart it to run the new version"
        )
        log.error("%s", problem)
        channel.send({"type": "failed", "error": problem})
        await channel.flush()
        return 1
    try:
        cfg = config_from(first)
    except config_mod.ConfigError as e:
        # the owner validated these very bytes; a file they name may have gone meanwhile
        channel.send({"type": "failed", "error": str(e)})
        await channel.flush()
        return 1
    daemon = wiring.build(cfg, sticky_keys_from(first))
    try:
        await daemon.start()
    except OSError as e:
        log.error("cannot start: %s", e)
        channel.send({"type": "failed", "error": str(e)})
        await channel.flush()
        await wiring.cleanup(daemon)
        return 1
    worker = Worker(daemon, channel)
    if first.get("state"):
        worker.apply_state(first["state"])
    wiring.settle()
    channel.send(
        {
            "type": "ready",
            "pid": os.getpid(),
            "generation": first["generation"],
            "seq": first["seq"],
        }
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
    # reloads go through the owner, which validates once and forwards to every process
    loop.add_signal_handler(
        signal.SIGHUP,
        lambda: log.warning("SIGHUP ignored: send it to the owner (pid %d)", os.getppid()),
    )
    reader = loop.create_task(worker.serve())
    reporter = loop.create_task(worker.report_forever())
    await daemon.wait_stopped()
    reporter.cancel()
    # the last counters, so the owner's totals include the requests this drain finished
    worker.send_report(0)
    try:
        await asyncio.wait_for(channel.flush(), FINAL_REPORT_TIMEOUT)
    except TimeoutError:
        pass
    reader.cancel()
    await asyncio.gather(reader, reporter, return_exceptions=True)
    channel.close()
    return 0


class Worker:
    """The worker's side of the channel: applies what the owner sends, reports counters."""

    def __init__(self, daemon: Served, channel: Channel) -> None:
        self.daemon = daemon
        self.channel = channel
        self.load_stamps: dict[Any, float] = {}

    def stop(self) -> None:
        asyncio.get_running_loop().create_task(self.daemon.stop())

    async def serve(self) -> None:
        """Apply the owner's messages until it says stop or goes away; then drain. Whatever
        goes wrong here ends in a drain too: a worker that can no longer hear its owner must
        not keep serving (it would outlive the owner and miss every change)."""
        try:
            await self._serve()
        except Exception:
            log.exception("handling the owner's messages failed: draining and exiting")
        self.stop()

    async def _serve(self) -> None:
        while True:
            try:
                msg = await self.channel.recv()
            except ProtocolError as e:
                log.error("bad message from the owner: %s: draining and exiting", e)
                break
            if msg is None:
                log.warning("the owner process is gone: draining and exiting")
                break
            kind = msg["type"]
            if kind == "state":
                self.apply_state(msg["state"])
                self.channel.send({"type": "ack", "seq": msg["seq"]})
            elif kind == "config":
                await self.reload(msg)
            elif kind == "report":
                self.send_report(msg.get("id", 0))
            elif kind == "stop":
                log.info("stop requested by the owner: draining")
                break
            else:
                log.warning("unknown message type %r from the owner ignored", kind)

    def apply_state(self, snap: state.Snapshot) -> None:
        daemon = self.daemon
        state.apply_state(
            daemon.pools,
            snap,
            on_removed=lambda pool, b: daemon.backend_removed(b),
            load_stamps=self.load_stamps,
        )

    async def reload(self, msg: Message) -> None:
        error = None
        try:
            new = config_from(msg)
            self.daemon.preset_sticky_keys = sticky_keys_from(msg)
            await self.daemon.apply(new)
            self.daemon.reloads += 1
            if msg.get("state"):
                self.apply_state(msg["state"])
            log.info("reloaded (config generation %d)", msg["generation"])
        except Exception as e:  # reported: the owner replaces this worker with a fresh one
            error = str(e) or type(e).__name__
            log.exception("cannot apply the owner's reload")
        self.channel.send({"type": "applied", "generation": msg["generation"], "error": error})
        if msg.get("state"):
            self.channel.send({"type": "ack", "seq": msg["seq"]})

    def send_report(self, rid: int) -> None:
        self.channel.send(
            {"type": "report", "id": rid, "counters": state.process_report(self.daemon)}
        )

    async def report_forever(self) -> None:
        while True:
            await asyncio.sleep(REPORT_INTERVAL)
            self.send_report(0)
            await self.channel.flush()
