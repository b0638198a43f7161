"""The docs' Python blocks run: each fenced ```python block in docs/*.md is a test.

Each block runs as its own script (``python block.py``) in a fresh temporary directory, with
no PTO_BROKER/PTO_TRACE from the environment, under a timeout. A block whose first line is
``# doc: skip`` is an illustration that cannot run here (it needs a broker started
elsewhere, or hardware) and is reported as skipped.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pto

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
FENCE = re.compile(r"^```python[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
SKIP = "# doc: skip"
TIMEOUT = 180


def python_blocks() -> list:
    params = []
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 2  # the block's first line
            code = match.group(1)
            marks = [pytest.mark.skip(reason=SKIP)] if code.lstrip().startswith(SKIP) else []
            if "LocalCluster" in code:  # starts a Ray cluster: ~15 s
                marks += [pytest.mark.ray, pytest.mark.slow]
            params.append(pytest.param(code, id=f"{path.name}:{line}", marks=marks))
    return params


@pytest.mark.timeout(TIMEOUT + 30)
@pytest.mark.parametrize("code", python_blocks())
def test_doc_block_runs(code, tmp_path):
    script = tmp_path / "block.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PTO_BROKER", "PTO_TRACE", "PTO_CURVE_DIR")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, f"--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def test_the_docs_exist_and_readme_links_them():
    readme = (REPO / "README.md").read_text()
    for name in ("architecture", "api", "operator", "migration", "cluster"):
        assert (DOCS / f"{name}.md").exists()
        assert f"(docs/{name}.md)" in readme


def test_api_reference_covers_every_public_name():
    text = (DOCS / "api.md").read_text()
    missing = [n for n in pto.__all__ if f"`{n}`" not in text and f"pto.{n}" not in text]
    assert not missing, f"docs/api.md does not document {missing}"


def test_doc_links_point_at_files_that_exist():
    for path in [*DOCS.glob("*.md"), REPO / "README.md"]:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", path.read_text()):
            assert (path.parent / target).exists(), f"{path.name} links to missing {target}"


def test_few_blocks_are_skipped():
    params = python_blocks()
    skipped = [p for p in params if p.marks]
    assert len(params) >= 8 and len(skipped) <= 3, [p.id for p in skipped]
