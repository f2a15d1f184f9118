"""Command line: `balancer run|check|demo|demo-backend` -> config -> daemon (and the internal
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
        f"{n} ({len(p.backends)} backends, {p.strategy})" for n, p in cfg.pools.items()
    )
    procs = f", {cfg.workers} processes" if cfg.workers > 1 else ""
    print(f"{args.config}: OK: {len(cfg.listeners)} listener(s){procs}; pools: {pools}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    cfg = _load_or_report(args.config)
    if cfg is None:
        return 1
    _setup_logging(args.log_level)
    from balancer.daemon import run_daemon

    return _run_loop(run_daemon(cfg, log_level=args.log_level))


def demo_config_text() -> str:
    return resources.files("balancer.demo").joinpath("demo.yaml").read_text()


def cmd_demo(args: argparse.Namespace) -> int:
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
    p = sub.add_parser("demo", help="three demo app servers behind a balancer on :8080")
    p.add_argument("--log-level", default="info")
    p.add_argument(
        "--sticky", action="store_true", help="insert a sticky cookie (one server per browser)"
    )
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
    if args.command == "demo":
        return cmd_demo(args)
    if args.command == "version":
        from balancer import __version__, build

        print(f"balancer {__version__}: {build.describe()}")
        return 0
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
