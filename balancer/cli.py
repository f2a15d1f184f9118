"""Command line: `balancer run|check|register|demo|demo-backend` -> config -> daemon (and the internal
`balancer worker` that `run` starts for `workers: N`)."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import subprocess
import sys
import time
from importlib import resources

from balancer import config as config_mod
from balancer.config import ConfigError

log = logging.getLogger("balancer")


def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _load_or_report(path: str) -> config_mod.Config | None:
    try:
        return config_mod.load(path)
    except ConfigError as e:
        print(f"{path}: {len(e.problems)} problem(s):", file=sys.stderr)
        for p in e.problems:
            print(f"  {p}", file=sys.stderr)
        return None


def _run_loop(coro) -> int:  # type: ignore[no-untyped-def]
    import uvloop

    return uvloop.run(coro)


def cmd_check(args: argparse.Namespace) -> int:
    cfg = _load_or_report(args.config)
    if cfg is None:
        return 1
    pools = ", ".join(
        f"{n} ({len(p.backends)} backends{_discovered(p)}, {p.strategy})"
        for n, p in cfg.pools.items()
    )
    procs = f", {cfg.workers} processes" if cfg.workers > 1 else ""
    print(f"{args.config}: OK: {len(cfg.listeners)} listener(s){procs}; pools: {pools}")
    return 0


def _discovered(pool: config_mod.PoolConfig) -> str:
    d = pool.discovery
    if d is None:
        return ""
    kinds = [k for k, v in (("etcd", d.etcd), ("dns", d.dns)) if v is not None]
    return " + " + " and ".join(kinds)


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load_or_report(args.config)
    if cfg is None:
        return 1
    _setup_logging(args.log_level)
    from balancer.daemon import run_daemon

    return _run_loop(run_daemon(cfg, log_level=args.log_level))


def cmd_register(args: argparse.Namespace) -> int:
    from balancer.discovery.register import Registration, run_registration

    try:
        endpoints = [config_mod.parse_address(e) for arg in args.etcd for e in arg.split(",")]
        config_mod.parse_address(args.address)
        registration = Registration(
            endpoints, args.prefix, args.name, args.address, weight=args.weight, ttl=args.ttl
        )
    except ValueError as e:
        print(f"balancer register: {e}", file=sys.stderr)
        return 2
    _setup_logging(args.log_level)
    return _run_loop(run_registration(registration))


def demo_config_text() -> str:
    return resources.files("balancer.demo").joinpath("demo.yaml").read_text()


def cmd_demo(args: argparse.Namespace) -> int:
    if args.fleet:
        from balancer.demo.fleet import FleetPorts, run_fleet

        ports = FleetPorts(args.etcd_port, args.port, args.admin_port, args.app_port)
        return run_fleet(balancers=args.balancers, apps=args.apps, churn=args.churn, ports=ports)
    _setup_logging(args.log_level)
    cfg = config_mod.parse(demo_config_text(), source="<demo>")
    if args.sticky:
        # pin each browser to one app server: its visit counter then climbs steadily
        cfg = dataclasses.replace(
            cfg,
            pools={
                name: dataclasses.replace(pool, sticky=config_mod.StickyConfig())
                for name, pool in cfg.pools.items()
            },
        )
    procs: list[subprocess.Popen] = []
    try:
        for pool in cfg.pools.values():
            for b in pool.backends:
                procs.append(
                    subprocess.Popen(
                        [
                            sys.executable,
                            "-m",
                            "balancer.demo.backend",
                            "--port",
                            str(b.address.port),
                            "--host",
                            b.address.host,
                            "--name",
                            b.name,
                        ],
                        stdout=subprocess.DEVNULL,
                    )
                )
        _wait_ports(
            [(b.address.host, b.address.port) for p in cfg.pools.values() for b in p.backends],
            procs,
        )
        from balancer.daemon import run_daemon

        def ready(daemon: object) -> None:
            listener = cfg.listeners[0]
            print(
                "\nbalancer demo is running:\n"
                f"  site       http://{listener.bind}/      (reload: a different app server answers)\n"
                f"  dashboard  http://{cfg.admin.bind}/\n"
                f"  status     http://{cfg.admin.bind}/status\n"
                f"  metrics    http://{cfg.admin.bind}/metrics\n"
                "  backends   "
                + ", ".join(
                    f"{b.name}=http://{b.address}/" for p in cfg.pools.values() for b in p.backends
                )
                + "\n"
                "Press Ctrl-C to stop everything.\n",
                flush=True,
            )

        return _run_loop(run_daemon(cfg, ready=ready))
    except KeyboardInterrupt:
        return 0
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()


def _wait_ports(
    addrs: list[tuple[str, int]], procs: list[subprocess.Popen], timeout: float = 15.0
) -> None:
    import socket

    deadline = time.monotonic() + timeout
    for host, port in addrs:
        while True:
            for p in procs:
                if p.poll() is not None:
                    raise SystemExit(
                        f"demo backend exited with status {p.returncode} (is port {port} free?)"
                    )
            try:
                with socket.create_connection((host, port), timeout=0.5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"demo backend on {host}:{port} did not start") from None
                time.sleep(0.05)


def cmd_demo_backend(args: argparse.Namespace, rest: list[str]) -> int:
    from balancer.demo.backend import main as backend_main

    return backend_main(rest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="balancer", description="Reverse-proxy load balancer")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("run", help="run the daemon in the foreground")
    p.add_argument("-c", "--config", required=True, help="YAML config file")
    p.add_argument("--log-level", default=os.environ.get("BALANCER_LOG_LEVEL", "info"))
    p = sub.add_parser("check", help="validate a config file")
    p.add_argument("-c", "--config", required=True, help="YAML config file")
    p = sub.add_parser(
        "register", help="keep an app server's key in etcd on a lease while this runs"
    )
    p.add_argument("--etcd", action="append", required=True, help="HOST:PORT (repeat or comma)")
    p.add_argument("--prefix", required=True, help="the pool's discovery.etcd.prefix")
    p.add_argument("--name", required=True, help="the backend's name (the key is PREFIX+NAME)")
    p.add_argument("--address", required=True, help="HOST:PORT the balancers connect to")
    p.add_argument("--weight", type=int, default=1)
    p.add_argument("--ttl", type=int, default=5, help="lease seconds (default 5)")
    p.add_argument("--log-level", default="info")
    p = sub.add_parser("demo", help="three demo app servers behind a balancer on :8080")
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--sticky", action="store_true", help="insert a sticky cookie (one server per browser)"
    )
    fleet = p.add_argument_group("--fleet: etcd, several balancers, self-registering app servers")
    fleet.add_argument("--fleet", action="store_true", help="run the fleet demo")
    fleet.add_argument("--balancers", type=int, default=2, help="balancers (default 2)")
    fleet.add_argument("--apps", type=int, default=3, help="app servers at start (default 3)")
    fleet.add_argument(
        "--churn", type=float, default=20.0, help="seconds between app joins/leaves (0: none)"
    )
    fleet.add_argument("--etcd-port", type=int, default=2379, help="etcd client port (+1 peer)")
    fleet.add_argument("--port", type=int, default=8080, help="first balancer's port (+1 each)")
    fleet.add_argument("--admin-port", type=int, default=9000, help="first admin port (+1 each)")
    fleet.add_argument("--app-port", type=int, default=9101, help="first app server port")
    sub.add_parser("demo-backend", help="one demo app server", add_help=False)
    sub.add_parser("version", help="the version, and whether the hot path runs compiled")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["demo-backend"]:
        return cmd_demo_backend(argparse.Namespace(), argv[1:])
    if argv[:1] == ["worker"]:
        # internal: a worker process of `workers: N`, started by `balancer run` (not listed
        # in --help; it needs the owner's end of a socketpair)
        from balancer.daemon import worker_main

        return worker_main(argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "check":
        return cmd_check(args)
    if args.command == "run":
        return cmd_run(args)
    if args.command == "register":
        return cmd_register(args)
    if args.command == "demo":
        return cmd_demo(args)
    if args.command == "version":
        from balancer import __version__, build

        print(f"balancer {__version__}: {build.describe()}")
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
