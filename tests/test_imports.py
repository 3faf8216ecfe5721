"""The import graph among surgery's own modules has no cycle, function-level imports included.

Read from the source with `ast` (nothing is imported), so a cycle that only a rarely taken
branch would close is found too. An edge is each module a statement names: `from .errors import
X` is an edge to surgery.errors, `from .engines import archive` to surgery.engines.archive, and
`from . import __version__` to the package surgery itself (its __init__). The parent packages
Python initialises before any submodule are not edges: every module would then depend on
surgery/__init__.py.
"""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "surgery"


def _modules(root: Path) -> dict[str, Path]:
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module name -> the surgery modules it imports anywhere in its text."""
    modules = _modules(root)
    top = root.name
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name == top or alias.name.startswith(top + "."):
                        edges.add(_known(alias.name, modules))
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    source = ".".join(base + ([node.module] if node.module else []))
                elif node.module and (node.module == top or node.module.startswith(top + ".")):
                    source = node.module
                else:
                    continue
                for alias in node.names:
                    child = f"{source}.{alias.name}"
                    edges.add(child if child in modules else _known(source, modules))
        edges.discard(name)
        graph[name] = edges
    return graph


def _known(name: str, modules: dict) -> str:
    while name not in modules and "." in name:
        name = name.rpartition(".")[0]
    return name


def find_cycle(graph: dict[str, set[str]]):
    """One cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node):
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state:
            found = visit(start)
            if found:
                return found
    return None


def test_surgery_modules_import_each_other_without_a_cycle():
    graph = import_graph()
    assert "surgery.parse" in graph and "surgery.engines.live" in graph
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


@pytest.mark.parametrize("files,cycle", [
    # module level
    ({"__init__.py": "", "a.py": "from .b import x\n", "b.py": "from .a import y\n"},
     ["surgery.a", "surgery.b", "surgery.a"]),
    # closed by an import inside a function, through a subpackage
    ({"__init__.py": "", "a.py": "def f():\n    from .sub import c\n",
      "sub/__init__.py": "", "sub/c.py": "from .. import a\n"},
     ["surgery.a", "surgery.sub.c", "surgery.a"]),
    # through the package's own __init__
    ({"__init__.py": "from .a import f\n", "a.py": "def f():\n    from . import __version__\n"},
     ["surgery", "surgery.a", "surgery"]),
    # absolute imports count too
    ({"__init__.py": "", "a.py": "import surgery.b\n", "b.py": "from surgery import a\n"},
     ["surgery.a", "surgery.b", "surgery.a"]),
])
def test_the_check_finds_a_cycle(tmp_path, files, cycle):
    root = _write(tmp_path / "surgery", files)
    assert find_cycle(import_graph(root)) == cycle


def test_the_check_passes_a_tree_without_a_cycle(tmp_path):
    root = _write(tmp_path / "surgery", {
        "__init__.py": "from .a import f\n", "a.py": "from .b import g\ndef f():\n    from . import b\n",
        "b.py": "import os\ng = 1\n"})
    assert find_cycle(import_graph(root)) is None
