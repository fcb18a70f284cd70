"""A hash of the code one benchmark method runs, so that its results can be reused across commits that did
not change it (issue 23: "re-run only what the new code changes"). The settings a run was given and the
machine it ran on are not code: the trade-off benchmark compares them separately before reusing results.

:func:`code_files` starts from the method's runner function (``tradeoff_methods.RUNNERS[name]``) and
follows every name its code uses: functions and classes of the same benchmark module (their source text),
the module's settings it reads (plain data such as ``TASK_SETTINGS``: their value), ``dpbert_rl`` functions,
classes and modules (their files), and from those files every ``dpbert_rl`` import,
to a fixed point. :func:`method_code_hash` is the SHA-256 of those sources and files. What every method
shares (the benchmark's ``TaskRun``: data, scoring, timing) is part of every method's hash.

It is conservative where it cannot see: a whole ``dpbert_rl`` package counts when the code uses the package
(``ee.train_berxit`` with ``ee = dpbert_rl.baselines``), and any change in a file counts, comments included.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "dpbert_rl"


def _code_objects(code: types.CodeType):
    yield code
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            yield from _code_objects(c)


def _module_files(module: types.ModuleType) -> set:
    f = Path(getattr(module, "__file__", "") or "")
    if not f.is_file() or PACKAGE not in f.resolve().parents:
        return set()
    if f.name == "__init__.py":  # a package: all of it
        return {p.resolve() for p in f.parent.rglob("*.py")}
    return {f.resolve()}


def _imports(file: Path) -> set:
    """The ``dpbert_rl`` files ``file`` imports (absolute or relative, at any level of the file)."""
    out = set()
    tree = ast.parse(file.read_text())
    pkg = file.parent
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg
                for _ in range(node.level - 1):
                    base = base.parent
                parts = node.module.split(".") if node.module else []
            elif node.module and node.module.split(".")[0] == "dpbert_rl":
                base, parts = ROOT, node.module.split(".")
            else:
                continue
            target = base.joinpath(*parts)
            candidates = [target.with_suffix(".py"), target / "__init__.py"]
            candidates += [target / f"{a.name}.py" for a in node.names] + [target / a.name / "__init__.py"
                                                                           for a in node.names]
            out |= {c.resolve() for c in candidates if c.is_file()}
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "dpbert_rl":
                    target = ROOT.joinpath(*a.name.split("."))
                    out |= {c.resolve() for c in (target.with_suffix(".py"), target / "__init__.py") if c.is_file()}
    return out


def code_files(fn) -> tuple:
    """``(sources, files)``: the source texts of the benchmark-module functions and classes ``fn`` reaches, and
    the ``dpbert_rl`` files it depends on (closed over their imports)."""
    home = fn.__module__
    sources, files, seen = {}, set(), set()
    todo = [fn]
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if inspect.isclass(obj):
            sources[f"{obj.__module__}.{obj.__qualname__}"] = inspect.getsource(obj)
            todo += [m for m in vars(obj).values() if inspect.isfunction(m)]
            todo += [p.fget for p in vars(obj).values() if isinstance(p, property) and p.fget]
            continue
        if not inspect.isfunction(obj):
            continue
        if obj.__module__ == home:
            try:
                sources.setdefault(f"{obj.__module__}.{obj.__qualname__}", inspect.getsource(obj))
            except OSError:  # generated (a dataclass's __init__): its class's source is hashed
                pass
        g = obj.__globals__
        for code in _code_objects(obj.__code__):
            for name in code.co_names:
                target = g.get(name)
                if target is None:
                    continue
                if isinstance(target, types.ModuleType):
                    files |= _module_files(target)
                elif inspect.isfunction(target) or inspect.isclass(target):
                    target = inspect.unwrap(target)  # a decorated function: its own file, not the decorator's
                    if target.__module__ == home:
                        todo.append(target)
                    elif target.__module__.split(".")[0] == "dpbert_rl":
                        f = Path(inspect.getsourcefile(target)).resolve()
                        if PACKAGE in f.parents:
                            files.add(f)
                elif target.__class__.__module__ == "builtins" and not callable(target):
                    # a setting of the benchmark module the code reads (TASK_SETTINGS, a constant)
                    sources.setdefault(f"{home}.{name} =", repr(target))
    frontier = set(files)
    while frontier:
        new = set().union(*(_imports(f) for f in frontier)) - files
        files |= new
        frontier = new
    return sources, files


def method_code_hash(fn, shared=()) -> str:
    """SHA-256 over the code ``fn`` (a method's runner) and ``shared`` (functions or classes every method runs)
    reach: see :func:`code_files`."""
    sources, files = code_files(fn)
    for s in shared:
        more_sources, more_files = code_files(s)
        sources.update(more_sources)
        files |= more_files
    h = hashlib.sha256()
    for name in sorted(sources):
        h.update(f"source {name}\n{sources[name]}\n".encode())
    for f in sorted(files):
        h.update(f"file {f.relative_to(ROOT)}\n".encode() + f.read_bytes() + b"\n")
    return h.hexdigest()
