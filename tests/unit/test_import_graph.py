"""mlc_ray's import graph: no circles, and a lower layer never imports a higher one.

The graph is built from the source with ``ast`` (nothing is imported): every ``import mlc_ray...``
and ``from mlc_ray... import ...`` counts, at module level and inside functions alike (a function-level
import is still a dependency, and hiding a circle inside a function is how the old ones survived),
and imports under ``if TYPE_CHECKING:`` count too. ``from mlc_ray.pkg import name`` is an edge to
``mlc_ray.pkg.name`` when that is a module, else to ``mlc_ray.pkg``.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parents[2] / "mlc_ray"

# Lowest first. A module may import modules of its own layer or of a lower one. Entries are module
# names or package prefixes; every module of mlc_ray must fall in exactly one layer (a new module
# gets a layer here, on purpose).
LAYERS: list[tuple[str, list[str]]] = [
    # errors, the URI layer, typed configs, the metric wrapper, console progress
    ("foundation", ["errors", "progress", "provenance", "storage", "config", "metrics"]),
    # what jobs share: argparse, logging, Ray start-up, errors -> exit codes (storage knows nothing of it)
    ("job runtime", ["cli"]),
    # data model and formats, decode/preprocess, the model zoo, threshold calibration
    ("data and models", ["data", "models", "calibrate"]),
    # the model-bundle contract (one reader of the bundle files; how its ONNX graph is run)
    ("bundle", ["bundle", "onnx_run"]),
    # what consumes a bundle: scoring/evaluation, the pyfunc wrapper, export to ONNX/int8/ncnn
    ("bundle users", ["evaluation", "pyfunc_model", "export"]),
    # MLflow: register, resolve, promote, audit, access control
    ("registry", ["registry", "alias_history", "registry_auth"]),
    # the pipelines: training, tagging, scanning, shadow promotion, the labelling queue (same layer: training writes the label rates
    # tagging's report reads, and the report logs through training's MLflow helpers)
    ("pipelines", ["train", "tagging", "scan", "shadow", "select"]),
    # end-to-end demo that drives the jobs
    ("orchestration", ["demo_pipeline"]),
]
UNLAYERED = {"mlc_ray"}  # the top package (empty)


def module_files(root: Path = PACKAGE_ROOT) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _owner(name: str, modules: dict[str, Path]) -> str | None:
    """The module that ``name`` (a module or an attribute of one) lives in."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                names = [
                    f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names
                ]
            else:
                continue
            for name in names:
                if name == "mlc_ray" or name.startswith("mlc_ray."):
                    owner = _owner(name, modules)
                    if owner and owner != module:
                        targets.add(owner)
        graph[module] = targets
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

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
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def layer_of(module: str) -> int | None:
    rel = module.removeprefix("mlc_ray.")
    hits = [
        i for i, (_, prefixes) in enumerate(LAYERS) for p in prefixes if rel == p or rel.startswith(p + ".")
    ]
    return hits[0] if len(hits) == 1 else None


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    bad = []
    for module, targets in sorted(graph.items()):
        if module in UNLAYERED:
            continue
        for target in sorted(targets):
            if target in UNLAYERED:
                continue
            mine, theirs = layer_of(module), layer_of(target)
            if mine is not None and theirs is not None and theirs > mine:
                bad.append(
                    f"{module} ({LAYERS[mine][0]}) imports {target} ({LAYERS[theirs][0]}), a higher layer"
                )
    return bad


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph(module_files())


def test_every_module_has_one_layer(graph: dict[str, set[str]]) -> None:
    missing = [m for m in sorted(graph) if m not in UNLAYERED and layer_of(m) is None]
    assert not missing, f"modules in no layer (or in two) of LAYERS: {missing}"


def test_no_import_circles(graph: dict[str, set[str]]) -> None:
    cycles = find_cycles(graph)
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_lower_layers_never_import_higher_ones(graph: dict[str, set[str]]) -> None:
    bad = layer_violations(graph)
    assert not bad, "layer violations:\n" + "\n".join(bad)


def test_the_graph_sees_imports_inside_functions_and_relative_ones(tmp_path: Path) -> None:
    # The checker itself: a circle through a function-level import and a relative import is found.
    pkg = tmp_path / "mlc_ray"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "storage.py").write_text("def f():\n    from mlc_ray.cli import UserError\n")
    (pkg / "cli.py").write_text("from mlc_ray import storage\n")
    (pkg / "sub" / "__init__.py").write_text("from .a import x\n")
    (pkg / "sub" / "a.py").write_text("from . import b\n")
    (pkg / "sub" / "b.py").write_text("def g():\n    from mlc_ray.sub import a\n")
    got = import_graph(module_files(pkg))
    assert got["mlc_ray.storage"] == {"mlc_ray.cli"}
    assert got["mlc_ray.sub"] == {"mlc_ray.sub.a"}
    assert got["mlc_ray.sub.a"] == {"mlc_ray.sub.b"}
    assert find_cycles(got) == [["mlc_ray.cli", "mlc_ray.storage"], ["mlc_ray.sub.a", "mlc_ray.sub.b"]]
    assert layer_violations(got) == [
        "mlc_ray.storage (foundation) imports mlc_ray.cli (job runtime), a higher layer"
    ]
    (pkg / "data").mkdir()
    (pkg / "data" / "__init__.py").write_text("")
    (pkg / "data" / "manifest.py").write_text("import mlc_ray.registry.promotion\n")
    (pkg / "registry").mkdir()
    (pkg / "registry" / "__init__.py").write_text("")
    (pkg / "registry" / "promotion.py").write_text("")
    assert layer_violations(import_graph(module_files(pkg))) == [
        "mlc_ray.data.manifest (data and models) imports mlc_ray.registry.promotion (registry), a higher layer",
        "mlc_ray.storage (foundation) imports mlc_ray.cli (job runtime), a higher layer",
    ]


def test_a_bundle_directory_tag_run_resolves_without_importing_mlflow(tmp_path: Path) -> None:
    """mlflow's import is ~0.7 s of a tagging run's fixed cost: the registry package and the tagging
    pipeline import it only in the functions that use it, so resolving a bundle directory never does."""
    import json
    import subprocess
    import sys

    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model.onnx").write_bytes(b"not parsed by resolve")
    for name in ("labels.json", "preprocess.json", "thresholds.json"):
        (bundle / name).write_text(json.dumps(["a", "b"]) if name == "labels.json" else "{}")
    script = (
        "import sys\n"
        "import mlc_ray.registry, mlc_ray.tagging.pipeline\n"
        "from mlc_ray.tagging.config import TagConfig\n"
        "from mlc_ray.tagging.resolve import resolve\n"
        f"model = resolve(TagConfig(model={str(bundle)!r}, model_cache={str(tmp_path / 'cache')!r}))\n"
        "assert model.version.startswith('bundle-'), model\n"
        "print(sorted(m for m in sys.modules if m == 'mlflow' or m.startswith('mlflow.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=PACKAGE_ROOT.parent, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]", out.stdout[-2000:]
