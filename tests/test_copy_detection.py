"""Copy detection under nuisances (issue 37): a copy stays a copy under noise, brightness, contrast, blur, a
one-pixel move and a mirror; a fresh-draw generator whose images are blurred or noised still passes. Closed-form
cases first (an affine intensity change, a move, a mirror give structural distance 0), then the audit's verdict
over many seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from medsyn.data import SimulatedBrainMRI
from medsyn.privacy import memorisation_audit
from medsyn.privacy.nearest_neighbours import PreparedReferences, nearest_neighbours
from medsyn.privacy.structure import (
    STRUCTURE_COPY_RATIO,
    StructureIndex,
    low_pass,
    noise_variance,
    relative_distances,
    structural_nearest,
)

NUISANCES = ("noise", "brightness", "contrast", "blur", "shift", "mirror")


def nuisance(images: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """(N, H, W) uint8 images with one of issue 37's nuisances at its stated size: noise sd 10 grey levels,
    brightness or contrast +-5%, a 0.5-pixel Gaussian blur, a 1-pixel move (edge repeated), a left-right mirror."""
    x = images.astype(np.float64)
    sign = rng.choice([-1.0, 1.0], size=(len(x), 1, 1))
    if kind == "noise":
        x = x + rng.normal(0, 10, x.shape)
    elif kind == "brightness":
        x = x + sign * 0.05 * 255
    elif kind == "contrast":
        mean = x.mean(axis=(1, 2), keepdims=True)
        x = (x - mean) * (1 + 0.05 * sign) + mean
    elif kind == "blur":
        x = low_pass(torch.from_numpy(x)[:, None], sigma=0.5)[:, 0].numpy()
    elif kind == "shift":
        moves = rng.integers(-1, 2, size=(len(x), 2))
        moves[(moves == 0).all(1), 1] = 1  # always a move
        x = np.stack([np.pad(image, 1, mode="edge")[1 - dy : 1 - dy + image.shape[0], 1 - dx : 1 - dx + image.shape[1]]
                      for image, (dy, dx) in zip(x, moves)])
    elif kind == "mirror":
        x = x[:, :, ::-1]
    else:
        raise ValueError(kind)
    return np.clip(x, 0, 255).round().astype(np.uint8)


def brains(resolution: int, seed: int, count: int) -> np.ndarray:
    return SimulatedBrainMRI(resolution, seed=seed).generate(count)["images"]


def test_intensity_changes_moves_and_mirrors_leave_a_copy_at_distance_zero():
    train = brains(32, 0, 40)
    affine = np.clip(train[:10].astype(np.float64) * 0.9 + 12, 0, 255).astype(np.float64) / 255  # no clipping
    moved = np.zeros_like(train[:10])
    moved[:, 1:, :] = train[10:20, :-1, :]  # down one pixel, the uncovered row black
    mirrored = train[20:30, :, ::-1]
    for copies, sources in ((affine, range(10)), (moved, range(10, 20)), (mirrored, range(20, 30))):
        distances, indices = structural_nearest(copies, train, max_shift=1, k=2)
        assert indices[:, 0].tolist() == list(sources)
        assert distances[:, 0].max() < 1e-3 and distances[:, 1].min() > 0.05
        assert relative_distances(distances).max() < 1e-2


def test_a_prepared_index_answers_as_a_fresh_search():
    """Prepared once (the QA gate's index, an audit's two searches), the answer is the one-off search's, exactly."""
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((50, 64)).astype(np.float32)
    queries = rng.standard_normal((7, 64))  # float64 queries against float32 references
    prepared = PreparedReferences.of_vectors(vectors)
    for k in (1, 5):
        fresh, again = nearest_neighbours(queries, vectors, k=k), nearest_neighbours(queries, prepared, k=k)
        assert np.array_equal(fresh[1], again[1]) and np.array_equal(fresh[0], again[0])
    train, queries = brains(32, 7, 60), nuisance(brains(32, 7, 60)[:12], "noise", rng)
    cached, uncached = StructureIndex(train), StructureIndex(train, cache_bytes=0)
    assert cached.cached and not uncached.cached
    for first, second in zip(cached.nearest(queries, k=3), uncached.nearest(queries, k=3)):
        assert np.array_equal(first, second)
    assert np.array_equal(cached.nearest(queries, k=3)[0], structural_nearest(queries, train, k=3)[0])
    with pytest.raises(ValueError, match="same size"):
        cached.nearest(brains(16, 0, 2))


