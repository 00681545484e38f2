"""Fault injection: a training run killed with SIGKILL at any point, checkpoint saves included, resumes from the
newest complete checkpoint and ends with exactly the weights of a run that was never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from medsyn.train_scripts.train_score_langevin import main, parse_args
from medsyn.training.checkpoints import COMPLETE_MARKER, list_checkpoints, resolve_checkpoint

from .conftest import assert_same_weights
from .test_train_score_langevin import TINY

REPO = Path(__file__).resolve().parents[1]
RUN = ["--class_conditional", "--max_train_steps", "6", "--checkpointing_steps", "2", "--validation_steps", "100",
       "--learning_rate", "1e-3"]

LAUNCHER = textwrap.dedent(
    """
    import importlib, sys
    script = importlib.import_module("medsyn.train_scripts.train_score_langevin")
    script.main(script.parse_args(sys.argv[1:]))
    """
)
# Runs the training script and SIGKILLs itself just before the N-th call of one function (os.fsync, os.replace,
# shutil.rmtree, torch.save...): the kill lands at a chosen point inside a checkpoint save.
KILLER = textwrap.dedent(
    """
    import importlib, os, signal, sys
    target, nth = sys.argv.pop(1).rsplit(":", 1)
    module_name, attribute = target.rsplit(".", 1)
    module = importlib.import_module(module_name)
    original, calls = getattr(module, attribute), [0]
    def counted(*args, **kwargs):
        calls[0] += 1
        if os.environ.get("LOG_CALLS"):
            print("CALL", calls[0], str(args[:1])[:80], file=sys.stderr, flush=True)
        if calls[0] == int(nth):
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)
    setattr(module, attribute, counted)
    """
) + LAUNCHER


def train_args(output_dir: Path, *extra: str) -> list[str]:
    return TINY + RUN + ["--output_dir", str(output_dir), *extra]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    return main(parse_args(train_args(tmp_path_factory.mktemp("straight") / "run")))


def killed_run(tmp_path: Path, output_dir: Path, kill_at: str, *extra: str) -> subprocess.CompletedProcess:
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER)
    command = [sys.executable, str(killer), kill_at, *train_args(output_dir, *extra)]
    # Same thread count as this process (the default): float sums then run in the same order in both.
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


def resume_and_compare(output_dir: Path, uninterrupted, *extra: str) -> None:
    resumed = main(parse_args(train_args(output_dir, "--resume_from_checkpoint", "latest", *extra)))
    assert_same_weights(resumed, uninterrupted)


# (function and call number, extra flags), counted in this run (each save: 3 torch.save, 8 fsync, 2 os.replace
# and, with a limit of 1 from the second save on, 1 os.replace + 1 rmtree for the prune). Kills land: in the
# second save's flush; before its rename; the same with a limit of 1; before the prune's rename; before the
# third save's marker; between the pruned folder's rename and its deletion; between two files of a save.
KILL_POINTS = [
    ("os.fsync:11", ()),
    ("os.replace:4", ()),
    ("os.replace:4", ("--checkpoints_total_limit", "1")),
    ("os.replace:5", ("--checkpoints_total_limit", "1")),
    ("os.replace:6", ("--checkpoints_total_limit", "1")),
    ("shutil.rmtree:1", ("--checkpoints_total_limit", "1")),
    ("torch.save:5", ("--checkpoints_total_limit", "1")),
]
FAST_KILL_POINTS = [0, 3]


@pytest.mark.parametrize("index", FAST_KILL_POINTS)
def test_killed_during_a_save_resumes_to_identical_weights(tmp_path, uninterrupted, index):
    check_kill_point(tmp_path, uninterrupted, *KILL_POINTS[index])


@pytest.mark.slow
@pytest.mark.parametrize("index", [i for i in range(len(KILL_POINTS)) if i not in FAST_KILL_POINTS])
def test_killed_at_every_save_stage_resumes_to_identical_weights(tmp_path, uninterrupted, index):
    check_kill_point(tmp_path, uninterrupted, *KILL_POINTS[index])


def check_kill_point(tmp_path, uninterrupted, kill_at, extra):
    output_dir = tmp_path / "run"
    result = killed_run(tmp_path, output_dir, kill_at, *extra)
    assert result.returncode == -signal.SIGKILL, f"{kill_at} was never reached: {result.stderr[-2000:]}"
    complete = list_checkpoints(output_dir)
    assert complete, f"killed at {kill_at}: no complete checkpoint left"
    resume_and_compare(output_dir, uninterrupted, *extra)
    if extra:  # the limit holds once the resumed run is done, and nothing hidden is left behind
        assert [p.name for p in list_checkpoints(output_dir)] == ["checkpoint-6"]
        assert not list(output_dir.glob(".staging-*"))


@pytest.mark.slow
def test_kill_dash_nine_by_pid_during_saves(tmp_path, uninterrupted):
    """Kill from outside, by pid, the moment a save is seen in progress, again and again until the run ends."""
    output_dir = tmp_path / "run"
    launcher = tmp_path / "launch.py"
    launcher.write_text(LAUNCHER)
    kills = 0
    for attempt in range(6):
        extra = ["--checkpoints_total_limit", "1"] + (["--resume_from_checkpoint", "latest"] if attempt else [])
        process = subprocess.Popen([sys.executable, str(launcher), *train_args(output_dir, *extra)],
                                   cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while process.poll() is None and time.monotonic() < deadline:
            if list(output_dir.glob(".staging-checkpoint-*")):
                os.kill(process.pid, signal.SIGKILL)
                kills += 1
                break
            time.sleep(0.002)
        if process.wait(timeout=300) == 0:
            break
    assert kills >= 1
    resume_and_compare(output_dir, uninterrupted, "--checkpoints_total_limit", "1")


def test_latest_skips_half_written_and_foreign_folders(tmp_path, uninterrupted, caplog):
    output_dir = tmp_path / "run"
    main(parse_args(train_args(output_dir, "--max_train_steps", "4")))
    assert [p.name for p in list_checkpoints(output_dir)] == ["checkpoint-2", "checkpoint-4"]
    (output_dir / "checkpoint-10").mkdir()  # empty: a save killed at once
    half = output_dir / "checkpoint-8"
    (output_dir / "checkpoint-4").rename(half)  # complete files, but a 0-byte optimizer state
    (half / "optimizer.bin").write_bytes(b"")
    (output_dir / "checkpoint-old").mkdir()
    (output_dir / "checkpoint-20-backup").mkdir()
    assert resolve_checkpoint("latest", output_dir).name == "checkpoint-2"
    for name in ("checkpoint-10", "checkpoint-8", "checkpoint-old", "checkpoint-20-backup"):
        assert name in caplog.text
    with pytest.raises(ValueError, match="incomplete"):
        resolve_checkpoint("checkpoint-8", output_dir)
    # the limit must not trip over the foreign folders either
    resume_and_compare(output_dir, uninterrupted, "--checkpoints_total_limit", "2")
    assert [p.name for p in list_checkpoints(output_dir)] == ["checkpoint-4", "checkpoint-6"]
    assert (output_dir / "checkpoint-old").is_dir() and json.loads(
        (output_dir / "checkpoint-6" / COMPLETE_MARKER).read_text())["step"] == 6
