"""Smoke test of the benchmark suite: ``python -m benchmarks --quick`` runs and writes
results of the expected shape. No timing thresholds: figures on a shared machine vary.

The chart (results.png) needs matplotlib, which only the ``bench`` extra installs: where
it is missing, the chart's test is skipped (saying so) and the run must say it drew none.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEADLINE_S = 240

pytestmark = pytest.mark.timeout(DEADLINE_S + 60)

# every row of these cases carries these numbers
METRICS = {"noop": ("tasks", "tasks_per_s", "us_per_task"),
           "roundtrip": ("trips", "median_us", "p99_us")}


OURS = ["floor", "pool", "executor", "pto"]  # pto and the floors it is measured against


def _importable_peers() -> list[str]:
    return [key for key, module in (("ray", "ray"), ("dask", "distributed"))
            if importlib.util.find_spec(module) is not None]


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _quick_run(out: Path, systems: list[str]) -> tuple[subprocess.CompletedProcess, Path,
                                                       list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "PTO_BROKER"}
    # Ray's peer starts its own instance, never joins a cluster another process runs here
    env["RAY_ADDRESS"] = "local"
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--cases", "noop,roundtrip",
         "--repeats", "1", "--systems", ",".join(systems), "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=DEADLINE_S)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-3000:]}"
    return proc, out, systems


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path, list[str]]:
    """One ``--quick`` run of the noop and roundtrip cases for pto and its floors, shared by
    the tests below."""
    return _quick_run(tmp_path_factory.mktemp("bench"), OURS)


def test_quick_noop_and_roundtrip(quick_run):
    _check_rows(*quick_run)


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.skipif(not _importable_peers(), reason="neither Ray nor Dask is installed")
def test_quick_run_of_the_peers_side_by_side(tmp_path):
    """Ray and Dask (where installed) in the same run as pto: a Ray instance and a Dask
    cluster start, so this one is slow."""
    _check_rows(*_quick_run(tmp_path, ["pto", *_importable_peers()]))


def _check_rows(proc: subprocess.CompletedProcess, tmp_path: Path, systems: list[str]) -> None:
    assert "1. no-op throughput" in proc.stdout and "2. single-task round trip" in proc.stdout

    result = json.loads((tmp_path / "results.json").read_text())
    assert {"meta", "config", "cases", "skipped", "errors", "targets"} <= set(result)
    assert result["errors"] == {} and result["skipped"] == {}
    assert set(result["cases"]) == {"noop", "roundtrip"}
    for case, metrics in METRICS.items():
        rows = result["cases"][case]["rows"]
        assert {r["system"] for r in rows} >= set(systems), case
        for row in rows:
            assert isinstance(row["label"], str) and row["label"]
            assert row["kind"] in ("runtime", "batched", "floor")
            for key in (*metrics, "ratio_to_pto"):
                assert _is_number(row[key]), (case, row["system"], key, row.get(key))
            assert row["ratio_to_pto"] > 0
        pto_row = next(r for r in rows if r["system"] == "pto")
        assert pto_row["ratio_to_pto"] == pytest.approx(1.0)
    for target in result["targets"]:
        assert isinstance(target["met"], bool) and target["target"] and target["detail"]
    if importlib.util.find_spec("matplotlib") is None:
        assert "no chart: matplotlib is not installed" in proc.stdout
        assert not (tmp_path / "results.png").exists()


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None,
                    reason="the chart needs matplotlib, from the bench extra: "
                           "pip install -e '.[bench]'")
def test_quick_run_draws_the_chart(quick_run):
    _, tmp_path, _ = quick_run
    assert (tmp_path / "results.png").stat().st_size > 0
