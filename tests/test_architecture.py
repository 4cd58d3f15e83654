"""The package's import graph: no cycles (function-level imports included) and arrows that only point down the layers."""

from __future__ import annotations

import ast
from pathlib import Path

import cifarflow

ROOT = Path(cifarflow.__file__).resolve().parent

# Lowest first. A module may import its own layer or a lower one, never a higher one.
LAYERS = (
    ("cifarflow", "cifarflow.errors", "cifarflow.utils", "cifarflow.plots", "cifarflow.serving"),
    ("cifarflow.models", "cifarflow.data.datasets"),
    ("cifarflow.config", "cifarflow.data"),
    ("cifarflow.tracking",),
    ("cifarflow.tracking.refs",),
    ("cifarflow.evaluation",),
    ("cifarflow.training",),
    ("cifarflow.deploy",),
    ("cifarflow.api", "cifarflow.cli"),
)


def module_name(path: Path) -> str:
    parts = ("cifarflow",) + path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in ROOT.rglob("*.py")}


def imports(name: str) -> set[str]:
    """cifarflow modules ``name`` imports anywhere in its file (module level, in functions, under TYPE_CHECKING)."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "cifarflow"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative import
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "cifarflow":
                continue
            for alias in node.names:  # `from cifarflow.data import datasets` names a module, `... import load` does not
                out.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base)
    return {m for m in out if m != name}


GRAPH = {name: imports(name) for name in MODULES}


def layer(name: str) -> int:
    """Index of the most specific LAYERS entry that is ``name`` or a package above it."""
    best, depth = None, -1
    for index, entries in enumerate(LAYERS):
        for entry in entries:
            if (name == entry or (entry != "cifarflow" and name.startswith(entry + "."))) and entry.count(".") > depth:
                best, depth = index, entry.count(".")
    assert best is not None, f"{name} is in no layer of LAYERS"
    return best


def test_the_graph_sees_function_level_imports():
    assert "cifarflow.training.trainer" in GRAPH["cifarflow.cli"]  # imported inside the `train` command only
    assert "cifarflow.tracking.refs" in GRAPH["cifarflow.deploy.export"]  # imported inside export()


def test_no_import_cycles():
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(GRAPH.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name)


def test_imports_point_down_the_layers():
    upward = [f"{a} (layer {layer(a)}) imports {b} (layer {layer(b)})"
              for a, targets in GRAPH.items() for b in targets if layer(b) > layer(a)]
    assert not upward, "\n".join(upward)


def test_model_references_are_resolved_in_one_module():
    """Consumers import the low refs module; none defines its own loader or resolver."""
    for name in ("load_keras", "resolve_source", "resolve_version", "resolve_model", "run_test_data"):
        defined = [m for m, p in MODULES.items()
                   if any(isinstance(n, ast.FunctionDef) and n.name == name for n in ast.parse(p.read_text()).body)]
        assert defined == ["cifarflow.tracking.refs"], (name, defined)


def test_module_names_in_code_exist():
    """A module's own name written as a string (``if __name__ != "cifarflow.x"``) follows it when it moves."""
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(n, ast.Name) and n.id == "__name__"
                                                     for n in [node.left, *node.comparators]):
                named = [n.value for n in [node.left, *node.comparators]
                         if isinstance(n, ast.Constant) and str(n.value).startswith("cifarflow")]
                assert all(n in MODULES for n in named), (name, named)


def test_the_trainer_does_not_know_model_families():
    """Transfer specifics reach the trainer only through the training plan it is handed."""
    assert not {"cifarflow.models.transfer", "cifarflow.training.transfer"} & GRAPH["cifarflow.training.trainer"]
    assert "cifarflow.training.plans" in GRAPH["cifarflow.training.trainer"]
