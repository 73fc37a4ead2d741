"""The package's import graph, read from its source with ``ast`` (every import statement, the ones inside
functions included, relative imports resolved): no import cycle between modules, and every import goes
to the same or a lower layer (docs/architecture.md draws the layers)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = "zsq"

#: layer of each module, by the longest matching dotted prefix: a module imports only from its own layer or
#: a lower one
LAYERS: dict[str, int] = {
    # 0: leaves that know nothing of models or quantization
    "zsq._version": 0, "zsq.errors": 0, "zsq.paths": 0, "zsq.progress": 0, "zsq.registry": 0,
    "zsq.interrupt": 0, "zsq.ops": 0, "zsq.hardware": 0,
    "zsq.train": 0,  # the training loops' shared parts: step seeds, lr schedules, checkpoint / resume
    "zsq.config": 0,  # the one converter of setting values, Setting, the Config base of the config dataclasses
    "zsq.record": 0,  # the QuantizedModel record a model carries (load_model, apply_protocol, the methods, quantize)
    # 1: the vocabulary (specs, the recipe / quantizer registries and their types) and the parts
    "zsq.spec": 1, "zsq.recipes": 1,
    "zsq.models": 1, "zsq.data": 1, "zsq.quant": 1,
    # 2: the methods: synthesizers, PTQ, QAT, generator games (each registers its synthesizers / quantizers)
    "zsq.synth": 2, "zsq.ptq": 2, "zsq.qat": 2, "zsq.gen": 2,
    "zsq.distributed": 2,  # data-parallel ranks of the QAT engine (shares the synthetic set: synth.base)
    # 3: the recipe catalogue: every recipe declared, everything registered from one package import
    "zsq.catalogue": 3,
    "zsq.settings": 3,  # every quantizer's --set keys, types and choices: reads the configs of layer 2
    # 4: orchestration of the flow
    "zsq.api": 4,
    # 5: what a person or a script calls
    "zsq": 5, "zsq.__main__": 5, "zsq.cli": 5, "zsq.export": 5, "zsq.report": 5, "zsq.bench": 5,
    "zsq.views": 5,
}

#: deliberate exceptions (importer, imported), at most two; each says why
ALLOWED: dict[tuple[str, str], str] = {}


def _modules() -> dict[str, Path]:
    mods = {}
    for path in sorted((SRC / PKG).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = path
    return mods


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def import_graph() -> dict[str, dict[str, int]]:
    """``{module: {imported module: line}}`` over the modules of the package (external imports dropped)."""
    mods = _modules()
    graph: dict[str, dict[str, int]] = {}
    for name, path in mods.items():
        edges: dict[str, int] = {}
        package = name if _is_package(path) else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base_parts = package.split(".")
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                # `from pkg import name`: the submodule pkg.name when there is one, else pkg itself
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in mods]
                targets = subs if len(subs) == len(node.names) else [base, *subs]
            for t in targets:
                # `import zsq.a.b` names zsq.a.b; keep the deepest module of the package it names
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name and (t == PKG or t.startswith(PKG + ".")):
                    edges.setdefault(t, node.lineno)
        graph[name] = edges
    return graph


def layer(module: str) -> int:
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        key = ".".join(parts[:i])
        if key in LAYERS:
            return LAYERS[key]
    raise KeyError(module)


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, {}):
            if (v, w) in ALLOWED:
                continue
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


def test_graph_is_read():
    g = import_graph()
    assert len(g) > 50
    # a function-level relative import is seen (api imports the catalogue, cli imports api lazily or not)
    assert "zsq.recipes" in g["zsq.api"]
    assert "zsq.catalogue" in g["zsq.api"]


def test_every_module_has_a_layer():
    missing = [m for m in import_graph() if not any(m == k or m.startswith(k + ".") for k in LAYERS)]
    assert not missing, f"give these modules a layer in LAYERS: {missing}"


def test_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_imports_follow_the_layers():
    bad = []
    for mod, edges in import_graph().items():
        for target, line in edges.items():
            if layer(target) > layer(mod) and (mod, target) not in ALLOWED:
                bad.append(f"{mod} (layer {layer(mod)}) imports {target} (layer {layer(target)}) at line {line}")
    assert not bad, "imports from a higher layer:\n" + "\n".join(bad)


def test_exceptions_are_few_and_real():
    assert len(ALLOWED) <= 2
    g = import_graph()
    for a, b in ALLOWED:
        assert b in g[a], f"ALLOWED names {a} -> {b}, which no longer exists: drop it"


@pytest.mark.parametrize("src,expect", [
    ("from . import x", {"p.x"}), ("from .x import y", {"p.x"}), ("from .. import q", {"q"}),
    ("import p.x", {"p.x"}),
])
def test_resolution(tmp_path, monkeypatch, src, expect):
    """Relative imports resolve against the importing module's package (a throwaway package p in q)."""
    pkg = tmp_path / PKG
    (pkg / "p").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "q.py").write_text("")
    (pkg / "p" / "__init__.py").write_text("")
    (pkg / "p" / "x.py").write_text("y = 1\n")
    (pkg / "p" / "m.py").write_text("def f():\n    " + src.replace("import p.x", f"import {PKG}.p.x") + "\n")
    monkeypatch.setattr(__import__(__name__), "SRC", tmp_path)
    assert set(import_graph()[f"{PKG}.p.m"]) == {f"{PKG}.{e}" for e in expect}
