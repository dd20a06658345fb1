"""The house rules of the import graph, read from the source (every import, at module level or inside a
function): each layer imports only the layers below it (training < evaluation < tasks < flows), and no two modules
import each other, directly or around a loop. CONTRIBUTING.md names the layers."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = ["training", "evaluation", "tasks", "flows"]  # lowest first


def _module_of(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(("vidtune", *(parts[:-1] if parts[-1] == "__init__" else parts)))


def _imports() -> dict[str, set[str]]:
    """vidtune module -> the vidtune modules it imports anywhere in its code."""
    modules = {_module_of(p): p for layer in LAYERS for p in (ROOT / layer).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                found |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        graph[name] = {m for m in found if m in modules and m != name}
    return graph


def _layer(module: str) -> int:
    return LAYERS.index(module.split(".")[1])


def test_each_layer_imports_only_the_layers_below_it():
    upward = sorted(
        f"{module} imports {target}"
        for module, targets in _imports().items()
        for target in targets
        if _layer(target) > _layer(module)
    )
    assert upward == []


def test_no_import_loops():
    graph = _imports()
    loops = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                start = path.index(target) if target in path else len(path)
                loops.append(" -> ".join([*path[start:], module, target]))
            elif target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert loops == []
