"""What the commands share: a jsonargparse parser with ``--config FILE``, options built from a
dataclass's typed fields and their docstrings, the model options, and how a command's errors reach
the user (one line, an exit code).

Every option is shown with dashes (``--base-lr``); where a name has underscores the underscore
spelling (``--base_lr``) is accepted too, and not listed. A config file's keys are the names with
underscores, as ``--print_config`` writes them and as a run folder's ``config.yaml`` holds them.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from collections.abc import Callable, Mapping
from typing import Any, get_args, get_origin

from jsonargparse import (
    ActionConfigFile,
    ActionYesNo,
    ArgumentParser,
    DefaultHelpFormatter,
    set_parsing_settings,
)

from oneword.errors import OneWordError

# the field docstrings of the dataclasses are their options' help
set_parsing_settings(docstring_parse_attribute_docstrings=True)

# Command-line names that differ from the field names (the contract of `ti invert`).
_RENAMES = {"num_vectors": "vectors"}

CONFIG_HELP = (
    "YAML file of options, keyed by the names with underscores (e.g. a run folder's config.yaml, or "
    "what --print_config writes); options after it override it"
)


class HelpFormatter(DefaultHelpFormatter):
    """argparse's layout with ``(default: X)`` or ``(required)`` after each option's help, unless
    the help already says its default in words."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if isinstance(action, (ActionConfigFile, argparse._HelpAction)) or not action.option_strings:
            return text
        if "default:" in text or "(required)" in text or isinstance(action, argparse._StoreTrueAction):
            return text
        if action.required:
            return f"{text} (required)"
        if action.default in (None, "", []) or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def accept_also(parser: ArgumentParser, action: argparse.Action, *spellings: str) -> None:
    """Let ``parser`` accept other spellings of an option without listing them in ``--help``."""
    for spelling in spellings:
        parser._option_string_actions[spelling] = action  # argparse looks options up here


class Parser(ArgumentParser):
    """jsonargparse's parser where an option named with dashes (``--base-lr``) also accepts its
    underscore spelling (``--base_lr``), unlisted, and ``type=bool`` gives ``--NAME`` /
    ``--no-NAME``."""

    def add_argument(self, *names: str, **kwargs: Any) -> argparse.Action:
        if kwargs.get("type") is bool:
            del kwargs["type"]
            kwargs.setdefault("default", False)
            kwargs["action"] = ActionYesNo(no_prefix="no-")
        action = super().add_argument(*names, **kwargs)
        for name in names:
            if name.startswith("--") and "-" in name[2:]:
                accept_also(self, action, "--" + name[2:].replace("-", "_"))
                if isinstance(action, ActionYesNo):
                    accept_also(self, action, "--no-" + name[2:].replace("-", "_"))
        return action


def new_parser(prog: str | None = None, description: str | None = None, **kwargs: Any) -> Parser:
    """A command's parser, with ``--config FILE`` (and jsonargparse's ``--print_config``)."""
    parser = Parser(prog=prog, description=description, formatter_class=HelpFormatter, **kwargs)
    parser.add_argument("--config", action=ActionConfigFile, help=CONFIG_HELP)
    # jsonargparse adds --print_config with --config; its help is worded here (it varies by version)
    parser._option_string_actions["--print_config"].help = (
        "print the settings the other options give, as a --config file, and exit "
        "(--print_config=skip_default leaves out the defaults)"
    )
    return parser


def group_parser(
    prog: str,
    description: str,
    commands: Mapping[str, tuple[str, Callable[[str], ArgumentParser]]],
    attach: Callable[[ArgumentParser], None] | None = None,
) -> Parser:
    """A parser whose subcommands are ``commands`` (name -> (help, build(prog))); the parsed
    subcommand's name is ``args.subcommand`` and its options ``args[name]``. A group that is
    itself a subcommand is attached to its parent (``attach``) before its own subcommands are
    added, as jsonargparse requires."""
    parser = Parser(prog=prog, description=description, formatter_class=HelpFormatter)
    if attach is not None:
        attach(parser)
    subcommands = parser.add_subcommands(required=True, dest="subcommand")
    for name, (text, build) in commands.items():
        sub = build(f"{prog} {name}")
        subcommands.add_subcommand(name, sub, help=text)
        sub.prog = f"{prog} {name}"  # jsonargparse's would read "ti [options] toy [options] render"
    return parser


def field_help(cls: type) -> dict[str, str]:
    """The help jsonargparse makes of each field of a dataclass (its attribute docstring)."""
    scratch = ArgumentParser()
    scratch.add_class_arguments(cls, nested_key=None, fail_untyped=False)
    return {a.dest: " ".join(a.help.split()) for a in scratch._actions if a.help and a.dest != "help"}


def add_dataclass_options(
    parser: ArgumentParser,
    cls: type,
    skip: frozenset[str] = frozenset(),
    required: frozenset[str] = frozenset(),
    defaults: Mapping[str, Any] | None = None,
    helps: Mapping[str, str] | None = None,
) -> None:
    """One typed ``--option`` per field of ``cls``, its docstring as help; ``defaults`` replaces
    some fields' defaults for this command (e.g. a refinement's rate) and ``helps`` some fields'
    help (where a field means something else in this command). Lists take one or more values
    (``--preview-seeds 0 1``), booleans ``--flag`` / ``--no-flag``."""
    docs = {**field_help(cls), **(helps or {})}
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        name = _RENAMES.get(f.name, f.name)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        if defaults and f.name in defaults:
            default = defaults[f.name]
        kind = hints[f.name]
        kwargs: dict[str, Any] = {"dest": f.name, "help": docs.get(f.name, "")}
        if f.name in required:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        if get_origin(kind) is list:
            kwargs.update(nargs="+", type=get_args(kind)[0])
        elif get_origin(kind) is tuple:
            kwargs.update(nargs=len(get_args(kind)), type=get_args(kind)[0])
        else:
            kwargs["type"] = kind
        action = parser.add_argument(f"--{name.replace('_', '-')}", **kwargs)
        if name != f.name:
            accept_also(parser, action, f"--{f.name}")


def model_options(p: ArgumentParser, required: bool = True) -> None:
    p.add_argument(
        "--model",
        required=required,
        help="sd15, sd21, sdxl, toy, tiny-sd1/tiny-sd2/tiny-sdxl, a diffusers folder, "
        "a .safetensors checkpoint or a Hugging Face hub id",
    )
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")


def progress_option(p: ArgumentParser) -> None:
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def run_reporting_errors(command, args: Any) -> int:
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
