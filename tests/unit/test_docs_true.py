"""The docs that tests keep true (docs/architecture.md, "The rooms"): each claim there is checked here.

- every module has a row in docs/architecture.md's tables, and every row names a module that exists;
- every variable the operator's config.py reads is in config.VARIABLES, in `modelapp-operator --help` and in
  docs/modelapp-spec.md's operator table; every variable the app reads is in `modelapp-serve --help` and in the
  app's table;
- the permission table of docs/operations.md is what deploy/'s ClusterRole and Role grant, verb for verb;
- no condition or event reason is spelled outside names.py;
- plan/ imports no client and no I/O library; clients/ imports nothing from plan/ or the layers above it.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import yaml
from modelapp_contract import container
from modelapp_operator import config as operator_config
from modelapp_operator import names
from modelapp_operator.__main__ import build_parser as operator_parser
from modelapp_serving import __main__ as serve_main
from modelapp_serving import config as app_config

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
OPERATOR = ROOT / "operator" / "modelapp_operator"
APP = ROOT / "app" / "modelapp_serving"
PACKAGES = {
    "modelapp_operator": OPERATOR,
    "modelapp_serving": APP,
    "modelapp_contract": ROOT / "contract" / "modelapp_contract",
}
VARIABLE = re.compile(r"`((?:MODELAPP|PROMETHEUS)_[A-Z0-9_]+)`")


# --- reading the docs --------------------------------------------------------------------------------


def _section(text: str, heading: str) -> str:
    """The text under a Markdown heading, up to the next heading of the same or a higher level."""
    level = heading.split(" ", 1)[0]
    start = text.index(f"\n{heading}\n") + len(heading) + 2
    ends = [m.start() for m in re.finditer(r"^(#+) ", text[start:], re.MULTILINE) if len(m[1]) <= len(level)]
    return text[start : start + ends[0]] if ends else text[start:]


def _table_rows(text: str) -> Iterator[list[str]]:
    """The cells of each body row of the first Markdown table in text."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            return
        yield [cell.strip() for cell in line.strip().strip("|").split("|")]


def _first_cell_variables(text: str) -> set[str]:
    return {name for row in _table_rows(text) for name in VARIABLE.findall(row[0])}


# --- the rooms -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_every_module_has_a_row_and_every_row_a_module(package: str) -> None:
    architecture = (DOCS / "architecture.md").read_text()
    heading = next(line for line in architecture.splitlines() if line.startswith(f"### `{package}`"))
    rows = {
        name for row in _table_rows(_section(architecture, heading)) for name in re.findall(r"`([\w/]+\.py)`", row[0])
    }
    root = PACKAGES[package]
    modules = {path.relative_to(root).as_posix() for path in root.rglob("*.py") if path.name != "__init__.py"}
    assert sorted(modules - rows) == [], "modules without a row in docs/architecture.md"
    assert sorted(rows - modules) == [], "rows in docs/architecture.md naming no module"


# --- the operator's variables ----------------------------------------------------------------------------


def _string_constants(path: Path, pattern: re.Pattern[str]) -> set[str]:
    return {
        node.value
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and pattern.fullmatch(node.value)
    }


def test_every_variable_the_operator_reads_is_listed_helped_and_documented() -> None:
    listed = {variable.name for variable in operator_config.VARIABLES}
    read = _string_constants(OPERATOR / "config.py", re.compile(r"MODELAPP_[A-Z0-9_]+"))
    assert read == listed, "config.py reads exactly the variables config.VARIABLES names"
    helped = operator_parser().format_help()
    assert sorted(name for name in listed if name not in helped) == [], "missing from modelapp-operator --help"
    table = _section((DOCS / "modelapp-spec.md").read_text(), "## Operator configuration")
    assert _first_cell_variables(table) == listed, "docs/modelapp-spec.md's operator table"


# --- the app's variables ---------------------------------------------------------------------------------


def _contract_names_used(path: Path, module: ModuleType, prefix: str) -> set[str]:
    """The values of `module`'s constants that path uses (imported by name or as `container.NAME`)."""
    tree = ast.parse(path.read_text())
    used: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == module.__name__:
            used |= {alias.name for alias in node.names}
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "container":
            used.add(node.attr)
    values = {getattr(module, name, None) for name in used}
    return {value for value in values if isinstance(value, str) and value.startswith(prefix)}


def _app_reads() -> set[str]:
    """Every variable the app reads: names spelled in its modules, and the contract's names it uses."""
    read: set[str] = set()
    for path in sorted(APP.rglob("*.py")):
        read |= _string_constants(path, re.compile(r"MODELAPP_[A-Z0-9_]+|PROMETHEUS_MULTIPROC_DIR"))
        read |= _contract_names_used(path, container, "MODELAPP_")
    return read


def test_every_variable_the_app_reads_is_listed_helped_and_documented() -> None:
    listed = {variable.name for variable in app_config.VARIABLES}
    read = _app_reads()
    assert set(container.RENDERED) <= read, "the app reads every variable the operator renders"
    assert sorted(read - listed) == [], "read by the app but not in config.VARIABLES"
    assert sorted(name for name in listed if name not in serve_main.ENV_HELP) == [], (
        "missing from modelapp-serve --help"
    )
    table = _section((DOCS / "modelapp-spec.md").read_text(), "## The serving app's environment")
    assert _first_cell_variables(table) == listed, "docs/modelapp-spec.md's table of the app's environment"


# --- permissions ---------------------------------------------------------------------------------------------

Grant = tuple[str, str, str]  # scope, API group ("" for the core group), resource


