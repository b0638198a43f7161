"""python -m worker.forkserver: start a broker's workers by fork, not exec.

    broker (Supervisor: broker.forks)             a child subreaper (PR_SET_CHILD_SUBREAPER)
      |  requests: one JSON line per worker         ^
      v  {"tag": device, "argv": [...]}             |  the worker is reparented to the
    fork server (this process)                      |  broker, which waits for it and
      |  fork                                       |  signals it as its own child
      v                                             |
    intermediate --fork--> worker: main(argv) ------'
      |  writes the worker's pid, exits at once
      v
    fork server  --replies: {"tag": device, "pid": N}-->  broker

An exec'd ``python -m worker`` spends ~0.3 s of CPU on the interpreter and its imports
(numpy, zmq, pto.wire) before it serves, and a runtime starts one per chip plus a host
worker. This process pays that once per broker; a forked worker starts in milliseconds,
sharing the imported modules' memory. What the worker runs is the same ``main(argv)`` as
``python -m worker`` with the argv the broker would have exec'd, which is also what
``/proc/PID/cmdline`` (ps, psutil) shows for it.

The fork server starts no thread, opens no socket and holds no lock of ours, so a fork
of it copies nothing half-done. It dies with the broker, and exits when the broker
closes the request pipe or after ``--idle-exit`` seconds without a request: the broker
starts another when it next needs a worker (a long-lived broker keeps no idle process,
and a frozen one none that outlives the workers that left it).
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import select
import signal
import sys
import time
import traceback

from pto.wire.procs import die_with_parent

# What a worker imports before it serves (its kernel kinds load theirs later).
from . import __main__ as entry

_PR_SET_NAME = 15
_REPARENT_WAIT_S = 30.0  # the intermediate exits at once; this only bounds a broken case


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.forkserver", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, required=True, metavar="FD",
                        help="pipe to read start requests from")
    parser.add_argument("--replies", type=int, required=True, metavar="FD",
                        help="pipe to write the started workers' pids to")
    parser.add_argument("--parent-pid", type=int, required=True,
                        help="the broker: the workers' parent once started")
    parser.add_argument("--idle-exit", type=float, default=2.0, metavar="SECONDS",
                        help="exit after this long without a request (default 2)")
    args = parser.parse_args(argv)
    die_with_parent(args.parent_pid, signal.SIGKILL)
    # Not "python -m worker...": whoever looks for workers by command line must not find
    # this short-lived helper; ps shows what it is. (Each worker gets its own back.)
    with open("/proc/self/comm", "rb") as f:
        name = f.read().strip()  # what an exec'd worker is called: the python binary's
    set_title(f"pto-forkserver for broker {args.parent_pid}")
    _set_name(b"pto-forkserver")
    gc.freeze()  # the imports' objects: shared with every worker, never copied by a GC pass
    pending = b""
    while select.select([args.requests], [], [], args.idle_exit)[0]:
        chunk = os.read(args.requests, 65536)
        if not chunk:
            break  # the broker closed it
        *lines, pending = (pending + chunk).split(b"\n")
        for line in lines:
            reply = _serve(line, (args.requests, args.replies), name)
            os.write(args.replies, json.dumps(reply).encode() + b"\n")
    return 0


def _serve(line: bytes, pipes: tuple[int, int], name: bytes) -> dict:
    try:
        request = json.loads(line)
        tag, argv = request["tag"], request["argv"]
        if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
            raise ValueError("argv must be a list of strings")
        if argv[1:3] != ["-m", "worker"]:
            raise ValueError("argv must be a `python -m worker ...` command line")
    except (ValueError, KeyError, TypeError) as exc:
        return {"tag": None, "error": f"bad request {line[:200]!r}: {exc}"}
    try:
        return {"tag": tag, "pid": _fork_worker(argv, pipes, name)}
    except OSError as exc:
        return {"tag": tag, "error": f"fork failed: {exc}"}


def _fork_worker(argv: list[str], pipes: tuple[int, int], name: bytes) -> int:
    """Fork twice so that the worker is the broker's child (it is a subreaper), not ours."""
    read_end, write_end = os.pipe()
    middle = os.fork()
    if middle == 0:
        try:
            os.close(read_end)
            middle = os.getpid()
            worker = os.fork()
            if worker == 0:
                os.close(write_end)
                _become_worker(argv, middle, pipes, name)
            os.write(write_end, str(worker).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pid_pipe:
        text = pid_pipe.read()
    # Once the intermediate is reaped, the worker has been reparented: the broker may wait
    # for it as soon as it reads the pid.
    os.waitpid(middle, 0)
    if not text:
        raise OSError("the intermediate process failed before its fork")
    return int(text)


def _become_worker(argv: list[str], middle: int, pipes: tuple[int, int], name: bytes) -> None:
    """In the forked worker (``middle``: the intermediate; ``name``: its comm): never
    returns. Its parent is the broker once the intermediate has exited; if the broker has
    died meanwhile, ``main`` finds another parent and exits."""
    code = 1
    try:
        for fd in pipes:
            os.close(fd)
        deadline = time.monotonic() + _REPARENT_WAIT_S
        while os.getppid() == middle and time.monotonic() < deadline:
            time.sleep(0.001)  # the intermediate is exiting
        set_cmdline(argv)
        _set_name(name)
        sys.argv = [entry.__file__, *argv[3:]]
        _reseed_numpy()
        code = entry.main(argv[3:])  # what follows ``python -m worker``
    except SystemExit as exc:  # argparse's errors
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:  # noqa: BLE001 - report it as an exec'd worker's traceback would
        traceback.print_exc()
    finally:
        entry.exit_now(code)


def _set_name(name: bytes) -> None:
    """The kernel's name of the process (``/proc/PID/comm``, 15 bytes), as ps -e shows it."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_NAME, ctypes.c_char_p(name[:15]), 0, 0, 0)


def _reseed_numpy() -> None:
    """Forked workers would share numpy's global random state (Python's ``random``
    reseeds itself after a fork); exec'd ones each drew their own."""
    random = sys.modules.get("numpy.random")
    if random is not None:
        random.seed()


