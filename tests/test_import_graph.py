"""The package's import graph: every module imports on its own, and no module reaches itself through imports.

Edges are every ``import`` / ``from ... import`` statement of the package's own modules, function-level ones
included (an import deferred into a function still ties the two modules together). A cycle means two modules
cannot be understood, tested or changed apart: data flows one way (data -> batch -> model -> objectives ->
engine -> logs), and the composition roots (``assembly``, ``finetune.runner``, ``run``) sit on top.
"""
import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import mvptr_ds

ROOT = Path(mvptr_ds.__file__).resolve().parent


def modules():
    names = ["mvptr_ds"]
    names += [m.name for m in pkgutil.walk_packages([str(ROOT)], prefix="mvptr_ds.")]
    return sorted(names)


def source_path(name: str) -> Path:
    rel = Path(*name.split(".")[1:])
    package = ROOT / rel / "__init__.py"
    return package if package.is_file() else (ROOT / rel).with_suffix(".py")


def imported(name: str, known) -> set:
    """The package modules ``name`` imports (anywhere in its source)."""
    path = source_path(name)
    tree = ast.parse(path.read_text(), str(path))
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                base = base[:len(base) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # "import a.b.c" of a non-module attribute: its module
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def cycles(graph):
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


@pytest.mark.parametrize("name", modules())
def test_every_module_imports(name):
    importlib.import_module(name)


def test_no_import_cycle():
    known = set(modules())
    graph = {name: imported(name, known) for name in known}
    assert cycles(graph) == []


def test_training_never_imports_the_composition_roots():
    known = set(modules())
    roots = {"mvptr_ds.assembly", "mvptr_ds.run", "mvptr_ds.finetune.runner"}
    for name in sorted(n for n in known if n.startswith("mvptr_ds.training")):
        assert not imported(name, known) & roots, name


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
