"""Traces show a package's launches inside its task: a task running a compiled
orchestration at L3 holds one slice per launch (kernel, block_dim, result) on its chip's
track, within the task's own slice; ``pto trace summarize`` still counts tasks only."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import pto

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]
VECTOR_ADD = REPO / "examples" / "vector_add" / "kernels"
In, Out, S = pto.Arg.input, pto.Arg.output, pto.Arg.scalar


def on_both_chips(ctx, args):
    outs = []
    for chip in ctx.peers():
        x = ctx.tensor(args)
        z = ctx.alloc(x.shape, x.dtype)
        ctx.submit(chip, "compute", [In(x), In(x), Out(z), S(2.0), S(3)])  # 3 blocks each
        outs.append(z)
    return outs


def test_a_traced_orchestration_task_holds_its_launches(tmp_path, monkeypatch):
    monkeypatch.setenv("PTO_CACHE_DIR", str(tmp_path / "cache"))
    pkg = pto.compile(kernels=[VECTOR_ADD / "add.c", VECTOR_ADD / "scale.c"],
                      orch=VECTOR_ADD / "orch.c")
    path = tmp_path / "run.json"
    with pto.Runtime(level="host", platform="sim", devices=[0, 1], trace=str(path)) as rt:
        rt.register("traced", orch=on_both_chips, kernels={"compute": pkg})
        x = np.arange(64, dtype=np.float32)
        for z in rt.run("traced", args=x):
            np.testing.assert_array_equal(z.numpy(), 4 * x)
    events = json.loads(path.read_text())["traceEvents"]
    tasks = [e for e in events if e["ph"] == "X" and e["cat"] == "task"]
    launches = [e for e in events if e["ph"] == "X" and e["cat"] == "launch"]
    assert sorted(t["name"] for t in tasks) == ["compute", "compute"]
    assert len(launches) == 4
    for task in tasks:
        inside = sorted((e for e in launches if e["args"]["task"] == task["args"]["task"]),
                        key=lambda e: e["ts"])
        assert [(e["name"], e["args"]["block_dim"], e["args"]["rc"]) for e in inside] == [
            ("add", 3, 0), ("scale", 3, 0)]
        for e in inside:  # nested: same track, within the task's slice
            assert e["tid"] == task["tid"]
            assert task["ts"] - 0.01 <= e["ts"] <= e["ts"] + e["dur"] <= \
                task["ts"] + task["dur"] + 0.01
    summary = subprocess.run([sys.executable, "-m", "pto", "trace", "summarize", "--json",
                              str(path)], capture_output=True, text=True, check=True,
                             env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    report = json.loads(summary.stdout)
    assert report["tasks"] == 2 and report["slices"] == 2  # the tasks, not their launches
    assert [k["kernel"] for k in report["top_kernels"]] == ["compute"]
