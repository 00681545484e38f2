"""`accelerate launch -m medsyn.cli generate`: each process makes its share of the indices, and the union equals a
single process's output image for image (PNG files and the NPZ)."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from medsyn.cli import main

from .conftest import get_dummy_pipeline
from .ddp_launch import REPO


def launch_two_processes(arguments: list[str]) -> None:
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "1",
               "--num_processes", "2", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "medsyn.cli",
               *arguments]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("wrote 5 images") == 1  # said once, by the main process


@pytest.mark.slow
def test_two_processes_write_what_one_process_writes(tmp_path):
    get_dummy_pipeline().save_pretrained(tmp_path / "model")
    common = ["generate", "--model", str(tmp_path / "model"), "--class-label", "tumor", "--num-images", "5",
              "--batch-size", "2", "--num-inference-steps", "2", "--n-steps-each", "1", "--seed", "3"]
    for fmt in ("png", "npz"):
        assert main([*common, "--format", fmt, "--output-dir", str(tmp_path / f"one-{fmt}")]) == 0
        launch_two_processes([*common, "--format", fmt, "--output-dir", str(tmp_path / f"two-{fmt}")])
    one, two = sorted((tmp_path / "one-png").iterdir()), sorted((tmp_path / "two-png").iterdir())
    assert [p.name for p in one] == [p.name for p in two] and len(one) == 5
    for a, b in zip(one, two):
        assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b))), a.name
    single, split = np.load(tmp_path / "one-npz" / "samples.npz"), np.load(tmp_path / "two-npz" / "samples.npz")
    assert sorted(single.files) == sorted(split.files)
    for key in single.files:
        assert np.array_equal(single[key], split[key]), key


@pytest.mark.parametrize("channels", [1, 3])
def test_an_image_set_sampled_in_batches_is_the_set_sampled_at_once(channels):
    """``sample_image_set``: the benchmarks' generation, batch by batch, in the layout NPZ image sets hold."""
    from medsyn.generation import ImageKey, SamplingSettings, sample_image_set, sample_images, to_uint8

    pipe = get_dummy_pipeline(in_channels=channels)
    keys = [ImageKey(3, i, class_label=i % 2) for i in range(5)]
    settings = SamplingSettings(num_inference_steps=2, n_steps_each=1)
    batched = sample_image_set(pipe, keys, settings, batch_size=2)
    whole = to_uint8(sample_images(pipe, keys, settings))
    assert batched.shape == ((5, 16, 16) if channels == 1 else (5, 16, 16, 3)) and batched.dtype == np.uint8
    # one grey level: float32 sums run in another order for another batch shape
    assert np.abs(batched.astype(int) - (whole[..., 0] if channels == 1 else whole).astype(int)).max() <= 1
