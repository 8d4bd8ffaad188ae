"""The shape of the code: the runtime (launcher/) knows no stage, and its modules import each
other without cycles (a cycle is how a 3000-line trainer starts: two modules that can only
change together)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STAGES = ("pretrain", "finetune")


def imports(path: Path, top_level_only: bool = False) -> set[str]:
    """Modules ``path`` imports (``from x import y`` gives x), skipping ``if TYPE_CHECKING``
    blocks; with ``top_level_only``, not those inside functions (they run later: no cycle)."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inner = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
            counted = not (top_level_only and in_function)
            if isinstance(child, ast.Import) and counted:
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and child.module and counted:
                found.add(child.module)  # and `from launcher import persist`: a module too
                found.update(f"{child.module}.{alias.name}" for alias in child.names)
            visit(child, inner)

    visit(tree, False)
    return found


def test_the_runtime_imports_no_stage():
    offenders = {
        str(path.relative_to(REPO)): sorted(m for m in imports(path) if m.split(".")[0] in STAGES)
        for path in sorted((REPO / "launcher").rglob("*.py"))
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_the_runtime_modules_import_each_other_without_cycles():
    modules = {
        "launcher."
        + path.relative_to(REPO / "launcher").with_suffix("").as_posix().replace("/", "."): path
        for path in (REPO / "launcher").rglob("*.py")
    }
    graph = {
        name: {m for m in imports(path, top_level_only=True) if m in modules and m != name}
        for name, path in modules.items()
    }
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def cycle_from(name: str, path: list[str]) -> list[str] | None:
        state[name] = 1
        for dep in sorted(graph[name]):
            if state.get(dep) == 1:
                return [*path, name, dep]
            if dep not in state and (found := cycle_from(dep, [*path, name])):
                return found
        state[name] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            assert cycle_from(name, []) is None
