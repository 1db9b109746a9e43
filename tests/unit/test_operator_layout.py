"""The operator's layout stays readable: no import cycles, small modules, one vocabulary, one config."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2] / "operator"
PACKAGE = ROOT / "modelapp_operator"
MAX_LINES = 450
ENV_READ = re.compile(r"(environ|getenv)\b[^\n]*[\"']MODELAPP_")


def _modules() -> dict[str, Path]:
    return {
        ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__"): path
        for path in sorted(PACKAGE.rglob("*.py"))
    }


def _runtime_imports(path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `path` imports when it runs (not inside `if TYPE_CHECKING:`)."""
    tree = ast.parse(path.read_text())
    skipped = {
        id(node)
        for branch in ast.walk(tree)
        if isinstance(branch, ast.If) and "TYPE_CHECKING" in ast.unparse(branch.test)
        for statement in branch.body
        for node in ast.walk(statement)
    }
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
        else:
            continue
        found |= {name for name in names if name in modules}
    return found


def test_no_import_cycles() -> None:
    modules = _modules()
    graph = {name: _runtime_imports(path, modules) - {name} for name, path in modules.items()}
    state: dict[str, str] = {}

    def visit(name: str, trail: list[str]) -> None:
        state[name] = "open"
        for imported in sorted(graph[name]):
            if state.get(imported) == "open":
                cycle = [*trail[trail.index(imported) :], imported] if imported in trail else [name, imported]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if imported not in state:
                visit(imported, [*trail, imported])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_module_is_over_the_size_a_reader_takes_in() -> None:
    long = {name: n for name, path in _modules().items() if (n := len(path.read_text().splitlines())) > MAX_LINES}
    assert not long


def test_names_and_config_live_in_one_module_each() -> None:
    for name, path in _modules().items():
        text = path.read_text()
        if not name.endswith((".names", ".__main__")):
            assert "modelapp.io/" not in text, f"{name} spells an annotation key or group: use names.py"
        if not name.endswith(".config"):
            assert not ENV_READ.search(text), f"{name} reads a MODELAPP_* variable: read it in config.py"


def _imports_of(path: Path, package: str) -> list[tuple[ast.AST, bool]]:
    """Each import of `package` in path, and whether it is inside a function (imported when that runs)."""
    tree = ast.parse(path.read_text())
    inside = {
        id(node)
        for function in ast.walk(tree)
        if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
        for node in ast.walk(function)
    }
    found: list[tuple[ast.AST, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names = [node.module or ""]
        else:
            continue
        if any(name.split(".")[0] == package for name in names):
            found.append((node, id(node) in inside))
    return found


def test_the_operator_and_the_app_share_only_the_contract() -> None:
    """Each image installs its own source root and modelapp_contract. The operator never imports the app: only
    `modelapp publish-model` (cli/commands.py) imports the app's publisher, when it runs."""
    for path in sorted(PACKAGE.rglob("*.py")):
        for node, in_function in _imports_of(path, "modelapp_serving"):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', 0)}"
            assert path.name == "commands.py" and in_function, f"{where} imports the serving app"
    for path in sorted((ROOT.parent / "app" / "modelapp_serving").rglob("*.py")):
        assert not _imports_of(path, "modelapp_operator"), f"{path} imports the operator"
