"""HaNode: one member of an HA pair, wiring state machines, heartbeat and VIPs on asyncio.

A node holds one or several floating IPs (instances, see instances.py): with one it is the
active-passive pair it always was; with several, each node is preferred for some addresses and
both serve at once (active-active). One heartbeat per interval speaks for every instance.

What a host running a node needs:

- root, or CAP_NET_ADMIN (netlink address changes) plus CAP_NET_RAW (gratuitous ARP);
- UDP `ha.bind` (default 5405) open between the nodes, and the same `auth_key_file` on both;
- wall clocks in step within a few seconds (NTP): heartbeats older than that are rejected;
- listeners that can serve the VIP the instant it arrives. The passive node does not hold the
  VIP, so it keeps its listeners bound either to the wildcard address (`0.0.0.0:PORT`, nothing
  else needed) or to the VIP itself, which needs `sysctl net.ipv4.ip_nonlocal_bind=1` (or
  IP_FREEBIND on the socket) because binding an address the host does not have fails otherwise.

Every VIP is held with a kernel lifetime that the node renews every advert interval (see
vip.py): kill -9 or a hang makes it vanish on its own within a few seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import shlex
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from balancer.config import HaConfig
from balancer.ha.heartbeat import (
    FLAG_PREEMPT,
    FLAG_READY,
    FLAG_RESIGNING,
    VERSION,
    VERSION_INSTANCES,
    Heartbeat,
    HeartbeatEndpoint,
    InstanceRecord,
    load_key,
)
from balancer.ha.instances import InstanceGroup, InstanceSpec, PeerRecord
from balancer.ha.state import (
    Action,
    HealthChanged,
    Outcome,
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


UNMATCHED_LOG_INTERVAL = 60.0  # a peer's addresses we have no instance for: warned this often


def vip_lifetime(dead_after: float) -> int:
    """Kernel lifetime of the VIP in whole seconds (the kernel's resolution), renewed every tick."""
    return max(2, math.ceil(2 * dead_after))


class _Slot:
    """One instance's VIP and what the node is doing with it."""

    __slots__ = (
        "address",
        "announce_task",
        "claiming",
        "claims",
        "holds_vip",
        "reconcile_task",
        "spec",
        "successor_seen",
        "vip",
        "vip_error",
        "want_vip",
    )

    def __init__(self, address: str, spec: InstanceSpec, vip: Vip) -> None:
        self.address = address
        self.spec = spec
        self.vip = vip
        self.want_vip = False  # what we decided; the kernel is brought in line every tick
        # Between deciding to claim and having the VIP announced, this instance is left out of
        # heartbeats: a resigning peer releases the VIP when it hears us active, and clients
        # must already be moved.
        self.claiming = False
        self.claims = 0  # numbers claims, so a cancelled older claim task cannot end a newer one
        self.holds_vip = False  # what the kernel said last
        self.vip_error: str | None = None
        self.announce_task: asyncio.Task | None = None
        self.reconcile_task: asyncio.Task | None = None
        self.successor_seen = asyncio.Event()


class HaNode:
    """A member of the pair: heartbeats to peers, takes or releases each VIP as the rules say."""

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
        self._on_role_change = on_role_change  # the node's role (active while it holds any VIP)
        self._clock = clock
        self._specs: tuple[InstanceSpec, ...] = tuple(config.instances)
        self._group = self._new_group()
        lifetime = vip_lifetime(config.dead_after)
        self._slots = [
            _Slot(address, spec, Vip(config.interface, spec.virtual_ip, lifetime=lifetime))
            for address, spec in self._group.specs.items()
        ]
        self._by_address = {slot.address: slot for slot in self._slots}
        self._endpoint: HeartbeatEndpoint | None = None
        self._peer_ids: dict[str, str] = {}  # peer IP -> node_id, learned from its heartbeats
        self._role = Role.PASSIVE  # the node's, as last told to on_role_change
        self._last_changed: str | None = None  # the address whose role changed last
        self._unmatched_logged: dict[tuple[str, ...], float] = {}
        self._task: asyncio.Task | None = None
        self._notify_task: asyncio.Task | None = None
        self._notify_queue: asyncio.Queue[list[str]] = asyncio.Queue()
        self._background: set[asyncio.Task] = set()
        self._stopping = False

    @property
    def _single(self) -> bool:
        return len(self._slots) == 1

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
        return self._group.transitions

    @property
    def role(self) -> str:
        """active while this node holds any floating IP, else passive."""
        return self._group.role.value

    def instance_roles(self) -> list[tuple[str, str]]:
        """(virtual_ip, role) of every instance, in config order."""
        return [
            (slot.spec.virtual_ip, self._group.machines[slot.address].role.value)
            for slot in self._slots
        ]

    # -- lifecycle -------------------------------------------------------------------------------

    def _new_group(self) -> InstanceGroup:
        c = self.config
        return InstanceGroup(
            c.node_id,
            self._specs,
            advert_interval=c.advert_interval,
            dead_after=c.dead_after,
            preempt=c.preempt,
            now=self._clock(),
        )

    async def _close_vips(self) -> None:
        loop = asyncio.get_running_loop()
        for slot in self._slots:
            await loop.run_in_executor(None, slot.vip.close)

    async def start(self) -> None:
        """Start passive: drop any VIP a previous run left, then heartbeat and listen."""
        c = self.config
        key = load_key(c.auth_key_file)
        try:
            for slot in self._slots:
                if await slot.vip.remove():
                    log.warning(
                        "removed %s from %s: left by a previous run",
                        slot.spec.virtual_ip,
                        c.interface,
                    )
        except BaseException:
            await self._close_vips()
            raise
        self._group = self._new_group()
        self._endpoint = HeartbeatEndpoint(
            node_id=c.node_id,
            key=key,
            bind=c.bind,
            peers=c.peers,
            on_heartbeat=self._on_heartbeat,
            on_peer_crashed=self._on_peer_crashed,
            clock=self._clock,
            incarnation_timeout=3 * c.dead_after,
            # one floating IP: version 1 as before (a pair can be upgraded one node at a time),
            # and version 2 from a newer peer; several: version 2 only
            versions=(VERSION, VERSION_INSTANCES) if self._single else (VERSION_INSTANCES,),
        )
        try:
            await self._endpoint.start()
        except BaseException:
            self._endpoint.close()
            await self._close_vips()
            raise
        loop = asyncio.get_running_loop()
        self._notify_task = loop.create_task(self._notify_worker())
        self._task = loop.create_task(self._run())
        if self._single:
            log.info(
                "ha: %s started passive (priority %d), peers %s, %s on %s",
                c.node_id,
                self._specs[0].priority,
                ", ".join(map(str, c.peers)),
                self._specs[0].virtual_ip,
                c.interface,
            )
        else:
            log.info(
                "ha: %s started passive, peers %s, on %s: %s",
                c.node_id,
                ", ".join(map(str, c.peers)),
                c.interface,
                ", ".join(f"{s.virtual_ip} (priority {s.priority})" for s in self._specs),
            )

    async def shutdown(self, drain: Callable[[], Awaitable[None]] | None = None) -> None:
        """Planned stop. For every VIP held: resign, let the peer claim it, drain, release."""
        if self._task is None or self._stopping:
            return
        self._stopping = True
        try:
            held = [slot for slot in self._slots if slot.want_vip]
            for slot in held:
                slot.successor_seen.clear()
            self._carry_out(self._group.handle(ResignRequested(self._clock())))
            if held and not self._group.any_live_peer(self._clock()):
                # nobody to hand over to (the peer crashed or went silent): waiting out
                # dead_after for a successor would only delay the drain and the exit
                log.warning("ha: no live peer to take over; draining, then releasing the VIP")
            elif held:
                # Release only once a successor holds each VIP, so new connections never find
                # nobody; the peer's gratuitous ARP has moved clients by then.
                waits = [slot.successor_seen.wait() for slot in held]
                try:
                    await asyncio.wait_for(asyncio.gather(*waits), self.config.dead_after)
                except TimeoutError:
                    late = [s.spec.virtual_ip for s in held if not s.successor_seen.is_set()]
                    log.warning(
                        "ha: no peer took over %s within dead_after; releasing anyway",
                        ", ".join(late),
                    )
            if drain is not None:
                try:
                    await drain()
                except Exception:
                    log.exception("ha: drain failed")
            for slot in held:
                self._drop_vip(slot)
                await slot.vip.remove()
                slot.holds_vip = False
        finally:
            await self._stop()

    async def _stop(self) -> None:
        tasks = [self._task]
        for slot in self._slots:
            tasks += [slot.announce_task, slot.reconcile_task]
        for task in tasks:
            if task is not None:
                task.cancel()
        await asyncio.gather(
            *(t for t in tasks if t is not None), *self._background, return_exceptions=True
        )
        if self._endpoint is not None:
            self._endpoint.close()
        if self._notify_task is not None:
            # Let the last notify (passive) run, but do not hang the shutdown on a script.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._notify_queue.join(), SHUTDOWN_NOTIFY_WAIT)
            self._notify_task.cancel()
            await asyncio.gather(self._notify_task, return_exceptions=True)
        await self._close_vips()

    # -- the loop --------------------------------------------------------------------------------

    async def _run(self) -> None:
        interval = self.config.advert_interval
        next_advert = self._clock()
        while True:
            now = self._clock()
            self._carry_out(self._group.handle(Tick(now)))
            if now >= next_advert:
                self._poll_health(now)
                self._advertise()
                for slot in self._slots:
                    self._reconcile(slot)
                next_advert += interval
                if next_advert <= now:  # after a pause: keep the cadence, no catch-up burst
                    next_advert = now + interval
            deadline = self._group.next_deadline()
            wake = next_advert if deadline is None else min(next_advert, deadline)
            await asyncio.sleep(max(wake - self._clock(), 0.001))

    def _poll_health(self, now: float) -> None:
        try:
            healthy = bool(self._local_health())
        except Exception:
            log.exception("ha: local health check failed; counting as unhealthy")
            healthy = False
        if healthy != self._group.healthy:
            self._carry_out(self._group.handle(HealthChanged(now, healthy)))

    def _advertise(self) -> None:
        """One heartbeat for every instance not in the middle of claiming its VIP."""
        if self._endpoint is None:
            return
        records = []
        for address, advert in self._group.adverts(self._clock()):
            if self._by_address[address].claiming:
                continue
            flags = (
                (FLAG_RESIGNING if advert.resigning else 0)
                | (FLAG_READY if advert.ready else 0)
                | (FLAG_PREEMPT if advert.preempt else 0)
            )
            # one instance: the version-1 record, which names no address
            records.append(
                InstanceRecord(
                    None if self._single else address, advert.priority, advert.role, flags
                )
            )
        if records:
            self._endpoint.send_records(records)

    def _on_heartbeat(self, hb: Heartbeat, host: str, now: float) -> None:
        self._peer_ids[host] = hb.node_id
        records = [
            PeerRecord(r.address, r.priority, r.role, r.resigning, r.ready, r.preempt)
            for r in hb.records
        ]
        outcomes, unmatched = self._group.heard(now, hb.node_id, records)
        if unmatched:
            self._log_unmatched(hb.node_id, unmatched, now)
        self._carry_out(outcomes)
        for slot in self._slots:
            if self._group.active_peer(slot.address, now) is not None:
                slot.successor_seen.set()

    def _log_unmatched(self, node_id: str, unmatched: list[str], now: float) -> None:
        key = (node_id, *unmatched)
        last = self._unmatched_logged.get(key)
        if last is not None and now - last < UNMATCHED_LOG_INTERVAL:
            return
        if len(self._unmatched_logged) >= 64:
            self._unmatched_logged.clear()
        self._unmatched_logged[key] = now
        log.warning(
            "ha: %s speaks for %s, which this node has no instance for: the two nodes'"
            " ha.instances must list the same addresses",
            node_id,
            ", ".join(unmatched),
        )

    def _on_peer_crashed(self, host: str) -> None:
        node_id = self._peer_ids.get(host)
        if node_id is not None:
            self._carry_out(self._group.handle(PeerCrashed(self._clock(), node_id)))

    # -- carrying out the machines' decisions ----------------------------------------------------

    def _carry_out(self, outcomes: Sequence[tuple[str, Outcome]]) -> None:
        """Each instance's actions; at most one heartbeat (and one resign burst) for all."""
        advertise = resign = False
        for address, outcome in outcomes:
            slot = self._by_address[address]
            label = "" if self._single else f" for {slot.spec.virtual_ip}"
            if outcome.changed:
                self._last_changed = address
                log.warning(
                    "ha: %s is now %s%s: %s",
                    self.config.node_id,
                    outcome.role.value,
                    label,
                    outcome.reason,
                )
            elif outcome.reason:
                log.info("ha: %s%s", outcome.reason, label)
            for action in outcome.actions:
                if action is Action.ADD_VIP:
                    slot.want_vip = True
                    slot.claiming = True
                    slot.claims += 1
                    # Submitted now so it is ordered after any removal already submitted.
                    added = slot.vip.add()
                    self._cancel_announce(slot)
                    slot.announce_task = self._spawn(
                        self._add_and_announce(slot, added, slot.claims)
                    )
                elif action is Action.REMOVE_VIP:
                    self._drop_vip(slot)
                    self._spawn(self._await_removal(slot, slot.vip.remove()))
                elif action is Action.ANNOUNCE:
                    if slot.announce_task is None or slot.announce_task.done():
                        slot.announce_task = self._spawn(self._announce(slot))
                elif action is Action.SEND_ADVERT:
                    advertise = True
                elif action is Action.SEND_RESIGN:
                    advertise = resign = True
                elif action is Action.NOTIFY:
                    self._notify(slot, outcome.role)
        if advertise:
            self._advertise()
        if resign:
            self._spawn(self._resign_burst())
        role = self._group.role
        if role is not self._role:
            self._role = role
            if self._on_role_change is not None:
                try:
                    self._on_role_change(role.value)
                except Exception:
                    log.exception("ha: on_role_change callback failed")

    def _drop_vip(self, slot: _Slot) -> None:
        slot.want_vip = False
        slot.claiming = False
        self._cancel_announce(slot)

    @staticmethod
    def _cancel_announce(slot: _Slot) -> None:
        if slot.announce_task is not None and not slot.announce_task.done():
            slot.announce_task.cancel()

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        return task

    async def _add_and_announce(self, slot: _Slot, added: Awaitable[None], claim: int) -> None:
        try:
            try:
                await added
            except Exception as e:
                self._vip_failed(slot, "add", e)
                return
            slot.holds_vip = True
            try:
                await slot.vip.send_garp()
            except OSError as e:
                log.error("ha: gratuitous ARP on %s failed: %s", self.config.interface, e)
        finally:
            if slot.claiming and claim == slot.claims:
                # Now the claim may be heard: the VIP is ours and neighbours were told.
                slot.claiming = False
                self._advertise()
        await self._announce(slot, slot.vip.garp_count - 1, delay_first=True)

    async def _announce(
        self, slot: _Slot, count: int | None = None, *, delay_first: bool = False
    ) -> None:
        try:
            await slot.vip.announce(count, delay_first=delay_first)
        except OSError as e:
            log.error("ha: gratuitous ARP on %s failed: %s", self.config.interface, e)

    async def _await_removal(self, slot: _Slot, removed: Awaitable[bool]) -> None:
        try:
            await removed
        except Exception as e:
            self._vip_failed(slot, "remove", e)
            return
        slot.holds_vip = False

    async def _resign_burst(self) -> None:
        for _ in range(RESIGN_BURST - 1):
            await asyncio.sleep(RESIGN_SPACING)
            self._advertise()

    def _reconcile(self, slot: _Slot) -> None:
        """Bring the kernel in line with the decision: renew the VIP's lifetime, or make sure
        a passive does not hold it (left over, or added by hand)."""
        if slot.reconcile_task is not None and not slot.reconcile_task.done():
            return  # the worker is slow; do not queue more behind it
        if slot.want_vip:
            slot.reconcile_task = self._spawn(self._renew(slot, slot.vip.add()))
        else:
            slot.reconcile_task = self._spawn(self._ensure_absent(slot, slot.vip.remove()))

    async def _renew(self, slot: _Slot, added: Awaitable[None]) -> None:
        try:
            await added
        except Exception as e:
            self._vip_failed(slot, "renew", e)
            return
        if slot.vip_error is not None:
            log.warning("ha: %s on %s is back", slot.spec.virtual_ip, self.config.interface)
            slot.vip_error = None
        slot.holds_vip = True

    async def _ensure_absent(self, slot: _Slot, removed: Awaitable[bool]) -> None:
        try:
            if await removed:
                log.warning(
                    "ha: removed %s from %s: a passive node must not hold it",
                    slot.spec.virtual_ip,
                    self.config.interface,
                )
        except Exception as e:
            self._vip_failed(slot, "remove", e)
            return
        slot.holds_vip = False

    def _vip_failed(self, slot: _Slot, what: str, error: Exception) -> None:
        message = f"{what} {slot.spec.virtual_ip} on {self.config.interface}: {error}"
        if message != slot.vip_error:  # once per distinct failure, not every tick
            log.error("ha: %s", message)
        slot.vip_error = message

    # -- notify ------------------------------------------------------------------------------

    def _notify(self, slot: _Slot, role: Role) -> None:
        if self.config.notify:
            # one floating IP: the role alone, as ever; several: the role, then the address
            tail = [role.value] if self._single else [role.value, slot.spec.virtual_ip]
            self._notify_queue.put_nowait(tail)

    async def _notify_worker(self) -> None:
        # One at a time and in order, so a script never sees "passive" overtake "active".
        while True:
            tail = await self._notify_queue.get()
            try:
                await self._run_notify(tail)
            except Exception:
                log.exception("ha: notify command failed")
            finally:
                self._notify_queue.task_done()

    async def _run_notify(self, tail: list[str]) -> None:
        argv = [*shlex.split(self.config.notify or ""), *tail]
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

    def _peers(self, address: str, now: float) -> list[dict[str, Any]]:
        m = self._group.machines[address]
        hosts = self._endpoint.peer_hosts if self._endpoint else {}
        peers = []
        for peer_address in self.config.peers:
            host = hosts.get(peer_address, peer_address.host)
            node_id = self._peer_ids.get(host)
            view = m.peers.get(node_id) if node_id else None
            entry: dict[str, Any] = {"address": str(peer_address), "node_id": node_id}
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
        return peers

    def status(self) -> dict[str, Any]:
        now = self._clock()
        first = self._slots[0]
        m = self._group.machines[first.address]
        instances = []
        for slot in self._slots:
            im = self._group.machines[slot.address]
            instances.append(
                {
                    "virtual_ip": slot.spec.virtual_ip,
                    "priority": slot.spec.priority,
                    "effective_priority": im.effective_priority,
                    "role": im.role.value,
                    "holds_vip": slot.holds_vip,
                    "vip_error": slot.vip_error,
                    "transitions": im.transitions,
                    "last_transition": im.last_reason,
                    "peers": [
                        {k: p[k] for k in ("node_id", "live", "role", "priority")}
                        for p in self._peers(slot.address, now)
                    ],
                }
            )
        last = self._last_changed or first.address
        last_reason = self._group.machines[last].last_reason
        if not self._single and self._last_changed is not None:
            last_reason = f"{self._by_address[last].spec.virtual_ip}: {last_reason}"
        return {
            "role": self.role,
            "node_id": self.config.node_id,
            "priority": first.spec.priority,
            "effective_priority": m.effective_priority,
            "healthy": m.healthy,
            "preempt": self.config.preempt,
            "vip": first.spec.virtual_ip,
            "interface": self.config.interface,
            "holds_vip": any(slot.holds_vip for slot in self._slots),
            "vip_error": next((s.vip_error for s in self._slots if s.vip_error), None),
            "peers": self._peers(first.address, now),
            "transitions": self._group.transitions,
            "last_transition": last_reason,
            "instances": instances,
            "heartbeats": {
                "sent": self.heartbeats_sent,
                "received": self.heartbeats_received,
                "rejected": self.heartbeats_rejected,
            },
        }
