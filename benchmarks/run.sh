#!/usr/bin/env bash
# Benchmarks side by side with HAProxy and nginx (see benchmarks/bench.py for what is run).
# Installs what it needs from Debian (wrk, haproxy, nginx, h2load) when run as root, the
# package with its bench extras into .venv, then runs. Results: benchmarks/results/.
#   benchmarks/run.sh [--quick] [--only small,64k] [--reps N] [--duration S]
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v wrk >/dev/null || missing+=(wrk)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v nginx >/dev/null || missing+=(nginx-light)
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v taskset >/dev/null || missing+=(util-linux)
if [ ${#missing[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "benchmarks need: ${missing[*]} (run as root to install them with apt-get)" >&2
        exit 1
    fi
    DEBIAN_FRONTEND=noninteractive apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
PYTHONWARNINGS=ignore .venv/bin/python -m pip install --quiet -e ".[bench]"  # no editable-install warning noise
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"
exec .venv/bin/python benchmarks/bench.py "$@"
