"""The import graph of the service code: every arrow points down, and nothing imports in a circle.

Layers, top to bottom: `ray_serve.py` -> `app.py` -> `utils/api`, `utils/viewer` -> `utils/pipeline` -> `utils/imaging`,
`utils/tracking`, `utils/report` ->
`utils/config.py`, `utils/errors.py` -> `database/`, `storage/`, `male_boneage/`, `mlflow_config.py`.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import PROJECT_ROOT

SERVICE_CODE = ["app.py", "ray_serve.py", "mlflow_config.py", "utils", "database", "storage", "male_boneage"]
LOWER_PACKAGES = ("database", "storage", "male_boneage")
# Entry points that live in a lower package but compose the layers above, as app.py does; nothing imports them.
# `male_boneage.score` (python -m male_boneage.score, the name the batch-scoring issue gives it) runs
# utils/pipeline/batch_scoring.py, which must use the service's own decoding to give the service's ages.
COMPOSITION_ROOTS = ("male_boneage.score",)
# What a command starts: python app.py / uvicorn app:app, serve run ray_serve:app, python -m male_boneage.score.
ENTRY_POINTS = ("app", "ray_serve", *COMPOSITION_ROOTS)
GROUND = ("utils.config", "utils.errors")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PROJECT_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    files: list[Path] = []
    for entry in SERVICE_CODE:
        path = PROJECT_ROOT / entry
        files.extend(sorted(path.rglob("*.py")) if path.is_dir() else [path])
    return {_module_name(f): f for f in files}


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The project module an import names (its longest prefix that is a module), or None for a library."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in MODULES:
            return candidate
    return None


def _imports(path: Path) -> list[tuple[str, ast.stmt, bool]]:
    """(project module, statement, inside a function) for every import of a project module in `path`."""
    tree = ast.parse(path.read_text())
    found: list[tuple[str, ast.stmt, bool]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [alias.name for alias in child.names]
            elif isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                names = [f"{child.module}.{alias.name}" for alias in child.names]
            for name in names:
                target = _resolve(name)
                if target is not None:
                    found.append((target, child, in_function))  # type: ignore[arg-type]
            visit(child, nested)

    visit(tree, False)
    return found


GRAPH = {module: {target for target, _, _ in _imports(path) if target != module} for module, path in MODULES.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of `graph`, if it has any."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                return stack[stack.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        state[node] = 2
        stack.pop()
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _room(module: str) -> str:
    """The room a module belongs to: `utils.<room>` for utils' subpackages, an entry point its own (as `app`), else
    its top-level package."""
    if module in COMPOSITION_ROOTS:
        return module
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0] == "utils" and len(parts) > 1 else parts[0]


def test_the_import_graph_has_no_circle() -> None:
    assert _cycle(GRAPH) is None, _cycle(GRAPH)


def test_the_rooms_import_each_other_without_circles() -> None:
    rooms: dict[str, set[str]] = {}
    for module, targets in GRAPH.items():
        rooms.setdefault(_room(module), set()).update(_room(t) for t in targets if _room(t) != _room(module))
    assert _cycle(rooms) is None, _cycle(rooms)


def test_model_storage_and_database_packages_never_reach_up() -> None:
    upward = {module: sorted(t for t in targets if t.startswith("utils") or t == "app")
              for module, targets in GRAPH.items()
              if module.startswith(LOWER_PACKAGES) and module not in COMPOSITION_ROOTS}
    assert {m: t for m, t in upward.items() if t} == {}


def test_nothing_imports_an_entry_point() -> None:
    """Only an entry point builds on another (ray_serve runs app's create_app under Ray Serve)."""
    importers = {module: sorted(t for t in targets if t in ENTRY_POINTS)
                 for module, targets in GRAPH.items() if module not in ENTRY_POINTS}
    assert {m: t for m, t in importers.items() if t} == {}


def test_config_and_errors_import_nothing_of_the_project_but_the_mlflow_defaults() -> None:
    for module in GROUND:
        assert GRAPH[module] <= {"mlflow_config"}, (module, GRAPH[module])


def test_every_function_level_import_of_project_code_says_why() -> None:
    unexplained = []
    for module, path in MODULES.items():
        lines = path.read_text().splitlines()
        for _target, statement, in_function in _imports(path):
            comment = lines[statement.lineno - 1].partition("#")[2].strip()
            if in_function and (not comment or comment.startswith(("noqa", "type:"))):
                unexplained.append(f"{module}:{statement.lineno}")
    assert unexplained == []
