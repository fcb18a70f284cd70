"""The layout: no import circle anywhere, imports that run one way between the packages, and every public name
that the README and the tests use still importable.

Imports are read from the source (``ast``), function-level ones included, so a lazy import cannot hide a
circle. A module's edge goes to the module it names (``from ..model.dpbert import DPBert`` -> ``dpbert_rl.model.dpbert``;
``from . import oracle`` -> ``dpbert_rl.pathtree.oracle``); the parent packages that Python imports on the way are
not edges.
"""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dpbert_rl", "envs", "agents")

# Inside dpbert_rl, each group may import only the groups listed for it (and itself). The direction the
# README's "Layout" gives: plumbing <- model <- pathtree <- evaluation <- training / baselines <- cli.
ALLOWED = {
    "plumbing": set(),
    "model": {"plumbing"},
    "pathtree": {"plumbing", "model"},
    "evaluation": {"plumbing", "model", "pathtree"},
    "training": {"plumbing", "model", "pathtree", "evaluation"},
    "baselines": {"plumbing", "model", "pathtree", "evaluation"},
    "cli": {"plumbing", "model", "pathtree", "evaluation", "training", "baselines"},
    "root": {"model"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict:
    """Every module of the three packages: name -> (path, is_package)."""
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            out[module_name(path)] = (path, path.name == "__init__.py")
    return out


def import_graph(mods: dict) -> dict:
    """name -> set of project modules it imports (anywhere in the file)."""
    graph = {}
    for name, (path, is_pkg) in mods.items():
        package = name if is_pkg else name.rpartition(".")[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - (node.level - 1)]
                    stem = ".".join(base + ([node.module] if node.module else []))
                else:
                    stem = node.module
                # `from pkg import sub` names a submodule when one exists, else a name in pkg
                targets = [f"{stem}.{a.name}" if f"{stem}.{a.name}" in mods else stem for a in node.names]
            else:
                continue
            for t in targets:
                while t and t not in mods:  # `import dpbert_rl.model.dpbert as x` style, or a name's module
                    t = t.rpartition(".")[0]
                if t and t != name:
                    edges.add(t)
        graph[name] = edges
    return graph


def find_cycle(graph: dict):
    """One import circle as a list of modules, or None (depth-first search, colours)."""
    state, stack = {}, []

    def visit(n):
        state[n] = "open"
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open":
                return stack[stack.index(m):] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = "done"
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def group(name: str) -> str:
    parts = name.split(".")
    if parts[0] != "dpbert_rl":
        return parts[0]
    if len(parts) == 1:
        return "root"
    return parts[1] if parts[1] in ALLOWED else "plumbing"  # checks, data


def test_no_import_circle():
    cycle = find_cycle(import_graph(modules()))
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_a_circle():
    """The check above can fail: a two-module circle and a longer one are found, a tree is not."""
    assert find_cycle({"a": {"b"}, "b": {"a"}}) in (["a", "b", "a"], ["b", "a", "b"])
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph(modules())
    # a function-level import (train_stage's lazy accelerate import is external; the CLI's are all lazy)
    assert "dpbert_rl.training" in graph["dpbert_rl.cli"]
    assert "dpbert_rl.model.backbone" in graph["dpbert_rl.model.dpbert"]  # `from .backbone import ...`
    assert "dpbert_rl.checks" in graph["dpbert_rl.model.dpbert"]  # `from ..checks import ...`


def test_imports_run_one_way():
    graph = import_graph(modules())
    wrong = []
    for name, edges in graph.items():
        g = group(name)
        for target in edges:
            t = group(target)
            if g in ALLOWED and t in ALLOWED and t != g and t not in ALLOWED[g]:
                wrong.append(f"{name} ({g}) imports {target} ({t})")
            if name.startswith("dpbert_rl") and not target.startswith("dpbert_rl"):
                wrong.append(f"{name} imports {target}: dpbert_rl imports neither envs nor agents")
            if g == "envs" and t == "agents":
                wrong.append(f"{name} imports {target}: envs never imports agents")
    assert not wrong, "\n".join(sorted(wrong))


def test_public_names_used_by_the_readme_and_the_tests_import(monkeypatch):
    """Every ``from dpbert_rl... import a, b`` and ``from envs/agents... import`` in the README's code and in the
    tests and benchmarks resolves."""
    import sys

    # tests that run the benchmark scripts put benchmarks/ first on the path, where agents.py would shadow the
    # agents package: import the packages as installed
    monkeypatch.setattr(sys, "path", [p for p in sys.path if Path(p).resolve() != ROOT / "benchmarks"])
    for name in list(sys.modules):
        if name.split(".")[0] in PACKAGES and not hasattr(sys.modules[name.split(".")[0]], "__path__"):
            monkeypatch.delitem(sys.modules, name)
    texts = [ROOT / "README.md", *(ROOT / "tests").glob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
    pattern = re.compile(r"^\s*from ((?:dpbert_rl|envs|agents)[\w.]*) import \(?([\w, \n]+?)\)?\s*(?:#.*)?$", re.M)
    missing = []
    seen = 0
    for path in texts:
        for mod, names in pattern.findall(path.read_text()):
            module = importlib.import_module(mod)
            for n in (x.strip().split(" as ")[0] for x in names.replace("\n", " ").split(",")):
                if n:
                    seen += 1
                    if not hasattr(module, n) and not _is_submodule(mod, n):
                        missing.append(f"{path.name}: from {mod} import {n}")
    assert seen > 100, f"only {seen} imported names found: the pattern no longer reads the files"
    assert not missing, "\n".join(missing)


def _is_submodule(mod: str, name: str) -> bool:
    try:
        importlib.import_module(f"{mod}.{name}")
        return True
    except ImportError:
        return False


def test_a_model_that_imports_training_is_caught():
    """The real graph with one import added (model -> training, as the old pathtree <-> train pair was): a
    circle and a wrong direction."""
    graph = import_graph(modules())
    graph["dpbert_rl.model.dpbert"] = graph["dpbert_rl.model.dpbert"] | {"dpbert_rl.training.stages"}
    assert find_cycle(graph) is not None
    assert group("dpbert_rl.training.stages") not in ALLOWED[group("dpbert_rl.model.dpbert")]
