"""Worker wake-up pipes: a peer opens the write end through /proc and pokes; a stale or
forged endpoint is refused; a dead peer is no error."""

from __future__ import annotations

import multiprocessing as mp
import select

from worker.wakeup import WakeUp


def _poke_from_another_process(address: str) -> None:
    w = WakeUp()
    w.learn(1, address)
    w.poke(1)
    w.close()


def readable(fd: int, timeout: float = 5.0) -> bool:
    return bool(select.select([fd], [], [], timeout)[0])


def test_a_peer_process_pokes_and_a_drain_empties_the_pipe():
    me = WakeUp()
    try:
        proc = mp.get_context("spawn").Process(target=_poke_from_another_process,
                                               args=(me.address,))
        proc.start()
        proc.join(30)
        assert proc.exitcode == 0
        assert readable(me.fd)
        me.drain()
        assert not readable(me.fd, 0)
    finally:
        me.close()


def test_an_endpoint_naming_another_pipe_or_a_bad_address_is_refused():
    me, other = WakeUp(), WakeUp()
    try:
        kind, pid, fd, _ = me.address.split(":")
        wrong_inode = ":".join([kind, pid, fd, "1"])
        for address in (wrong_inode, "pipe:1:2", "tcp://x:1", f"pipe:{pid}:99999:1"):
            other.learn(hash(address) & 0xFFFF, address)
            other.poke(hash(address) & 0xFFFF)  # nothing to poke: no error
        assert not readable(me.fd, 0)
    finally:
        me.close()
        other.close()


def test_poking_a_peer_that_is_gone_is_no_error():
    me, peer = WakeUp(), WakeUp()
    me.learn(2, peer.address)
    peer.close()  # its read end is gone: our write gets EPIPE
    me.poke(2)
    me.poke(2)
    me.close()
