"""The ``medsyn`` command: ``demo``, ``generate``, ``pixel-noise-baseline``, ``evaluate``, ``evaluate-expert``,
``push``, ``rate``, ``attack`` and ``serve``, each a module of ``medsyn.commands``."""

from __future__ import annotations

import argparse
import sys

from medsyn.commands import COMMANDS
from medsyn.flag_spellings import accept_both_spellings
from medsyn.validation import DefaultsShown


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="medsyn", description="Synthetic medical images with diffusion models.")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(commands, {"formatter_class": DefaultsShown})
    return accept_both_spellings(parser)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, OSError) as error:  # bad input or an unwritable disk: say what is wrong, not a traceback
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
