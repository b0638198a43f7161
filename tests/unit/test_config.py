"""pto.wire.config: one table of PTO_* variables, read at start, checked, shown in docs/api.md."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pto.wire import config

REPO = Path(__file__).resolve().parents[2]
SOURCE_DIRS = ("pto", "broker", "worker")


def test_defaults_without_any_variable():
    cfg = config.load({})
    assert cfg.broker is None and cfg.trace is None and cfg.curve_dir is None
    assert cfg.log_level == "INFO" and cfg.keep_logs is False
    assert cfg.release_backlog_bytes == 32 * 1024 * 1024
    assert cfg.max_outstanding_tasks == 100_000
    assert cfg.spin_us == 100.0 and cfg.spin_seconds == pytest.approx(1e-4)
    assert cfg.segment_pool_bytes == config.default_pool_bytes()
    assert cfg.sim_cores is None and cfg.cache_dir is None and cfg.runtime_dir is None
    assert cfg.fork_workers is True


def test_values_are_parsed():
    cfg = config.load({
        "PTO_BROKER": "tcp://127.0.0.1:5555", "PTO_TRACE": "t.json", "PTO_CURVE_DIR": "/k",
        "PTO_LOG_LEVEL": "debug", "PTO_RUNTIME_DIR": "/r", "PTO_KEEP_LOGS": "yes",
        "PTO_CACHE_DIR": "/c", "PTO_SIM_CORES": "3", "PTO_RELEASE_BACKLOG_BYTES": "1_000",
        "PTO_MAX_OUTSTANDING_TASKS": "7", "PTO_SPIN_US": "0", "PTO_SEGMENT_POOL_BYTES": "0",
        "PTO_FORK_WORKERS": "off",
    })
    assert cfg == config.Config(
        broker="tcp://127.0.0.1:5555", trace="t.json", curve_dir="/k", log_level="DEBUG",
        runtime_dir="/r", keep_logs=True, cache_dir="/c", sim_cores=3,
        release_backlog_bytes=1000, max_outstanding_tasks=7, spin_us=0.0, segment_pool_bytes=0,
        fork_workers=False)
    assert config.load({"PTO_KEEP_LOGS": "0"}).keep_logs is False


def test_an_empty_variable_counts_as_unset():
    assert config.load({name: "" for name in (s.variable for s in config.SETTINGS)}) == \
        config.load({})


@pytest.mark.parametrize("variable, raw, expected", [
    ("PTO_BROKER", "localhost:5555", "ipc://PATH or tcp://HOST:PORT"),
    ("PTO_BROKER", "tcp://host", "ipc://PATH or tcp://HOST:PORT"),
    ("PTO_LOG_LEVEL", "loud", "DEBUG or INFO"),
    ("PTO_KEEP_LOGS", "maybe", "one of 1, true"),
    ("PTO_SIM_CORES", "0", "whole number >= 1"),
    ("PTO_SIM_CORES", "four", "whole number >= 1"),
    ("PTO_RELEASE_BACKLOG_BYTES", "-1", "whole number >= 0"),
    ("PTO_RELEASE_BACKLOG_BYTES", "32M", "whole number >= 0"),
    ("PTO_MAX_OUTSTANDING_TASKS", "0", "whole number >= 1"),
    ("PTO_SPIN_US", "nan", "microseconds >= 0"),
    ("PTO_FORK_WORKERS", "2", "one of 1, true"),
    ("PTO_SPIN_US", "-5", "microseconds >= 0"),
    ("PTO_SEGMENT_POOL_BYTES", "1.5", "whole number >= 0"),
])
def test_a_bad_value_names_the_variable_the_value_and_what_was_expected(variable, raw, expected):
    with pytest.raises(config.ConfigError) as ei:
        config.load({variable: raw})
    assert isinstance(ei.value, ValueError)
    assert str(ei.value).startswith(f"{variable}={raw!r}: expected ")
    assert expected in str(ei.value)


def test_the_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.load({}).spin_us = 1.0  # type: ignore[misc]


def test_every_field_has_exactly_one_setting():
    fields = [f.name for f in dataclasses.fields(config.Config)]
    assert sorted(s.field for s in config.SETTINGS) == sorted(fields)
    assert len({s.variable for s in config.SETTINGS}) == len(config.SETTINGS)


def test_every_variable_the_code_mentions_is_in_the_table():
    pattern = re.compile(r"\bPTO_[A-Z][A-Z0-9_]*\b")
    known = {s.variable for s in config.SETTINGS}
    mentioned: dict[str, str] = {}
    for folder in SOURCE_DIRS:
        for path in (REPO / folder).rglob("*.py"):
            for name in pattern.findall(path.read_text()):
                mentioned.setdefault(name, str(path.relative_to(REPO)))
    # PTO_ERR_*, PTO_INPUT, ... are the C header's constants, not environment variables
    env_like = {n: p for n, p in mentioned.items()
                if not n.startswith("PTO_ERR") and n not in _header_constants()}
    assert set(env_like) <= known, {n: p for n, p in env_like.items() if n not in known}


def _header_constants() -> set[str]:
    header = (REPO / "pto" / "chip" / "include").rglob("*.h")
    names: set[str] = set()
    for path in header:
        names |= set(re.findall(r"\bPTO_[A-Z0-9_]+\b", path.read_text()))
    return names


def test_only_the_config_module_reads_the_environment_for_pto_variables():
    reads = re.compile(r"environ(?:\.get)?\(?\[?\s*[\"']PTO_|getenv\(\s*[\"']PTO_")
    offenders = [str(path.relative_to(REPO))
                 for folder in SOURCE_DIRS for path in (REPO / folder).rglob("*.py")
                 if path.name != "config.py" and reads.search(path.read_text())]
    assert offenders == []


def test_docs_api_shows_the_table_of_the_module():
    api = (REPO / "docs" / "api.md").read_text()
    assert config.doc_table() in api


def test_importing_pto_reads_no_variable():
    # a bad value must not break `import pto`; it fails when a runtime starts
    code = "import pto, pto.host.runtime, pto.host.tensor, pto.host.connection; print('ok')"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={"PTO_SPIN_US": "x", "PTO_MAX_OUTSTANDING_TASKS": "x",
                               "PTO_RELEASE_BACKLOG_BYTES": "x", "PTO_SEGMENT_POOL_BYTES": "x",
                               "PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}, cwd=REPO)
    assert proc.returncode == 0 and proc.stdout == "ok\n", proc.stderr


def test_a_runtime_with_a_bad_variable_fails_before_starting_anything(monkeypatch):
    import pto

    monkeypatch.delenv("PTO_BROKER", raising=False)
    monkeypatch.setenv("PTO_MAX_OUTSTANDING_TASKS", "lots")
    with pytest.raises(config.ConfigError, match="PTO_MAX_OUTSTANDING_TASKS='lots'"):
        pto.Runtime(level="host", platform="sim", devices=[0])
