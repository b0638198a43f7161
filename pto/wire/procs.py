"""Process plumbing shared by the client, broker and worker: runtime dir, addresses, lifetimes
(their sockets and children's environment: ``pto.wire.sockets``)."""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Generic, TypeVar

from . import config

T = TypeVar("T")

_PR_SET_PDEATHSIG = 1


def runtime_dir(base: str | None = None) -> str:
    """The per-user 0700 directory for ipc endpoints and logs (created if missing):
    ``base`` (PTO_RUNTIME_DIR), else $XDG_RUNTIME_DIR/pto, else /tmp/pto-UID."""
    if base is None:
        base = config.load().runtime_dir
    if not base:
        xdg = os.environ.get("XDG_RUNTIME_DIR")
        base = os.path.join(xdg, "pto") if xdg and os.path.isdir(xdg) else os.path.join(
            tempfile.gettempdir(), f"pto-{os.getuid()}"
        )
    os.makedirs(base, mode=0o700, exist_ok=True)
    st = os.stat(base)
    if st.st_uid != os.getuid():
        raise PermissionError(f"runtime dir {base} belongs to uid {st.st_uid}, not to us")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(base, 0o700)
    return base


def worker_address(client_address: str) -> str:
    """The broker's worker endpoint, derived from its client endpoint.

    ``ipc://PATH`` -> ``ipc://PATH.w``; ``tcp://HOST:PORT`` -> ``tcp://HOST:PORT+1``.
    """
    if client_address.startswith("ipc://"):
        return client_address + ".w"
    if client_address.startswith("tcp://"):
        host, _, port = client_address[len("tcp://") :].rpartition(":")
        if not port.isdigit():
            raise ValueError(f"tcp address needs an explicit port: {client_address!r}")
        return f"tcp://{host}:{int(port) + 1}"
    raise ValueError(f"unsupported broker address {client_address!r} (use ipc:// or tcp://)")


def die_with_parent(parent_pid: int | None, sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send us ``sig`` when our parent exits (Linux), and check it has
    not already. A process that must clean up after itself asks for SIGTERM and handles it."""
    if parent_pid is None:
        return
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def parent_gone(parent_pid: int | None) -> bool:
    return parent_pid is not None and os.getppid() != parent_pid


def setup_logging(role: str, level: str, log_file: str | None = None) -> None:
    """Log records carry the process role and pid; ``level`` is a logging level name
    (``config.Config.log_level``: PTO_LOG_LEVEL, default INFO)."""
    handler: logging.Handler = (
        logging.FileHandler(log_file) if log_file else logging.StreamHandler(sys.stderr)
    )
    handler.setFormatter(
        logging.Formatter(f"%(asctime)s {role}[%(process)d] %(levelname)s %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class SpinPoll(Generic[T]):
    """``poll(timeout_ms)``, preceded after activity by up to ``spin_seconds`` of
    ``poll(0)`` while spinning pays (``config.Config.spin_seconds``, PTO_SPIN_US).

    Waking a sleeping process costs tens of microseconds on a VM, so when messages come
    back to back a short spin catches the next one sooner. But a spin that runs out is
    CPU taken from the very peer whose answer we wait for (on 2 shared cores, a 100 us
    spin after every message cost the broker ~170 us and the worker ~90 us of CPU per
    single-task round trip, and slowed it: issue 14's profile). So after a spin runs out
    we stop spinning, until a blocking poll returns within ``spin_seconds`` (a spin would
    have caught that message)."""

    __slots__ = ("poll", "spin_seconds", "worth_it")

    def __init__(self, poll: Callable[[int], T], spin_seconds: float):
        self.poll = poll
        self.spin_seconds = spin_seconds
        self.worth_it = True

    def __call__(self, timeout_ms: int, active: bool) -> T:
        """Poll; ``active``: we just handled messages (another may follow at once)."""
        poll, spin = self.poll, self.spin_seconds
        if active and spin > 0 and self.worth_it:
            deadline = time.perf_counter() + spin
            while True:
                ready = poll(0)
                if ready:
                    return ready
                if time.perf_counter() >= deadline:
                    break
            self.worth_it = False
        if spin <= 0:
            return poll(timeout_ms)
        start = time.perf_counter()
        ready = poll(timeout_ms)
        if ready and time.perf_counter() - start < spin:
            self.worth_it = True
        return ready
