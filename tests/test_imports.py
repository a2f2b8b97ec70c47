"""The package's imports form a DAG: no module imports, directly or around a circle, one that
imports it back. Every import statement counts, wherever it stands: at module level, inside a
function (a deferred import is still a dependency, and the usual way a circle hides), and under
`if TYPE_CHECKING:` (mypy follows it, and it is where `Options` made api <-> writers)."""

from __future__ import annotations

import ast
from pathlib import Path

import ckpt_avg

PACKAGE = Path(ckpt_avg.__file__).parent

# Edges that close a circle and can only be removed in modules other branches are rewriting
# today (write.py, writers.py). Each is listed with its fix; the test fails when one is gone,
# so that this list only ever shrinks.
PENDING = {
    ("distributed", "api"): "_Run, _validate, run_engine, _report move below api (a run module both import)",
}


def _imported(tree: ast.Module, modules: set[str]) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module is not None:
                found.add(node.module.split(".")[0])
            else:  # `from . import x`: the module x, or a name from the package's __init__
                found.update(a.name if a.name in modules else "__init__" for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("ckpt_avg"):
            parts = (node.module or "").split(".")
            if len(parts) > 1:
                found.add(parts[1])
            else:
                found.update(a.name if a.name in modules else "__init__" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("ckpt_avg."))
        assert not (isinstance(node, ast.ImportFrom) and node.level > 1), "no module sits below the package"
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {path.stem for path in PACKAGE.glob("*.py")}
    graph = {}
    for name in sorted(modules):
        tree = ast.parse((PACKAGE / f"{name}.py").read_text(encoding="utf-8"))
        graph[name] = {m for m in _imported(tree, modules) if m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One circle of imports (a list of modules, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = 1
        path.append(module)
        for target in sorted(graph.get(module, ())):
            if state.get(target) == 1:
                return [*path[path.index(target) :], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        path.pop()
        state[module] = 2
        return None

    for module in sorted(graph):
        if module not in state and (cycle := visit(module)) is not None:
            return cycle
    return None


def test_the_finder_sees_a_circle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_deferred_and_type_checking_imports() -> None:
    graph = import_graph()
    assert "inspect_cli" in graph["cli"]  # imported inside entry()
    assert "options" in graph["__init__"]  # imported under TYPE_CHECKING
    assert graph["_version"] == set()


def test_no_import_circles() -> None:
    graph = import_graph()
    for source, target in PENDING:
        assert target in graph[source], f"{source} no longer imports {target}: remove it from PENDING"
        graph[source].discard(target)
    assert find_cycle(graph) is None, f"import circle: {' -> '.join(find_cycle(graph) or [])}"


def test_the_commands_share_options_without_importing_each_other() -> None:
    graph = import_graph()
    for command in ("cli", "inspect_cli", "verify_cli"):
        assert graph[command] & {"cli", "inspect_cli", "verify_cli"} <= (
            {"inspect_cli", "verify_cli"} if command == "cli" else set()
        )
        assert "cli_options" in graph[command]


def test_subprocess_tests_run_this_tree() -> None:
    """A test that starts the tool starts `sys.executable -m ckpt_avg` (the tree under test),
    never whatever `ckpt-avg` the PATH finds."""
    found = []
    for path in sorted(Path(__file__).parent.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in _STARTERS:
                program = node.args[0] if node.args else None
                if isinstance(program, ast.List) and program.elts:
                    first = program.elts[0]
                    if isinstance(first, ast.Constant) and "ckpt" in str(first.value):
                        found.append(f"{path.name}:{node.lineno}")
    assert found == []


_STARTERS = {"run", "Popen", "check_output", "check_call", "call"}
