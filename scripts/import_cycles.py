#!/usr/bin/env python3
"""List import circles between the modules of fusefs.

Reads ``fusefs/**/*.py`` with ``ast`` (nothing is imported). An edge A -> B is an import of
B that A executes at runtime: at module level or inside a function (a function-level import
still ties the modules together, it only postpones the circle). Imports under
``if TYPE_CHECKING:`` are listed separately and do not count. ``from pkg import name`` is an
import of ``pkg.name`` when that is a module, else of ``pkg``. Importing ``a.b.c`` also runs
``a/__init__`` and ``a/b/__init__``, which count as edges too, except a module's own parent
packages: they have run before it (``from . import sibling`` is no edge to the package,
``from . import name_its_init_defines`` is one).

Prints each strongly connected component of more than one module (modules that import each
other, directly or around a loop) and one shortest cycle through it. Exits 1 if there is a
circle. ``--edges`` also prints every runtime edge; ``--as-written`` reads
``from pkg import module`` as an import of ``pkg`` (see ``AS_WRITTEN``).
"""

from __future__ import annotations

import ast
import sys
from collections import deque
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "fusefs"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_type_checking(test: ast.expr) -> bool:
    if isinstance(test, ast.Name):
        return test.id == "TYPE_CHECKING"
    return isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"


def imports(tree: ast.Module, module: str, is_pkg: bool) -> tuple[set[str], set[str]]:
    """(runtime, TYPE_CHECKING-only) imported names of one module.

    A name is ``dotted.module`` or, for ``from prefix import name``, ``prefix.name|prefix``.
    """
    runtime: set[str] = set()
    typing_only: set[str] = set()

    def visit(node: ast.AST, typing: bool) -> None:
        if isinstance(node, ast.If) and is_type_checking(node.test):
            for child in node.body:
                visit(child, True)
            for child in node.orelse:
                visit(child, typing)
            return
        target = typing_only if typing else runtime
        if isinstance(node, ast.Import):
            for alias in node.names:
                target.add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")
                if not is_pkg:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            for alias in node.names:
                target.add(f"{prefix}.{alias.name}|{prefix}")
        for child in ast.iter_child_nodes(node):
            visit(child, typing)

    visit(tree, False)
    return runtime, typing_only


#: ``--as-written``: read ``from pkg import name`` as an import of ``pkg`` even when ``name`` is
#: a module (what simple tools do): then ``from . import sibling`` ties a module to its package.
AS_WRITTEN = False


def resolve(name: str, modules: set[str]) -> tuple[set[str], set[str]]:
    """(the fusefs module a name imports, the parent packages importing it runs)."""
    if "|" in name:
        full, prefix = name.split("|")
        name = full if full in modules and not AS_WRITTEN else prefix
    if name not in modules:
        return set(), set()
    parts = name.split(".")
    return {name}, {".".join(parts[:i]) for i in range(1, len(parts))} & modules


def graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """(runtime edges, TYPE_CHECKING-only edges) per module."""
    files = sorted((ROOT / PACKAGE).rglob("*.py"))
    modules = {module_name(f) for f in files}
    runtime: dict[str, set[str]] = {}
    typing_only: dict[str, set[str]] = {}
    for f in files:
        mod = module_name(f)
        run, typ = imports(ast.parse(f.read_text(), str(f)), mod, f.name == "__init__.py")
        own_parents = {".".join(mod.split(".")[:i]) for i in range(1, mod.count(".") + 1)}
        edges: set[str] = set()
        for n in run:
            named, implied = resolve(n, modules)
            edges |= named | (implied - own_parents)
        runtime[mod] = edges - {mod}
        typed = {m for n in typ for m in resolve(n, modules)[0]}
        typing_only[mod] = typed - runtime[mod] - {mod}
    return runtime, typing_only


def components(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def shortest_cycle(edges: dict[str, set[str]], comp: list[str]) -> list[str]:
    """A shortest cycle inside one component (breadth-first from each module)."""
    inside = set(comp)
    best: list[str] = []
    for start in comp:
        prev: dict[str, str] = {}
        queue = deque([start])
        while queue:
            v = queue.popleft()
            if start in edges[v]:
                path = [v]
                while path[-1] != start:
                    path.append(prev[path[-1]])
                cycle = [*reversed(path), start]
                if not best or len(cycle) < len(best):
                    best = cycle
                break
            for w in sorted(edges[v] & inside):
                if w not in prev and w != start:
                    prev[w] = v
                    queue.append(w)
    return best


def main() -> int:
    global AS_WRITTEN
    AS_WRITTEN = "--as-written" in sys.argv
    runtime, typing_only = graph()
    if "--edges" in sys.argv:
        for mod in sorted(runtime):
            for dep in sorted(runtime[mod]):
                print(f"edge {mod} -> {dep}")
    comps = components(runtime)
    for comp in comps:
        print(f"circle of {len(comp)}: {', '.join(comp)}")
        print("  e.g. " + " -> ".join(shortest_cycle(runtime, comp)))
    typed = sorted((m, d) for m, ds in typing_only.items() for d in ds)
    print(f"TYPE_CHECKING-only imports (not counted): {len(typed)}")
    for mod, dep in typed:
        print(f"  {mod} -> {dep}")
    edges = sum(len(v) for v in runtime.values())
    print(f"{len(runtime)} modules, {edges} runtime imports, {len(comps)} circle(s)")
    return 1 if comps else 0


if __name__ == "__main__":
    sys.exit(main())
