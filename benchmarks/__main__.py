"""pto side by side with Ray, Dask, the process pools and the physical floors (issue 7).

    python -m benchmarks                    # every case, every installed peer (~10 min)
    python -m benchmarks --quick            # smaller sizes, under 3 minutes
    python -m benchmarks --cases noop,roundtrip --repeats 3 --out /tmp/bench
    python -m benchmarks --cases cluster    # L4: pto and plain Ray on a 2-host LocalCluster

Each system runs in its own fresh interpreter, one after the other, every case in the
same invocation; figures are medians of the repeats. Peers come from the ``bench`` extra
(``pip install -e '.[bench]'``); a peer that is not installed is skipped and noted.
Prints a table per case, and writes ``results.json`` and ``results.png`` to ``--out``.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import report
from .child import SYSTEMS, cases_of
from .common import CASES, Config

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "benchmarks" / "launch.py"
ORDER = ("floor", "pool", "executor", "pto", "ray", "dask", "cluster")


def _csv(text: str, allowed) -> list[str]:
    items = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in items if s not in allowed]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {','.join(allowed)}")
    return items


def _env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    env.pop("PTO_BROKER", None)
    return env


def _run(cmd: list[str], log_path: Path, timeout: float) -> int | None:
    """Run ``cmd`` in its own session with output to ``log_path``; None on timeout."""
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return None


def _tail(path: Path, n: int = 1500) -> str:
    return path.read_text(errors="replace")[-n:]


def run_system(key: str, cases: list[str], cfg: Config, logs: Path, timeout: float) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    log = logs / f"{key}.log"
    cmd = [sys.executable, "-m", "benchmarks.child", key, "--cases", ",".join(cases),
           "--config", json.dumps(cfg.to_dict()), "--out", str(out)]
    try:
        rc = _run(cmd, log, timeout)
        if rc == 0:
            return json.loads(out.read_text())
        why = f"timed out after {timeout:.0f}s" if rc is None else f"exited with code {rc}"
        return {"rows": {}, "errors": {"all": f"{why}; log {log}:\n{_tail(log)}"}}
    finally:
        out.unlink(missing_ok=True)


def run_launch(quick: bool, logs: Path, timeout: float) -> dict:
    if not LAUNCH.exists():
        return {"rows": [], "skipped": "skipped: benchmarks/launch.py does not exist yet "
                                       "(L2 launch overhead comes with the simulation "
                                       "platform issue)"}
    cmd = [sys.executable, str(LAUNCH)]
    if quick and "--quick" in LAUNCH.read_text():
        cmd.append("--quick")
    log = logs / "launch.log"
    rc = _run(cmd, log, timeout)
    return {"rows": [], "command": " ".join(cmd[1:]), "returncode": rc,
            "output": log.read_text(errors="replace")[-20_000:]}


def _versions() -> dict:
    out = {}
    for dist in ("pto", "numpy", "pyzmq", "ray", "dask", "distributed"):
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            pass
    return out


def _git() -> dict:
    """The commit measured, and whether the runtime's code differs from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD"),
                "runtime_modified": bool(git("status", "--porcelain", "pto", "broker", "worker"))}
    except (OSError, subprocess.SubprocessError):
        return {}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks",
                                 description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="smaller sizes (under 3 minutes)")
    ap.add_argument("--cases", type=lambda s: _csv(s, CASES), default=list(CASES),
                    help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--systems", type=lambda s: _csv(s, ORDER), default=list(ORDER),
                    help=f"comma-separated subset of {','.join(ORDER)}")
    ap.add_argument("--repeats", type=int, default=None, help="repeats per figure (median); "
                    "default 5, --quick 3")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"),
                    help="directory for results.json, results.png and logs/")
    ap.add_argument("--timeout", type=float, default=None,
                    help="seconds per system before it is killed (default 300 quick, 3600)")
    a = ap.parse_args(argv)
    a.cases = [c for c in CASES if c in a.cases]  # always in the order
    cfg = Config.make(a.quick, a.repeats)
    timeout = a.timeout or (300 if a.quick else 3600)
    out = Path(a.out)
    logs = out / "logs"
    logs.mkdir(parents=True, exist_ok=True)

    t0 = time.monotonic()
    result = {
        "meta": {"argv": sys.argv[1:] if argv is None else list(argv), "quick": cfg.quick,
                 "python": platform.python_version(), "platform": platform.platform(),
                 "cpus": os.cpu_count(), "loadavg_at_start": os.getloadavg(),
                 "versions": _versions(), "git": _git(),
                 "started": time.strftime("%Y-%m-%d %H:%M:%S")},
        "config": cfg.to_dict(),
        "cases": {c: {"rows": []} for c in a.cases},
        "skipped": {}, "errors": {}, "targets": [],
    }
    print(f"pto benchmarks{' (quick)' if cfg.quick else ''}: cases {','.join(a.cases)}; "
          f"{cfg.repeats} repeats; {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"load {os.getloadavg()[0]:.1f}; each system in a fresh process, one after another",
          flush=True)
    system_cases = [c for c in a.cases if c != "launch"]
    for key in [k for k in ORDER if k in a.systems] if system_cases else []:
        if not cases_of(key, system_cases):
            continue
        needs = SYSTEMS[key][2]
        if needs and importlib.util.find_spec(needs) is None:
            result["skipped"][key] = f"{needs} is not installed (pip install -e '.[bench]')"
            print(f"  {key}: skipped ({needs} not installed)", flush=True)
            continue
        t = time.monotonic()
        got = run_system(key, cases_of(key, system_cases), cfg, logs, timeout)
        for case, rows in got["rows"].items():
            result["cases"][case]["rows"] += rows
        if got["errors"]:
            result["errors"][key] = got["errors"]
        status = f"errors in {', '.join(got['errors'])}" if got["errors"] else "ok"
        print(f"  {key}: {time.monotonic() - t:.1f}s, {status}", flush=True)
    if "launch" in a.cases:
        result["cases"]["launch"] = run_launch(cfg.quick, logs, timeout)

    report.add_ratios(result["cases"])
    result["targets"] = report.targets(result["cases"])
    result["meta"]["seconds"] = round(time.monotonic() - t0, 1)
    report.print_tables(result)
    json_path = report.write_json(result, str(out))
    try:
        chart = report.write_chart(result, str(out))
    except ImportError:
        chart = "(no chart: matplotlib is not installed)"
    print(f"\n{result['meta']['seconds']:.0f}s; wrote {json_path} and {chart}", flush=True)
    return 1 if result["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