def test_the_noise_estimate_reads_added_noise_not_edges():
    clean = brains(64, 1, 20)
    noisy = np.clip(clean + np.random.default_rng(0).normal(0, 10, clean.shape), 0, 255)
    noisy, clean = (torch.from_numpy(np.asarray(x, np.float32) / 255)[:, None] for x in (noisy, clean))
    added = (noise_variance(noisy) - noise_variance(clean)).sqrt() * 255
    assert added.median() == pytest.approx(10, rel=0.25)


def test_noise_does_not_hide_a_copy_from_the_structural_distance():
    train = brains(32, 2, 60)
    noisy = nuisance(train[:20], "noise", np.random.default_rng(1))
    debiased, _ = structural_nearest(noisy, train, k=1)
    fresh, _ = structural_nearest(brains(32, 3, 20), train, k=1)
    assert debiased.max() < fresh.min() / 2


@pytest.mark.parametrize("kind", NUISANCES)
def test_one_copy_with_any_nuisance_fails_the_audit(kind):
    train, held_out, generated = brains(32, 4, 200), brains(32, 5, 100), brains(32, 6, 100)
    generated[7] = nuisance(train[11:12], kind, np.random.default_rng(0))[0]
    audit = memorisation_audit(generated, train, held_out=held_out)
    assert not audit.passed and audit.near_copy_indices == [7] and audit.nearest_indices[7] == 11, audit.verdict
    assert audit.nearest_distances[7] <= STRUCTURE_COPY_RATIO


def pass_rates(resolution: int, seeds: range) -> dict[str, float]:
    """Over ``seeds``: the share of audits a fresh-draw generator passes with its images blurred or noised, and
    the share a generator with 1% copies (each with a random nuisance) fails. Exchangeability is not checked
    here (the sets are exchangeable by construction; its own tests are in test_privacy)."""
    outcomes = {"blurred fresh draws pass": [], "noised fresh draws pass": [], "1% copies fail": []}
    for seed in seeds:
        rng = np.random.default_rng(seed)
        images = brains(resolution, 1000 + seed, 500)
        train, held_out, generated = images[:200], images[200:300], images[300:]
        def passes(images, train=train, held_out=held_out):
            return memorisation_audit(images, train, held_out=held_out, check_exchangeable=False).passed

        outcomes["blurred fresh draws pass"].append(passes(nuisance(generated, "blur", rng)))
        outcomes["noised fresh draws pass"].append(passes(nuisance(generated, "noise", rng)))
        copied = generated.copy()
        sources = rng.choice(len(train), size=len(generated) // 100, replace=False)
        for slot, source in zip(rng.choice(len(generated), size=len(sources), replace=False), sources):
            copied[slot] = nuisance(train[source : source + 1], rng.choice(NUISANCES), rng)[0]
        outcomes["1% copies fail"].append(not passes(copied))
    return {name: float(np.mean(values)) for name, values in outcomes.items()}


@pytest.mark.slow
@pytest.mark.parametrize("resolution", [16, 32, 64])
def test_blur_and_noise_do_not_decide_the_verdict_over_a_hundred_seeds(resolution):
    """At 16 px noise of sd 10 is not asserted: the noised fresh draws are over-corrected there (the nearest of
    many training images is partly chosen by the noise itself) and fail too often (RESULTS.md)."""
    rates = pass_rates(resolution, range(100, 200))
    assert rates["1% copies fail"] >= 0.95 and rates["blurred fresh draws pass"] >= 0.9, rates
    if resolution >= 32:
        assert rates["noised fresh draws pass"] >= 0.9, rates
