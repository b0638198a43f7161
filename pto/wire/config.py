"""Every ``PTO_*`` environment variable, read and checked in one place.

A runtime, broker or worker calls ``load()`` when it starts (never at import: a test or an
application may set a variable after importing ``pto``) and passes the frozen ``Config`` on;
no other module reads ``PTO_*`` from the environment. ``SETTINGS`` is the one table of them:
docs/api.md shows ``doc_table()`` verbatim (tests/unit/test_config.py checks it).

A bad value raises ``ConfigError`` naming the variable, the value and what it should be.
An empty variable counts as unset.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

SHM_DIR = "/dev/shm"


class ConfigError(ValueError):
    """A ``PTO_*`` variable holds a value that cannot be used."""


@dataclass(frozen=True)
class Config:
    """The settings of one process, as ``load()`` found them in its environment."""

    broker: str | None              # PTO_BROKER: connect there instead of starting a broker
    trace: str | None               # PTO_TRACE: default Runtime(trace=) file
    curve_dir: str | None           # PTO_CURVE_DIR: CURVE keys for tcp:// brokers
    log_level: str                  # PTO_LOG_LEVEL: a logging level name, upper case
    runtime_dir: str | None         # PTO_RUNTIME_DIR: None = $XDG_RUNTIME_DIR/pto or /tmp/pto-UID
    keep_logs: bool                 # PTO_KEEP_LOGS
    cache_dir: str | None           # PTO_CACHE_DIR: None = $XDG_CACHE_HOME/pto or ~/.cache/pto
    sim_cores: int | None           # PTO_SIM_CORES: None = the CPUs this process may use
    release_backlog_bytes: int      # PTO_RELEASE_BACKLOG_BYTES
    max_outstanding_tasks: int      # PTO_MAX_OUTSTANDING_TASKS
    spin_us: float                  # PTO_SPIN_US
    segment_pool_bytes: int         # PTO_SEGMENT_POOL_BYTES
    fork_workers: bool              # PTO_FORK_WORKERS

    @property
    def spin_seconds(self) -> float:
        return self.spin_us / 1e6


# ---- parsers: text -> value, or ValueError saying what was expected ------------------------


def _text(raw: str) -> str:
    return raw


def broker_address(raw: str) -> str:
    """``raw`` if it is a broker address (``ipc://PATH``, ``tcp://HOST:PORT``), else ValueError."""
    ok = isinstance(raw, str) and (
        raw.startswith("ipc://") and len(raw) > len("ipc://")
        or raw.startswith("tcp://") and raw.rpartition(":")[2].isdigit() and raw.count(":") >= 2)
    if not ok:
        raise ValueError("ipc://PATH or tcp://HOST:PORT")
    return raw


_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _level(raw: str) -> str:
    name = raw.strip().upper()
    if name not in _LEVELS:
        raise ValueError(" or ".join(_LEVELS))
    return name


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _flag(raw: str) -> bool:
    word = raw.strip().lower()
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"one of {', '.join(_TRUE + _FALSE)}")


def _count(minimum: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        try:
            value = int(raw.strip().replace("_", ""), 10)
        except ValueError:
            raise ValueError(f"a whole number >= {minimum:,}") from None
        if value < minimum:
            raise ValueError(f"a whole number >= {minimum:,}")
        return value

    return parse


def _microseconds(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        raise ValueError("a number of microseconds >= 0") from None
    if not value >= 0 or value == float("inf"):  # also rejects nan
        raise ValueError("a number of microseconds >= 0")
    return value


def default_pool_bytes() -> int:
    """1 GiB, but at most 1/16 of /dev/shm (a container's 64 MiB one keeps 4 MiB)."""
    try:
        st = os.statvfs(SHM_DIR)
        return min(1 << 30, st.f_blocks * st.f_frsize // 16)
    except OSError:
        return 0


# ---- the table ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """One variable: the Config field it fills, how to parse it, its default, what it does."""

    variable: str
    field: str
    parse: Callable[[str], Any]
    default: Any                    # a value, or a callable computing it at load()
    default_doc: str                # the default as docs/api.md shows it
    effect: str

    def default_value(self) -> Any:
        return self.default() if callable(self.default) else self.default


SETTINGS: tuple[Setting, ...] = (
    Setting("PTO_BROKER", "broker", broker_address, None, "none: start an embedded broker",
            "broker address for `Runtime(level=\"host\")`, `pto.status`, `pto status`"),
    Setting("PTO_TRACE", "trace", _text, None, "none",
            "default `trace=` file"),
    Setting("PTO_CURVE_DIR", "curve_dir", _text, None, "none",
            "CURVE key directory (`pto keygen`) for `tcp://` brokers"),
    Setting("PTO_LOG_LEVEL", "log_level", _level, "INFO", "`INFO`",
            "log level of brokers and workers (`DEBUG`, `INFO`, `WARNING`, `ERROR`, `CRITICAL`)"),
    Setting("PTO_RUNTIME_DIR", "runtime_dir", _text, None,
            "`$XDG_RUNTIME_DIR/pto`, else `/tmp/pto-UID`",
            "where ipc endpoints and embedded runtimes' logs live"),
    Setting("PTO_KEEP_LOGS", "keep_logs", _flag, False, "`0`",
            "`1` keeps an embedded runtime's logs after `close()`"),
    Setting("PTO_CACHE_DIR", "cache_dir", _text, None,
            "`$XDG_CACHE_HOME/pto`, else `~/.cache/pto`",
            "compiled package cache"),
    Setting("PTO_SIM_CORES", "sim_cores", _count(1), None, "the CPUs available",
            "cores of a simulated chip"),
    Setting("PTO_RELEASE_BACKLOG_BYTES", "release_backlog_bytes", _count(0), 32 * 1024 * 1024,
            "32 MiB", "released-but-still-used bytes before `ctx.alloc` waits"),
    Setting("PTO_MAX_OUTSTANDING_TASKS", "max_outstanding_tasks", _count(1), 100_000,
            "100,000", "unfinished tasks per runtime before submitting waits"),
    Setting("PTO_SPIN_US", "spin_us", _microseconds, 100.0, "100",
            "microseconds a busy process polls before it blocks"),
    Setting("PTO_SEGMENT_POOL_BYTES", "segment_pool_bytes", _count(0), default_pool_bytes,
            "1 GiB, at most 1/16 of `/dev/shm`",
            "bytes of freed large segments a runtime keeps for reuse (`0`: none)"),
    Setting("PTO_FORK_WORKERS", "fork_workers", _flag, True, "`1`",
            "`0` makes a broker exec each worker it starts instead of forking it from a "
            "warm fork server (`python -m worker.forkserver`)"),
)


def load(environ: Mapping[str, str] | None = None) -> Config:
    """The settings in ``environ`` (default ``os.environ``); ``ConfigError`` for a bad one."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for setting in SETTINGS:
        raw = env.get(setting.variable, "")
        if raw == "":
            values[setting.field] = setting.default_value()
            continue
        try:
            values[setting.field] = setting.parse(raw)
        except ValueError as exc:
            raise ConfigError(f"{setting.variable}={raw!r}: expected {exc}") from None
    return Config(**values)


def doc_table() -> str:
    """The Markdown table of SETTINGS that docs/api.md shows."""
    rows = ["| variable | default | effect |", "| --- | --- | --- |"]
    rows += [f"| `{s.variable}` | {s.default_doc} | {s.effect} |" for s in SETTINGS]
    return "\n".join(rows) + "\n"
