"""POSIX shared-memory segments: the only place tensor bytes live.

A segment is named ``/pto_<owner>_<id>``: ``owner`` is the creating runtime's session id
(``<pid>x<random>``), so any process can tell from a name alone whether its owner is still
alive, and a janitor can reclaim what a dead client left. Segments are created mode 0600
and their pages reserved up front (``posix_fallocate``), so a full /dev/shm is an
``OutOfMemory`` at allocation instead of a SIGBUS inside a kernel later.
"""

from __future__ import annotations

import errno
import logging
import mmap
import os
import secrets

import posix_ipc

from .errors import OutOfMemory

log = logging.getLogger(__name__)

SHM_DIR = "/dev/shm"
PREFIX = "pto_"  # tensors: /pto_<owner>_<id>
CACHE_PREFIX = "ptocache_"  # retired segments a runtime keeps for reuse (pto.host.tensor)
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)


def new_owner() -> str:
    """A session id for the calling process: its pid plus randomness (no underscores)."""
    return f"{os.getpid()}x{secrets.token_hex(4)}"


def owner_pid(owner: str) -> int | None:
    head = owner.split("x", 1)[0]
    return int(head) if head.isdigit() else None


def owner_of(name: str) -> str:
    """The owner part of one of our names: ``/pto_<owner>_<id>`` -> ``<owner>`` (also for
    ``/ptocache_...`` and semaphore names)."""
    base = name.lstrip("/")
    prefix = CACHE_PREFIX if base.startswith(CACHE_PREFIX) else PREFIX
    return base[len(prefix) :].rsplit("_", 1)[0]


def segment_name(owner: str, tensor: int) -> str:
    return f"/{PREFIX}{owner}_{tensor}"


def cache_name(owner: str, tensor: int) -> str:
    return f"/{CACHE_PREFIX}{owner}_{tensor}"


def create(name: str, nbytes: int, populate: bool = False) -> mmap.mmap:
    """Create a new segment of ``nbytes`` (at least one page is mapped) and map it.

    The pages are reserved (so ENOSPC is an ``OutOfMemory`` now), but only mapped in on
    touch unless ``populate``: a client often never touches the tensors it allocates.
    """
    size = max(nbytes, 1)
    shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600)
    try:
        os.fchmod(shm.fd, 0o600)  # shm_open applies the umask; be explicit
        try:
            os.posix_fallocate(shm.fd, 0, size)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.ENOMEM, errno.EFBIG):
                raise OutOfMemory(
                    f"no room in {SHM_DIR} for a tensor of {nbytes} bytes ({exc.strerror})"
                ) from None
            raise
        flags = mmap.MAP_SHARED | (_POPULATE if populate else 0)
        return mmap.mmap(shm.fd, size, flags=flags)
    except BaseException:
        unlink(name)
        raise
    finally:
        shm.close_fd()


def open_existing(name: str) -> mmap.mmap:
    """Map an existing segment (its whole size), page tables filled at once: a worker maps
    a tensor to run kernels on it, and one populate beats a fault per page.
    Raises posix_ipc.ExistentialError if gone."""
    shm = posix_ipc.SharedMemory(name)
    try:
        size = os.fstat(shm.fd).st_size
        return mmap.mmap(shm.fd, size, flags=mmap.MAP_SHARED | _POPULATE)
    finally:
        shm.close_fd()


def rename(name: str, new_name: str) -> bool:
    """Give a segment another name (mappings and open fds are unaffected); False if it
    is gone. Linux keeps POSIX shared memory as files in /dev/shm."""
    try:
        os.rename(SHM_DIR + name, SHM_DIR + new_name)
        return True
    except FileNotFoundError:
        return False


def unlink(name: str) -> bool:
    """Remove a segment's name; mappings stay valid until unmapped. False if already gone."""
    try:
        posix_ipc.unlink_shared_memory(name)
        return True
    except posix_ipc.ExistentialError:
        return False


