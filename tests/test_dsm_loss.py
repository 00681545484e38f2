import torch
import torch.nn.functional as F

from medsyn.training.dsm_loss import dsm_loss, per_value_scale, perturb


def test_dsm_loss_at_optimal_score_equals_closed_form_minimum():
    """Data N(0, s0^2 I) in D dims: the optimal score is -x / (s0^2 + sigma^2) and the sigma^2-weighted
    loss 1/2 ||sigma s + z||^2 has expectation D/2 * s0^2 / (s0^2 + sigma^2)."""
    generator = torch.Generator().manual_seed(0)
    dim, s0 = 16, 0.7
    sigmas = torch.tensor([0.1, 0.5, 1.0, 3.0])
    clean = torch.randn(200000, dim, generator=generator) * s0
    noisy, noise, sigma = perturb(clean, sigmas, generator=generator)
    optimal = -noisy / (s0**2 + sigma[:, None] ** 2)
    loss = dsm_loss(optimal, noise, sigma).mean()
    minimum = (dim / 2 * s0**2 / (s0**2 + sigmas**2)).mean()
    assert abs(loss.item() - minimum.item()) / minimum.item() < 0.01
    for wrong in (0.9 * optimal, 1.1 * optimal, optimal + 0.05):
        assert dsm_loss(wrong, noise, sigma).mean() > loss


def test_perturb_draws_levels_uniformly_and_adds_scaled_noise():
    generator = torch.Generator().manual_seed(0)
    sigmas = torch.tensor([0.5, 1.0, 2.0])
    clean = torch.zeros(30000, 1, 2, 2)
    noisy, noise, sigma = perturb(clean, sigmas, generator=generator)
    torch.testing.assert_close(noisy, sigma.view(-1, 1, 1, 1) * noise)
    counts = torch.stack([(sigma == s).float().mean() for s in sigmas])
    torch.testing.assert_close(counts, torch.full((3,), 1 / 3), atol=0.01, rtol=0)


def test_per_value_scale_turns_the_per_value_mse_of_the_implied_noise_into_the_dsm_loss():
    """-sigma * score is the score model's noise prediction: its per-value MSE against z, times half an image's
    value count, is the DSM loss, for any shape."""
    generator = torch.Generator().manual_seed(0)
    for shape in ((4, 1, 8, 8), (3, 3, 16, 12)):
        score, noise = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
        sigma = torch.rand(shape[0], generator=generator) + 0.1
        mse = F.mse_loss(-sigma.view(-1, 1, 1, 1) * score, noise)
        torch.testing.assert_close(dsm_loss(score, noise, sigma).mean(), per_value_scale(score) * mse)
