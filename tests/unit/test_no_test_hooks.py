"""Faults are injected from outside: production code (``mlc_ray/``, ``jobs/``) holds no chaos hook.

An AST scan of every module: no parameter, keyword argument, name, attribute, function or class
whose name contains ``chaos``, and no string constant (an environment variable's name, a dict key
passed as a keyword) that contains it; docstrings and comments may mention the chaos tier. The
tier's faults live in ``tests/chaos/`` (``hooks.py``: Ray's ``worker_process_setup_hook`` and a
``Predictor`` subclass swapped in by the driver; ``s3_fault_proxy.py``; ``driver.py``).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PRODUCTION = ("mlc_ray", "jobs")
WORD = "chaos"


def _docstring_nodes(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                ids.add(id(body[0].value))
    return ids


def chaos_names(source: str, filename: str = "<source>") -> list[str]:
    """``line: what`` for each chaos-named identifier or non-docstring string constant."""
    tree = ast.parse(source, filename)
    docstrings = _docstring_nodes(tree)
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.arg) or (isinstance(node, ast.keyword) and node.arg):
            names.append(node.arg)
        elif isinstance(node, ast.Name):
            names.append(node.id)
        elif isinstance(node, ast.Attribute):
            names.append(node.attr)
        elif isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.append(node.name)
        elif isinstance(node, ast.alias):
            names.append(node.asname or node.name)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            names.append(node.value)
        found += [f"{getattr(node, 'lineno', '?')}: {n!r}" for n in names if WORD in n.lower()]
    return found


def production_files() -> list[Path]:
    files = [p for top in PRODUCTION for p in sorted((REPO / top).rglob("*.py"))]
    assert len(files) > 20, files  # the scan really sees the library
    return files


def test_production_code_reads_no_chaos_parameter_or_env_var() -> None:
    offenders = {
        str(path.relative_to(REPO)): hits
        for path in production_files()
        if (hits := chaos_names(path.read_text(), str(path)))
    }
    assert not offenders, (
        f"test hooks in production code (inject faults from tests/chaos instead): {offenders}"
    )


@pytest.mark.parametrize(
    "source",
    [
        "def f(*, chaos_delay_s=0.0):\n    pass\n",  # a parameter
        "import os\nDELAY = os.environ.get('MLC_RAY_CHAOS_PREDICTOR_DELAY_S')\n",  # an env var
        "make(chaos_exit_once=None)\n",  # a keyword argument
        "kwargs = {'chaos_exit_once': None}\n",  # a dict key passed on
        "class P:\n    def __init__(self):\n        self.chaos = 1\n",  # an attribute
    ],
)
def test_the_scan_finds_each_kind_of_hook(source: str) -> None:
    assert chaos_names(source)


def test_the_scan_ignores_docstrings() -> None:
    assert chaos_names('"""Faults come from the chaos tier."""\n\ndef f():\n    """chaos"""\n') == []
