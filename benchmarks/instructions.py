"""Instructions per request, per hotpath.py scenario, counted by callgrind: deterministic where
timings on a shared machine are not.

    .venv/bin/python benchmarks/instructions.py                     # every scenario
    .venv/bin/python benchmarks/instructions.py --only small --top 25
    BALANCER_PURE=1 .venv/bin/python benchmarks/instructions.py     # the interpreted build

Each scenario runs under `valgrind --tool=callgrind` with collection on only inside the
functools.reduce() call that wraps the measured requests (hotpath.py --callgrind): the count
is the user-space instructions of those requests (plus a few hundred per request for the
reduce step itself), without start-up and warm-up. `--top N` prints the N functions with the
highest inclusive cost per request (callgrind_annotate), `--keep DIR` keeps the output files.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCENARIOS = ("small", "metrics_off", "sticky", "least_connections", "access_log")


def count(scenario: str, n: int, out: Path) -> int:
    """Instructions callgrind counted for `n` requests of one scenario."""
    subprocess.run(
        [
            "valgrind",
            "--tool=callgrind",
            "--collect-atstart=no",
            "--toggle-collect=functools_reduce",
            f"--callgrind-out-file={out}",
            sys.executable,
            str(HERE / "hotpath.py"),
            "--callgrind",
            "--only",
            scenario,
            "-n",
            str(n),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONHASHSEED": "0"},
    )
    for line in out.read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {out}")


def _annotate(out: Path, inclusive: bool) -> list[tuple[int, str]]:
    text = subprocess.run(
        ["callgrind_annotate", f"--inclusive={'yes' if inclusive else 'no'}", str(out)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    rows = []
    for line in text.splitlines():
        m = re.match(r"\s*([\d,]+) \(\s*[\d.]+%\)\s+(\S+)", line)
        if m is not None:
            # "file:function [object]": the function's name is enough here
            rows.append((int(m.group(1).replace(",", "")), m.group(2).rpartition(":")[2]))
    return rows


def _demangle(name: str) -> str:
    """`__pyx_pw_8balancer_5proxy_6client_14ClientProtocol_17data_received` ->
    `balancer.proxy.client.ClientProtocol.data_received` (Cython's length-prefixed parts;
    the method's own number is Cython's index of it)."""
    m = re.match(r"__pyx_[a-z]+_(.*)$", name)
    if m is None:
        return name
    rest, parts = m.group(1), []
    while True:
        d = re.match(r"(\d+)(.*)$", rest)
        if d is None:
            break
        size, tail = int(d.group(1)), d.group(2)
        if len(tail) <= size or tail[size] != "_":
            rest = tail  # the method's index, then its name
            break
        parts.append(tail[:size])
        rest = tail[size + 1 :]
    return ".".join([*parts, rest])


def top(out: Path, n: int, limit: int) -> list[str]:
    """Per request: the compiled functions (balancer, httptools) by inclusive cost, then
    every function by its own cost, `limit` of each."""
    rows = ["inclusive, compiled functions:"]
    seen = set()
    for cost, name in _annotate(out, inclusive=True):
        if "__pyx_" in name and "uvloop" not in name and "CyFunction" not in name:
            short = _demangle(name)
            if short not in seen:
                seen.add(short)
                rows.append(f"{cost / n:9.0f}  {short}")
        if len(rows) > limit:
            break
    rows.append("self:")
    rows += [
        f"{cost / n:9.0f}  {name}" for cost, name in _annotate(out, inclusive=False)[1 : limit + 1]
    ]
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("-n", type=int, default=5000, help="requests counted per scenario")
    ap.add_argument("--only", default="", help="comma-separated scenarios")
    ap.add_argument("--top", type=int, default=0, help="also list the N costliest functions")
    ap.add_argument("--keep", default="", help="directory to keep the callgrind files in")
    args = ap.parse_args()
    if shutil.which("valgrind") is None:
        print("valgrind is not installed", file=sys.stderr)
        return 1
    names = [s for s in args.only.split(",") if s] or list(SCENARIOS)
    work = Path(args.keep or tempfile.mkdtemp(prefix="balancer-callgrind-"))
    work.mkdir(parents=True, exist_ok=True)
    base = None
    for name in names:
        out = work / f"callgrind.{name}.out"
        per = count(name, args.n, out) / args.n
        if name == "small":
            base = per
        share = f"  ({(per / base - 1) * 100:+.1f}% of small)" if base and name != "small" else ""
        print(f"{name:18s} {per:9.0f} instructions/request{share}", flush=True)
        if args.top:
            for row in top(out, args.n, args.top):
                print("   ", row)
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