def list_names(owner: str | None = None, semaphores: bool = False) -> list[str]:
    """Names (with leading slash) of our segments in /dev/shm (tensors and kept ones),
    optionally of one owner.

    With ``semaphores``, our POSIX semaphores (files ``sem.pto_...``) instead.
    """
    tail = f"{owner}_" if owner else ""
    prefixes = (f"sem.{PREFIX}{tail}",) if semaphores else (PREFIX + tail, CACHE_PREFIX + tail)
    try:
        return ["/" + f[4 if semaphores else 0 :] for f in os.listdir(SHM_DIR)
                if f.startswith(prefixes)]
    except FileNotFoundError:
        return []


def unlink_owner(owner: str) -> int:
    """Unlink every segment and semaphore of ``owner``; returns how many were removed."""
    removed = sum(unlink(name) for name in list_names(owner))
    for name in list_names(owner, semaphores=True):
        try:
            posix_ipc.unlink_semaphore(name)
            removed += 1
        except posix_ipc.ExistentialError:
            pass
    return removed


def dead_leftovers() -> list[str]:
    """Our files in /dev/shm (segments, kept segments, ``sem.`` semaphores) that belong to
    this user and whose owning process is gone: what a janitor may remove.

    Another user's files are never listed (run as root, a sweep must not remove another
    user's live data because its owner pid is not visible or was reused), nor a live
    process's."""
    uid = os.getuid()
    alive: dict[int, bool] = {}
    found = []
    try:
        files = sorted(os.listdir(SHM_DIR))
    except FileNotFoundError:
        return []
    for f in files:
        base = f[4:] if f.startswith("sem.") else f
        if not base.startswith((PREFIX, CACHE_PREFIX)):
            continue
        pid = owner_pid(owner_of(base))
        if pid is None:
            continue
        if pid not in alive:
            alive[pid] = pid_alive(pid)
        if alive[pid]:
            continue
        try:
            if os.lstat(os.path.join(SHM_DIR, f)).st_uid != uid:
                continue
        except FileNotFoundError:
            continue
        found.append(f)
    return found


def remove_file(f: str) -> bool:
    """Unlink one of ``dead_leftovers()``'s names (``sem.`` ones as semaphores); False if
    it is already gone."""
    if f.startswith("sem."):
        try:
            posix_ipc.unlink_semaphore("/" + f[4:])
            return True
        except posix_ipc.ExistentialError:
            return False
    return unlink("/" + f)


def reap_dead_owners() -> int:
    """Unlink this user's segments whose owning process no longer exists (a janitor's
    sweep: every broker start, ``pto clean``); returns how many were removed."""
    removed = 0
    for f in dead_leftovers():
        if remove_file(f):
            log.debug("janitor: removed %s", f)
            removed += 1
    if removed:
        log.info("janitor: removed %d segment(s) of dead owners", removed)
    return removed


def reap_pid(pid: int) -> int:
    """Unlink the segments of process ``pid``, which the caller saw exit (a child it
    reaped): what a worker killed before it said hello to its broker leaves."""
    owners = {owner_of(name) for sem in (False, True) for name in list_names(semaphores=sem)}
    return sum(unlink_owner(owner) for owner in owners if owner_pid(owner) == pid)


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs (a zombie, dead but not yet reaped by its parent, does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid_state(pid) != "Z"


def pid_state(pid: int) -> str | None:
    """The process state letter from /proc (R running, S sleeping, T stopped, Z zombie...)."""
    return pid_stat(pid)[0]


def pid_stat(pid: int) -> tuple[str | None, int | None]:
    """(state letter, CPU time used so far in clock ticks: user + system) from /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        # after the name: state is field 3 of the man page, utime 14 and stime 15
        return fields[0].decode(), int(fields[11]) + int(fields[12])
    except (OSError, IndexError, ValueError):
        return None, None
