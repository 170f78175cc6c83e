"""The import graph of the service code: every arrow points down, and nothing imports in a circle.

Layers, top to bottom: `ray_serve.py` -> `app.py`, `score.py` -> `utils/api`, `utils/viewer` -> `utils/pipeline` ->
`utils/imaging`, `utils/tracking`, `utils/report` ->
`utils/config.py`, `utils/errors.py` -> `database/`, `storage/`, `male_boneage/`, `mlflow_config.py`.
The lower packages import nothing above them: no exception.
"""

from __future__ import annotations

import ast
from pathlib import Path

from helpers import PROJECT_ROOT

SERVICE_CODE = ["app.py", "ray_serve.py", "score.py", "mlflow_config.py", "utils", "database", "storage",
                "male_boneage"]
LOWER_PACKAGES = ("database", "storage", "male_boneage")
# What a command starts: python app.py / uvicorn app:app, serve run ray_serve:app, python -m score. They compose
# the layers; nothing imports them (but ray_serve builds on app).
ENTRY_POINTS = ("app", "ray_serve", "score")
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
    """Not one module of `male_boneage/`, `storage/` or `database/` imports `utils/` or an entry point, at module
    level or in a function."""
    lower = [module for module in GRAPH if module.split(".")[0] in LOWER_PACKAGES]
    assert "male_boneage.inference" in lower and "database.crud" in lower  # the walk found the packages
    upward = {module: sorted(t for t in GRAPH[module] if t.split(".")[0] == "utils" or t in ENTRY_POINTS)
              for module in lower}
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
