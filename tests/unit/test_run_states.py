"""The client's run as a state machine (pto/host/run.py ``RunState``, ``ALLOWED``): its table,
and a real runbook (real broker and worker processes, real connection and tensor store)
taken through every path, with ``validate()`` after each step."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import pto
from pto.host.connection import Connection
from pto.host.orchestration import OrchContext
from pto.host.run import ALLOWED, IllegalRunTransition, Registration, Run, RunState
from pto.host.runbook import RunBook
from pto.host.tensor import TensorStore
from pto.wire import protocol as P
from pto.wire import shm
from pto.wire.errors import BrokerLost
from pto.wire.pickling import pickle_by_value
from pto.wire.sockets import child_env

S = RunState


# ---- the table alone -------------------------------------------------------------------


def test_every_edge_off_the_table_raises_and_names_both_states():
    for start, to in itertools.product(S, S):
        run = Run()
        run.state = start  # (set up the starting point directly; move() is under test)
        if to in ALLOWED[start]:
            run.move(to)
            assert run.state is to
        else:
            with pytest.raises(IllegalRunTransition, match=f"{start.value} -> {to.value}"):
                run.move(to)
            assert run.state is start


def test_only_a_finished_run_can_be_claimed_and_only_once():
    run = Run()
    assert not run.claim()  # still orchestrating
    run.move(S.FINISHED)
    assert run.claim() and run.state is S.RESOLVING
    assert not run.claim()
    run.resolve()
    assert run.state is S.RESOLVED and run.outcome == (None, None)
    run.validate()


def test_validate_catches_a_state_that_disagrees_with_the_fields():
    run = Run()
    run.move(S.WAITING)  # waiting with no task in flight
    with pytest.raises(AssertionError, match="no task in flight"):
        run.validate()
    lost = Run(lost=BrokerLost("gone"))
    with pytest.raises(AssertionError, match="lost but orchestrating"):
        lost.validate()


# ---- a real runbook ----------------------------------------------------------------------


def fill(out, value, delay):
    time.sleep(delay)
    out[:] = value


@pytest.fixture
def book(tmp_path):
    """A RunBook wired as a runtime wires it, to a broker with one worker (chip 0)."""
    address = f"ipc://{tmp_path}/b.sock"
    broker = subprocess.Popen(
        [sys.executable, "-m", "broker", "--listen", address, "--workers", "1",
         "--parent-pid", str(os.getpid())],
        stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=child_env())
    owner = shm.new_owner()
    conn = Connection(address, owner, timeout=30)
    store = TensorStore(owner, threading.RLock(), conn.free)
    rb = RunBook(conn, store, [0], None, host_kernel=lambda fn: 0, max_outstanding=1000)
    conn.on_message = rb.on_message
    conn.on_lost = rb.fail_all
    conn.send(P.RegisterKernel(1, "fill", "py", pickle_by_value(fill)))
    conn.start()
    rb.broker = broker
    try:
        yield rb
    finally:
        rb.close()
        conn.close(bye=conn.lost is None)
        store.close()
        if broker.poll() is None:
            broker.send_signal(signal.SIGTERM)
        broker.wait(30)
        broker.stdout.close()


REG = Registration("fill_one", orch=lambda ctx, args: None, kernel_ids={"fill": 1})


def start(book: RunBook, value: float, delay: float, with_future: bool = True):
    """A run whose orchestration sends one task (fill chip 0's tensor after ``delay``)."""
    run = book.new_run(with_future)
    assert run.state is S.ORCHESTRATING
    ctx = OrchContext(book, run, REG)
    y = ctx.alloc((4,), np.float64)
    ctx.submit(0, "fill", [pto.Arg.output(y), pto.Arg.scalar(value), pto.Arg.scalar(delay)])
    ctx.finish()  # sent: one task in flight
    assert run.state is S.ORCHESTRATING and run.outstanding == 1
    run.validate()
    book.validate()
    return run, y


@pytest.mark.timeout(60)
def test_a_run_with_a_future_through_every_state(book):
    run, y = start(book, 7.0, 0.3)
    book.orch_finished(run, value=y)
    assert run.state is S.WAITING  # its task still runs
    run.validate()
    book.validate()
    assert book.wait(run, timeout=30)
    assert run.state is S.RESOLVED  # this thread resolved it
    run.validate()
    book.validate()
    assert run.future.result().numpy().tolist() == [7.0] * 4


@pytest.mark.timeout(60)
def test_a_run_whose_tasks_ended_before_its_orchestration_returned(book):
    run, y = start(book, 2.0, 0.0)
    assert book.wait(run, timeout=0.5) is False  # the orchestration has not returned yet
    deadline = time.monotonic() + 30
    while run.outstanding and time.monotonic() < deadline:
        book.wait(run, timeout=0.05)  # drives the results in
    assert run.state is S.ORCHESTRATING and run.outstanding == 0
    run.validate()
    book.validate()
    book.orch_finished(run, value=y)  # no task left: FINISHED, and this thread resolves it
    assert run.state is S.RESOLVED
    run.validate()
    assert run.future.result() is y


@pytest.mark.timeout(60)
def test_a_run_without_a_future_and_one_abandoned(book):
    run = book.new_run(with_future=False)
    book.orch_finished(run, value=3)  # no tasks: resolved at once, by this thread
    assert run.state is S.RESOLVED and run.outcome == (3, None)
    run.validate()

    slow, y = start(book, 1.0, 5.0, with_future=False)
    book.orch_finished(slow, value=y)
    assert not book.wait(slow, timeout=0.1)
    assert not book.abandon(slow)  # rt.run's timeout: it stops waiting
    assert slow.abandoned and slow.dropped and slow.state is S.WAITING
    slow.validate()
    book.validate()


@pytest.mark.timeout(60)
def test_broker_lost_ends_every_run_and_the_connection_alone_records_it(book):
    running, y = start(book, 1.0, 10.0)
    book.orch_finished(running, value=y)
    orchestrating, _ = start(book, 1.0, 10.0)
    book.broker.kill()  # the connection sees its pid gone
    with pytest.raises(BrokerLost):
        running.future.result(timeout=30)
    assert running.state is S.RESOLVED and orchestrating.finished
    running.validate()
    orchestrating.validate()
    book.validate()
    book.orch_finished(orchestrating, value=None)  # its orchestration returns after the loss
    assert orchestrating.state is S.RESOLVED
    with pytest.raises(BrokerLost):
        orchestrating.future.result(timeout=5)
    with pytest.raises(BrokerLost):
        book.new_run()


@pytest.mark.timeout(60)
def test_close_runs_ends_runs_in_flight_and_refuses_new_ones(book):
    run, y = start(book, 1.0, 10.0)
    book.orch_finished(run, value=y)
    book.close_runs()
    with pytest.raises(BrokerLost, match="closed"):
        run.future.result(timeout=30)
    run.validate()
    book.validate()
    with pytest.raises(BrokerLost, match="closed"):
        book.new_run()
