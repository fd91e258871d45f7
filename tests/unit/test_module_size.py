"""No module of mlc_ray grows past ~400 lines without saying why at its top.

A module that long usually holds more than one responsibility (docs/internals.md maps one per
module). Where one responsibility really takes more, the module's docstring says so in a paragraph
that starts with "Why" (e.g. storage.py: "Why one module of ~650 lines: ...").
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "mlc_ray"
LIMIT = 420  # "~400"


def too_long_without_a_reason(root: Path = PACKAGE_ROOT, limit: int = LIMIT) -> list[str]:
    bad = []
    for path in sorted(root.rglob("*.py")):
        text = path.read_text()
        n = text.count("\n")
        if n <= limit:
            continue
        doc = ast.get_docstring(ast.parse(text)) or ""
        if not any(line.startswith("Why") for line in doc.splitlines()):
            bad.append(f"{path.relative_to(root.parent)}: {n} lines, no 'Why ...' paragraph in its docstring")
    return bad


@pytest.mark.unit
def test_long_modules_say_why() -> None:
    assert too_long_without_a_reason() == []


@pytest.mark.unit
def test_the_check_sees_a_long_module_without_a_reason(tmp_path: Path) -> None:
    pkg = tmp_path / "mlc_ray"
    pkg.mkdir()
    (pkg / "short.py").write_text('"""Short."""\n' + "x = 1\n" * 10)
    (pkg / "long.py").write_text('"""Long, no reason."""\n' + "x = 1\n" * 30)
    (pkg / "reasoned.py").write_text('"""Long.\n\nWhy 31 lines: one table.\n"""\n' + "x = 1\n" * 30)
    assert too_long_without_a_reason(pkg, limit=20) == [
        "mlc_ray/long.py: 31 lines, no 'Why ...' paragraph in its docstring"
    ]
