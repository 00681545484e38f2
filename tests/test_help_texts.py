"""Every flag of medsyn's CLI and training scripts says what it does, with its default shown."""

from __future__ import annotations

import argparse
import importlib
from pathlib import Path

import pytest

from medsyn.cli import build_parser

SCRIPTS = sorted(path.stem for path in (Path(__file__).resolve().parents[1] / "train_scripts").glob("train_*.py"))


class Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def script_parser(name: str, monkeypatch) -> argparse.ArgumentParser:
    def capture(self, *args, **kwargs):
        raise Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    with pytest.raises(Captured) as caught:
        importlib.import_module(f"medsyn.train_scripts.{name}").parse_args([])
    return caught.value.parser


def all_parsers(monkeypatch) -> dict[str, argparse.ArgumentParser]:
    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices
    return {**{f"medsyn {name}": parser for name, parser in subcommands.items()},
            **{name: script_parser(name, monkeypatch) for name in SCRIPTS}}


def test_every_flag_has_help_and_shows_its_default(monkeypatch):
    parsers = all_parsers(monkeypatch)
    assert {"medsyn generate", "medsyn push", "medsyn evaluate", "train_ddpm", "train_score_langevin"} <= set(parsers)
    for name, parser in parsers.items():
        missing = [a.option_strings[0] for a in parser._actions
                   if a.option_strings and a.dest != "help" and not a.help]
        assert not missing, f"{name}: flags without help: {missing}"
    for name in SCRIPTS:
        text = " ".join(parsers[name].format_help().split())
        assert f"(default: {parsers[name].get_default('learning_rate')})" in text, name
