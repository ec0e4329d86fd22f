"""Code structure rules (read from the source with `ast`, nothing imported): no import cycle between the project's
modules (function-level imports count), `sharding/` knows meshes and not models, no private name imported across
modules, functions short enough to read (kernel bodies included; benchmarks excepted), and experiment scripts that run
from any directory."""

from __future__ import annotations

import ast
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGES = ("dsjax", "pallas_kernels", "sharding", "experiments")
MAX_FUNCTION_LINES = 80


def modules() -> dict[str, str]:
    """module name -> file path for every .py file of the packages."""
    out = {}
    for pkg in PACKAGES:
        for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
            for f in files:
                if f.endswith(".py"):
                    path = os.path.join(dirpath, f)
                    name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                    out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def imports(path: str, name: str, known) -> list[tuple[str, str | None, int]]:
    """(imported project module, imported name or None, line) for every import in the file, at any depth."""
    tree = ast.parse(open(path).read(), path)
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] not in PACKAGES:
                continue
            for a in node.names:
                sub = f"{base}.{a.name}"
                out.append((sub, None, node.lineno) if sub in known else (base, a.name, node.lineno))
    return out


def graph():
    mods = modules()
    edges = {m: set() for m in mods}
    for m, path in mods.items():
        for target, _, _ in imports(path, m, mods):
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != m and not m.startswith(target + "."):  # a package's own __init__ is no edge
                edges[m].add(target)
    return mods, edges


def cycles(edges) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in edges[v]:
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

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert cycles(graph()[1]) == []


def test_sharding_knows_meshes_not_models():
    mods, edges = graph()
    bad = {
        m: sorted(t for t in targets if t.startswith("dsjax."))
        for m, targets in edges.items()
        if m.startswith("sharding")
    }
    assert not any(bad.values()), bad


def test_no_private_names_imported_across_modules():
    mods = modules()
    bad = [
        f"{os.path.relpath(path, ROOT)}:{line} imports {target}.{name}"
        for m, path in mods.items()
        for target, name, line in imports(path, m, mods)
        if name is not None and name.startswith("_") and not name.startswith("__")
    ]
    assert bad == []


@pytest.mark.parametrize("pkg", PACKAGES)
def test_functions_are_short(pkg):
    long = []
    for dirpath, _, files in os.walk(os.path.join(ROOT, pkg)):
        for f in files:
            path = os.path.join(dirpath, f)
            rel = os.path.relpath(path, ROOT)
            if not f.endswith(".py") or f.startswith("bench_"):  # benchmarks are scripts
                continue
            for node in ast.walk(ast.parse(open(path).read(), path)):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    n = node.end_lineno - node.lineno + 1
                    if n > MAX_FUNCTION_LINES:
                        long.append(f"{rel}:{node.lineno} {node.name} ({n} lines)")
    assert long == []


def test_experiment_scripts_run_from_anywhere():
    """A script under experiments/ that imports experiments.* puts the repository root on sys.path first: the
    package install (pip install -e .) holds dsjax, pallas_kernels and sharding, not experiments, so without it
    `python3 experiments/<script>.py` fails with ModuleNotFoundError outside the root (or without PYTHONPATH)."""
    bad = []
    for name in sorted(os.listdir(os.path.join(ROOT, "experiments"))):
        path = os.path.join(ROOT, "experiments", name)
        if not name.endswith(".py"):
            continue
        tree = ast.parse(open(path).read())
        is_script = any(isinstance(n, ast.If) and "__main__" in ast.unparse(n.test) for n in tree.body)
        first_import = min(
            (
                n.lineno
                for n in ast.walk(tree)
                if isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "experiments"
            ),
            default=None,
        )
        inserts = [
            n.lineno
            for n in tree.body
            if isinstance(n, ast.Expr) and ast.unparse(n.value).startswith("sys.path.insert(0,")
        ]
        if is_script and first_import is not None and not (inserts and inserts[0] < first_import):
            bad.append(name)
    assert bad == []


def test_real_gpu_fp8_tests_run_on_the_gpu_backend():
    """FP8_TEST_REAL_GPU=1 (the FP8 kernel tests compiled, not interpreted) makes the tests' default platform the
    GPU's; an explicit JAX_PLATFORMS still wins. Checked in a subprocess: conftest sets the environment on import."""
    code = "import os, tests.conftest; print(os.environ['JAX_PLATFORMS'])"
    for extra, want in (({}, "cuda"), ({"JAX_PLATFORMS": "cpu"}, "cpu")):
        env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"} | {"FP8_TEST_REAL_GPU": "1", **extra}
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.split()[-1] == want
