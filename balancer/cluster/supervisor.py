"""Supervisor: the owner's side of multi-process mode. Spawns the worker processes, feeds them
the config and backend state, collects their counters, respawns the ones that die, and drains
them all on shutdown."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

from balancer.cluster import state
from balancer.cluster.channel import PROTOCOL, Channel, Message, ProtocolError

if TYPE_CHECKING:
    from balancer.backend import Backend
    from balancer.config import Config
    from balancer.pool import Pool

log = logging.getLogger("balancer.cluster")

RESPAWN_MIN = 0.5  # seconds before respawning a worker that died after a stable spell
RESPAWN_MAX = 30.0  # the back-off doubles per quick death up to this
STABLE_AFTER = 10.0  # a worker that lived this long resets the back-off
STATE_POLL = 0.25  # the state is also compared this often (catches load reports)
SYNC_TIMEOUT = 2.0  # an admin change waits at most this for every worker's ack
RELOAD_TIMEOUT = 10.0  # a reload waits at most this for every worker to apply it
REFRESH_TIMEOUT = 0.5  # /status and /metrics wait at most this for fresh worker counters
EXIT_GRACE = 5.0  # beyond timeouts.drain, before a worker that won't exit is killed
SILENT_AFTER = 10.0  # a serving worker that sends nothing for this long is killed (hung)
START_TIMEOUT = 60.0  # the same for one that never says it is ready


class WorkerProcess:
    """One worker slot: the process currently filling it and what it last told us."""

    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.proc: asyncio.subprocess.Process | None = None
        self.channel: Channel | None = None
        self.pid: int | None = None
        self.ready = False  # listeners bound, first state applied
        self.generation = 0  # config generation it runs
        self.state_seq = 0  # state snapshot it acknowledged
        self.report: dict[str, Any] = {}
        self.report_id = 0
        self.restarts = 0
        self.started_at = 0.0
        self.retiring = False  # removed by a reload that lowered `workers`

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def connected(self) -> bool:
        return self.ready and self.channel is not None and not self.channel.closed


class Owner(Protocol):
    """What the supervisor reads of the owner process (the daemon that starts it): the
    config and backend state it sends every worker."""

    @property
    def config(self) -> Config: ...

    @property
    def pools(self) -> Mapping[str, Pool]: ...

    def sticky_keys(self) -> dict[str, list[bytes]]: ...

    def load_stamps(self) -> dict[Backend, float]: ...


class Supervisor:
    """Keeps `count - 1` worker processes running beside the owner (the calling daemon)."""

    def __init__(self, daemon: Owner, count: int, *, log_level: str = "info") -> None:
        self.daemon = daemon
        self.count = count
        self.log_level = log_level
        self.workers: dict[int, WorkerProcess] = {}
        self.generation = 1  # bumped by every reload the owner applied
        self.seq = 0  # bumped by every state snapshot that differs from the last one
        self._last: state.Snapshot | None = None
        self._retired: dict[str, Any] = {}  # counters of workers that exited
        self._report_id = 0
        self.restarts = 0  # respawns over all slots, for balancer_worker_restarts_total
        self.hung = 0  # workers killed for going silent, for balancer_worker_hangs_total
        self._stopping = False
        self._stop_requested = asyncio.Event()  # cuts a respawn back-off short
        # set while the owner applies a reload: its pools are half-built then (new backends
        # not yet marked down until checked), and no snapshot of that may reach a worker
        self.held = False
        self._changed = asyncio.Condition()
        self._dirty = asyncio.Event()
        self._keepers: dict[int, asyncio.Task[None]] = {}
        self._pump_task: asyncio.Task[None] | None = None

    # -- lifecycle --------------------------------------------------------------------------

    def start(self) -> None:
        """Spawn the workers (in the background: the owner serves meanwhile)."""
        self._publish()
        for slot in range(1, self.count):
            self._add_slot(slot)
        self._pump_task = asyncio.get_running_loop().create_task(self._pump())

    def _add_slot(self, slot: int) -> None:
        w = self.workers[slot] = WorkerProcess(slot)
        self._keepers[slot] = asyncio.get_running_loop().create_task(
            self._keep(w), name=f"worker-{slot}"
        )

    async def resize(self, count: int) -> None:
        """A reload changed `workers`: start the extra slots, or stop the surplus ones."""
        if count == self.count:
            return
        log.warning("workers: %d -> %d processes", self.count, count)
        for slot in range(self.count, count):
            self._add_slot(slot)
        for slot in range(count, self.count):
            w = self.workers[slot]
            w.retiring = True
            if w.channel is not None:
                w.channel.send({"type": "stop"})
        self.count = count

    async def stop(self) -> None:
        """Drain every worker (they finish their in-flight requests) and wait for them."""
        self._stopping = True
        self._stop_requested.set()
        for w in self.workers.values():
            if w.channel is not None:
                w.channel.send({"type": "stop"})
        keepers = list(self._keepers.values())
        if keepers:
            timeout = self.daemon.config.timeouts.drain + EXIT_GRACE
            _, pending = await asyncio.wait(keepers, timeout=timeout)
            if pending:
                for w in self.workers.values():
                    if w.alive:
                        log.error("worker %d (pid %s) did not exit: killing it", w.slot, w.pid)
                        _signal(w, signal.SIGKILL)
                await asyncio.wait(pending, timeout=EXIT_GRACE)
            for task in pending:
                task.cancel()
        if self._pump_task is not None:
            self._pump_task.cancel()
            await asyncio.gather(self._pump_task, return_exceptions=True)

    async def _keep(self, w: WorkerProcess) -> None:
        """Run slot `w` until shutdown: spawn, serve its channel, respawn with back-off."""
        loop = asyncio.get_running_loop()
        backoff = RESPAWN_MIN
        while not self._stopping and not w.retiring:
            started = loop.time()
            try:
                await self._spawn(w)
            except Exception as e:  # OSError mostly (fds, memory); never end the slot's loop
                log.error("worker %d: cannot start: %s", w.slot, e)
            else:
                if self._stopping:  # stop() ran while it started: it missed the message
                    w.channel.send({"type": "stop"})  # type: ignore[union-attr]
                await self._serve(w)
                code = await self._reap(w)
                if self._stopping or w.retiring:
                    level = logging.INFO if code == 0 else logging.ERROR
                    log.log(level, "worker %d (pid %s) exited with %s", w.slot, w.pid, code)
                    break
            delay, backoff = respawn_delay(backoff, loop.time() - started)
            log.error(
                "worker %d (pid %s) exited unexpectedly (%s): respawning in %.1fs",
                w.slot,
                w.pid,
                _exit_reason(w.proc.returncode if w.proc is not None else None),
                delay,
            )
            try:
                await asyncio.wait_for(self._stop_requested.wait(), delay)
                break  # shutting down: no respawn
            except TimeoutError:
                pass
            w.restarts += 1
            self.restarts += 1
        if w.retiring and self.workers.get(w.slot) is w:
            # (a later reload may have filled the slot again: then that one stays)
            del self.workers[w.slot]
            self._keepers.pop(w.slot, None)

    async def _spawn(self, w: WorkerProcess) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # a fresh interpreter rather than fork(): the owner's event loop, threads and
            # sockets are not duplicated; the child inherits only its end of the socketpair.
            # A session of its own: Ctrl-C in a terminal reaches the owner alone, which then
            # drains the workers in order instead of everyone stopping at once.
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "balancer",
                "worker",
                "--fd",
                str(child.fileno()),
                "--slot",
                str(w.slot),
                "--log-level",
                self.log_level,
                pass_fds=(child.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
                start_new_session=True,
            )
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()  # the owner keeps only its end: the worker's death reads as EOF
        w.proc = proc
        w.pid = proc.pid
        w.ready = False
        w.report = {}
        w.report_id = 0
        w.started_at = time.time()
        w.channel = await Channel.open(parent)
        w.channel.send(self._config_message())
        log.info("worker %d started (pid %d)", w.slot, proc.pid)

    async def _serve(self, w: WorkerProcess) -> None:
        """Read worker `w`'s messages until its channel ends."""
        channel = w.channel
        assert channel is not None
        while True:
            try:
                # a worker reports its counters every REPORT_INTERVAL: one that says nothing
                # for much longer is alive but stuck (an endless loop, a stop signal), and
                # the connections the kernel hands its listening sockets would hang with it
                limit = SILENT_AFTER if w.ready else START_TIMEOUT
                msg = await asyncio.wait_for(channel.recv(), limit)
            except TimeoutError:
                if self._stopping or w.retiring:
                    continue  # draining: stop() has its own deadline for it
                log.error("worker %d (pid %s) silent for %.0fs: killing it", w.slot, w.pid, limit)
                self.hung += 1
                _signal(w, signal.SIGKILL)
                msg = None
            except ProtocolError as e:
                log.error("worker %d (pid %s): %s: stopping it", w.slot, w.pid, e)
                _signal(w, signal.SIGKILL)
                msg = None
            if msg is None:
                break
            try:
                self._handle(w, msg)
            except Exception:
                # a message we can't make sense of: this worker is not one we can run
                log.exception("worker %d (pid %s): bad message %r: stopping it", w.slot, w.pid, msg)
                _signal(w, signal.SIGKILL)
            async with self._changed:
                self._changed.notify_all()
        channel.close()
        w.ready = False
        async with self._changed:
            self._changed.notify_all()

    def _handle(self, w: WorkerProcess, msg: Message) -> None:
        kind = msg["type"]
        if kind == "ready":
            w.ready = True
            w.generation = msg.get("generation", 0)
            w.state_seq = msg.get("seq", 0)
            # anything published or reloaded since its config message is queued behind it on
            # the channel, so it catches up by itself
            log.warning("worker %d (pid %s) serving", w.slot, w.pid)
        elif kind == "failed":
            log.error("worker %d (pid %s) failed to start: %s", w.slot, w.pid, msg.get("error"))
        elif kind == "ack":
            w.state_seq = max(w.state_seq, msg.get("seq", 0))
        elif kind == "applied":
            w.generation = max(w.generation, msg.get("generation", 0))
            if msg.get("error"):
                # it could not run the config the owner runs: a fresh worker starts from it
                log.error(
                    "worker %d (pid %s) could not apply the reload: %s: restarting it",
                    w.slot,
                    w.pid,
                    msg["error"],
                )
                _signal(w, signal.SIGTERM)
        elif kind == "report":
            w.report = msg.get("counters", {})
            w.report_id = max(w.report_id, msg.get("id", 0))
        else:
            log.warning("worker %d: unknown message type %r ignored", w.slot, kind)

    async def _reap(self, w: WorkerProcess) -> int | None:
        """The exit status of `w`'s process, whose channel just ended; its counters retire."""
        proc = w.proc
        code: int | None = None
        if proc is not None:
            try:
                # its channel ends when it exits, but it may still be draining after the
                # owner's stop message closed nothing: wait for the exit itself
                code = await asyncio.wait_for(
                    proc.wait(), self.daemon.config.timeouts.drain + EXIT_GRACE
                )
            except TimeoutError:
                log.error(
                    "worker %d (pid %s) closed its channel but lives: killing it", w.slot, w.pid
                )
                _signal(w, signal.SIGKILL)
                code = await proc.wait()
        # what it counted stays in the totals: counters must not go down when a worker dies
        self._retired = state.add(self._retired, state.without_gauges(w.report))
        w.report = {}
        w.ready = False
        return code

    # -- owner -> workers -------------------------------------------------------------------

    def _config_message(self) -> Message:
        cfg = self.daemon.config
        text = cfg.text or b""
        return {
            "type": "config",
            "protocol": PROTOCOL,
            "generation": self.generation,
            "path": cfg.source,
            "text": base64.b64encode(text).decode(),
            # the keys the owner signs with, so a cookie set by any process verifies in all
            "sticky_keys": {
                path: [k.hex() for k in keys] for path, keys in self.daemon.sticky_keys().items()
            },
            "seq": self.seq,
            "state": self._last,
        }

    def notify(self) -> None:
        """Backend state changed in the owner: send it to the workers soon."""
        self._dirty.set()

    def _publish(self) -> int:
        if self.held:
            return self.seq
        snap = state.snapshot(self.daemon.pools, self.daemon.load_stamps())
        if snap != self._last:
            # only the pools that changed: a load report from one backend doesn't resend every
            # pool (a worker leaves pools a message does not name alone; a (re)connecting one
            # gets the full snapshot with its config)
            last = self._last or {}
            delta = {name: pool for name, pool in snap.items() if last.get(name) != pool}
            self.seq += 1
            self._last = snap
            msg = {"type": "state", "seq": self.seq, "state": delta}
            for w in self.workers.values():
                if w.channel is not None:
                    w.channel.send(msg)
        return self.seq

    async def _pump(self) -> None:
        while True:
            try:
                await asyncio.wait_for(self._dirty.wait(), STATE_POLL)
            except TimeoutError:
                pass
            self._dirty.clear()
            try:
                self._publish()
            except Exception:
                log.exception("publishing backend state to the workers failed")

    async def sync(self, timeout: float = SYNC_TIMEOUT) -> bool:
        """Send the current state now and wait until every serving worker applied it (so an
        admin change has taken effect everywhere when its answer goes out)."""
        seq = self._publish()
        ok = await self._wait(
            lambda: all(w.state_seq >= seq for w in self.workers.values() if w.connected),
            timeout,
        )
        if not ok:
            log.warning(
                "backend state %d not acknowledged by every worker within %gs", seq, timeout
            )
        return ok

    async def reload(self, config: Config) -> list[str]:
        """The owner applied `config`: send it to every worker and wait for them to apply it.
        Returns what went wrong (workers that failed are restarted with the new config)."""
        await self.resize(config.workers)
        self.generation += 1
        self.held = False
        self._publish()
        msg = self._config_message()
        for w in self.workers.values():
            if w.channel is not None:
                w.channel.send(msg)
        gen = self.generation
        ok = await self._wait(
            lambda: all(w.generation >= gen for w in self.workers.values() if w.connected),
            RELOAD_TIMEOUT,
        )
        if not ok:
            late = [w.slot for w in self.workers.values() if w.connected and w.generation < gen]
            return [f"workers {late} had not applied the reload after {RELOAD_TIMEOUT:g}s"]
        return []

    async def refresh(self, timeout: float = REFRESH_TIMEOUT) -> None:
        """Ask every serving worker for its counters now (for /status and /metrics)."""
        self._report_id += 1
        rid = self._report_id
        asked = [w for w in self.workers.values() if w.connected]
        for w in asked:
            w.channel.send({"type": "report", "id": rid})  # type: ignore[union-attr]
        if asked:
            await self._wait(
                lambda: all(w.report_id >= rid or not w.connected for w in asked), timeout
            )

    async def _wait(self, done: Callable[[], bool], timeout: float) -> bool:
        try:
            async with asyncio.timeout(timeout):
                async with self._changed:
                    await self._changed.wait_for(done)
            return True
        except TimeoutError:
            return False

    # -- reading ----------------------------------------------------------------------------

    def counters(self) -> dict[str, Any]:
        """The workers' counters added up: live ones' latest reports plus the retired."""
        return state.total([self._retired] + [w.report for w in self.workers.values()])

    def status(self) -> list[dict[str, Any]]:
        out = []
        for slot in sorted(self.workers):
            w = self.workers[slot]
            out.append(
                {
                    "slot": w.slot,
                    "role": "worker",
                    "pid": w.pid,
                    "alive": w.alive,
                    "ready": w.ready,
                    "in_sync": w.connected
                    and w.generation >= self.generation
                    and w.state_seq >= self.seq,
                    "restarts": w.restarts,
                    "started_at": w.started_at,
                    **state.process_totals(w.report),
                }
            )
        return out


def respawn_delay(backoff: float, lived: float) -> tuple[float, float]:
    """(seconds to wait before respawning, the back-off for the next death) for a worker
    that lived `lived` seconds: one that keeps dying young waits twice as long each time, up
    to RESPAWN_MAX; one that had been up for STABLE_AFTER starts again from RESPAWN_MIN."""
    delay = RESPAWN_MIN if lived >= STABLE_AFTER else backoff
    return delay, min(delay * 2, RESPAWN_MAX)


def _signal(w: WorkerProcess, sig: int) -> None:
    if w.proc is not None and w.proc.returncode is None:
        try:
            os.kill(w.proc.pid, sig)  # our own child, by its pid
        except ProcessLookupError:
            pass


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "status unknown"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit status {code}"
