"""The import rules of the tree (docs/architecture.md, "The tree"): every import of every module
under pto/, broker/ and worker/ (lazy ones inside functions too) read with ``ast``, checked
against the layers, and searched for circles.

    pto/wire     shared by every process: imports nothing of pto above it
    pto/chip     L2, compiler, simulator; pto/chip/runner.py (+ simlib, simtasks) is the one
                 part a worker may load
    pto/host     L3 client          pto/cluster  L4          pto/tools  CLI
    broker/      imports pto.wire only        worker/  pto.wire and the kernel runner
    the client (pto/*) never imports broker/ or worker/; no module imports itself round a circle
"""

from __future__ import annotations

import ast
import functools
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
ROOTS = ("pto", "broker", "worker")

# layer -> the layers it may import
_SIM = "chip-sim"  # the simulator binding the kernel runner loads: no compiler
ALLOWED: dict[str, set[str]] = {
    "wire": {"wire"},
    "base": {"wire", "base"},
    _SIM: {"wire", _SIM},
    "runner": {"wire", "runner", _SIM},
    "chip": {"wire", "base", "chip", _SIM, "runner"},
    "host": {"wire", "base", "host", "chip", _SIM, "runner"},
    "cluster": {"wire", "base", "host", "chip", _SIM, "runner", "cluster"},
    "tools": {"wire", "base", "host", "chip", _SIM, "runner", "cluster", "tools"},
    "top": {"wire", "base", "host", "chip", _SIM, "runner", "cluster", "tools", "top"},
    "broker": {"wire", "broker"},
    "worker": {"wire", "runner", _SIM, "worker"},
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] in ("broker", "worker"):
        return parts[0]
    if module in ("pto.chip.simlib", "pto.chip.simtasks"):
        return _SIM
    if module == "pto.chip.runner":
        return "runner"
    if module == "pto.base":
        return "base"
    if len(parts) > 1 and parts[1] in ("wire", "chip", "host", "cluster", "tools"):
        return parts[1]
    return "top"  # pto/__init__, __main__, runtime (the door), types


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for root in ROOTS for p in sorted((REPO / root).rglob("*.py"))}


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The module ``name`` is, or the package it is an attribute of, if it is ours."""
    while name:
        if name in known:
            return name
        name = name.rpartition(".")[0]
    return None


def _type_only_nodes(tree: ast.AST) -> set[int]:
    """The import nodes under ``if TYPE_CHECKING:``: never executed, so never in a circle."""
    ids: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            ids.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return ids


def imports_of(module: str, source: str, known: dict[str, Path],
               type_only: bool = True) -> set[str]:
    """Our modules that ``source`` (the text of ``module``) imports, anywhere in it (and under
    ``if TYPE_CHECKING:`` unless ``type_only`` is false)."""
    is_pkg = known.get(module, Path()).name == "__init__.py"
    package = module if is_pkg else module.rpartition(".")[0]
    found: set[str] = set()
    tree = ast.parse(source)
    skip = set() if type_only else _type_only_nodes(tree)
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                head = ".".join(base + ([node.module] if node.module else []))
            else:
                head = node.module or ""
            # ``from pkg import sub`` imports the submodule when there is one
            names = [f"{head}.{a.name}" if f"{head}.{a.name}" in known else head
                     for a in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name, known)
            if target is not None and target != module:
                found.add(target)
    return found


@functools.cache
def _graphs() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    known = _modules()
    texts = {m: p.read_text() for m, p in known.items()}
    return ({m: imports_of(m, t, known) for m, t in texts.items()},
            {m: imports_of(m, t, known, type_only=False) for m, t in texts.items()})


def import_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(every import, the imports that run): module -> our modules it imports; fresh copies."""
    every, running = _graphs()
    return ({m: set(t) for m, t in every.items()}, {m: set(t) for m, t in running.items()})


def violations(every: dict[str, set[str]], running: dict[str, set[str]]) -> list[str]:
    """Every forbidden edge (type-only imports count: they are dependencies too) and every
    circle of imports that run."""
    out = []
    for src, targets in sorted(every.items()):
        for dst in sorted(targets):
            if layer_of(dst) not in ALLOWED[layer_of(src)]:
                out.append(f"{src} ({layer_of(src)}) imports {dst} ({layer_of(dst)})")
    for cycle in circles(running):
        out.append("circle: " + " -> ".join(cycle + [cycle[0]]))
    return out


def circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


# ---- the tree as it is ----------------------------------------------------------------------


def test_the_tree_keeps_the_import_rules():
    every, running = import_graph()
    assert len(every) > 60 and "broker.server" in every and "pto.wire.protocol" in every
    assert violations(every, running) == []


def test_the_client_and_the_processes_are_apart():
    every, _ = import_graph()
    for src, targets in every.items():
        if src.startswith("pto"):
            assert not {t for t in targets if t.split(".")[0] in ("broker", "worker")}, src


def test_broker_and_worker_processes_load_no_client_compiler_or_ray():
    """What ``python -m broker`` and ``python -m worker`` really load, not what we think."""
    code = ("import sys, broker.__main__, broker.server, worker.__main__, worker.loop, "
            "worker.kernels, json; print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    loaded = set(json.loads(out))
    ours = {m for m in loaded if m.split(".")[0] == "pto"}
    assert {layer_of(m) for m in ours} <= {"wire", "top", "base"}, sorted(ours)
    assert "ray" not in loaded and "pto.chip.compiler" not in loaded


def test_the_broker_process_loads_no_numpy():
    """A broker handles no tensor data: it starts without numpy's ~0.1 s of imports."""
    code = ("import sys, broker.__main__, broker.server, broker.forks, json; "
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert not {m for m in json.loads(out) if m.split(".")[0] == "numpy"}


def test_a_worker_running_a_c_kernel_loads_the_runner_not_the_compiler():
    code = ("import sys, json, worker.kernels as k\n"
            "try:\n    k.load_kernel('sim', 'x', b'{\"path\": \"/nonexistent.so\", "
            "\"sha256\": \"0\", \"symbol\": \"x\"}')\nexcept Exception:\n    pass\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    loaded = set(json.loads(out))
    assert "pto.chip.runner" in loaded
    assert not {"pto.chip.compiler", "pto.chip.prebuilt", "pto.chip.elf"} & loaded


# ---- the checker fails on each kind of forbidden edge ---------------------------------------


@pytest.mark.parametrize("src, dst", [
    ("pto.wire.protocol", "pto.host.run"),          # the shared layer reaching up
    ("pto.wire.shm", "pto.runtime"),
    ("broker.server", "pto.host.tensor"),           # a process importing the client
    ("broker.scheduler", "pto.chip.compiler"),
    ("worker.loop", "pto.chip.compiler"),           # a worker loading the compiler
    ("worker.kernels", "pto.cluster.refs"),
    ("pto.host.runbook", "broker.scheduler"),       # the client importing a process
    ("pto.cluster.host", "worker.loop"),
    ("pto.chip.runner", "pto.chip.compiler"),       # the runner pulling the compiler in
    ("pto.host.runtime", "pto.runtime"),            # a level importing the door
    ("pto.chip.runtime", "pto.host.run"),           # L2 importing L3
])
def test_each_forbidden_edge_is_reported(src, dst):
    every, running = import_graph()
    assert violations(every, running) == []
    every[src].add(dst)
    found = violations(every, running)
    assert any(f"{src} (" in v and f"imports {dst} (" in v for v in found), found


def test_a_circle_is_reported():
    every, running = import_graph()
    assert "pto.host.run" in running["pto.host.runbook"]  # runbook imports run today
    running["pto.host.run"].add("pto.host.runbook")
    found = violations(every, running)
    assert any(v.startswith("circle:") and "pto.host.run " in v + " " for v in found), found


def test_lazy_and_relative_imports_are_read():
    known = _modules()
    src = ("def f():\n    from ..wire import shm\n    from . import runbook\n"
           "    import broker.server\n")
    assert imports_of("pto.host.run", src, known) == {
        "pto.wire.shm", "pto.host.runbook", "broker.server"}
    typed = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .run import Run\n"
    assert imports_of("pto.host.runbook", typed, known) == {"pto.host.run"}
    assert imports_of("pto.host.runbook", typed, known, type_only=False) == set()
