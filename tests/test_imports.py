"""No import cycles inside preftune, counting imports inside functions too.

Importing every module one after another cannot see a cycle that function-local imports hide (the second
import simply finds the first module done). So this reads the source instead: every `import` statement of
every module, at any depth, resolved to the preftune modules it names, then a search for a cycle in that graph.
"""

from __future__ import annotations

import ast
import importlib
import pkgutil
from pathlib import Path

import pytest

import preftune

PACKAGE = "preftune"


def module_files(root: Path, package: str) -> dict[str, Path]:
    """{dotted module name: source file} of every module under `root` (a package's __init__ is the package)."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join([package, *parts])] = path
    return found


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that `name` (the module in `path`) imports, anywhere in its body."""
    is_package = path.name == "__init__.py"
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                # `from .x import y` in a.b.c means a.b.x; in the package a.b itself it means a.b.x too.
                anchor = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            # `from pkg import mod` imports the submodule pkg.mod; `from mod import func` imports mod.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            # `import a.b.c` also runs a and a.b, but those are packages of a.b.c; the edge that matters is a.b.c.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


def import_graph(root: Path, package: str) -> dict[str, set[str]]:
    files = module_files(root, package)
    return {name: imported_modules(name, path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle as [a, b, ..., a], or None. Depth-first search with the path on a stack."""
    state: dict[str, int] = {}  # 1: on the current path, 2: finished

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt, path)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start, [])):
            return cycle
    return None


def test_no_import_cycles():
    graph = import_graph(Path(preftune.__file__).parent, PACKAGE)
    assert "preftune.losses" in graph and len(graph) > 30
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_check_sees_cycles_hidden_in_functions(tmp_path):
    root = tmp_path / "pkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("")
    (root / "a.py").write_text("from .sub import b\n")
    (root / "sub" / "b.py").write_text("def f():\n    from ..c import g\n")
    (root / "c.py").write_text("import os\n\ndef g():\n    from . import a\n")
    (root / "d.py").write_text("from pkg.sub.b import f\n")
    graph = import_graph(root, "pkg")
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.c"] == {"pkg.a"}
    assert graph["pkg.d"] == {"pkg.sub.b"}
    assert find_cycle(graph) == ["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]
    (root / "c.py").write_text("def g():\n    pass\n")
    assert find_cycle(import_graph(root, "pkg")) is None


def test_every_module_imports():
    """No import-time side effect that fails (a missing optional package imported at module level, say)."""
    names = [m.name for m in pkgutil.walk_packages(preftune.__path__, prefix="preftune.")]
    assert "preftune.losses" in names
    for name in names:
        if name != "preftune.__main__":
            importlib.import_module(name)


def test_the_command_line_starts_without_torch_and_the_api_loads_on_use():
    """`preftune.cli` (what the `preftune` script imports before main runs) brings no torch, so an interrupt while
    starting reaches main's one-line handler; the API names load on first use."""
    import subprocess
    import sys

    code = ("import sys; import preftune.cli; light = 'torch' not in sys.modules; "
            "from preftune import train, TrainResult; print(light, 'torch' in sys.modules, train.__module__)")
    env = {**__import__("os").environ, "PYTHONPATH": str(Path(preftune.__file__).parents[1])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["True", "True", "preftune.api"], out.stderr
    assert "train" in dir(preftune)
    code = "import preftune; print(preftune.reward.load_reward_model.__module__, preftune.training.__name__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.stdout.split() == ["preftune.reward", "preftune.training"], out.stderr
    with pytest.raises(AttributeError, match="has no attribute 'trian'"):
        preftune.trian  # noqa: B018
