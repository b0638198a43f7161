"""pto.wire.procs.SpinPoll: spin before sleeping only while spinning catches messages."""

from __future__ import annotations

from pto.wire.procs import SpinPoll


class FakePoll:
    """A poll function: ``poll(0)`` answers from ``spins`` (empty when exhausted), a
    blocking poll answers ``blocking``; every call's timeout is recorded."""

    def __init__(self, spins=(), blocking=("msg",)):
        self.spins = list(spins)
        self.blocking = list(blocking)
        self.calls: list[int] = []

    def __call__(self, timeout_ms: int) -> list:
        self.calls.append(timeout_ms)
        if timeout_ms == 0:
            got = self.spins.pop(0) if self.spins else None
            return [got] if got is not None else []
        return self.blocking


def test_a_message_during_the_spin_is_returned_without_sleeping():
    poll = FakePoll(spins=[None, None, "msg"])
    assert SpinPoll(poll, spin_seconds=10.0)(500, active=True) == ["msg"]
    assert poll.calls == [0, 0, 0]


def test_idle_polls_block_at_once():
    poll = FakePoll()
    assert SpinPoll(poll, spin_seconds=10.0)(500, active=False) == ["msg"]
    assert poll.calls == [500]


def test_after_a_spin_runs_out_the_next_active_poll_sleeps_at_once():
    poll = FakePoll(blocking=[])  # nothing comes: the blocking polls time out
    spin = SpinPoll(poll, spin_seconds=1e-4)
    assert spin(5, active=True) == []
    assert poll.calls[-1] == 5 and set(poll.calls[:-1]) == {0}  # spun, then slept
    assert not spin.worth_it
    poll.calls.clear()
    spin(5, active=True)
    assert poll.calls == [5]


def test_a_message_soon_after_going_to_sleep_turns_spinning_back_on():
    poll = FakePoll(blocking=["msg"])  # the blocking poll answers at once
    spin = SpinPoll(poll, spin_seconds=1.0)
    spin.worth_it = False
    assert spin(500, active=True) == ["msg"]
    assert poll.calls == [500] and spin.worth_it
    poll.spins = ["again"]
    poll.calls.clear()
    assert spin(500, active=True) == ["again"] and poll.calls == [0]


def test_no_spin_configured_never_spins():
    poll = FakePoll()
    spin = SpinPoll(poll, spin_seconds=0.0)
    assert spin(7, active=True) == ["msg"] and poll.calls == [7]
