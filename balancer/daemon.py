"""Daemon: lifecycle, signals, reload and the wiring of config, pools, listeners, health, admin, HA."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import ssl
import time
from collections.abc import Awaitable, Callable

from balancer import build, sticky
from balancer import config as config_mod
from balancer.backend import Backend, BackendState
from balancer.config import Address, BackendConfig, Config, ConfigError, PoolConfig
from balancer.discovery.runner import CONFIG, PoolDiscovery, discovery_summary
from balancer.health import ActiveChecker, maintain_forever
from balancer.pool import NotifyingEvents, Pool, PoolEvents, backend_from_config
from balancer.proxy.h2upstream import H2BackendConnections
from balancer.proxy.limits import ClientLimits, process_limits
from balancer.proxy.listener import HttpListener, Listener
from balancer.proxy.observe import AccessLog, Observer
from balancer.proxy.routing import Router
from balancer.proxy.upstream import Upstreams, Watchdog

log = logging.getLogger("balancer")

# Backends present when the daemon starts are assumed up until their first check says
# otherwise; backends added later (admin API, reload) wait for a passing check.
STARTUP = "startup"
RUNTIME = "runtime"

# What a Daemon is in its process group. The process `balancer run` starts is the OWNER: it
# does everything (serves, health checks, HA, admin API, reload) and with `workers: N > 1`
# also supervises N - 1 WORKER processes, which only serve: they take config and backend
# state from the owner (balancer.cluster).
OWNER = "owner"
WORKER = "worker"

API = "api"  # the source of a backend added through the admin API
STARTUP_DISCOVERY_WAIT = 3.0  # seconds a starting daemon waits for its registries' first answer


class Daemon:
    """The running balancer. The admin API reads its attributes and changes things only
    through its methods, which are the same calls a reload makes."""

    def __init__(
        self,
        config: Config,
        *,
        role: str = OWNER,
        sticky_keys: dict[str, list[bytes]] | None = None,
        log_level: str = "info",
    ) -> None:
        self.config = config
        self.role = role
        self.log_level = log_level  # handed to worker processes
        self.cluster = None  # the Supervisor of this owner's workers (workers > 1)
        # a worker signs and verifies sticky cookies with the keys its owner sent, not with
        # what it would read from the key files itself
        self.preset_sticky_keys: dict[str, list[bytes]] = dict(sticky_keys or {})
        self.pools: dict[str, Pool] = {}
        self.listeners: dict[str, object] = {}
        self.checkers: dict[str, ActiveChecker] = {}
        self.discoveries: dict[str, PoolDiscovery] = {}  # pool name -> its registries
        self.ha = None
        self.metrics = None
        self.events = PoolEvents()
        self.started_at = time.time()
        self.reloads = 0
        self.reload_failures = 0  # for balancer_config_reloads_total{result="failure"}
        self.last_reload_error: list[str] = []
        self._stopped = asyncio.Event()
        self._stopping = False
        self._tasks: list[asyncio.Task] = []
        self._admin_runner = None
        self._sticky_keys: dict[str, list[bytes]] = dict(self.preset_sticky_keys)
        self._removals: set[asyncio.Task] = set()
        self._reload_lock = asyncio.Lock()

    # -- startup ---------------------------------------------------------------------------

    async def start(self) -> None:
        build.note_interpreted(log)
        loop = asyncio.get_running_loop()
        self.loop = loop
        cfg = self.config
        self.watchdog = Watchdog(loop)
        self.watchdog.start()
        self.upstreams = Upstreams(
            loop,
            self.watchdog,
            connect_timeout=cfg.timeouts.connect,
            backend_timeout=cfg.timeouts.backend,
            idle_timeout=cfg.timeouts.upstream_idle,
            h2_pools=H2BackendConnections,
        )
        self.limits = ClientLimits(process_limits(cfg))
        self.access_log = AccessLog(cfg.access_log)
        self.observer = Observer(self.access_log)
        self._install_metrics()
        if self.role == OWNER:
            # health flips reach the workers at once (the supervisor also polls for the rest)
            self.events = NotifyingEvents(self.events, self._state_changed)
        self.pools = self._build_pools(cfg, {})
        for lc in cfg.listeners:
            listener = self._make_listener(lc)
            await _start_listener(listener, lc, reuse_port=cfg.workers > 1)
            self.listeners[lc.name] = listener
            log.info("listener %s (%s) on %s", lc.name, lc.mode, lc.bind)
        self._tasks.append(loop.create_task(maintain_forever(lambda: self.pools.values())))
        self._tasks.append(loop.create_task(self._housekeeping()))
        if self.role == WORKER:
            return  # health, admin and HA are the owner's
        self._start_checkers(STARTUP)
        await self._sync_discovery()
        await asyncio.gather(
            *(
                running.first_answers(STARTUP_DISCOVERY_WAIT)
                for running in self.discoveries.values()
            )
        )
        await self._start_admin()
        await self._start_ha()
        if cfg.workers > 1:
            from balancer.cluster.supervisor import Supervisor

            # the sticky key files exist by now (the pools above created them), and the
            # listeners are bound: the workers join the same SO_REUSEPORT groups
            self.cluster = Supervisor(self, cfg.workers, log_level=self.log_level)
            self.cluster.start()
            log.warning("%d processes: this owner and %d worker(s)", cfg.workers, cfg.workers - 1)

    def _install_metrics(self) -> None:
        if not self.config.admin.metrics:
            return  # admin.metrics: false (to measure what counting costs); /metrics stays empty
        try:
            from balancer.admin.metrics import Metrics
        except ImportError:  # the admin package is optional in stripped-down embeddings
            return
        self.metrics = Metrics(self)
        self.observer.metrics = self.metrics
        self.events = self.metrics.pool_events()

    def _make_listener(self, lc: config_mod.ListenerConfig) -> object:
        if lc.mode == "tcp":
            from balancer.proxy.tcp import TcpListener

            return TcpListener(
                lc,
                pool=self.pools[lc.pool],  # type: ignore[index]
                watchdog=self.watchdog,
                limits=self.limits,
                timeouts=self.config.timeouts,
                loop=self.loop,
            )
        return HttpListener(
            lc,
            router=Router(lc.routes, self.pools) if lc.routes else None,
            upstreams=self.upstreams,
            watchdog=self.watchdog,
            limits=self.limits,
            timeouts=self.config.timeouts,
            observer=self.observer,
            loop=self.loop,
            ssl_context=self._ssl_context(lc),
        )

    def _ssl_context(self, lc: config_mod.ListenerConfig) -> ssl.SSLContext | None:
        if lc.tls is None:
            return None
        from balancer.proxy.tls import build_ssl_context

        return build_ssl_context(lc.tls, http2=lc.http2)

    def _build_pools(self, cfg: Config, old: dict[str, Pool]) -> dict[str, Pool]:
        pools: dict[str, Pool] = {}
        for name, pc in cfg.pools.items():
            prev = old.get(name)
            known = {(b.host, b.port): b for b in prev.backends} if prev else {}
            backends = []
            for bc in pc.backends:
                b = known.get((bc.address.host, bc.address.port))
                if b is None:
                    b = backend_from_config(bc)
                else:
                    # same address: same server, keep its health and counters; the file
                    # is the truth for everything else (runtime changes don't survive)
                    b.name = bc.name
                    b.weight = bc.weight
                    b.max_connections = bc.max_connections
                    b.admin_state = BackendState.UP
                    b.source = CONFIG
                backends.append(b)
            if (
                prev is not None
                and pc.discovery is not None
                and prev.config.discovery == pc.discovery
            ):
                # same registries: what they gave stays (health, counters and all), except
                # where the file now lists that name or address itself
                listed = {(bc.address.host, bc.address.port) for bc in pc.backends}
                names = {bc.name for bc in pc.backends}
                backends += [
                    b
                    for b in prev.backends
                    if b.source not in (CONFIG, API)
                    and (b.host, b.port) not in listed
                    and b.name not in names
                ]
            pools[name] = Pool(
                pc, backends, events=self.events, sticky_codec=self._sticky_codec(pc)
            )
        return pools

    def _sticky_codec(self, pc: PoolConfig) -> sticky.StickyCodec | None:
        if pc.sticky is None:
            return None
        path = pc.sticky.key_file or self._default_sticky_key_path()
        keys = self._sticky_keys.get(path or "")
        if keys is None:
            if path is None:
                log.warning(
                    "pool %s: sticky key kept in memory only (no config file directory to "
                    "keep it in): cookies will not survive a restart",
                    pc.name,
                )
                keys = [os.urandom(32)]
            else:
                keys = sticky.load_or_create_keys(path)
            self._sticky_keys[path or ""] = keys
        return sticky.StickyCodec(keys, pc.name, pc.sticky.ttl)

    def _default_sticky_key_path(self) -> str | None:
        if not self.config.source:
            return None
        d = os.path.dirname(os.path.abspath(self.config.source))
        return os.path.join(d, "sticky.key") if os.access(d, os.W_OK) else None

    async def _sync_discovery(self) -> None:
        """Start, keep or stop each pool's discovery: one whose settings a reload kept runs
        on (its backends were carried into the new pool), a changed one starts over."""
        wanted = {n: pc.discovery for n, pc in self.config.pools.items() if pc.discovery}
        for name, running in list(self.discoveries.items()):
            if wanted.get(name) != running.config:
                await running.stop()
                del self.discoveries[name]
        for name, dc in wanted.items():
            if name not in self.discoveries:
                running = PoolDiscovery(name, dc, self)
                running.start(self.loop)
                self.discoveries[name] = running

    def _start_checkers(self, phase: str, previous: dict[str, ActiveChecker] | None = None) -> None:
        for name, pool in self.pools.items():
            hc = pool.config.health_check
            if hc is None:
                continue
            checker = ActiveChecker(pool, hc, connect_timeout=self.config.timeouts.connect)
            if phase == RUNTIME and previous is not None:
                # a backend the old config did not check is new: down until checked
                old = previous.get(name)
                for b in pool.backends:
                    if old is None or b not in old:
                        checker.remove(b)
                        checker.add(b, verified=False)
            checker.start()
            self.checkers[name] = checker

    async def _start_admin(self) -> None:
        from aiohttp import web

        from balancer.admin.app import build_app

        app = build_app(self)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        bind = self.config.admin.bind
        try:
            site = web.TCPSite(runner, bind.host, bind.port, reuse_address=True)
            try:
                await site.start()
            except OSError as e:
                raise OSError(e.errno, f"admin on {bind}: {e.strerror or e}") from e
        except BaseException:
            await runner.cleanup()
            raise
        self._admin_runner = runner
        log.info("admin API on http://%s", bind)

    async def _move_admin(self) -> None:
        """admin.bind changed in a reload: serve on the new address, then close the old one
        (a moment later, so the POST /reload that asked for it still gets its answer)."""
        old = self._admin_runner
        await self._start_admin()
        if old is not None:

            async def close_later() -> None:
                await asyncio.sleep(1.0)
                await old.cleanup()

            self._tasks.append(self.loop.create_task(close_later()))

    async def _start_ha(self) -> None:
        if self.config.ha is None:
            return
        from balancer.ha.node import HaNode

        self.ha = HaNode(self.config.ha, local_health=self.locally_healthy)
        await self.ha.start()

    def locally_healthy(self) -> bool:
        """For HA self-fencing: can this node serve? (some pool has an eligible backend)."""
        return any(p.strategy.backends for p in self.pools.values()) if self.pools else True

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            self.access_log.flush()
            self.limits.sweep(self.loop.time())

    # -- reload ----------------------------------------------------------------------------

    async def reload(self) -> list[str]:
        """Re-read the config file. Returns the problems ([] on success); on problems the
        running config stays untouched, in this process and in every worker."""
        async with self._reload_lock:  # SIGHUP and POST /reload may arrive together
            return await self._reload()

    async def _reload(self) -> list[str]:
        source = self.config.source
        if not source:
            return ["no config file to reload (started without one)"]
        try:
            new = config_mod.load(source)
            config_mod.check_reloadable(self.config, new)
        except ConfigError as e:
            problems = [str(p) for p in e.problems]
            self.last_reload_error = problems
            self.reload_failures += 1
            log.error("reload rejected, old config keeps serving:\n  %s", "\n  ".join(problems))
            return problems
        if self.cluster is not None:
            self.cluster.held = True
        try:
            await self.apply(new)
        except (OSError, ValueError) as e:
            msg = f"reload failed while applying: {e}"
            self.last_reload_error = [msg]
            self.reload_failures += 1
            log.error("%s; old listeners keep serving", msg)
            return [msg]
        finally:
            if self.cluster is not None:
                self.cluster.held = False  # nothing awaits before cluster.reload() publishes
        self.reloads += 1
        self.last_reload_error = []
        log.warning("reloaded %s", source)
        if self.cluster is not None:
            # validated and applied here once; the workers get the very same bytes
            late = await self.cluster.reload(new)
            for problem in late:
                log.error("reload: %s", problem)
        return []

    async def apply(self, new: Config) -> None:
        """Swap in a new config without dropping connections."""
        old_cfg = self.config
        old_pools = self.pools
        # bind new listeners first: if one can't bind, nothing has changed yet
        fresh: dict[str, object] = {}
        keep_names = {
            lc.name
            for lc in new.listeners
            if lc.name in self.listeners and self._same_socket(self.listeners[lc.name], lc)
        }
        # re-read key files: a reload is how a rotated key goes live (a worker takes the
        # keys its owner read and sent with the config instead: {} in an owner)
        self._sticky_keys = dict(self.preset_sticky_keys)
        new_pools = self._build_pools(new, old_pools)
        self.pools = new_pools  # needed by _make_listener
        try:
            for lc in new.listeners:
                if lc.name not in keep_names:
                    listener = self._make_listener_for(new, lc)
                    await _start_listener(listener, lc, reuse_port=new.workers > 1)
                    fresh[lc.name] = listener
        except BaseException:
            self.pools = old_pools
            for listener in fresh.values():
                listener.stop_accepting()
            raise
        self.config = new
        self.limits.config = process_limits(new)
        self.upstreams.retune(
            connect_timeout=new.timeouts.connect,
            backend_timeout=new.timeouts.backend,
            idle_timeout=new.timeouts.upstream_idle,
        )
        for lc in new.listeners:
            if lc.name in keep_names:
                listener = self.listeners[lc.name]
                if isinstance(listener, HttpListener):
                    listener.apply(
                        lc,
                        router=Router(lc.routes, new_pools) if lc.routes else None,
                        timeouts=new.timeouts,
                    )
                    if lc.tls is not None:
                        self._refresh_tls(listener)
                else:
                    listener.apply(lc, pool=new_pools[lc.pool], timeouts=new.timeouts)  # type: ignore[attr-defined]
        for name, listener in list(self.listeners.items()):
            if name not in keep_names:
                # a listener gone from the file (or rebound): stop accepting, let its
                # connections finish their requests
                listener.stop_accepting()  # type: ignore[attr-defined]
                listener.shutdown_connections()  # type: ignore[attr-defined]
                del self.listeners[name]
        self.listeners.update(fresh)
        old_checkers = self.checkers
        self.checkers = {}
        for checker in old_checkers.values():
            await checker.stop()
        if self.role == OWNER:
            self._start_checkers(RUNTIME, old_checkers)
            await self._sync_discovery()
        # warm connections to servers no longer configured anywhere are closed
        live = {(b.host, b.port) for p in new_pools.values() for b in p.backends}
        for p in old_pools.values():
            for b in p.backends:
                if (b.host, b.port) not in live:
                    self.upstreams.drop(b.host, b.port)
        if self.access_log.format != new.access_log.format or old_cfg.access_log != new.access_log:
            old_log = self.access_log
            self.access_log = AccessLog(new.access_log)
            self.observer.access_log = self.access_log
            old_log.close()
        if new.admin.bind != old_cfg.admin.bind and self.role == OWNER:
            await self._move_admin()

    def _make_listener_for(self, new: Config, lc: config_mod.ListenerConfig) -> object:
        saved = self.config
        self.config = new
        try:
            return self._make_listener(lc)
        finally:
            self.config = saved

    @staticmethod
    def _same_socket(listener: object, lc: config_mod.ListenerConfig) -> bool:
        cur = listener.config  # type: ignore[attr-defined]
        return cur.bind == lc.bind and cur.mode == lc.mode and (cur.tls is None) == (lc.tls is None)

    def _refresh_tls(self, listener: HttpListener) -> None:
        # the server keeps the SSLContext it was created with: renewed certificates must be
        # loaded into that same object for new handshakes to see them
        from balancer.proxy.tls import reload_certificates

        if listener.config.tls is not None and listener.ssl_context is not None:
            reload_certificates(listener.ssl_context, listener.config.tls, http2=listener.http2)

    # -- runtime backend changes (admin API) ------------------------------------------------

    def _pool(self, pool_name: str) -> Pool:
        pool = self.pools.get(pool_name)
        if pool is None:
            raise KeyError(f"no pool named {pool_name!r}")
        return pool

    def find_backend(self, pool_name: str, name: str) -> tuple[Pool, Backend]:
        pool = self._pool(pool_name)
        b = pool.find(name)
        if b is None:
            raise KeyError(f"pool {pool_name!r} has no backend named {name!r}")
        return pool, b

    def add_backend(
        self,
        pool_name: str,
        name: str,
        address: str,
        weight: int = 1,
        max_connections: int = 0,
        *,
        source: str = API,
    ) -> Backend:
        pool = self._pool(pool_name)
        addr = config_mod.parse_address(address)
        if pool.find(name) is not None:
            raise ValueError(f"pool {pool_name!r} already has a backend named {name!r}")
        if any((b.host, b.port) == (addr.host, addr.port) for b in pool.backends):
            raise ValueError(f"pool {pool_name!r} already has a backend at {addr}")
        b = backend_from_config(
            BackendConfig(name, Address(addr.host, addr.port), weight, max_connections)
        )
        b.source = source
        checker = self.checkers.get(pool_name)
        if checker is not None:
            b.healthy = False  # takes traffic once its first check passes
        pool.add_backend(b)
        if checker is not None:
            checker.add(b, verified=False)
        log.warning("pool %s: backend %s (%s) added (%s)", pool_name, name, b.address, source)
        self._state_changed()
        return b

    def update_backend(
        self, pool_name: str, name: str, *, state: str | None = None, weight: int | None = None
    ) -> Backend:
        pool, b = self.find_backend(pool_name, name)
        if weight is not None:
            pool.set_weight(b, weight)
        if state is not None:
            pool.set_admin_state(b, BackendState(state))
        log.warning(
            "pool %s: backend %s changed at runtime: %s",
            pool_name,
            name,
            {k: v for k, v in (("state", state), ("weight", weight)) if v is not None},
        )
        self._state_changed()
        return b

    def remove_backend(self, pool_name: str, name: str, *, drain: bool = True) -> Backend:
        """Drain `name` now and remove it once its in-flight requests finished (or the
        drain timeout passed); with drain=False remove it at once (its in-flight requests
        still finish on the object they hold)."""
        pool, b = self.find_backend(pool_name, name)
        if not drain:
            self._removed(pool_name, pool, b)
            return b
        pool.set_admin_state(b, BackendState.DRAINING)
        task = self.loop.create_task(self._finish_removal(pool_name, b))
        self._removals.add(task)
        task.add_done_callback(self._removals.discard)
        self._state_changed()
        return b

    async def _finish_removal(self, pool_name: str, b: Backend) -> None:
        deadline = self.loop.time() + self.config.timeouts.drain
        while b.inflight > 0 and self.loop.time() < deadline:
            await asyncio.sleep(0.05)
        if b.admin_state is not BackendState.DRAINING:
            # put back in service meanwhile (a reload whose file still lists it, an operator,
            # its registry key back): the pending removal is void
            log.warning("pool %s: removal of %s cancelled: back in service", pool_name, b.name)
            return
        pool = self.pools.get(pool_name)
        if pool is not None:
            self._removed(pool_name, pool, b)

    def _removed(self, pool_name: str, pool: Pool, b: Backend) -> None:
        pool.remove_backend(b)
        checker = self.checkers.get(pool_name)
        if checker is not None:
            checker.remove(b)
        self.backend_removed(b)
        log.warning("pool %s: backend %s (%s) removed", pool_name, b.name, b.address)
        self._state_changed()

    def backend_removed(self, b: Backend) -> None:
        """`b` left its pool: close warm connections to it unless another pool uses it."""
        if not any(
            x.host == b.host and x.port == b.port for p in self.pools.values() for x in p.backends
        ):
            self.upstreams.drop(b.host, b.port)

    # -- multi-process (balancer.cluster) ----------------------------------------------------

    def _state_changed(self) -> None:
        if self.cluster is not None:
            self.cluster.notify()

    async def propagate(self) -> None:
        """Wait until every worker process applied the backend state as it is now (no-op
        with one process): the admin API answers a change once it holds everywhere."""
        if self.cluster is not None:
            await self.cluster.sync()

    async def refresh_counters(self) -> None:
        """Fresh counters from every worker, for /status and /metrics (no-op alone)."""
        if self.cluster is not None:
            await self.cluster.refresh()

    def sticky_keys(self) -> dict[str, list[bytes]]:
        """The sticky keys in use, by key file path ("" for a key kept in memory)."""
        return dict(self._sticky_keys)

    def load_stamps(self) -> dict[Backend, float]:
        """Backend -> wall time of its latest health check (tells a fresh load report)."""
        return {b: t for checker in self.checkers.values() for b, t in checker.last_check.items()}

    # -- shutdown --------------------------------------------------------------------------

    async def drain(self) -> None:
        """Stop accepting, let in-flight requests finish (up to timeouts.drain), close."""
        for listener in self.listeners.values():
            listener.stop_accepting()  # type: ignore[attr-defined]
        for listener in self.listeners.values():
            listener.shutdown_connections()  # type: ignore[attr-defined]
        deadline = self.loop.time() + self.config.timeouts.drain
        while self.loop.time() < deadline:
            if not any(listener.connections for listener in self.listeners.values()):  # type: ignore[attr-defined]
                break
            await asyncio.sleep(0.05)
        left = sum(len(listener.connections) for listener in self.listeners.values())  # type: ignore[attr-defined]
        if left:
            log.warning("drain timeout: closing %d connection(s) still busy", left)
            for listener in self.listeners.values():
                listener.abort_connections()  # type: ignore[attr-defined]

    async def _drain_all(self) -> None:
        """Drain this process, and every worker process at the same time."""
        if self.cluster is None:
            await self.drain()
        else:
            await asyncio.gather(self.drain(), self.cluster.stop())

    async def stop(self) -> None:
        if self._stopping:
            return
        self._stopping = True
        log.warning(
            "shutting down: draining in-flight requests (up to %.0fs)", self.config.timeouts.drain
        )
        if self.ha is not None:
            await self.ha.shutdown(
                self._drain_all
            )  # resign, wait for the successor, drain, drop the VIP
        else:
            await self._drain_all()
        for checker in self.checkers.values():
            await checker.stop()
        for running in self.discoveries.values():
            await running.stop()
        for task in self._tasks + list(self._removals):
            task.cancel()
        await asyncio.gather(*self._tasks, *self._removals, return_exceptions=True)
        if self._admin_runner is not None:
            await self._admin_runner.cleanup()
        self.watchdog.stop()
        self.upstreams.close_all()
        self.access_log.close()
        self._stopped.set()
        log.warning("stopped")

    @property
    def stopping(self) -> bool:
        """Shutting down (draining): the admin's /healthz answers 503 from now on."""
        return self._stopping

    async def wait_stopped(self) -> None:
        await self._stopped.wait()

    def install_signal_handlers(self) -> None:
        loop = self.loop
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda: loop.create_task(self.stop()))
        loop.add_signal_handler(signal.SIGHUP, lambda: loop.create_task(self.reload()))

    def status(self) -> dict:
        st = {
            "version": __import__("balancer").__version__,
            "compiled": build.compiled(),
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "config": self.config.source,
            "reloads": self.reloads,
            "last_reload_error": self.last_reload_error,
            "listeners": [listener.status() for listener in self.listeners.values()],  # type: ignore[attr-defined]
            "pools": {name: self._pool_status(name, pool) for name, pool in self.pools.items()},
            "ha": self.ha.status() if self.ha is not None else {"role": "standalone"},
        }
        if self.discoveries:
            st["discovery"] = discovery_summary(
                {name: st["pools"][name]["discovery"] for name in self.discoveries}
            )
        cluster = self.cluster
        if cluster is not None:
            from balancer.cluster import state

            own = state.process_totals(state.process_report(self, with_metrics=False))
            state.merge_status(st, cluster.counters())
            st["workers"] = [
                {
                    "slot": 0,
                    "role": "owner",
                    "pid": os.getpid(),
                    "alive": True,
                    "ready": True,
                    "in_sync": True,
                    **own,
                },
                *cluster.status(),
            ]
        return st

    def _pool_status(self, name: str, pool: Pool) -> dict:
        st = pool.status()
        checker = self.checkers.get(name)
        for entry, b in zip(st["backends"], pool.backends, strict=True):
            entry["health_checks"] = checker.history(b) if checker is not None else []
        running = self.discoveries.get(name)
        if running is not None:
            st["discovery"] = running.status()
        return st


