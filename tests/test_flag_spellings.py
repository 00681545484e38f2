"""Both spellings of every long flag, in the medsyn command and the training scripts; help shows one."""

from __future__ import annotations

import argparse

import pytest

from medsyn.cli import build_parser
from medsyn.flag_spellings import accept_both_spellings


def test_the_medsyn_command_takes_underscores_too():
    parser = build_parser()
    args = parser.parse_args(["generate", "--model", "m", "--output_dir", "out", "--num_images", "3"])
    assert (args.output_dir, args.num_images) == ("out", 3)
    assert parser.parse_args(["generate", "--model", "m", "--output-dir", "out"]).output_dir == "out"
    assert parser.parse_args(["generate", "--model", "m", "--output", "out"]).output_dir == "out"  # abbreviated
    generate = parser._subparsers._group_actions[0].choices["generate"]
    assert "--output-dir" in generate.format_help() and "--output_dir" not in generate.format_help()


def test_a_training_script_takes_hyphens_too():
    from medsyn.train_scripts.train_ddpm import parse_args

    args = parse_args(["--output-dir", "run", "--max-train-steps", "5", "--train_batch_size", "4"])
    assert (args.output_dir, args.max_train_steps, args.train_batch_size) == ("run", 5, 4)


def test_two_flags_that_differ_only_in_spelling_are_refused():
    parser = argparse.ArgumentParser(prog="x")
    parser.add_argument("--a-b")
    parser.add_argument("--a_b")
    with pytest.raises(ValueError, match="--a-b and --a_b are different flags"):
        accept_both_spellings(parser)
