"""Stress: 4 client processes run random task DAGs through one long-lived broker + 4 workers.

Each client (``dag_client.py``, a separate Python process) runs 10 orchestrations of 100
tasks over 16 shared tensors and compares every tensor, after every run, with a sequential
numpy reference. The whole test has a hard deadline, so it can fail but never hang.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CLIENT = Path(__file__).with_name("dag_client.py")
DEADLINE_S = 240
N_CLIENTS = 4

pytestmark = [pytest.mark.slow, pytest.mark.timeout(DEADLINE_S + 60)]


def _first_line(path: Path, proc: subprocess.Popen, timeout: float) -> str:
    """The first line ``proc`` writes to its stdout file ``path``, within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        text = path.read_text(errors="replace")
        if "\n" in text:
            return text.split("\n", 1)[0].strip()
        if proc.poll() is not None:
            raise EOFError(f"broker exited (rc={proc.returncode}) before its address: {text!r}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"broker printed no address within {timeout}s (got {text!r})")
        time.sleep(0.05)


def _stop(proc: subprocess.Popen, timeout: float = 15.0) -> int | None:
    """SIGTERM and wait; on timeout SIGKILL its whole process group and return None."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
            return None
    return proc.returncode


def _tail(path: Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


def test_four_clients_random_dags_through_one_broker(tmp_path):
    deadline = time.monotonic() + DEADLINE_S
    env = {k: v for k, v in os.environ.items() if k != "PTO_BROKER"}
    out, err = tmp_path / "broker.out", tmp_path / "broker.err"
    # Output goes to files, not pipes: nobody can block on a full pipe.
    with open(out, "wb") as fo, open(err, "wb") as fe:
        broker = subprocess.Popen(
            ["bash", str(REPO / "scripts" / "start_broker.sh"), "--workers", "4"],
            cwd=REPO, env=env, stdout=fo, stderr=fe,
            start_new_session=True,  # so a clean-up SIGKILL reaches its workers too
        )
    clients: list[subprocess.Popen] = []
    try:
        addr = _first_line(out, broker, timeout=30)
        assert addr.startswith(("ipc://", "tcp://")), addr

        for i in range(N_CLIENTS):
            with open(tmp_path / f"c{i}.out", "wb") as fo, open(tmp_path / f"c{i}.err", "wb") as fe:
                clients.append(subprocess.Popen(
                    [sys.executable, str(CLIENT), "--broker", addr, "--seed", str(1000 + i),
                     "--runs", "10", "--tasks-per-run", "100", "--pool", "16"],
                    cwd=REPO, env=env, stdout=fo, stderr=fe,
                ))
        reports, failures = [], []
        for i, c in enumerate(clients):
            try:
                c.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"client {i} still running at the {DEADLINE_S}s deadline:\n"
                            f"{_tail(tmp_path / f'c{i}.err')}")
            if c.returncode != 0:
                failures.append(f"client {i} rc={c.returncode}\n{_tail(tmp_path / f'c{i}.err')}")
                continue
            reports.append(json.loads((tmp_path / f"c{i}.out").read_text().splitlines()[-1]))
        assert broker.poll() is None, f"the broker died during the test:\n{_tail(err)}"
        assert not failures, "\n\n".join(failures)

        for r in reports:
            assert r["tasks"] == 1000 and r["checks"] == 10 * 16, r
        wrong = {r["seed"]: (r["wrong"], r["first_wrong"]) for r in reports if r["wrong"]}
        assert not wrong, f"wrong results (seed: (count, first)): {wrong}"
    finally:
        for c in clients:
            if c.poll() is None:
                c.kill()
                c.wait()
        rc = _stop(broker)
    assert rc is not None, f"broker ignored SIGTERM for 15s; stderr tail:\n{_tail(err)}"
    assert rc in (0, -signal.SIGTERM, 128 + signal.SIGTERM), (
        f"broker exited rc={rc} on SIGTERM; stderr tail:\n{_tail(err)}"
    )
