"""No import cycles in iit_fast (issue 21), checked two ways, each with a negative control:

- statically: the graph of every import of an iit_fast module by another (at the top of a module or inside
  a function: a lazy import that closes a cycle is a cycle all the same) has no cycle;
- dynamically: a fresh interpreter imports every iit_fast module in a random order (the seed is in the
  failure message) without error: a cycle of top-level imports fails there with a partially initialised
  module, whichever module of it comes first.
"""
from __future__ import annotations

import ast
import random
import subprocess
import sys
import textwrap
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "iit_fast"


def module_files(package: Path) -> dict[str, tuple[Path, bool]]:
    """{dotted module name: (file, is a package's __init__)} of every .py file under `package`."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def import_graph(package: Path) -> dict[str, dict[str, list[int]]]:
    """{module: {module of the package it imports: [line numbers]}}, every import statement counted."""
    mods = module_files(package)
    graph: dict[str, dict[str, list[int]]] = {m: {} for m in mods}
    for mod, (path, is_pkg) in mods.items():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                if node.level:  # relative: from the module's package, `level - 1` packages up
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[:len(base) - (node.level - 1)]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module
                # `from pkg import sub` imports the submodule sub; `from mod import name`, the module mod
                names = [f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                while name not in mods and "." in name:  # `import pkg.mod.attr` -> the deepest module
                    name = name.rsplit(".", 1)[0]
                if name in mods and name != mod:
                    graph[mod].setdefault(name, []).append(node.lineno)
    return graph


def cycles(graph: dict[str, dict[str, list[int]]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []
    for root in graph:
        if root in index:
            continue
        work = [(root, iter(graph[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            v, children = work[-1]
            w = next(children, None)
            if w is not None:
                if w not in index:
                    index[w] = low[w] = len(index)
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(graph[w])))
                elif w in on_stack:
                    low[v] = min(low[v], index[w])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[v])
            if low[v] == index[v]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == v:
                        break
                if len(comp) > 1:
                    found.append(sorted(comp))
    return found


def describe(graph, comp: list[str]) -> str:
    return "; ".join(f"{a} -> {b} (line {graph[a][b][0]})" for a in comp for b in graph[a] if b in comp)


def import_all_fresh(package: Path, seed: int) -> subprocess.CompletedProcess:
    """A fresh interpreter importing every module of `package` in an order shuffled by `seed`."""
    names = sorted(module_files(package))
    random.Random(seed).shuffle(names)
    code = f"import importlib, sys\nsys.path.insert(0, {str(package.parent)!r})\n" \
           f"for name in {names!r}:\n    importlib.import_module(name)\n"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)


def test_no_import_cycle_in_iit_fast():
    graph = import_graph(PACKAGE)
    assert len(graph) > 40 and "iit_fast.models.intervenable" in graph
    assert graph["iit_fast.models.load"]  # the graph sees imports (of registry, intervenable)
    found = cycles(graph)
    assert not found, "import cycles: " + " | ".join(describe(graph, c) for c in found)


def test_every_module_imports_in_a_fresh_interpreter_in_a_random_order():
    seed = random.randrange(2**32)
    run = import_all_fresh(PACKAGE, seed)
    assert run.returncode == 0, f"seed {seed}: {run.stderr[-3000:]}"


def _cyclic_package(root: Path, lazy: bool) -> Path:
    """A package whose modules a and b import each other (b lazily, inside a function, when `lazy`)."""
    pkg = root / "cyc"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import g\n\n\ndef f():\n    return 1\n")
    b = "def g():\n    from .a import f\n    return f()\n" if lazy else "from .a import f\n\n\ndef g():\n    return f()\n"
    (pkg / "b.py").write_text(textwrap.dedent(b))
    (pkg / "c.py").write_text("from . import a\n")  # outside the cycle
    return pkg


def test_negative_control_a_lazy_cycle_is_found(tmp_path):
    graph = import_graph(_cyclic_package(tmp_path, lazy=True))
    assert cycles(graph) == [["cyc.a", "cyc.b"]]
    assert describe(graph, ["cyc.a", "cyc.b"]) == "cyc.a -> cyc.b (line 1); cyc.b -> cyc.a (line 2)"


def test_negative_control_a_top_level_cycle_fails_the_fresh_import(tmp_path):
    pkg = _cyclic_package(tmp_path, lazy=False)
    assert cycles(import_graph(pkg)) == [["cyc.a", "cyc.b"]]
    run = import_all_fresh(pkg, 0)
    assert run.returncode != 0 and "partially initialized module" in run.stderr
