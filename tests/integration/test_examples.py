"""Every example runs as the README says, with one command, and checks its own result."""

from __future__ import annotations

import subprocess
import sys

import pytest

from ._util import REPO

# The README's main example runs in the quick subset; the others (a few seconds each) are slow.
EXAMPLES = ["examples/pipeline.py",
            *(pytest.param(e, marks=pytest.mark.slow) for e in (
                "examples/vector_add/run.py", "examples/matmul/run.py",
                "examples/allreduce/run.py", "examples/prebuilt/run.py")),
            pytest.param("examples/cluster.py", marks=[pytest.mark.ray, pytest.mark.slow])]


@pytest.mark.timeout(180)
@pytest.mark.parametrize("script", EXAMPLES)
def test_example_runs_and_checks_itself(script, tmp_path, monkeypatch):
    monkeypatch.setenv("PTO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("PTO_BROKER", raising=False)
    proc = subprocess.run([sys.executable, str(REPO / script)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "matches numpy" in proc.stdout or "holds the sum" in proc.stdout, proc.stdout
