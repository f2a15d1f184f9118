"""Where the kernel time per request goes: the balancer and HAProxy, same run, same machine.

Both proxies make the same system calls per small keep-alive request (two reads, two writes,
an epoll_wait every few requests: `strace -c`), yet the balancer spent more kernel time per
request. This samples each proxy's stacks with `perf record -e cpu-clock -g` (a software
clock: works where hardware counters are not exposed, as in most VMs) while it is loaded,
and sorts every kernel sample into what it was doing, by the first marker found walking its
stack from the leaf:

    wake peer      sock_def_readable/try_to_wake_up: waking the reader of what we just sent
                   (the backend or the load generator, on the other core: an IPI if it sleeps)
    loopback rx    the receiving side's TCP work, which loopback runs in the sender's context
    tcp send       the rest of tcp_sendmsg
    tcp recv       tcp_recvmsg
    epoll          epoll_wait and epoll_ctl
    connections    accept4, connect, close, socket setup
    page faults    the process's own memory (a growing or churning heap shows here)
    syscall entry  the rest under do_syscall_64
    other          interrupts, softirqs not under a syscall, scheduler

It also counts, per request, the IPIs the proxy sends (ipi:ipi_send_cpu): waking a peer whose
core has gone idle. In a VM whose idle cores halt at once (no guest halt-polling) each is a
VM exit, and a slower proxy leaves its peers idle more often, so it sends more of them.

It runs each proxy twice: saturated (wrk -c50, as the throughput table) and at a fixed
offered rate (h2load --h1 --rps, as the CPU-per-request table), because how often the peers
sleep (and so cost a wake-up) depends on how busy the proxy keeps them.

    .venv/bin/python benchmarks/kernel_share.py [--seconds 5] [--rate 3000]

Needs wrk, h2load, haproxy, nginx (benchmarks/run.sh installs them) and perf (linux-perf).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import LOAD_CORE, Lab  # noqa: E402

FREQ = 4999
# user-space samples by the shared object of their leaf frame (the proxy's own code first)
USER_LIBRARIES = (
    ("/balancer/", "balancer (compiled)"),
    ("libpython", "CPython"),
    ("httptools", "httptools/llhttp"),
    ("uvloop", "uvloop/libuv"),
    ("libc.so", "libc"),
    ("libcrypto", "OpenSSL"),
    ("haproxy", "haproxy"),
)
# counted per request: cross-core wake-ups this process sends (an IPI is a VM exit in a guest
# whose idle cores halt), and its system calls
EVENTS = ("ipi:ipi_send_cpu", "sched:sched_wakeup", "raw_syscalls:sys_enter")
CATEGORIES = (
    ("wake peer", ("sock_def_readable", "try_to_wake_up", "ep_poll_callback")),
    ("loopback rx", ("tcp_v4_rcv", "__netif_receive_skb", "net_rx_action")),
    ("tcp send", ("tcp_sendmsg",)),
    ("tcp recv", ("tcp_recvmsg",)),
    ("epoll", ("do_epoll_wait", "do_epoll_ctl", "ep_poll")),
    (
        "connections",
        ("__sys_accept4", "__sys_connect", "__x64_sys_close", "__sys_socket", "sock_setsockopt"),
    ),
    ("page faults", ("asm_exc_page_fault", "do_user_addr_fault", "__x64_sys_munmap")),
    ("syscall entry", ("do_syscall_64", "entry_SYSCALL_64")),
)


def proc_times(pid: int) -> tuple[int, int]:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[11]), int(fields[12])


def classify(stack: list[str]) -> str:
    for name, markers in CATEGORIES:
        for frame in stack:
            if any(m in frame for m in markers):
                return name
    return "other"


def user_library(frame: str) -> str:
    """Which part of user space a sampled leaf frame belongs to (by its shared object)."""
    dso = frame.rsplit("(", 1)[-1]
    for marker, name in USER_LIBRARIES:
        if marker in dso:
            return name
    return "other"


def samples(data: Path) -> tuple[Counter, Counter, int]:
    """Kernel samples by category, user samples by library, all samples."""
    out = subprocess.run(
        ["perf", "script", "-i", str(data), "-F", "ip,sym,dso"],
        capture_output=True,
        text=True,
    ).stdout
    kinds: Counter = Counter()
    user: Counter = Counter()
    total = 0
    for block in out.split("\n\n"):
        frames = [line.strip() for line in block.strip().splitlines() if line.strip()]
        if not frames:
            continue
        total += 1
        if "[kernel.kallsyms]" not in frames[0]:
            user[user_library(frames[0])] += 1
            continue
        kinds[classify([f.split(None, 1)[1] if " " in f else f for f in frames])] += 1
    return kinds, user, total


def load(kind: str, port: int, seconds: int, rate: int) -> int:
    """Run the load; return the number of requests answered."""
    if kind == "saturated":
        cmd = ["wrk", "-t1", "-c50", f"-d{seconds}s", f"http://127.0.0.1:{port}/small"]
        out = subprocess.run(
            ["taskset", "-c", LOAD_CORE, *cmd], capture_output=True, text=True
        ).stdout
        return int(re.search(r"(\d+) requests in", out).group(1))
    n = rate * seconds
    cmd = ["h2load", "--h1", "-n", str(n), "-c", "10", "--rps", str(rate // 10)]
    out = subprocess.run(
        ["taskset", "-c", LOAD_CORE, *cmd, f"http://127.0.0.1:{port}/small"],
        capture_output=True,
        text=True,
    ).stdout
    return int(re.search(r"(\d+) succeeded", out).group(1))


def measure(pid: int, port: int, kind: str, seconds: int, rate: int, work: Path) -> dict:
    data = work / f"{pid}-{kind}.data"
    u0, s0 = proc_times(pid)
    counts = work / f"{pid}-{kind}.counts"
    perf = subprocess.Popen(
        ["perf", "record", "-q", "-e", "cpu-clock", "-F", str(FREQ), "-g"]
        + ["-o", str(data), "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    stat = subprocess.Popen(
        ["perf", "stat", "-x,", "-e", ",".join(EVENTS), "-o", str(counts), "-p", str(pid)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        reqs = load(kind, port, seconds, rate)
    finally:
        for p in (perf, stat):
            p.send_signal(2)
            p.wait(30)
    u1, s1 = proc_times(pid)
    tick = os.sysconf("SC_CLK_TCK")
    kinds, user, total = samples(data)
    per_sample_us = 1e6 / FREQ / reqs
    events = {}
    for line in counts.read_text().splitlines():
        parts = line.split(",")
        if len(parts) > 2 and parts[2] in EVENTS and parts[0].strip().isdigit():
            events[parts[2]] = int(parts[0]) / reqs
    return {
        "requests": reqs,
        "per_request": events,
        "user_us": (u1 - u0) / tick / reqs * 1e6,
        "sys_us": (s1 - s0) / tick / reqs * 1e6,
        "kernel_share": sum(kinds.values()) / max(1, total),
        "kernel_us": {k: v * per_sample_us for k, v in kinds.items()},
        "user_us_by_library": {k: v * per_sample_us for k, v in user.items()},
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rate", type=int, default=3000)
    args = ap.parse_args()
    for tool in ("perf", "wrk", "h2load", "haproxy", "nginx", "taskset"):
        if shutil.which(tool) is None:
            print(f"missing {tool}", file=sys.stderr)
            return 1
    work = Path(tempfile.mkdtemp(prefix="balancer-kshare-"))
    work.chmod(0o755)
    lab = Lab(work)
    results: dict = {}
    try:
        lab.start_backend()
        proxies = {"balancer": lab.start_balancer("balancer"), "haproxy": lab.start_haproxy()}
        for kind in ("saturated", "fixed"):
            for name, target in proxies.items():
                load(kind, target.port, 1, args.rate)  # warm connections and caches
                r = measure(target.proc.pid, target.port, kind, args.seconds, args.rate, work)
                results[(kind, name)] = r
    finally:
        lab.stop_all()
    names = [name for name, _ in CATEGORIES] + ["other"]
    for kind in ("saturated", "fixed"):
        b, h = results[(kind, "balancer")], results[(kind, "haproxy")]
        label = "wrk -c50" if kind == "saturated" else f"{args.rate} req/s"
        print(f"\n{kind} ({label}): µs per request, balancer / HAProxy")
        print(f"  {'requests':14s} {b['requests']:>9d} / {h['requests']:d}")
        print(f"  {'user (/proc)':14s} {b['user_us']:9.2f} / {h['user_us']:.2f}")
        print(f"  {'kernel (/proc)':14s} {b['sys_us']:9.2f} / {h['sys_us']:.2f}")
        for ev in EVENTS:
            bv, hv = b["per_request"].get(ev, 0.0), h["per_request"].get(ev, 0.0)
            print(f"  {ev:24s} {bv:6.3f} / {hv:.3f} per request")
        print("  kernel, from perf samples:")
        for n in names:
            bv, hv = b["kernel_us"].get(n, 0.0), h["kernel_us"].get(n, 0.0)
            print(f"    {n:14s} {bv:7.2f} / {hv:.2f}")
        print("  user space, from perf samples (balancer; HAProxy is one binary):")
        for lib, us in sorted(b["user_us_by_library"].items(), key=lambda kv: -kv[1]):
            print(f"    {lib:20s} {us:7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
