"""The house: every folder is one layer and imports point down only, with no cycles; function-local imports
are only for what must stay lazy. Read from the sources with `ast`, so the rule holds for code paths no
test runs. `python -m tests.test_layers` prints the import graph by layer."""

from __future__ import annotations

import ast
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# folder -> import package (pyproject's package-dir mapping)
FOLDERS = {"effx": "effx", "plugins": "effx.plugins", "models": "effx.models", "exporter": "effx.exporter",
           "targets": "effx.targets"}
# lowest first: a module may import its own layer and the layers below it
LAYERS = [
    ("core", ("effx", "effx.core")),
    ("plugins", ("effx.plugins",)),
    ("models", ("effx.models",)),
    ("exporter", ("effx.exporter",)),
    ("targets", ("effx.targets",)),
    ("check", ("effx.check",)),
    ("pipeline/cli", ("effx.pipeline", "effx.cli", "effx.__main__", "effx.matrix")),
]
# effx modules imported inside a function: only the CLI's API (so `effx --help` does not load torch)
LOCAL_EFFX_IMPORTS_MAX = 15


def modules() -> dict[str, Path]:
    out = {}
    for folder, package in FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([package, *parts])] = path
    return out


def layer_of(module: str) -> int:
    best, depth = None, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > depth and not (p == "effx" and module != p):
                best, depth = i, len(p)
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS"
    return best


def _resolve(node: ast.AST, known: set[str]) -> list[str]:
    """The effx modules an import statement loads (the most specific known module per imported name)."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    else:
        assert node.level == 0, "effx uses absolute imports"
        names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        names = [n for n in names if n in known] or [node.module]
        names = names[:-1] if len(names) > 1 and names[-1] == node.module else names
    out = []
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name.startswith("effx"):
            out.append(name)
    return out


def imports() -> tuple[dict[str, set[str]], list[tuple[str, int, str]]]:
    """(module -> effx modules it imports, [(module, line, imported) for imports inside functions])."""
    known = set(modules())
    graph: dict[str, set[str]] = defaultdict(set)
    local: list[tuple[str, int, str]] = []
    for module, path in modules().items():
        tree = ast.parse(path.read_text())
        inside = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                  for n in ast.walk(f)}
        for node in ast.walk(tree):
            if not isinstance(node, (ast.Import, ast.ImportFrom)):
                continue
            targets = _resolve(node, known)
            for target in targets:
                if not module.startswith(target + ".") and target != module:  # a package above: implicit
                    graph[module].add(target)
            if id(node) in inside:
                names = targets or ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module])
                local += [(module, node.lineno, n) for n in names]
        for node in ast.walk(tree):  # importlib.import_module("effx....") counts as an import too
            if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == \
                    "import_module" and node.args and "effx" in ast.unparse(node.args[0]):
                local.append((module, node.lineno, ast.unparse(node.args[0])))
    return graph, local


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    found, state, stack = [], {}, []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:
                found.append(stack[stack.index(n):] + [n])
            elif n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    return found


def test_imports_point_down_a_layer_or_stay_in_it():
    graph, _ = imports()
    upward = [f"{a} ({LAYERS[layer_of(a)][0]}) imports {b} ({LAYERS[layer_of(b)][0]})"
              for a, targets in graph.items() for b in targets if layer_of(b) > layer_of(a)]
    assert not upward, "\n".join(upward)


def test_no_import_cycles():
    found = cycles(imports()[0])
    assert not found, "\n".join(" -> ".join(c) for c in found)


def test_core_imports_nothing_else_of_effx():
    graph, _ = imports()
    for module, targets in graph.items():
        if layer_of(module) == 0:
            assert all(layer_of(t) == 0 for t in targets), (module, targets)


def test_function_local_imports_are_only_what_must_stay_lazy():
    """Heavy optional dependencies go through effx.core.lazy.lazy_import (not an import statement); effx's
    own modules are imported locally only by the CLI (so `effx --help` does not load torch)."""
    _, local = imports()
    effx_local = [x for x in local if x[2].startswith("effx")]
    others = [x for x in local if not x[2].startswith("effx")]
    assert not others, f"import these at module level, or through lazy_import if optional: {others}"
    assert len(effx_local) <= LOCAL_EFFX_IMPORTS_MAX, effx_local
    assert {m for m, _, _ in effx_local} <= {"effx.cli"}, effx_local


def test_top_level_folders_are_not_packages_of_their_own(tmp_path):
    """With the checkout's root on sys.path (as under pytest), `plugins` is not a second copy of effx.plugins."""
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r})\nimport effx.plugins\n"
            "for name in ('plugins.local', 'models', 'exporter', 'targets.profiles'):\n"
            "    try:\n        __import__(name)\n        print('IMPORTED', name)\n"
            "    except ImportError as exc:\n        print('REFUSED', name, exc)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert [ln.split()[0] for ln in lines] == ["REFUSED"] * 4, lines
    assert "import effx.plugins" in lines[0] and "registered twice" not in proc.stdout


def test_every_module_says_what_it_is_for():
    missing = [m for m, path in modules().items() if not ast.get_docstring(ast.parse(path.read_text()))]
    assert not missing, missing


def summary() -> str:
    graph, local = imports()
    by_layer: dict[int, Counter] = defaultdict(Counter)
    count = Counter(layer_of(m) for m in modules())
    for a, targets in graph.items():
        for b in targets:
            by_layer[layer_of(a)][LAYERS[layer_of(b)][0]] += 1
    lines = [f"{len(modules())} modules, {sum(len(t) for t in graph.values())} effx imports, "
             f"{len(cycles(graph))} cycles, function-local effx imports: {len(local)}"]
    for i, (name, _) in enumerate(LAYERS):
        lines.append(f"  {i} {name:<13} {count[i]:>3} modules -> " +
                     ", ".join(f"{k} {v}" for k, v in sorted(by_layer[i].items(), key=lambda kv: -kv[1])))
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary())
