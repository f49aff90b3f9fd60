"""The layout's rules, checked: dependencies point one way, no import circle, files and functions stay small.

    serve -> learn -> feedback: feedback imports nothing from learn or serve, learn nothing from
    serve; no module imports torch, transformers, peft or vllm at import time in serve or
    feedback; no module imports itself back through others; no file over MAX_LINES.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("feedback", "learn", "serve")
MAY_IMPORT = {"feedback": set(), "learn": {"feedback"}, "serve": {"feedback", "learn"}}
HEAVY = ("torch", "transformers", "peft", "vllm", "trl", "bitsandbytes")
MAX_LINES = 420  # "about 400"


def modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            out[name] = path
    return out


def imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    """Absolute module names `path` imports (inside functions too, unless top_level_only)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


@pytest.mark.parametrize("package", PACKAGES)
def test_dependencies_point_one_way(package):
    wrong = []
    for name, path in modules().items():
        if name.split(".")[0] != package:
            continue
        for imported in imports(path):
            top = imported.split(".")[0]
            if top in PACKAGES and top != package and top not in MAY_IMPORT[package]:
                wrong.append(f"{name} imports {imported}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("package", ("feedback", "serve"))
def test_no_heavy_import_at_import_time(package):
    wrong = [f"{name} imports {imp} at import time" for name, path in modules().items() if name.startswith(package)
             for imp in imports(path, top_level_only=True) if imp.split(".")[0] in HEAVY]
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    names = modules()
    graph = {name: {imp for imp in imports(path, top_level_only=True) if imp in names} for name, path in names.items()}
    done: set[str] = set()

    def visit(name: str, stack: list[str]) -> None:
        if name in stack:
            raise AssertionError("import circle: " + " -> ".join(stack[stack.index(name):] + [name]))
        if name in done:
            return
        for imported in graph[name]:
            visit(imported, stack + [name])
        done.add(name)

    for name in graph:
        visit(name, [])


def test_no_file_is_over_about_400_lines():
    files = [p for d in (*PACKAGES, "tests", "bench") for p in (ROOT / d).rglob("*.py")]
    long = [f"{p.relative_to(ROOT)}: {n} lines" for p in files if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, "\n".join(long)


def test_every_module_opens_with_a_docstring():
    missing = [str(p.relative_to(ROOT)) for p in modules().values()
               if p.read_text().strip() and ast.get_docstring(ast.parse(p.read_text())) is None]
    assert not missing, "\n".join(missing)


MAX_FUNCTION_LINES = 65  # "about 60"
LONG_ON_PURPOSE = {"learn.train.train"}  # the training loop reads top to bottom in one function


def test_no_function_is_over_about_60_lines():
    long = []
    for name, path in modules().items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > MAX_FUNCTION_LINES and f"{name}.{node.name}" not in LONG_ON_PURPOSE:
                    long.append(f"{name}.{node.name}: {lines} lines")
    assert not long, "\n".join(long)
