import math

import pytest
import torch

from medsyn.schedulers import AnnealedLangevinScheduler
from medsyn.schedulers.ncsn_rules import (
    geometric_ratio,
    langevin_step_size,
    langevin_variance_ratio,
    noise_schedule_from_data,
    sigma_max_from_data,
)


def gaussian_score(mean, var):
    """Exact score of N(mean, var) perturbed with N(0, sigma^2): -(x - mean) / (var + sigma^2)."""
    return lambda x, sigma: -(x - mean) / (var + sigma**2)


def run_sampler(scheduler, score_fn, x, generator):
    for t in scheduler.timesteps:
        x = scheduler.step(score_fn(x, float(t)), t, x, generator=generator).prev_sample
    return x


def test_langevin_with_exact_gaussian_score_recovers_mean_and_variance():
    mean, std = torch.tensor([0.5, -0.3]), torch.tensor([0.2, 0.4])
    sigma_max, sigma_min, levels, steps = 5.0, 0.01, 30, 100  # many steps per level: near-exact mixing
    scheduler = AnnealedLangevinScheduler(
        num_train_timesteps=levels, sigma_max=sigma_max, sigma_min=sigma_min,
        step_size=langevin_step_size(sigma_max, sigma_min, levels, steps), n_steps_each=steps,
    )
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 2, generator=generator) * sigma_max
    samples = run_sampler(scheduler, gaussian_score(mean, std**2), x, generator)
    torch.testing.assert_close(samples.mean(0), mean, atol=0.01, rtol=0)
    torch.testing.assert_close(samples.std(0), std, atol=0.01, rtol=0.03)


def test_langevin_with_exact_mixture_score_recovers_weights():
    """Two well-separated 1D modes with weights 0.3 / 0.7: annealing must find both in proportion."""
    means, weights, var = torch.tensor([-2.0, 2.0]), torch.tensor([0.3, 0.7]), 0.1**2

    def score(x, sigma):
        total = var + sigma**2
        log_p = torch.log(weights) - (x - means) ** 2 / (2 * total)
        responsibility = torch.softmax(log_p, dim=-1)
        return (responsibility * -(x - means) / total).sum(-1, keepdim=True)

    scheduler = AnnealedLangevinScheduler(
        num_train_timesteps=30, sigma_max=6.0, sigma_min=0.01,
        step_size=langevin_step_size(6.0, 0.01, 30, 100), n_steps_each=100,
    )
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(20000, 1, generator=generator) * 6.0
    samples = run_sampler(scheduler, score, x, generator)
    assert abs((samples > 0).float().mean().item() - 0.7) < 0.02
    assert abs(samples[samples > 0].std().item() - 0.1) < 0.01


def test_set_timesteps_changes_schedule():
    scheduler = AnnealedLangevinScheduler(num_train_timesteps=10, sigma_max=4.0, sigma_min=0.1, n_steps_each=3)
    assert len(scheduler.timesteps) == 10 * 3 + 1
    scheduler.set_timesteps(5, n_steps_each=2)
    assert len(scheduler.timesteps) == 5 * 2 + 1
    assert scheduler.timesteps[0].item() == pytest.approx(4.0)
    assert scheduler.timesteps[-1].item() == pytest.approx(0.1)
    ratios = scheduler.sigmas[:-1] / scheduler.sigmas[1:]
    torch.testing.assert_close(ratios, torch.full_like(ratios, (4.0 / 0.1) ** 0.25))


def test_step_size_and_final_denoise_follow_the_formulas():
    scheduler = AnnealedLangevinScheduler(num_train_timesteps=2, sigma_max=1.0, sigma_min=0.5, step_size=0.01, n_steps_each=1)
    x, score = torch.zeros(4096), torch.ones(4096)
    out = scheduler.step(score, scheduler.timesteps[0], x, generator=torch.Generator().manual_seed(0)).prev_sample
    eta = 0.01 * (1.0 / 0.5) ** 2  # alpha * sigma_i^2 / sigma_L^2
    assert out.mean().item() == pytest.approx(eta, abs=0.02)
    assert out.std().item() == pytest.approx(math.sqrt(2 * eta), rel=0.05)
    scheduler.step(score, scheduler.timesteps[1], x, generator=torch.Generator().manual_seed(0))
    final = scheduler.step(score, scheduler.timesteps[2], x).prev_sample
    torch.testing.assert_close(final, x + 0.5**2 * score)  # Tweedie, no noise
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(score, scheduler.timesteps[2], x)


def test_scheduler_noise_comes_only_from_generator():
    scheduler = AnnealedLangevinScheduler(num_train_timesteps=3)
    x = torch.zeros(8)
    a = scheduler.step(x, scheduler.timesteps[0], x, generator=torch.Generator().manual_seed(5)).prev_sample
    torch.manual_seed(123)  # global state must not matter
    scheduler.set_timesteps()
    b = scheduler.step(x, scheduler.timesteps[0], x, generator=torch.Generator().manual_seed(5)).prev_sample
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_scheduler_config_round_trip(tmp_path):
    scheduler = AnnealedLangevinScheduler(num_train_timesteps=7, sigma_max=9.0, step_size=2e-5, n_steps_each=4)
    scheduler.save_pretrained(tmp_path)
    loaded = AnnealedLangevinScheduler.from_pretrained(tmp_path)
    torch.testing.assert_close(loaded.timesteps, scheduler.timesteps)
    assert loaded.step_size == 2e-5


@pytest.mark.parametrize(
    "sigma_max, levels, published",
    [(50.0, 232, 6.2e-6), (90.0, 500, 3.3e-6)],  # NCSNv2 CIFAR-10 and CelebA 64 configs
)
def test_step_size_rule_reproduces_ncsnv2_configs(sigma_max, levels, published):
    alpha = langevin_step_size(sigma_max, 0.01, levels, 5)
    assert alpha == pytest.approx(published, rel=0.02)
    gamma = (sigma_max / 0.01) ** (1 / (levels - 1))
    error = lambda a: abs(langevin_variance_ratio(a, gamma, 0.01, 5) - 1)  # noqa: E731
    assert error(alpha) < 0.1
    assert error(alpha) <= min(error(0.9 * alpha), error(1.1 * alpha))


def test_geometric_ratio_satisfies_technique_two():
    dim = 3 * 32 * 32
    gamma = geometric_ratio(dim)
    centre = math.sqrt(2 * dim) * (gamma - 1)
    phi = lambda v: 0.5 * (1 + math.erf(v / math.sqrt(2)))  # noqa: E731
    assert phi(centre + 3 * gamma) - phi(centre - 3 * gamma) == pytest.approx(0.5, abs=1e-6)


def test_sigma_max_is_largest_pairwise_distance():
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(50, 1, 4, 4, generator=generator)
    expected = torch.cdist(images.flatten(1).double(), images.flatten(1).double()).max().item()
    assert sigma_max_from_data(images, block_size=7) == pytest.approx(expected)
    with pytest.raises(ValueError, match="NaN"):
        sigma_max_from_data(torch.tensor([[0.0, float("nan")], [1.0, 2.0]]))


def test_noise_schedule_from_data_is_usable():
    images = torch.rand(20, 1, 8, 8) * 2 - 1
    schedule = noise_schedule_from_data(images, n_steps_each=3)
    scheduler = AnnealedLangevinScheduler(**vars(schedule))
    assert scheduler.config.sigma_max == pytest.approx(sigma_max_from_data(images))
    assert scheduler.config.num_train_timesteps > 10
