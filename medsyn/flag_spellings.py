"""Every long flag answers to both spellings, ``--output-dir`` and ``--output_dir``.

The ``medsyn`` command spells its flags with hyphens (as accelerate and most CLIs do); the training scripts spell
theirs with underscores (as diffusers' examples do). A user who types the other spelling gets an error for nothing.
Each flag's other spelling is registered as an alias of the same action, so it parses; help still shows the one
spelling the parser declared.
"""

from __future__ import annotations

import argparse


def _other_spelling(option: str) -> str | None:
    if not option.startswith("--"):
        return None
    name = option[2:]
    other = name.replace("-", "_") if "-" in name else name.replace("_", "-")
    return None if other == name else f"--{other}"


def accept_both_spellings(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Register the other spelling of every long flag of ``parser`` and of its subcommands' parsers. A flag whose
    other spelling is already a different flag is an error in the parser's definition."""
    for action in list(parser._actions):
        for option in action.option_strings:
            other = _other_spelling(option)
            if other is None:
                continue
            taken = parser._option_string_actions.get(other)
            if taken is not None and taken is not action:
                raise ValueError(f"{parser.prog}: {option} and {other} are different flags; rename one")
            parser._option_string_actions[other] = action
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                accept_both_spellings(subparser)
    matches = parser._get_option_tuples

    def distinct_matches(option_string: str) -> list[tuple]:
        """An abbreviation that matches both spellings of one flag is that flag, not an ambiguity."""
        found, seen = [], set()
        for match in matches(option_string):
            if id(match[0]) not in seen:
                seen.add(id(match[0]))
                found.append(match)
        return found

    parser._get_option_tuples = distinct_matches
    return parser