def _arg_area() -> tuple[int, int] | None:
    """Where this process's argv strings lie: what ``/proc/self/cmdline`` reads."""
    try:
        with open("/proc/self/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
        return int(fields[45]), int(fields[46])  # arg_start, arg_end: fields 48, 49
    except (OSError, ValueError, IndexError):
        return None


def set_title(title: str) -> None:
    """Show ``title`` as our command line (ps, psutil), as setproctitle(3) does: a last
    byte of the argv area that is not NUL makes the kernel read up to the first NUL."""
    area = _arg_area()
    if area is None:
        return
    start, end = area
    text = os.fsencode(title)[:end - start - 2] + b"\0"
    text += b" " * (end - start - len(text))
    ctypes.memmove(start, text, len(text))


def set_cmdline(argv: list[str]) -> bool:
    """Make ``/proc/self/cmdline`` show ``argv`` (NUL-separated, as for an exec'd process)
    by rewriting the memory it is read from. The fork server's own argv must leave room:
    the broker pads its argv[0]; what is left over pads ours, as extra slashes before the
    executable's name (the same path). False if it does not fit or cannot be written."""
    area = _arg_area()
    if area is None:
        return False
    start, end = area
    words = [os.fsencode(a) for a in argv]
    slack = (end - start) - (sum(len(w) + 1 for w in words))
    if slack < 0 or not words:
        return False
    head, sep, name = words[0].rpartition(b"/")
    if sep and slack:
        words[0] = head + b"/" * (slack + 1) + name
        slack = 0
    text = b"\0".join(words) + b"\0" * (slack + 1)
    ctypes.memmove(start, text, len(text))
    return True


if __name__ == "__main__":
    entry.exit_now(main())