async def _start_listener(
    listener: Listener, lc: config_mod.ListenerConfig, *, reuse_port: bool
) -> None:
    """listener.start(); a bind failure names the listener and its address."""
    try:
        await listener.start(reuse_port=reuse_port)
    except OSError as e:
        raise OSError(e.errno, f"listener {lc.name} on {lc.bind}: {e.strerror or e}") from e


async def run_daemon(
    config: Config,
    *,
    ready: Callable[[Daemon], Awaitable[None] | None] | None = None,
    log_level: str = "info",
) -> int:
    """Run until SIGTERM/SIGINT; returns the exit status."""
    daemon = Daemon(config, log_level=log_level)
    try:
        await daemon.start()
    except (OSError, ValueError) as e:
        # a port in use, an unreadable key file: one line naming it, never a traceback
        log.error("cannot start: %s", e)
        await cleanup_partial(daemon)
        return 1
    daemon.install_signal_handlers()
    settle_heap()
    log.warning("balancer %s running (pid %d)", __import__("balancer").__version__, os.getpid())
    if ready is not None:
        r = ready(daemon)
        if asyncio.iscoroutine(r):
            await r
    await daemon.wait_stopped()
    return 0


class WorkerWiring:
    """How a `balancer worker` process gets its daemon (balancer.cluster.worker.Wiring): built
    here, so that the cluster package never imports the daemon."""

    def build(self, config: Config, sticky_keys: dict[str, list[bytes]]) -> Daemon:
        return Daemon(config, role=WORKER, sticky_keys=sticky_keys)

    def cleanup(self, daemon: Daemon) -> Awaitable[None]:
        return cleanup_partial(daemon)

    def settle(self) -> None:
        settle_heap()


def worker_main(argv: list[str]) -> int:
    """`balancer worker ...`: one worker process of `workers: N`, started by the owner."""
    from balancer.cluster.worker import main

    return main(argv, WorkerWiring())


def settle_heap() -> None:
    """Call once startup is done, before the first connection: everything built so far
    (modules, config, pools, the admin app, metric families) lives as long as the process.
    Frozen out of the cyclic collector's view, it is no longer re-scanned by every full
    collection, which the churn of connections triggers; with new connections per request
    that took p99 latency from 11-15 ms to 4 ms. Only called at startup: an object frozen
    while it is still in use (a connection, a config a reload will replace) would never be
    collected if it later became cyclic garbage."""
    gc.collect()
    gc.freeze()


async def cleanup_partial(daemon: Daemon) -> None:
    """Undo a start() that failed half-way (a listener could not bind, ...)."""
    for listener in daemon.listeners.values():
        listener.stop_accepting()  # type: ignore[attr-defined]
    for checker in daemon.checkers.values():
        await checker.stop()
    for task in daemon._tasks:
        task.cancel()
    if daemon._admin_runner is not None:
        await daemon._admin_runner.cleanup()
