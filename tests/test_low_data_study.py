"""The low-data study's plumbing: nested stratified fractions, a test split without near-copies of training
slices, paired arms (same batches, same resamples), and the whole chain on tiny data with no test image reaching
the generator."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medsyn.evaluation.downstream import train_classifier
from medsyn.evaluation.low_data_study import (
    Arm,
    class_probabilities,
    clean_test_split,
    gain_over_seeds,
    paired_bootstrap,
    paired_gain,
    stratified_fraction,
    study_arms,
    synthetic_counts,
    train_arm,
)
from medsyn.privacy.statistics import binary_auc

STUDY = Path(__file__).parents[1] / "benchmarks" / "study_low_data.py"


def load_study():
    spec = importlib.util.spec_from_file_location("study_low_data", STUDY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fractions_are_stratified_nested_and_seeded():
    labels = np.repeat([0, 1, 2, 3], [100, 60, 40, 3])
    small, large = stratified_fraction(labels, 0.1, seed=4), stratified_fraction(labels, 0.25, seed=4)
    assert np.bincount(labels[small]).tolist() == [10, 6, 4, 2]  # at least 2 of a rare class
    assert np.bincount(labels[large]).tolist() == [25, 15, 10, 2]
    assert set(small) <= set(large)  # one seed: the smaller set is inside the larger
    assert np.array_equal(small, stratified_fraction(labels, 0.1, seed=4))
    assert not np.array_equal(small, stratified_fraction(labels, 0.1, seed=5))
    with pytest.raises(ValueError, match="fraction"):
        stratified_fraction(labels, 0.0, seed=0)


def smooth_images(rng, count: int) -> np.ndarray:
    """Slice-like images: smooth anatomy on a black background, so a slice moved by a pixel stays nearest itself."""
    coarse = torch.from_numpy(rng.uniform(0, 255, (count, 1, 4, 4))).float()
    inside = torch.nn.functional.interpolate(coarse, size=(12, 12), mode="bicubic", align_corners=True)
    return np.pad(inside.clamp(0, 255).round().byte()[:, 0].numpy(), ((0, 0), (2, 2), (2, 2)))


def test_near_copies_of_training_slices_leave_the_test_split():
    rng = np.random.default_rng(0)
    train, fresh = smooth_images(rng, 30), smooth_images(rng, 5)
    shifted = np.roll(train[7], 1, axis=1)  # the same slice moved by a pixel, with a faint noise
    shifted = np.clip(shifted.astype(int) + rng.integers(-1, 2, shifted.shape), 0, 255).astype(np.uint8)
    kept, removed = clean_test_split(train, np.concatenate([fresh, shifted[None], train[3:4]]))
    assert kept.tolist() == [0, 1, 2, 3, 4] and removed.tolist() == [5, 6]


def test_auc_is_the_mann_whitney_statistic():
    from torchmetrics.functional.classification import binary_auroc

    rng = np.random.default_rng(1)
    scores = np.round(rng.uniform(size=200), 1)  # many ties
    positive = rng.uniform(size=200) < 0.4
    expected = float(binary_auroc(torch.tensor(scores), torch.tensor(positive.astype(int))))
    assert binary_auc(scores, positive) == pytest.approx(expected, abs=1e-6)  # torchmetrics works in float32


def test_an_identity_augmentation_changes_nothing_the_batches_are_paired():
    images = torch.randn(12, 1, 8, 8).clamp(-1, 1)
    labels = np.arange(12) % 2
    plain = train_classifier(images, labels, 2, steps=3, batch_size=4, learning_rate=1e-3, seed=3, progress=False,
                             description="plain")
    identity = train_classifier(images, labels, 2, steps=3, batch_size=4, learning_rate=1e-3, seed=3,
                                progress=False, description="identity", augment=lambda batch, generator: batch)
    for a, b in zip(plain.parameters(), identity.parameters(), strict=True):
        assert torch.equal(a, b)


def test_arms_keep_class_proportions_and_identical_arms_gain_exactly_nothing():
    rng = np.random.default_rng(2)
    real, real_labels = rng.integers(0, 256, (12, 8, 8), dtype=np.uint8), np.repeat([0, 1], [8, 4])
    counts = synthetic_counts(real_labels, 2, 4)
    assert counts == [32, 16]
    synthetic_labels = np.concatenate([np.full(c, label) for label, c in enumerate(counts)])
    synthetic = rng.integers(0, 256, (len(synthetic_labels), 8, 8), dtype=np.uint8)
    arms = {arm.name: arm for arm in study_arms(real, real_labels, synthetic, synthetic_labels)}
    assert [len(arm.images) for arm in arms.values()] == [12, 12, 24, 24, 36, 60, 48]
    assert np.bincount(arms["real + synthetic 2x"].labels).tolist() == [24, 12]
    assert np.bincount(arms["synthetic only"].labels).tolist() == [32, 16]
    with pytest.raises(ValueError, match="are needed for 8x"):
        study_arms(real, real_labels, synthetic, synthetic_labels, multiples=(8,))

    test, test_labels = rng.integers(0, 256, (20, 8, 8), dtype=np.uint8), np.arange(20) % 2
    twins = [Arm(name, real, real_labels) for name in ("real", "again")]
    probabilities = {arm.name: class_probabilities(train_arm(arm, 2, 3, 4, 1e-3, seed=0), test).numpy()
                     for arm in twins}
    assert np.array_equal(probabilities["real"], probabilities["again"])  # same seed, same batches
    boot = paired_bootstrap(probabilities, test_labels, negative_class=0, resamples=50, seed=0)
    assert paired_gain(0.0, boot, "again", "real", 0)["ci"] == [0.0, 0.0]


def test_the_gain_over_seeds_has_the_student_t_interval():
    pooled = gain_over_seeds([0.1, 0.2, 0.3])
    t_975_two_dof = 0.95 / np.sqrt(2 * 0.975 * 0.025)  # the t quantile with 2 degrees of freedom in closed form
    half = t_975_two_dof * 0.1 / np.sqrt(3)
    assert pooled["gain"] == pytest.approx(0.2)
    assert pooled["ci"] == pytest.approx([0.2 - half, 0.2 + half])
    assert not pooled["excludes_zero"] and pooled["seeds"] == 3  # three positive seeds, yet the interval holds 0
    assert gain_over_seeds([0.10, 0.12, 0.14])["excludes_zero"]
    assert gain_over_seeds([-0.10, -0.12, -0.14])["excludes_zero"]
    assert gain_over_seeds([0.04]) == {"gain": 0.04, "ci": None, "seeds": 1, "excludes_zero": False}
    for bad in ([], [0.1, float("nan")]):
        with pytest.raises(ValueError, match="gains must be"):
            gain_over_seeds(bad)


@pytest.fixture
def tiny_dataset(tmp_path):
    from medsyn.data import SimulatedBrainMRI

    made = SimulatedBrainMRI(resolution=16, seed=0).generate(72)
    split = np.where(np.arange(72) < 48, "training", "testing")
    path = tmp_path / "tiny.npz"
    np.savez(path, images=made["images"], labels=made["labels"], class_names=np.array(["notumor", "tumor"]),
             split=split)
    return path, made


def test_the_study_runs_end_to_end_resumes_and_keeps_test_images_from_the_generator(tiny_dataset, tmp_path):
    path, made = tiny_dataset
    study = load_study()
    argv = ["--data", str(path), "--output-dir", str(tmp_path / "study"), "--resolution", "16", "--fractions", "0.5",
            "--seeds", "0", "1", "--generator-steps", "2", "--sampling-steps", "2", "--classifier-steps", "3",
            "--resamples", "20", "--no-fid"]
    study.main(argv)
    results = json.loads((tmp_path / "study" / "results.json").read_text())
    assert [(r["fraction"], r["seed"], r["real_images"]) for r in results["runs"]] == [(0.5, 0, 24), (0.5, 1, 24)]
    arms = results["runs"][0]["arms"]
    assert list(arms) == ["real", "real + classic augmentation", "real + pixel noise", "real + synthetic 1x",
                          "real + synthetic 2x", "real + synthetic 4x", "synthetic only"]
    assert arms["real + synthetic 4x"]["train_images"] == 24 * 5
    assert set(arms["real + synthetic 1x"]["vs_real"]["auc"]) == {"gain", "ci", "excludes_zero"}
    assert "audit" in results["runs"][0] and (tmp_path / "study" / "auc_vs_fraction.png").stat().st_size > 1000
    report = (tmp_path / "study" / "report.md").read_text()
    assert "## 50% of the training split (24 images)" in report
    recall = " / ".join(f"{np.mean([r['arms']['real']['recall'][c] for r in results['runs']]):.2f}"
                        for c in ("notumor", "tumor"))  # per class, the mean over the two seeds
    assert "| arm | AUC | accuracy | recall notumor / tumor |" in report
    assert [line.split(" | ")[3] for line in report.splitlines() if line.startswith("| real |")] == [recall]

    # The generator saw exactly its fraction of the training split, and no test image
    for seed in (0, 1):
        with np.load(tmp_path / "study" / f"fraction-0.5-seed-{seed}" / "train.npz") as seen:
            assert seen["indices"].max() < 48 and len(set(seen["indices"])) == 24
            assert np.array_equal(seen["images"], made["images"][:48][seen["indices"]])
            test = made["images"][48:]
            assert not any((image == test).all(axis=(1, 2)).any() for image in seen["images"])
    # A second call finds every stage done and changes nothing
    before = (tmp_path / "study" / "fraction-0.5-seed-0" / "run.json").read_text()
    study.main(argv)
    assert (tmp_path / "study" / "fraction-0.5-seed-0" / "run.json").read_text() == before

    # The classifier-noise stage adds to finished runs without redoing them; each run's own classifier (seed =
    # the run's seed) is among the retrained ones, bit for bit
    synthetic = tmp_path / "study" / "fraction-0.5-seed-1" / "synthetic.npz"
    made_at = synthetic.stat().st_mtime_ns
    study.main(argv + ["--classifier-noise", "3"])
    for seed in (0, 1):
        record = json.loads((tmp_path / "study" / f"fraction-0.5-seed-{seed}" / "run.json").read_text())
        noise = record["classifier_noise"]
        assert noise["classifier_seeds"] == [0, 1, 2] and len(noise["auc"]) == 3
        assert noise["auc"][seed] == record["arms"]["real"]["auc"]
    assert synthetic.stat().st_mtime_ns == made_at
    assert "The classifier's own noise (real only, the same images, classifier seeds 0 to 2)" in (
        tmp_path / "study" / "report.md").read_text()
    with pytest.raises(SystemExit, match="2 or more"):
        study.main(argv + ["--classifier-noise", "1"])


def test_the_test_splits_features_are_encoded_once_and_stored_for_every_run(tmp_path):
    """A later run (a new process: an empty in-memory cache) reads the stored test features instead of encoding
    the test split again, and its FID is the one computed from scratch."""
    study = load_study()

    class CountingEncoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.images_seen = 0

        def forward(self, images):
            self.images_seen += len(images)
            return torch.cat([images.mean((2, 3)), images.std((2, 3)), images.amax((2, 3))], dim=1)

    rng = np.random.default_rng(0)
    test = rng.integers(0, 256, (20, 8, 8), dtype=np.uint8)
    generated = rng.integers(0, 200, (12, 8, 8), dtype=np.uint8)
    expected = study.inception_fid(CountingEncoder(), generated, test, {})
    for run, test_images_encoded in ((1, len(test)), (2, 0)):
        encoder, cache = CountingEncoder(), {}
        study.stored_test_features(encoder, test, tmp_path, cache)
        assert study.inception_fid(encoder, generated, test, cache) == pytest.approx(expected, rel=1e-6), run
        assert encoder.images_seen == test_images_encoded + len(generated), run
