"""docs/migration.md is exact: its table has a row for every public name of the original
runtime (read from the reference file: file layout, exports, types.py, the keywords and
methods of its usage block, the AscendC commits), each marked works / renamed / refused,
every ``pto.`` name it points to exists, and its rewrite of the usage block keeps ``orch=``.
(Its Python blocks themselves run in tests/unit/test_docs.py.)"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import pto

REPO = Path(__file__).resolve().parents[2]
MIGRATION = REPO / "docs" / "migration.md"
REFERENCE = Path("/work/shared/reference/unified-runtime-pr.txt")


def original_names() -> set[str]:
    """Every public name the original's pull request shows a user."""
    text = REFERENCE.read_text()
    layout = text[text.index("File layout"):text.index("Usage")]
    usage = text[text.index("import pto\n"):text.index("Test plan")]
    names = set(re.findall(r"^\s*(\w+\.py)\s+—", layout, re.M))  # the modules
    names |= set(re.findall(r"\b([A-Z](?=\w*[a-z])(?=\w*[A-Z0-9])\w+)\b", layout))  # TaskDAG
    exports = re.search(r"Package exports: (.+)", layout).group(1)
    names |= {f"pto.{n.strip()}" for n in exports.split(",")}
    types = re.search(r"types\.py\s+— (.+)", layout).group(1)
    names |= {n.strip() for n in types.split(",")}
    names |= set(re.findall(r"\b(\w+)=", usage))  # level, platform, device(s), orch, kernels, args
    names |= set(re.findall(r"\brt\.(\w+)\(", usage))  # register, run, close
    names |= set(re.findall(r'level="(\w+)"', usage)) | set(re.findall(r'platform="(\w+)"',
                                                                        usage))
    commits = text[text.index("added 4 commits"):]
    names |= set(re.findall(r"\b(\w+\(\))", commits))  # compile_ascendc_kernel()
    names |= set(re.findall(r"\b(\w*ascendc\w*\.py|code_runner\.py|kernel_config\.py)\b",
                            commits))
    names |= set(re.findall(r"\b(AscendC\w*Toolchain|build_add_custom\.sh|add_custom\.o)\b",
                            commits))
    names |= {"TensorHandle.size", "compiler='ascendc'"}
    return names


def table_rows() -> list[list[str]]:
    text = MIGRATION.read_text()
    section = text[text.index("## Every public name of the original"):]
    rows = [line for line in section.splitlines() if line.startswith("| `")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows]


def test_reference_names_were_found():
    names = original_names()
    for expected in ("pto.Runtime", "pto.Arg", "pto.compile", "TensorHandle", "ParamType",
                     "CompiledPackage", "L3OrchestratorContext", "TaskDAG", "level", "devices",
                     "register", "close", "a2a3", "compile_ascendc_kernel()", "types.py"):
        assert expected in names, expected


def test_every_original_name_has_a_row():
    firsts = {re.sub(r"^`(.*)`$", r"\1", row[0].replace('"', "")) for row in table_rows()}
    missing = sorted(n for n in original_names() if n.replace('"', "") not in firsts)
    assert not missing, f"docs/migration.md has no row for {missing}"


def test_every_row_says_works_renamed_or_refused_and_refusals_say_why():
    rows = table_rows()
    assert len(rows) >= 40
    for row in rows:
        assert len(row) == 4, row
        original, here, status, notes = row
        assert status in ("works", "renamed", "refused"), row
        if status == "refused":
            assert notes, f"{original} is refused without a reason"


def resolve(dotted: str) -> object:
    obj: object = pto
    for part in dotted.split(".")[1:]:
        obj = getattr(obj, part)
    return obj


def test_every_pto_name_the_table_points_to_exists():
    pointed = set()
    for _, here, _, _ in table_rows():
        pointed |= set(re.findall(r"`(pto(?:\.[A-Za-z_]\w*)+)`", here))
    assert {"pto.types.Arg", "pto.TensorHandle.size", "pto.OrchContext"} <= pointed
    for dotted in sorted(pointed):
        resolve(dotted)  # AttributeError names the one that does not exist


@pytest.mark.parametrize("name", ["Arg", "TensorHandle", "CompiledPackage", "ParamType"])
def test_pto_types_holds_the_same_objects(name):
    assert getattr(pto.types, name) is getattr(pto, name)


def test_the_rewritten_usage_keeps_orch_and_the_package_as_the_kernel():
    text = MIGRATION.read_text()
    blocks = re.findall(r"^```python[ \t]*\n(.*?)^```", text, re.M | re.S)
    runnable = [b for b in blocks if not b.lstrip().startswith("# doc: skip")]
    rewrite = runnable[0]
    assert 'rt.register("vector_add", orch="orch.cpp", kernels=["vinc.c", "vdouble.c"])' \
        in rewrite
    assert 'pkg = pto.compile(platform="sim", orch="orch.cpp", kernels=["vinc.c", ' \
        '"vdouble.c"])' in rewrite
    assert 'rt.register("pipeline", orch=my_orch_func, kernels={"compute": pkg})' in rewrite
    assert 'platform="a2a3"' not in rewrite
    assert any('{"object": object_bytes' in b for b in runnable)  # prebuilt bytes, rewritten
