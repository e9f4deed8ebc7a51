"""The `transformer` command line: a thin layer over the library.

One grammar: ``transformer TASK VERB [flags]``, TASK one of ``translation``, ``lm``, ``mlm``, ``classify``, ``vit``,
``caption``;
translation is the default task, so ``transformer preprocess|train|translate|evaluate|attention|quickstart|serve``
mean ``transformer translation VERB``. ``params``, ``average``, ``plot`` and ``export`` work on any
model or run. Every flag is declared once (`transformer.cli.flags`); training commands
also read a TOML ``--config`` file, which the command line overrides. Every number is checked
against its range when the arguments are parsed, a --config file's values too. A `UserError` from
the library, a mistake in the arguments, and an `OSError` are printed as one line on stderr with
exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from transformer.cli import caption, classify, export, flags, lm, mlm, tools, translation, vit
from transformer.cli.common import ArgumentsError, Parser, one_line
from transformer.errors import Error, UserError

TASKS = {"translation": translation, "lm": lm, "mlm": mlm, "classify": classify, "vit": vit, "caption": caption}
TRANSLATION_VERBS = ("preprocess", "train", "translate", "evaluate", "attention", "quickstart", "serve")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="transformer",
        description="The Transformer of 'Attention Is All You Need': train, translate, evaluate, inspect.",
        epilog=f"{', '.join(TRANSLATION_VERBS)} are short for `transformer translation VERB`.",
    )
    sub = parser.add_subparsers(dest="task", required=True, metavar="TASK")
    helps = {
        "translation": "Translation (the default task): preprocess, train, translate, evaluate, attention, quickstart, serve.",
        "lm": "GPT-style decoder-only language model: train on a text file, sample from it.",
        "mlm": "BERT-style encoder-only masked language model: train on sentences, fill in [MASK].",
        "classify": "Fine-tune a masked language model to label texts or text pairs: train, predict, evaluate.",
        "vit": "Vision Transformer: classify images (a folder, or a bundled set); predict, attention.",
        "caption": "Image to text: a ViT and a Q-Former or Flamingo bridge to a frozen LM; generate, attention.",
    }
    for name, module in TASKS.items():
        p = sub.add_parser(name, help=helps[name], description=helps[name])
        module.register(p.add_subparsers(dest="verb", required=True, metavar="VERB"))
    tools.register(sub)
    export.register(sub)
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
            except argparse.ArgumentTypeError as e:  # out of range: "-10: must be >= 0"
                raise UserError(f"{path}: {key}: {e}") from None
        elif action.nargs != 0 and not isinstance(value, str):  # a flag that takes text (a path, a name)
            raise UserError(f"{path}: {key}: {value!r} is not a value of --{dest.replace('_', '-')} (give a string)")
        if action.choices is not None and value not in action.choices:
            raise UserError(f"{path}: {key}: {value!r}: choose one of {', '.join(map(str, action.choices))}")
        defaults[dest] = value
    return defaults


def parse(argv: list[str]) -> argparse.Namespace:
    """The command's arguments: --config's values, then the command line's over them."""
    if argv and argv[0] in TRANSLATION_VERBS:
        argv = ["translation", *argv]
    parser = build_parser()
    args = _parse_args(parser, argv)
    config: dict = {}
    if getattr(args, "config", None):
        try:
            config = _config_defaults(args.parser, args.config)
        except ArgumentsError:
            raise
        except UserError as e:
            raise ArgumentsError(args.parser.prog, str(e)) from None
    # A --recipe's values under --config's, both under the command line's.
    recipe = getattr(args, "recipe", None) or config.get("recipe")
    defaults = {**(args.recipes[recipe] if recipe else {}), **config}
    if defaults:
        args.parser.set_defaults(**defaults)
        args = _parse_args(parser, argv)
    return args


def _parse_args(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """`parser.parse_args`, with an unknown argument reported by the command it was given to."""
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        raise ArgumentsError(args.parser.prog, f"unrecognized arguments: {' '.join(unknown)}")
    for action in args.parser._actions:  # argparse (before 3.12) takes `--flag=--` as an empty list
        if action.option_strings and action.nargs is None and isinstance(getattr(args, action.dest, None), list):
            raise ArgumentsError(args.parser.prog, f"{action.option_strings[0]}: expected one argument")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    name = "transformer"
    try:
        args = parse(argv)
        name = args.parser.prog
        args.func(args)
    except ArgumentsError as e:
        print(f"{e.prog}: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except Error as e:  # the library's one-line errors (UserError)
        print(f"{name}: error: {one_line(flags.as_flags(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # the reader of stdout left (`| head`): stop quietly, as Unix tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 141
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"{name}: error: out of memory, ask for less (a smaller --batch-size, --beam, --max-tokens or "
              f"model): {one_line(message)}", file=sys.stderr)
        return 2
    except OSError as e:  # a file or folder the library did not expect to fail (disk full, permissions)
        where = f"{e.filename}: " if e.filename is not None else ""
        print(f"{name}: error: {one_line(where + (e.strerror or str(e)))}", file=sys.stderr)
        return 2
    return 0


def _out_of_memory(e: BaseException) -> bool:
    """Whether `e` says that memory ran out (torch's CPU allocator, a CUDA GPU, or Python itself)."""
    return (isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in str(e) or "out of memory" in str(e).lower())


if __name__ == "__main__":
    sys.exit(main())