def _granted(path: Path, kind: str, scope: str) -> dict[Grant, set[str]]:
    granted: dict[Grant, set[str]] = {}
    (role,) = [doc for doc in yaml.safe_load_all(path.read_text()) if doc and doc["kind"] == kind]
    for rule in role["rules"]:
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                granted.setdefault((scope, group, resource), set()).update(rule["verbs"])
    return granted


def test_the_permission_table_is_what_deploy_grants_verb_for_verb() -> None:
    documented: dict[Grant, set[str]] = {}
    for scope, group, resource, verbs, _why in _table_rows(
        _section((DOCS / "operations.md").read_text(), "## Permissions")
    ):
        key = (scope, "" if group == "(core)" else group.strip("`"), resource.strip("`"))
        assert key not in documented, f"{key} twice in docs/operations.md"
        documented[key] = {verb.strip() for verb in verbs.split(",")}
    deploy = ROOT / "deploy"
    granted = _granted(deploy / "base" / "clusterrole.yaml", "ClusterRole", "cluster")
    granted |= _granted(deploy / "tenant" / "role.yaml", "Role", "app namespace")
    granted |= _granted(deploy / "base" / "leader-election.yaml", "Role", "operator namespace")
    assert documented == granted


# --- reasons ----------------------------------------------------------------------------------------------------

# Strings that equal one of our reasons but are someone else's word, read or shown, never written as a reason.
NOT_OUR_REASONS = {
    ("plan/pods.py", "OOMKilled"),  # the kubelet's reason for a container it killed, as the pod's status says it
    ("cli/commands.py", "Ready"),  # the verdict `modelapp wait` prints
}
REASON_BEARERS = re.compile(r"(Condition|Event|Error|Refusal|Problem|Failure|Resolution|condition)$")
CAMEL_CASE = re.compile(r"[A-Z][a-z0-9]+(?:[A-Z][A-Za-z0-9]*)+")


def _docstrings(tree: ast.AST) -> set[int]:
    bodies = (node.body for node in ast.walk(tree) if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef))
    return {id(body[0].value) for body in bodies if body and isinstance(body[0], ast.Expr)}


def _reason_literals(node: ast.AST) -> list[ast.expr]:
    """The expressions handed to something that carries a reason: reason=..., {"reason": ...}, Condition(...)."""
    if isinstance(node, ast.keyword) and node.arg == "reason":
        return [node.value]
    if isinstance(node, ast.Dict):
        pairs = zip(node.keys, node.values, strict=True)
        return [value for key, value in pairs if isinstance(key, ast.Constant) and key.value == "reason"]
    if isinstance(node, ast.Call) and REASON_BEARERS.search(ast.unparse(node.func)):
        return list(node.args)
    return []


def test_no_reason_is_spelled_outside_names_py() -> None:
    ours = {
        value
        for vocabulary in (names.Reason, names.ConditionType)
        for key, value in vars(vocabulary).items()
        if key.isupper() and isinstance(value, str)
    }
    spelled: list[str] = []
    for path in sorted(OPERATOR.rglob("*.py")):
        module = path.relative_to(OPERATOR).as_posix()
        if module == "names.py":
            continue
        tree = ast.parse(path.read_text())
        skipped = _docstrings(tree)
        for node in ast.walk(tree):
            if (
                isinstance(node, ast.Constant)
                and node.value in ours
                and id(node) not in skipped
                and (module, node.value) not in NOT_OUR_REASONS
            ):
                spelled.append(f"{module}:{node.lineno} {node.value!r}")
            # A new reason (not in names.py yet) handed straight to whatever carries one.
            spelled += [
                f"{module}:{literal.lineno} {literal.value!r}"
                for literal in _reason_literals(node)
                if isinstance(literal, ast.Constant)
                and isinstance(literal.value, str)
                and CAMEL_CASE.fullmatch(literal.value)
            ]
    assert spelled == [], "spell reasons and condition types as names.py's constants"


# --- import rules ----------------------------------------------------------------------------------------------

# Standard-library modules that reach outside the process (or its clock): never in plan/.
IO_MODULES = frozenset(
    {"asyncio", "http", "io", "os", "pathlib", "select", "selectors", "shutil", "socket", "ssl", "subprocess"}
    | {"tempfile", "threading", "time", "urllib.request", "concurrent"}
)
PLAN_MAY_IMPORT = ("modelapp_contract", "modelapp_operator.api", "modelapp_operator.names", "modelapp_operator.plan")
CLIENTS_MAY_NOT_IMPORT = tuple(
    f"modelapp_operator.{layer}" for layer in ("plan", "reconcile", "watch", "receiver", "runtime", "handlers", "cli")
)


def _imported(path: Path) -> Iterator[tuple[int, str]]:
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            yield from ((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module


def _within(name: str, prefixes: tuple[str, ...] | frozenset[str]) -> bool:
    return any(name == prefix or name.startswith(f"{prefix}.") for prefix in prefixes)


def test_plan_imports_no_client_and_no_io() -> None:
    wrong = []
    for path in sorted((OPERATOR / "plan").glob("*.py")):
        for line, name in _imported(path):
            stdlib = name.split(".")[0] in sys.stdlib_module_names or name == "__future__"
            if (stdlib and _within(name, IO_MODULES)) or (not stdlib and not _within(name, PLAN_MAY_IMPORT)):
                wrong.append(f"plan/{path.name}:{line} {name}")
    assert wrong == [], "plan/ is pure: its inputs are values the I/O layers read"


def test_clients_import_nothing_from_plan_or_above() -> None:
    wrong = [
        f"clients/{path.name}:{line} {name}"
        for path in sorted((OPERATOR / "clients").glob("*.py"))
        for line, name in _imported(path)
        if _within(name, CLIENTS_MAY_NOT_IMPORT)
    ]
    assert wrong == [], "clients/ only reads and writes: what the answers mean is decided in plan/"
