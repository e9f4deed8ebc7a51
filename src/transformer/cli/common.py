"""What every command module of the command line shares: declaring a command, and saying things."""

from __future__ import annotations

import argparse
import sys


def command(sub, name: str, func, help: str) -> argparse.ArgumentParser:
    """A subcommand `name` of `sub` that runs func(args)."""
    p = sub.add_parser(name, help=help, description=help, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.set_defaults(func=func, parser=p)
    return p


def say(message: str) -> None:
    """A progress message on stderr that does not break the progress bar."""
    from tqdm import tqdm

    tqdm.write(message, file=sys.stderr)
