"""A live HA failover in network namespaces: two nodes, a VIP, a client stream; the active dies.

Needs root (namespaces, netlink). Everything lives in 198.18.0.0/24 inside private namespaces on
a private bridge, and is removed at the end, Ctrl-C included:

    sudo .venv/bin/python benchmarks/ha_demo.py               # kill -9 the active
    sudo .venv/bin/python benchmarks/ha_demo.py --fail stop   # SIGSTOP it (a hung host)
    sudo .venv/bin/python benchmarks/ha_demo.py --fail term   # planned hand-over (SIGTERM)
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.integration.netns import JsonLines, Topology, netns_problem, program  # noqa: E402

VIP = "198.18.0.100/24"
VIP_IP = "198.18.0.100"
HOSTS = {"client": "198.18.0.10", "lb1": "198.18.0.11", "lb2": "198.18.0.12"}
KEEPALIVED = (
    "keepalived (VRRPv3, 200 ms adverts) + HAProxy on this machine: gap 0.61-0.66 s, 11-12 failed"
)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fail", choices=("kill", "stop", "term"), default="kill")
    parser.add_argument("--advert", type=float, default=0.2, help="advert_interval, seconds")
    parser.add_argument("--dead", type=float, default=0.6, help="dead_after, seconds")
    parser.add_argument("--rate", type=float, default=20.0, help="client requests per second")
    parser.add_argument("--before", type=float, default=3.0, help="seconds of traffic first")
    parser.add_argument("--after", type=float, default=4.0, help="seconds of traffic after")
    parser.add_argument("--quiet", action="store_true", help="print failures and events only")
    args = parser.parse_args()

    problem = netns_problem()
    if problem:
        print(f"ha_demo: {problem}", file=sys.stderr)
        return 2

    topo = Topology()
    try:
        for name, ip in HOSTS.items():
            topo.add_host(name, ip)
        key = topo.logdir / "ha.key"
        key.write_text(os.urandom(24).hex() + "\n")
        key.chmod(0o600)
        nodes = {}
        for name, prio, peer in (("lb1", 150, "lb2"), ("lb2", 100, "lb1")):
            spec = {
                "ha": {
                    "node_id": name,
                    "virtual_ip": VIP,
                    "auth_key_file": str(key),
                    "peers": [f"{HOSTS[peer]}:5405"],
                    "priority": prio,
                    "advert_interval": args.advert,
                    "dead_after": args.dead,
                },
                "status_every": 3600,
            }
            nodes[name] = JsonLines(topo.run(name, program("node", json.dumps(spec))), name)
        print(f"namespaces {topo.tag}-*: client {HOSTS['client']}, lb1 {HOSTS['lb1']} (priority "
              f"150), lb2 {HOSTS['lb2']} (priority 100), VIP {VIP}")  # fmt: skip
        print(f"advert_interval {args.advert}s, dead_after {args.dead}s; waiting for an active...")
        nodes["lb1"].wait_for(lambda e: e.get("event") == "role" and e["role"] == "active", 10)
        client = JsonLines(
            topo.run(
                "client", program("client", f"http://{VIP_IP}:8080/", "--rate", str(args.rate))
            ),
            "client",
        )
        t0 = time.monotonic()
        shown = {"client": 0, "lb1": 0, "lb2": 0}
        t_fail: float | None = None
        end = t0 + args.before + args.after

        def show() -> None:
            rows = []
            for name, stream in (("client", client), *nodes.items()):
                items = stream.snapshot()
                rows += [(name, item) for item in items[shown[name] :]]
                shown[name] = len(items)
            for name, item in sorted(rows, key=lambda r: r[1]["t"]):
                at = item["t"] - t0
                if name == "client":
                    if item["ok"] and not args.quiet:
                        print(f"{at:7.2f}s  ok     answered by {item['who']}")
                    elif not item["ok"]:
                        print(f"{at:7.2f}s  FAIL   {item['error']}")
                elif item.get("event") == "role":
                    print(f"{at:7.2f}s  ====   {name} is now {item['role']}")

        while time.monotonic() < end:
            if t_fail is None and time.monotonic() >= t0 + args.before:
                show()
                t_fail = time.monotonic()
                proc = nodes["lb1"].proc
                what = {"kill": "kill -9", "stop": "SIGSTOP", "term": "SIGTERM"}[args.fail]
                print(f"{t_fail - t0:7.2f}s  >>>>   {what} lb1 (the active)")
                sig = {"kill": signal.SIGKILL, "stop": signal.SIGSTOP, "term": signal.SIGTERM}
                os.kill(proc.pid, sig[args.fail])
            show()
            time.sleep(0.05)
        time.sleep(0.6)  # let the last requests finish
        show()

        records = client.snapshot()
        assert t_fail is not None
        after = [r for r in records if r["t"] >= t_fail - 1.0]
        first = next(
            (r for r in records if r["ok"] and r["who"] == "lb2" and r["t"] >= t_fail), None
        )
        failed = [r for r in after if not r["ok"]]
        print()
        if first is None:
            print(f"lb2 never answered; {len(failed)} failed requests")
            return 1
        print(f"failover ({args.fail}): gap {first['end'] - t_fail:.3f} s from the signal to the first "
              f"answer by lb2; {len(failed)} failed of {len(records)} requests at {args.rate:g} req/s")  # fmt: skip
        print(f"reference: {KEEPALIVED}")
        print(f"holding {VIP} now: {', '.join(topo.holders(VIP)) or 'nobody'}")
        return 0
    except KeyboardInterrupt:
        return 130
    finally:
        topo.cleanup()
        topo.remove_logs()


if __name__ == "__main__":
    sys.exit(main())
