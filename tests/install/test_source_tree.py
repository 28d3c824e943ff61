"""The source tree keeps the shape a maintainer relies on: no import cycles between the project's
modules, every PPX_* switch read in `engine/switches.py` alone, and a README for users."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("engine", "frontends", "voices", "benchmarks")


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for p in (ROOT / pkg).rglob("*.py"):
            name = ".".join(p.relative_to(ROOT).with_suffix("").parts)
            mods[name.removesuffix(".__init__")] = p
    return mods


def _imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Module -> the project modules it imports, anywhere in its body (function-level too)."""
    def owner(name: str) -> str | None:
        while name and name not in mods:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
                prefix = ".".join(base + ([node.module] if node.module else []))
                targets = [f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in mods else prefix for a in node.names]
            else:
                continue
            graph[mod] |= {t for t in map(owner, targets) if t and t != mod}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _imports(_modules())
    assert graph["engine.lm"] >= {"engine.quant", "engine.kernels.products"}  # (the scan sees imports)
    assert _cycles(graph) == []


def test_the_cuda_graphs_know_nothing_of_the_engine():
    graph = _imports(_modules())
    for mod in ("engine.graphs", "engine.graphs.capture"):
        assert not {m for m in graph[mod] if m.startswith(("engine.engine", "engine.lm", "engine.kernels"))}, mod


def test_switches_are_read_in_one_module():
    readers = []
    for mod, path in _modules().items():
        text = path.read_text()
        if mod != "engine.switches" and re.search(r"environ[^\n]*[\"']PPX_|getenv\([\"']PPX_", text):
            readers.append(mod)
    assert readers == []


def test_the_readme_is_for_users():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.encode()) <= 16_000
    assert readme.lstrip().startswith("# ") and "make demo" in readme[:400] and "make test" in readme[:400]
    assert not re.search(r"\b[0-9a-f]{7,40}\b(?<!\d{7})", re.sub(r"`[^`]*`", "", readme)), "commit hashes"
