"""What every command module of the command line shares: the parser, numbers within a range, checks of
output paths and of the optional extras before the work starts, declaring a command, and saying things."""

from __future__ import annotations

import argparse
import importlib
import math
import os
import re
import sys
import tempfile
from pathlib import Path

from transformer.errors import UserError


class ArgumentsError(UserError):
    """A mistake in the command's arguments, found by the parser `prog` (its name leads the error line)."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """argparse's parser with every parse error (bad value, unknown flag, missing argument) raised as
    `ArgumentsError`, so that `main` prints it as one line and exits 2, instead of usage and an error on two.
    A negative number in scientific notation (``--lr -1e-3``) is a value, as in Python 3.13's argparse."""

    _negative_number_matcher = re.compile(r"^-(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?$")

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = Parser._negative_number_matcher  # argparse sets its own per parser

    def error(self, message: str):
        # argparse says "argument --warmup: -10: must be >= 0"; this says "--warmup -10: must be >= 0",
        # and "--precision: invalid choice: ..." for argparse's own messages.
        m = re.fullmatch(r"argument (\S+): (.*)", message, re.DOTALL)
        if m:
            flag, rest = m.groups()
            message = f"{flag} {rest}" if _RANGE_MESSAGE.fullmatch(rest) else f"{flag}: {rest}"
        raise ArgumentsError(self.prog, message)


_RANGE_MESSAGE = re.compile(r"\S+: must be .*", re.DOTALL)  # Number's message


class Number:
    """An argparse ``type=``: an int or a float (`kind`) within bounds, each inclusive or not.

    A string that is not a number raises `ValueError` (argparse: "invalid int value: 'x'"); a number out
    of range raises `argparse.ArgumentTypeError` with the range, e.g. "-10: must be >= 0". Values from a
    TOML file (ints, floats) are taken too: an int flag takes an integral float, never a bool.
    """

    def __init__(self, kind: type, minimum: float | None = None, maximum: float | None = None, *,
                 above: bool = False, below: bool = False) -> None:
        self.kind, self.minimum, self.maximum, self.above, self.below = kind, minimum, maximum, above, below
        self.__name__ = kind.__name__  # argparse names the type in "invalid int value"

    def range(self) -> str:
        """The allowed range in words: ">= 0", "> 0 and <= 1"."""
        parts = []
        if self.minimum is not None:
            parts.append(f"{'>' if self.above else '>='} {self.minimum}")
        if self.maximum is not None:
            parts.append(f"{'<' if self.below else '<='} {self.maximum}")
        return " and ".join(parts) or "a finite number"

    def __call__(self, value):
        shown = value.strip() if isinstance(value, str) else repr(value)
        if isinstance(value, bool):
            raise TypeError("a bool is not a number")
        if isinstance(value, str):
            value = self.kind(value.strip())  # ValueError: not a number
        elif self.kind is int and isinstance(value, float) and value.is_integer():
            value = int(value)
        elif not isinstance(value, (int, float)) or (self.kind is int and not isinstance(value, int)):
            raise TypeError(f"{value!r} is not a {self.kind.__name__}")
        if self.kind is float:
            value = float(value)
            if not math.isfinite(value):
                raise argparse.ArgumentTypeError(f"{shown}: must be {self.range()}")
        low = self.minimum is not None and (value <= self.minimum if self.above else value < self.minimum)
        high = self.maximum is not None and (value >= self.maximum if self.below else value > self.maximum)
        if low or high:
            raise argparse.ArgumentTypeError(f"{shown}: must be {self.range()}")
        return value

    def __repr__(self) -> str:
        return f"{self.kind.__name__} {self.range()}"


def number(kind: type, minimum: float | None = None, maximum: float | None = None, *,
           above: bool = False, below: bool = False) -> Number:
    """`Number`: ``number(int, 1)`` is an int >= 1; ``number(float, 0, 1, below=True)`` a float in [0, 1)."""
    return Number(kind, minimum, maximum, above=above, below=below)


