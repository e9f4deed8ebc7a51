"""The `transformer` command line: a thin layer over the library.

One grammar: ``transformer TASK VERB [flags]``, TASK one of ``translation``, ``lm``, ``mlm``;
translation is the default task, so ``transformer train|translate|evaluate|attention|quickstart``
mean ``transformer translation VERB``. ``params``, ``average`` and ``plot`` work on any
model or run. Every flag is declared once (`transformer.cli.flags`); training commands
also read a TOML ``--config`` file, which the command line overrides. A `UserError` from
the library is printed as one line on stderr with exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from transformer.cli import lm, mlm, tools, translation
from transformer.errors import UserError

TASKS = {"translation": translation, "lm": lm, "mlm": mlm}
TRANSLATION_VERBS = ("train", "translate", "evaluate", "attention", "quickstart")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="transformer",
        description="The Transformer of 'Attention Is All You Need': train, translate, evaluate, inspect.",
        epilog=f"{', '.join(TRANSLATION_VERBS)} are short for `transformer translation VERB`.",
    )
    sub = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    helps = {
        "translation": "Translation (the default task): train, translate, evaluate, attention, quickstart.",
        "lm": "GPT-style decoder-only language model: train on a text file, sample from it.",
        "mlm": "BERT-style encoder-only masked language model: train on sentences, fill in [MASK].",
    }
    for name, module in TASKS.items():
        p = sub.add_parser(name, help=helps[name], description=helps[name])
        module.register(p.add_subparsers(dest="verb", required=True, metavar="VERB"))
    tools.register(sub)
    return parser


def _config_defaults(parser: argparse.ArgumentParser, path: str) -> dict:
    """The flags of a TOML --config file as defaults of `parser`; `UserError` naming the file and the key."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    from transformer.text.data import read_text

    try:
        values = tomllib.loads(read_text(path))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: not valid TOML ({e})") from None
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    defaults = {}
    for key, value in values.items():
        dest = key.removeprefix("--").replace("-", "_")
        action = actions.get(dest)
        if action is None or dest in ("config", "help", "resume"):
            raise UserError(f"{path}: {key}: not a flag of this command")
        if isinstance(action, (argparse._StoreTrueAction, argparse.BooleanOptionalAction)) != isinstance(value, bool):
            raise UserError(f"{path}: {key}: {value!r} is not a value of --{dest.replace('_', '-')}")
        if action.type is not None and not isinstance(value, bool):
            try:
                value = action.type(value)
            except (TypeError, ValueError):
                raise UserError(f"{path}: {key}: {value!r} is not a value of --{dest.replace('_', '-')}") from None
        if action.choices is not None and value not in action.choices:
            raise UserError(f"{path}: {key}: {value!r}: choose one of {', '.join(map(str, action.choices))}")
        defaults[dest] = value
    return defaults


def parse(argv: list[str]) -> argparse.Namespace:
    """The command's arguments: --config's values, then the command line's over them."""
    if argv and argv[0] in TRANSLATION_VERBS:
        argv = ["translation", *argv]
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "config", None):
        args.parser.set_defaults(**_config_defaults(args.parser, args.config))
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    name = "transformer"
    try:
        args = parse(argv)
        name = args.parser.prog
        args.func(args)
    except UserError as e:
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout left (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 141
    return 0


if __name__ == "__main__":
    sys.exit(main())
