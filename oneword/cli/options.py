"""What the commands share: options generated from a dataclass's fields, the model options, and
how a command's errors reach the user (one line, an exit code)."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import sys
import typing
from collections.abc import Mapping
from typing import Any, Literal, get_args, get_origin

from oneword.errors import OneWordError

# Command-line names that differ from the field names (the contract of `ti invert`).
_RENAMES = {"num_vectors": "vectors"}


def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings (a string literal right after an annotated field) of a dataclass."""
    tree = ast.parse(inspect.getsource(cls))
    body = tree.body[0].body  # type: ignore[attr-defined]
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def add_dataclass_options(
    parser: argparse.ArgumentParser,
    cls: type,
    skip: frozenset[str] = frozenset(),
    required: frozenset[str] = frozenset(),
    defaults: Mapping[str, Any] | None = None,
    helps: Mapping[str, str] | None = None,
) -> None:
    """One ``--option`` per field, typed, with the field's docstring and default as help;
    ``defaults`` replaces some fields' defaults for this command (e.g. a refinement's rate) and
    ``helps`` some fields' help (where a field means something else in this command)."""
    docs = {**field_docs(cls), **(helps or {})}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        name = _RENAMES.get(f.name, f.name)
        dashed = name.replace("_", "-")
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if defaults and f.name in defaults:
            default = defaults[f.name]
        kind = hints[f.name]
        kwargs: dict[str, Any] = {"dest": f.name, "default": default}
        if f.name in required:
            kwargs = {"dest": f.name, "required": True}
        args = [a for a in get_args(kind) if a is not type(None)]
        if kind is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif get_origin(kind) is Literal:
            kwargs["choices"] = list(get_args(kind))
        elif get_origin(kind) is list:
            kwargs.update(nargs="+", type=get_args(kind)[0])
        elif get_origin(kind) is tuple:
            kwargs.update(nargs=len(get_args(kind)), type=get_args(kind)[0])
        else:
            kwargs["type"] = args[0] if args else kind
        suffix = " (required)" if f.name in required else f" (default: {default})"
        kwargs["help"] = f"{docs.get(f.name, '')}{suffix}".replace("%", "%%")
        parser.add_argument(f"--{dashed}", **kwargs)
        if dashed != name:  # the underscore spelling is still accepted, and not shown
            parser.add_argument(f"--{name}", **{**kwargs, "help": argparse.SUPPRESS, "required": False})


def model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        required=True,
        help="sd15, sd21, sdxl, toy, tiny-sd1/tiny-sd2/tiny-sdxl, a diffusers folder, "
        "a .safetensors checkpoint or a Hugging Face hub id",
    )
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")


def run_reporting_errors(command, args: argparse.Namespace) -> int:
    """Run a command; a :class:`OneWordError` becomes its one-line message and exit code 2,
    Ctrl-C exit code 130. Anything else is a bug and keeps its traceback."""
    try:
        return command(args)
    except OneWordError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
