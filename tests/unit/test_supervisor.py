"""The broker's Supervisor keeps how a worker it reaped ended, for the server to report even
when the Supervisor's own tick saw the death first (and has started the next worker)."""

from __future__ import annotations

import signal
import time

import pytest

from broker.supervisor import Supervisor


@pytest.mark.timeout(60)
def test_a_worker_reaped_and_restarted_by_tick_is_still_reported_with_its_exit(tmp_path):
    # No broker listens there: the worker starts and keeps trying to connect.
    sup = Supervisor(f"ipc://{tmp_path}/nobody.sock", devices=[0], host_workers=0,
                     heartbeat=0.5, liveness=3)
    try:
        sup.tick(time.monotonic(), stopping=False)
        first = sup.process(0)
        assert sup.exit_of(0, first.pid) is None  # running
        first.send_signal(signal.SIGKILL)
        first.wait(10)
        sup.tick(time.monotonic(), stopping=False)  # reaps it ...
        assert sup.process(0) is None
        assert sup.exit_of(0, first.pid) == "killed by SIGKILL"
        # ... and starts the next one after its back-off (it never connected)
        sup.tick(time.monotonic() + 1.0, stopping=False)
        second = sup.process(0)
        assert second is not None and second.pid != first.pid
        assert sup.exit_of(0, first.pid) == "killed by SIGKILL"
        assert sup.exit_of(0, second.pid) is None
        assert sup.exit_of(0, 999_999_999) is None  # not one of ours
    finally:
        sup.stop(timeout=2.0)
