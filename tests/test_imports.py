"""The import graph of mftcore: no cycles, and every import points down the layers below (imports inside
functions included). `python -m tests.test_imports` prints the graph by layer."""

import ast
import os
import sys

from tests.helpers.paths import ROOT

# Bottom first. A module may import from its own layer (if that makes no cycle) or any layer below.
LAYERS = [
    # kernels import nothing of mftcore: other trainers embed them
    ("errors", "io", "integrity", "outputs", "_packing", "kernels", "sandbox", "yamlconfig", "quiet"),
    ("mftcoder", "data"),
    ("model",),
    ("loss", "weighting", "trackers", "metrics", "memory", "optim", "parallel"),
    ("config", "evaluate", "checkpoint"),
    ("train", "commands", "codeeval"),  # codeeval generates through commands/generate.py
    ("cli", "__main__", "__init__"),
]


def layer_of(module: str) -> int:
    top = module.split(".")[1] if "." in module else "__init__"
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module}: not in any layer of tests/test_imports.py")


def module_files() -> dict:
    """mftcore module name -> file (the package's own files, kernels through their links)."""
    out = {}
    base = os.path.join(ROOT, "mftcore")
    for root, _, names in os.walk(base):
        for name in names:
            if name.endswith(".so"):  # a compiled extension: imported, imports nothing
                out["mftcore." + name.split(".")[0]] = None
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, name), ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__") if rel != "mftcore.__init__" else "mftcore"] = os.path.join(root, name)
    return out


def imports_of(module: str, path: str, known: set) -> set:
    """The mftcore modules `module` imports anywhere in its file (a `from x import name` of a submodule
    counts as that submodule)."""
    tree = ast.parse(open(path, encoding="utf-8").read())
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name != module and name != "mftcore":
                found.add(name)
    return found


def import_graph() -> dict:
    files = module_files()
    return {m: imports_of(m, p, set(files)) if p else set() for m, p in files.items()}


def cycles(graph: dict) -> list:
    """Every strongly connected group of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_imports_point_down():
    graph = import_graph()
    upward = [f"{m} -> {d}" for m, deps in graph.items() for d in deps if layer_of(d) > layer_of(m)]
    assert upward == []


def test_kernels_import_nothing_of_mftcore():
    graph = import_graph()
    outside = [f"{m} -> {d}" for m, deps in graph.items() if m.startswith("mftcore.kernels")
               for d in deps if not d.startswith("mftcore.kernels")]
    assert outside == []


if __name__ == "__main__":
    graph = import_graph()
    for i, names in enumerate(LAYERS):
        print(f"layer {i}: {', '.join(names)}")
        for m in sorted(m for m in graph if layer_of(m) == i):
            deps = sorted(d.removeprefix("mftcore.") for d in graph[m])
            print(f"  {m.removeprefix('mftcore.') or 'mftcore'} -> {', '.join(deps) or '-'}")
