"""The package layout is the system diagram: ``algorithm/`` (the paper's math) depends on neither Ray
nor DeepSpeed, and no module of the package imports itself back through others."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "minillm_rl"
DISTRIBUTED = ("ray", "deepspeed")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path) -> list[str]:
    """Every module ``name`` imports, anywhere in the file (also inside functions), except under
    ``if TYPE_CHECKING:`` (never executed); ``from a import b`` counts ``a.b`` when it is a module."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = {id(node) for block in ast.walk(tree)
               if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test)
               for statement in block.body for node in ast.walk(statement)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            found += [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    return found


def test_algorithm_imports_neither_ray_nor_deepspeed():
    """Statically (every import statement in ``algorithm/``, function bodies included), and at run
    time: importing every ``algorithm`` module loads neither package, through any dependency."""
    algorithm = [name for name in MODULES if name.startswith("minillm_rl.algorithm")]
    assert len(algorithm) > 5, algorithm
    offending = [(name, imported) for name in algorithm for imported in _imports(name, MODULES[name])
                 if imported.split(".")[0] in DISTRIBUTED]
    assert not offending, offending
    script = (f"import importlib, sys\nfor name in {algorithm!r}:\n    importlib.import_module(name)\n"
              f"print(sorted(m for m in sys.modules if m.split('.')[0] in {DISTRIBUTED!r}))")
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (a path returning to its start), or ``None``."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph[node]):
            if state.get(target) == 1:
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_circle_in_the_package():
    """A module's imports (function-level ones too) never lead back to it. A package's
    ``__init__`` is counted only for what it imports itself, not as importing its submodules."""
    graph = {name: {imported for imported in _imports(name, path) if imported in MODULES and imported != name}
             for name, path in MODULES.items()}
    assert sum(map(len, graph.values())) > 50  # the parse sees the package's imports
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None
