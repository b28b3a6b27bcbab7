"""The package's structure: no module imports one of a higher layer, and no library module imports a
command line. Every import counts, including those inside functions."""

from __future__ import annotations

import ast
from pathlib import Path

import oneword

ROOT = Path(oneword.__file__).parent

# Lowest first. A module may import its own layer and those below it, never one above.
LAYERS: list[tuple[str, ...]] = [
    ("errors", "fileio"),
    ("trainstate", "tokenizer", "imagegrid", "provenance"),
    ("models",),
    ("data", "sampling", "tiny"),
    ("inversion",),
    ("generate",),
    ("toy",),
    ("eval",),
    ("encoder",),
    ("batch", "serve"),
    ("cli",),
]
# The command lines: the top layer, whatever folder they live in.
COMMAND_LINES = {"cli", "encoder.encode", "eval.cli"}


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _layer(module: str) -> int:
    if module in COMMAND_LINES or module.startswith("cli."):
        return len(LAYERS) - 1
    top = module.split(".")[0]
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"oneword.{module} is in no layer of tests/test_structure.py: place it")


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("oneword"):
            base = node.module.removeprefix("oneword").lstrip(".")
            for alias in node.names:  # `from oneword import toy` imports a module
                sub = f"{base}.{alias.name}" if base else alias.name
                found.add(
                    sub
                    if (ROOT / sub.replace(".", "/")).exists()
                    or (ROOT / f"{sub.replace('.', '/')}.py").exists()
                    else base
                )
        elif isinstance(node, ast.Import):
            found |= {a.name.removeprefix("oneword.") for a in node.names if a.name.startswith("oneword.")}
    return {m for m in found if m}


def test_no_module_imports_a_higher_layer_or_a_command_line():
    wrong = []
    for path in sorted(ROOT.rglob("*.py")):
        me = _module(path)
        if not me:
            continue
        for target in _imports(path):
            if _layer(target) > _layer(me):
                wrong.append(f"oneword.{me} imports oneword.{target}")
            elif _layer(target) == len(LAYERS) - 1 and me not in COMMAND_LINES and not me.startswith("cli"):
                wrong.append(f"oneword.{me} imports the command line oneword.{target}")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle_between_modules():
    graph = {_module(p): {t for t in _imports(p)} for p in ROOT.rglob("*.py") if _module(p)}
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                circles.append(" -> ".join([*stack[stack.index(nxt) :], nxt]))
            elif nxt in graph and not state.get(nxt):
                visit(nxt, [*stack, nxt])
        state[node] = 2

    for node in sorted(graph):
        if not state.get(node):
            visit(node, [node])
    assert not circles, "\n".join(circles)
