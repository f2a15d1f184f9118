"""HaNode: one member of an active-passive pair, wiring state machine, heartbeat and VIP on asyncio.

What a host running a node needs:

- root, or CAP_NET_ADMIN (netlink address changes) plus CAP_NET_RAW (gratuitous ARP);
- UDP `ha.bind` (default 5405) open between the nodes, and the same `auth_key_file` on both;
- wall clocks in step within a few seconds (NTP): heartbeats older than that are rejected;
- listeners that can serve the VIP the instant it arrives. The passive node does not hold the
  VIP, so it keeps its listeners bound either to the wildcard address (`0.0.0.0:PORT`, nothing
  else needed) or to the VIP itself, which needs `sysctl net.ipv4.ip_nonlocal_bind=1` (or
  IP_FREEBIND on the socket) because binding an address the host does not have fails otherwise.

The VIP is held with a kernel lifetime that the node renews every advert interval (see vip.py):
kill -9 or a hang makes it vanish on its own within a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import shlex
import time
from collections.abc import Awaitable, Callable
from typing import Any

from balancer.config import HaConfig
from balancer.ha.heartbeat import (
    FLAG_PREEMPT,
    FLAG_READY,
    FLAG_RESIGNING,
    Heartbeat,
    HeartbeatEndpoint,
    load_key,
)
from balancer.ha.state import (
    Action,
    FailoverMachine,
    HealthChanged,
    Outcome,
    PeerAdvert,
    PeerCrashed,
    ResignRequested,
    Role,
    Tick,
)
from balancer.ha.vip import Vip

log = logging.getLogger("balancer.ha")

RESIGN_BURST = 3  # resigning heartbeats on a planned hand-over...
RESIGN_SPACING = 0.02  # ...this far apart: one lost datagram must not cost a dead_after wait
NOTIFY_TIMEOUT = 30.0  # a notify command running longer is killed
SHUTDOWN_NOTIFY_WAIT = 5.0


def vip_lifetime(dead_after: float) -> int:
    """Kernel lifetime of the VIP in whole seconds (the kernel's resolution), renewed every tick."""
    return max(2, math.ceil(2 * dead_after))


class HaNode:
    """A member of the pair: heartbeats to peers, takes or releases the VIP as the rules say."""

    def __init__(
        self,
        config: HaConfig,
        *,
        local_health: Callable[[], bool] = lambda: True,
        on_role_change: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._local_health = local_health
        self._on_role_change = on_role_change
        self._clock = clock
        self._machine = self._new_machine()
        self._vip = Vip(
            config.interface, config.virtual_ip, lifetime=vip_lifetime(config.dead_after)
        )
        self._endpoint: HeartbeatEndpoint | None = None
        self._peer_ids: dict[str, str] = {}  # peer IP -> node_id, learned from its heartbeats
        self._want_vip = False  # what we decided; the kernel is brought in line every tick
        # Between deciding to claim and having the VIP announced, heartbeats wait: a resigning
        # peer releases the VIP when it hears us active, and clients must already be moved.
        self._claiming = False
        self._claims = 0  # numbers claims, so a cancelled older claim task cannot end a newer one
        self._holds_vip = False  # what the kernel said last
        self._vip_error: str | None = None
        self._task: asyncio.Task | None = None
        self._announce_task: asyncio.Task | None = None
        self._reconcile_task: asyncio.Task | None = None
        self._notify_task: asyncio.Task | None = None
        self._notify_queue: asyncio.Queue[str] = asyncio.Queue()
        self._background: set[asyncio.Task] = set()
        self._successor_seen = asyncio.Event()
        self._stopping = False

    # -- counters for metrics --------------------------------------------------------------------

    @property
    def heartbeats_sent(self) -> int:
        return self._endpoint.sent if self._endpoint else 0

    @property
    def heartbeats_received(self) -> int:
        return self._endpoint.received if self._endpoint else 0

    @property
    def heartbeats_rejected(self) -> dict[str, int]:
        return dict(self._endpoint.rejected) if self._endpoint else {}

    @property
    def transitions(self) -> int:
        return self._machine.transitions

    @property
    def role(self) -> str:
        return self._machine.role.value

    # -- lifecycle -------------------------------------------------------------------------------

    def _new_machine(self) -> FailoverMachine:
        c = self.config
        return FailoverMachine(
            c.node_id,
            c.priority,
            advert_interval=c.advert_interval,
            dead_after=c.dead_after,
            preempt=c.preempt,
            now=self._clock(),
        )

    async def start(self) -> None:
        """Start passive: drop any VIP a previous run left, then heartbeat and listen."""
        c = self.config
        key = load_key(c.auth_key_file)
        try:
            if await self._vip.remove():
                log.warning("removed %s from %s: left by a previous run", c.virtual_ip, c.interface)
        except BaseException:
            await asyncio.get_running_loop().run_in_executor(None, self._vip.close)
            raise
        self._machine = self._new_machine()
        self._endpoint = HeartbeatEndpoint(
            node_id=c.node_id,
            key=key,
            bind=c.bind,
            peers=c.peers,
            on_heartbeat=self._on_heartbeat,
            on_peer_crashed=self._on_peer_crashed,
            clock=self._clock,
            incarnation_timeout=3 * c.dead_after,
        )
        try:
            await self._endpoint.start()
        except BaseException:
            self._endpoint.close()
            await asyncio.get_running_loop().run_in_executor(None, self._vip.close)
            raise
        loop = asyncio.get_running_loop()
        self._notify_task = loop.create_task(self._notify_worker())
        self._task = loop.create_task(self._run())
        log.info(
            "ha: %s started passive (priority %d), peers %s, %s on %s",
            c.node_id,
            c.priority,
            ", ".join(map(str, c.peers)),
            c.virtual_ip,
            c.interface,
        )

    async def shutdown(self, drain: Callable[[], Awaitable[None]] | None = None) -> None:
        """Planned stop. Holding the VIP: resign, let the peer claim it, drain, then release it."""
        if self._task is None or self._stopping:
            return
        self._stopping = True
        try:
            held = self._want_vip
            self._successor_seen.clear()
            self._apply(self._machine.handle(ResignRequested(self._clock())))
            if held and not self._machine.any_live_peer(self._clock()):
                # nobody to hand over to (the peer crashed or went silent): waiting out
                # dead_after for a successor would only delay the drain and the exit
                log.warning("ha: no live peer to take over; draining, then releasing the VIP")
            elif held:
                # Release only once a successor holds the VIP, so new connections never find
                # nobody; the peer's gratuitous ARP has moved clients by then.
                try:
                    await asyncio.wait_for(self._successor_seen.wait(), self.config.dead_after)
                except TimeoutError:
                    log.warning("ha: no peer took over within dead_after; releasing anyway")
            if drain is not None:
                try:
                    await drain()
                except Exception:
                    log.exception("ha: drain failed")
            if held:
                self._drop_vip()
                await self._vip.remove()
                self._holds_vip = False
        finally:
            await self._stop()

    async def _stop(self) -> None:
        for task in (self._task, self._announce_task, self._reconcile_task):
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in (self._task, self._announce_task, self._reconcile_task) if t),
            *self._background,
            return_exceptions=True,
        )
        if self._endpoint is not None:
            self._endpoint.close()
        if self._notify_task is not None:
            # Let the last notify (passive) run, but do not hang the shutdown on a script.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._notify_queue.join(), SHUTDOWN_NOTIFY_WAIT)
            self._notify_task.cancel()
            await asyncio.gather(self._notify_task, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(None, self._vip.close)

    # -- the loop --------------------------------------------------------------------------------

    async def _run(self) -> None:
        interval = self.config.advert_interval
        next_advert = self._clock()
        while True:
            now = self._clock()
            self._apply(self._machine.handle(Tick(now)))
            if now >= next_advert:
                self._poll_health(now)
                self._advertise()
                self._reconcile()
                next_advert += interval
                if next_advert <= now:  # after a pause: keep the cadence, no catch-up burst
                    next_advert = now + interval
            deadline = self._machine.next_deadline()
            wake = next_advert if deadline is None else min(next_advert, deadline)
            await asyncio.sleep(max(wake - self._clock(), 0.001))

    def _poll_health(self, now: float) -> None:
        try:
            healthy = bool(self._local_health())
        except Exception:
            log.exception("ha: local health check failed; counting as unhealthy")
            healthy = False
        if healthy != self._machine.healthy:
            self._apply(self._machine.handle(HealthChanged(now, healthy)))

    def _advertise(self) -> None:
        if self._endpoint is None or self._claiming:
            return
        advert = self._machine.advert(self._clock())
        flags = (
            (FLAG_RESIGNING if advert.resigning else 0)
            | (FLAG_READY if advert.ready else 0)
            | (FLAG_PREEMPT if advert.preempt else 0)
        )
        self._endpoint.send(advert.role, advert.priority, flags)

    def _on_heartbeat(self, hb: Heartbeat, host: str, now: float) -> None:
        self._peer_ids[host] = hb.node_id
        event = PeerAdvert(
            now, hb.node_id, hb.priority, hb.role, hb.resigning, hb.ready, hb.preempt
        )
        self._apply(self._machine.handle(event))
        if self._machine.active_peer(now) is not None:
            self._successor_seen.set()

    def _on_peer_crashed(self, host: str) -> None:
        node_id = self._peer_ids.get(host)
        if node_id is not None:
            self._apply(self._machine.handle(PeerCrashed(self._clock(), node_id)))

    # -- carrying out the machine's decisions ----------------------------------------------------

    def _apply(self, outcome: Outcome) -> None:
        if outcome.changed:
            log.warning(
                "ha: %s is now %s: %s", self.config.node_id, outcome.role.value, outcome.reason
            )
        elif outcome.reason:
            log.info("ha: %s", outcome.reason)
        for action in outcome.actions:
            if action is Action.ADD_VIP:
                self._want_vip = True
                self._claiming = True
                self._claims += 1
                # Submitted now so it is ordered after any removal already submitted.
                added = self._vip.add()
                self._cancel_announce()
                self._announce_task = self._spawn(self._add_and_announce(added, self._claims))
            elif action is Action.REMOVE_VIP:
                self._drop_vip()
                self._spawn(self._await_removal(self._vip.remove()))
            elif action is Action.ANNOUNCE:
                if self._announce_task is None or self._announce_task.done():
                    self._announce_task = self._spawn(self._announce())
            elif action is Action.SEND_ADVERT:
                self._advertise()
            elif action is Action.SEND_RESIGN:
                self._advertise()
                self._spawn(self._resign_burst())
            elif action is Action.NOTIFY:
                self._notify(outcome.role)

    def _drop_vip(self) -> None:
        self._want_vip = False
        self._claiming = False
        self._cancel_announce()

    def _cancel_announce(self) -> None:
        if self._announce_task is not None and not self._announce_task.done():
            self._announce_task.cancel()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _add_and_announce(self, added: Awaitable[None], claim: int) -> None:
        try:
            try:
                await added
            except Exception as e:
                self._vip_failed("add", e)
                return
            self._holds_vip = True
            try:
                await self._vip.send_garp()
            except OSError as e:
                log.error("ha: gratuitous ARP on %s failed: %s", self.config.interface, e)
        finally:
            if self._claiming and claim == self._claims:
                # Now the claim may be heard: the VIP is ours and neighbours were told.
                self._claiming = False
                self._advertise()
        await self._announce(self._vip.garp_count - 1, delay_first=True)

    async def _announce(self, count: int | None = None, *, delay_first: bool = False) -> None:
        try:
            await self._vip.announce(count, delay_first=delay_first)
        except OSError as e:
            log.error("ha: gratuitous ARP on %s failed: %s", self.config.interface, e)

    async def _await_removal(self, removed: Awaitable[bool]) -> None:
        try:
            await removed
        except Exception as e:
            self._vip_failed("remove", e)
            return
        self._holds_vip = False

    async def _resign_burst(self) -> None:
        for _ in range(RESIGN_BURST - 1):
            await asyncio.sleep(RESIGN_SPACING)
            self._advertise()

    def _reconcile(self) -> None:
        """Bring the kernel in line with the decision: renew the VIP's lifetime, or make sure
        a passive does not hold it (left over, or added by hand)."""
        if self._reconcile_task is not None and not self._reconcile_task.done():
            return  # the worker is slow; do not queue more behind it
        if self._want_vip:
            self._reconcile_task = self._spawn(self._renew(self._vip.add()))
        else:
            self._reconcile_task = self._spawn(self._ensure_absent(self._vip.remove()))

    async def _renew(self, added: Awaitable[None]) -> None:
        try:
            await added
        except Exception as e:
            self._vip_failed("renew", e)
            return
        if self._vip_error is not None:
            log.warning("ha: %s on %s is back", self.config.virtual_ip, self.config.interface)
            self._vip_error = None
        self._holds_vip = True

    async def _ensure_absent(self, removed: Awaitable[bool]) -> None:
        try:
            if await removed:
                log.warning(
                    "ha: removed %s from %s: a passive node must not hold it",
                    self.config.virtual_ip,
                    self.config.interface,
                )
        except Exception as e:
            self._vip_failed("remove", e)
            return
        self._holds_vip = False

    def _vip_failed(self, what: str, error: Exception) -> None:
        message = f"{what} {self.config.virtual_ip} on {self.config.interface}: {error}"
        if message != self._vip_error:  # once per distinct failure, not every tick
            log.error("ha: %s", message)
        self._vip_error = message

    # -- notify ------------------------------------------------------------------------------

    def _notify(self, role: Role) -> None:
        if self._on_role_change is not None:
            try:
                self._on_role_change(role.value)
            except Exception:
                log.exception("ha: on_role_change callback failed")
        if self.config.notify:
            self._notify_queue.put_nowait(role.value)

    async def _notify_worker(self) -> None:
        # One at a time and in order, so a script never sees "passive" overtake "active".
        while True:
            role = await self._notify_queue.get()
            try:
                await self._run_notify(role)
            except Exception:
                log.exception("ha: notify command failed")
            finally:
                self._notify_queue.task_done()

    async def _run_notify(self, role: str) -> None:
        argv = [*shlex.split(self.config.notify or ""), role]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.PIPE,
            )
        except OSError as e:
            log.error("ha: notify %s: %s", shlex.join(argv), e)
            return
        try:
            _, err = await asyncio.wait_for(proc.communicate(), NOTIFY_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            log.error("ha: notify %s killed after %.0fs", shlex.join(argv), NOTIFY_TIMEOUT)
            return
        if proc.returncode != 0:
            log.error(
                "ha: notify %s exited %d: %s",
                shlex.join(argv),
                proc.returncode,
                err.decode(errors="replace").strip()[-500:],
            )

    # -- status ------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now = self._clock()
        m = self._machine
        hosts = self._endpoint.peer_hosts if self._endpoint else {}
        peers = []
        for address in self.config.peers:
            host = hosts.get(address, address.host)
            node_id = self._peer_ids.get(host)
            view = m.peers.get(node_id) if node_id else None
            entry: dict[str, Any] = {"address": str(address), "node_id": node_id}
            if view is None:
                entry.update(live=False, last_seen_age=None, role=None, priority=None)
            else:
                entry.update(
                    live=m.live(view, now),
                    last_seen_age=round(now - view.last_seen, 3),
                    role=view.role.value,
                    priority=view.priority,
                    resigning=view.resigning,
                    crashed=view.crashed,
                )
            peers.append(entry)
        return {
            "role": m.role.value,
            "node_id": self.config.node_id,
            "priority": self.config.priority,
            "effective_priority": m.effective_priority,
            "healthy": m.healthy,
            "preempt": self.config.preempt,
            "vip": self.config.virtual_ip,
            "interface": self.config.interface,
            "holds_vip": self._holds_vip,
            "vip_error": self._vip_error,
            "peers": peers,
            "transitions": m.transitions,
            "last_transition": m.last_reason,
            "heartbeats": {
                "sent": self.heartbeats_sent,
                "received": self.heartbeats_received,
                "rejected": self.heartbeats_rejected,
            },
        }
