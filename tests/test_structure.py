"""The package's layering: no module imports, at its top level, a module that imports it back (directly or
through others), and every module imports on its own in a fresh interpreter."""
import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "fedlora"


def module_name(path: Path, src: Path = SRC) -> str:
    parts = path.relative_to(src).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path, modules: set[str], src: Path = SRC) -> set[str]:
    """The package's modules this file imports when it is imported (not inside functions or TYPE_CHECKING)."""
    name = module_name(path, src)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            submodules = {f"{base}.{a.name}" for a in node.names} & modules
            found |= submodules
            if len(submodules) < len(node.names):  # names defined in `base` itself
                found.add(base)
    return {m for m in found if m in modules and m != name}


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: top_level_imports(path, set(files)) for name, path in files.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A chain of imports that leads back to where it started, or None."""
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                found = visit(nxt, path + [nxt])
                if found:
                    return found
        state[node] = 2
        return None

    for name in sorted(graph):
        if name not in state:
            found = visit(name, [name])
            if found:
                return found
    return None


def test_no_module_imports_itself_back():
    graph = import_graph()
    assert len(graph) > 40
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_finds_a_cycle(tmp_path):
    """The cycle check above can fail: two modules that import each other are reported."""
    pkg = tmp_path / "src" / "fedlora"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from .b import x\n")
    (pkg / "b.py").write_text("from . import a\nx = 1\n")
    files = {module_name(p, tmp_path / "src"): p for p in pkg.rglob("*.py")}
    graph = {n: top_level_imports(p, set(files), tmp_path / "src") for n, p in files.items()}
    assert graph == {"fedlora": set(), "fedlora.a": {"fedlora.b"}, "fedlora.b": {"fedlora.a"}}
    assert find_cycle(graph) in (["fedlora.a", "fedlora.b", "fedlora.a"], ["fedlora.b", "fedlora.a", "fedlora.b"])


@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_interpreter():
    names = sorted(name for name in import_graph() if not name.endswith("__main__"))  # a script runs on import
    script = ("import importlib, subprocess, sys\n"
              "failed = []\n"
              f"for name in {names!r}:\n"
              "    r = subprocess.run([sys.executable, '-c', f'import {name}'], capture_output=True, text=True)\n"
              "    if r.returncode: failed.append((name, r.stderr.strip().splitlines()[-1]))\n"
              "print(failed)\n"
              "sys.exit(1 if failed else 0)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
