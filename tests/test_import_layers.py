"""The package's import graph: no circles, and arrows only point down the layers of
ARCHITECTURE.md (demo → optimizer/preconditioner → distributed → curvature → ops/linalg →
backends, batch). Read from the source with ``ast``: every ``import`` counts, at module level or
inside a function (a lazy import is still an arrow)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import kfac_fast

PKG = Path(kfac_fast.__file__).resolve().parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _resolve(module: str, is_pkg: bool, node: ast.ImportFrom) -> list[str]:
    if node.level == 0:
        base = node.module or ""
    else:
        pkg = module.split(".") if is_pkg else module.split(".")[:-1]
        pkg = pkg[: len(pkg) - (node.level - 1)]
        base = ".".join(pkg + ([node.module] if node.module else []))
    # `from . import ops` imports the submodule kfac_fast.ops
    return [base] + [f"{base}.{a.name}" for a in node.names]


def import_graph() -> dict[str, set[str]]:
    files = {p: _module_name(p) for p in PKG.rglob("*.py")}
    modules = set(files.values())
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for path, mod in files.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                targets = _resolve(mod, path.name == "__init__.py", node)
            for t in targets:
                if t in modules and t != mod:
                    graph[mod].add(t)
    return graph


def _is_package_init(graph: dict, module: str) -> bool:
    return any(m.startswith(module + ".") for m in graph)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan), ignoring the arrows
    from a package's ``__init__`` to its own submodules (re-exports) and from a submodule to
    its parent package (which Python imports first anyway)."""
    def edges(m):
        for t in graph[m]:
            if t.startswith(m + ".") and _is_package_init(graph, m):
                continue  # package re-exports its submodule
            if m.startswith(t + ".") and _is_package_init(graph, t):
                continue  # a submodule importing its package's public names
            yield t

    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    cycles = find_cycles(import_graph())
    assert not cycles, "import circles: " + "; ".join(" ⇄ ".join(c) for c in cycles)


def test_cycle_finder_finds_a_cycle():
    g = {"p.a": {"p.b"}, "p.b": {"p.c"}, "p.c": {"p.a"}, "p.d": {"p.a"}}
    assert find_cycles(g) == [["p.a", "p.b", "p.c"]]


# Layers, top to bottom: a module may import its own layer or lower ones only.
LAYERS = [
    ("demo", ["kfac_fast.demo"]),
    ("optimizer", ["kfac_fast.optimizer", "kfac_fast.phases", "kfac_fast.preconditioner",
                   "kfac_fast.step_size", "kfac_fast.rules",
                   "kfac_fast.step_state", "kfac_fast.quadratic",
                   "kfac_fast.config", "kfac_fast.checkpoint", "kfac_fast.schedules", "kfac_fast._parts"]),
    ("distributed", ["kfac_fast.distributed"]),
    ("curvature", ["kfac_fast.curvature"]),
    ("kernels", ["kfac_fast.ops", "kfac_fast.linalg"]),
    ("foundation", ["kfac_fast.backends", "kfac_fast._native", "kfac_fast.batch"]),
]


def _layer(module: str) -> int:
    best, rank = -1, None
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, rank = len(p), i
    return rank


@pytest.mark.parametrize("layer", [name for name, _ in LAYERS])
def test_imports_point_down(layer):
    graph = import_graph()
    bad = []
    for mod, targets in graph.items():
        i = _layer(mod)
        if i is None or LAYERS[i][0] != layer:
            continue
        for t in targets:
            j = _layer(t)
            if j is not None and j < i:
                bad.append(f"{mod} -> {t}")
    assert not bad, f"imports from layer {layer!r} up the stack (see ARCHITECTURE.md): " + ", ".join(sorted(bad))
