#!/usr/bin/env bash
# Start a long-lived pto broker, and with --workers N, N chip workers (devices 0..N-1).
# The first line of output is the address clients use (Runtime(broker=ADDR) or PTO_BROKER).
# Runs in the foreground; SIGTERM or Ctrl-C stops the broker and its workers.
#   scripts/start_broker.sh --workers 4 [--listen ipc:///path | tcp://127.0.0.1:5555]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${here}${PYTHONPATH:+:${PYTHONPATH}}"
exec "${PYTHON:-python3}" -m broker "$@"