def _probe(folder: Path, flag: str, path) -> None:
    """`UserError` unless a file can be created in the existing folder `folder` (tried, then removed)."""
    try:
        fd, name = tempfile.mkstemp(dir=folder, prefix=".transformer-probe-")
        os.close(fd)
        os.unlink(name)
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write in {folder} ({e.strerror or e})") from None


def writable_file(path, flag: str, create_folders: bool = False) -> None:
    """`UserError` naming `flag` unless the file `path` can be written: not a folder, in an existing
    folder (or, with `create_folders`, one that can be made), which lets us write. Nothing is left behind."""
    p = Path(path)
    if p.is_dir():
        raise UserError(f"{flag} {path}: is a folder, not a file")
    if p.exists():
        try:
            with open(p, "ab"):  # opened for writing, not changed
                pass
        except OSError as e:
            raise UserError(f"{flag} {path}: cannot write ({e.strerror or e})") from None
        return
    folder = p.parent
    if not create_folders:
        if not folder.exists():
            raise UserError(f"{flag} {path}: no such folder {folder}")
        if not folder.is_dir():
            raise UserError(f"{flag} {path}: {folder} is not a folder")
        _probe(folder, flag, path)
        return
    writable_folder(folder, flag, shown=path)


def writable_folder(path, flag: str, shown=None) -> None:
    """`UserError` naming `flag` unless the folder `path` exists and lets us write, or can be made
    (its nearest existing ancestor is a folder that lets us write). Nothing is left behind."""
    shown = path if shown is None else shown
    p = Path(path)
    while not p.exists() and p != p.parent:
        if p.is_symlink():  # a dangling link: nothing can be made there
            raise UserError(f"{flag} {shown}: {p} is a broken link")
        p = p.parent
    if not p.is_dir():
        raise UserError(f"{flag} {shown}: {p} is not a folder")
    _probe(p, flag, shown)


def needs_extra(what: str, extra: str, *modules: str) -> None:
    """`UserError` unless each of `modules`, of the optional `extra` of pyproject.toml, imports: one line saying
    that `what` needs the extra and how to install it. A command calls it first, before any work."""
    for module in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            raise UserError(f"{what} needs the {extra} extra ({module} is not installed): "
                            f"pip install 'transformer[{extra}]'") from None


_LINE_BREAKS = {c: repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


def one_line(message: str) -> str:
    """`message` with its line breaks written as escapes (\\n), so that it prints as one line."""
    return message.translate(str.maketrans(_LINE_BREAKS))


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each number's range and default: "linear warm-up steps; an int >= 0 (default: 4000)"."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        if isinstance(action.type, Number):
            article = "an" if action.type.kind is int else "a"
            help += f"; {article} {action.type!r}".replace("%", "%%")
        action_help, action.help = action.help, help
        try:
            return super()._get_help_string(action)
        finally:
            action.help = action_help


def command(sub, name: str, func, help: str) -> argparse.ArgumentParser:
    """A subcommand `name` of `sub` that runs func(args)."""
    p = sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)
    p.set_defaults(func=func, parser=p)
    return p


# Settings (as the library's messages name them, in backticks: `warmup`) whose flag is not "--" + the name with
# "-" for "_".
SETTING_FLAGS = {"n_encoder_layers": "--encoder-layers (or --layers)", "n_decoder_layers": "--decoder-layers (or --layers)",
                 "tokenizer_type": "--tokenizer", "eps": "--adam-eps", "n_best": "--n-best", "n_layers": "--layers",
                 "max_new_tokens": "--tokens", "top_k": "--top-k", "top_p": "--top-p"}
_SETTING = re.compile(r"`([a-z][a-z0-9_]*)`")


def flag_of(setting: str) -> str:
    """The command-line flag of a setting: ``warmup`` -> ``--warmup``, ``max_tokens`` -> ``--max-tokens``."""
    return SETTING_FLAGS.get(setting, "--" + setting.replace("_", "-"))


def say_flags(text: str) -> str:
    """`text` (a library message) with each setting it names in backticks written as its flag."""
    return _SETTING.sub(lambda m: flag_of(m[1]), text)


def say(message: str) -> None:
    """A progress message on stderr that does not break the progress bar; settings it names as flags."""
    from tqdm import tqdm

    tqdm.write(say_flags(message), file=sys.stderr)
