"""RLHF's generator updates: the sampling chain as an MDP (exact against the pipeline and the DDPM posterior), the
policy gradient against its analytic value, and one round of each update moving a toy reward the right way."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from diffusers import ConfigMixin, DDPMScheduler, DPMSolverMultistepScheduler, ModelMixin, UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from medsyn import ClassConditionalDDPMPipeline, ScoreLangevinPipeline, ddpm_unet_config
from medsyn.rlhf.chain import DDIMChain, LangevinChain, gaussian_log_prob, sampling_chain
from medsyn.rlhf.policy_gradient import (
    clipped_surrogate,
    gaussian_kl,
    kl_to_reference,
    per_prompt_advantages,
    policy_gradient_update,
)
from medsyn.rlhf.reward_weighted import reward_weighted_update, reward_weights
from medsyn.schedulers import AnnealedLangevinScheduler
from medsyn.training.lora import merged, with_lora

from .conftest import get_dummy_pipeline


def generators(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


def tiny_ddpm(num_train_timesteps: int = 1000, sample_size: int = 8) -> ClassConditionalDDPMPipeline:
    torch.manual_seed(0)
    unet = UNet2DModel(**ddpm_unet_config(sample_size=sample_size, in_channels=1, num_classes=2, base_channels=8,
                                          channel_mult=(1, 2), layers_per_block=1, norm_num_groups=4))
    scheduler = DDPMScheduler(num_train_timesteps=num_train_timesteps, clip_sample=False)
    pipe = ClassConditionalDDPMPipeline(unet.eval(), scheduler, class_names=["dark", "bright"])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_langevin_chain_is_the_pipelines_sampler_and_scores_its_own_steps():
    pipe = get_dummy_pipeline()
    labels = torch.tensor([0, 1, 1])
    chain = LangevinChain(pipe, guidance_scale=2.0)
    trajectory = chain.sample(labels, generators([3, 4, 5]))
    expected = pipe(class_labels=labels, guidance_scale=2.0, generator=generators([3, 4, 5]), output_type="pt").images
    torch.testing.assert_close((trajectory.images / 2 + 0.5).clamp(0, 1), expected, atol=1e-5, rtol=0)
    # Every step but the last (noise-free) one is an action.
    assert len(trajectory.step_indices) == len(pipe.scheduler.timesteps) - 1
    with torch.no_grad():
        for k in (0, len(trajectory.step_indices) - 1):
            log_probs, mean, std = chain.step_log_prob(trajectory, k)
            noise = (trajectory.outputs[k] - mean) / std
            dims = noise[0].numel()
            density = -0.5 * noise.pow(2).flatten(1).sum(1) - dims * (math.log(std) + 0.5 * math.log(2 * math.pi))
            torch.testing.assert_close(log_probs, density, atol=1e-3, rtol=1e-5)
            torch.testing.assert_close(trajectory.log_probs[k], density, atol=1e-3, rtol=1e-5)


def test_a_ddim_step_at_eta_1_is_the_ddpm_posterior():
    """With every training timestep, DDIM at eta = 1 is Ho et al.'s ancestral step: mean and variance in closed form."""
    pipe = tiny_ddpm(num_train_timesteps=10)
    chain = DDIMChain(pipe, guidance_scale=1.0, num_inference_steps=10, eta=1.0)
    a_bar = DDPMScheduler(num_train_timesteps=10).alphas_cumprod.double()
    labels = torch.tensor([0, 1])
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for index in (0, 4, 8):
        t = int(chain.timesteps[index])
        with torch.no_grad():
            mean, std = chain.step_distribution(x, index, labels)
            eps = pipe.unet(x, torch.tensor(t), class_labels=labels).sample.double()
        beta = 1 - a_bar[t] / a_bar[t - 1]
        x0 = (x.double() - (1 - a_bar[t]).sqrt() * eps) / a_bar[t].sqrt()
        posterior_mean = (a_bar[t - 1].sqrt() * beta * x0 + (1 - beta).sqrt() * (1 - a_bar[t - 1]) * x.double()) / (
            1 - a_bar[t])
        posterior_variance = (1 - a_bar[t - 1]) / (1 - a_bar[t]) * beta
        torch.testing.assert_close(mean.double(), posterior_mean, atol=1e-5, rtol=1e-4)
        assert std == pytest.approx(float(posterior_variance.sqrt()), rel=1e-5)
    assert chain.step_distribution(x, 9, labels)[1] == 0  # to t = 0: deterministic, not an action


def test_each_ddim_chain_step_lands_where_the_next_one_starts():
    """DDIMScheduler.step goes back num_train_timesteps // steps; the chain's timesteps must be spaced by exactly that,
    whatever spacing the saved scheduler has. A pipeline saved with DPM-Solver's "linspace" spacing gave 999, 946,
    894, ...: its first step went to 949 and the next treated the sample as 946."""
    pipe = tiny_ddpm()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, timestep_spacing="linspace")
    for steps in (20, 30):
        chain = DDIMChain(pipe, guidance_scale=1.0, num_inference_steps=steps)
        timesteps = chain.timesteps.tolist()
        jump = 1000 // steps
        assert len(timesteps) == steps and timesteps[-1] == 0
        assert all(t - jump == following for t, following in zip(timesteps, timesteps[1:])), timesteps


class ConstantScore(ModelMixin, ConfigMixin):
    """A score network that outputs the trainable constant theta everywhere: the chain's mean moves by eta * theta."""

    @register_to_config
    def __init__(self, sample_size: int = 2, in_channels: int = 1, num_class_embeds: int = 2):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, sample, timestep, class_labels=None):
        return BaseOutput(sample=self.theta.expand_as(sample))


def test_the_policy_gradient_of_a_toy_langevin_chain_matches_its_analytic_value():
    """Reward = sum of the final pixels. Each step adds eta_k * theta to the mean, so dE[r]/dtheta = D sum_k eta_k.
    The surrogate's gradient at ratio 1 (REINFORCE with a mean baseline) must estimate it without bias."""
    scheduler = AnnealedLangevinScheduler(num_train_timesteps=3, sigma_max=1.0, sigma_min=0.2, step_size=0.05,
                                          n_steps_each=2, denoise_final=False)
    pipe = ScoreLangevinPipeline(ConstantScore(), scheduler)
    chain = LangevinChain(pipe, guidance_scale=1.0)
    n = 20000
    trajectory = chain.sample(torch.zeros(n, dtype=torch.long), generators(range(n)))
    rewards = trajectory.images.flatten(1).sum(1)
    advantages = rewards - rewards.mean()
    surrogate = sum(clipped_surrogate(chain.step_log_prob(trajectory, k)[0], trajectory.log_probs[k], advantages,
                                      clip_range=1e9)[0] for k in range(len(trajectory.step_indices)))
    (estimate,) = torch.autograd.grad(-surrogate, pipe.unet.theta)
    etas = [chain.scheduler.step_eta(float(chain.timesteps[k])) for k in trajectory.step_indices]
    dims = 4
    analytic = dims * sum(etas)
    # The same estimate per chain, from the noise each step drew: A * sum_k sqrt(eta_k / 2) * sum(z_k).
    per_chain = advantages * sum(
        math.sqrt(eta / 2) * ((trajectory.outputs[k] - trajectory.inputs[k] - eta * 0.3) / math.sqrt(2 * eta)
                              ).flatten(1).sum(1) for k, eta in enumerate(etas))
    assert float(estimate) == pytest.approx(float(per_chain.mean()), rel=1e-3)
    standard_error = float(per_chain.std() / math.sqrt(n))
    assert abs(float(estimate) - analytic) < 4 * standard_error
    assert standard_error < 0.1 * analytic  # the check has the power to see a wrong gradient


def test_gaussian_kl_and_log_prob_agree_with_torch_distributions():
    mean, reference, x = torch.randn(3, 2, 1, 2, 2).unbind(0)
    std = 0.7
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(mean, std),
                                                 torch.distributions.Normal(reference, std)).flatten(1).sum(1)
    torch.testing.assert_close(gaussian_kl(mean, reference, std), expected)
    torch.testing.assert_close(gaussian_log_prob(x, mean, std),
                               torch.distributions.Normal(mean, std).log_prob(x).flatten(1).sum(1))
    with pytest.raises(ValueError, match="deterministic"):
        gaussian_log_prob(x, mean, 0.0)


def test_advantages_are_standardised_within_each_prompt():
    rewards = torch.tensor([1.0, 2.0, 3.0, 10.0, 30.0, 5.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    advantages = per_prompt_advantages(rewards, groups)
    for group in (0, 1):
        members = advantages[groups == group]
        assert members.mean().abs() < 1e-6 and members.std(unbiased=False) == pytest.approx(1.0, rel=1e-4)
    assert advantages[5] == pytest.approx(float((5.0 - rewards.mean()) / rewards.std(unbiased=False)), rel=1e-4)
    with pytest.raises(ValueError, match="NaN"):
        per_prompt_advantages(torch.tensor([1.0, float("nan")]), torch.tensor([0, 0]))


def brightness(images: torch.Tensor) -> torch.Tensor:
    return images.flatten(1).mean(1)


def trained_on_flat_images(sample_size: int = 8) -> ClassConditionalDDPMPipeline:
    """The tiny DDPM trained briefly on flat images of every brightness in [-0.8, 0.8] (both classes alike), so
    that its samples vary in brightness and a reward for it has something to select."""
    pipe = tiny_ddpm(sample_size=sample_size)
    generator = torch.Generator().manual_seed(0)
    levels = torch.rand(512, 1, 1, 1, generator=generator) * 1.6 - 0.8
    images = (levels + 0.05 * torch.randn(512, 1, sample_size, sample_size, generator=generator)).clamp(-1, 1)
    pipe.unet.requires_grad_(True)
    reward_weighted_update(DDIMChain(pipe, guidance_scale=1.0), images, torch.arange(512) % 2, torch.ones(512),
                           updates=100, batch_size=32, learning_rate=2e-3, pretrain_weight=0.0)
    return pipe


@pytest.fixture(scope="module")
def flat_images_ddpm() -> ClassConditionalDDPMPipeline:
    return trained_on_flat_images()


def adapted_copy(pipe: ClassConditionalDDPMPipeline) -> tuple[ClassConditionalDDPMPipeline, DDIMChain]:
    """A copy of ``pipe`` with LoRA adapters, and its 4-step DDIM chain."""
    copied = ClassConditionalDDPMPipeline(**{**pipe.components, "unet": with_lora(copy.deepcopy(pipe.unet), rank=4)})
    copied.set_progress_bar_config(disable=True)
    return copied, DDIMChain(copied, guidance_scale=1.0, num_inference_steps=4)


HELD_OUT = list(range(1000, 1032))


def held_out_chains(chain: DDIMChain):
    return chain.sample(torch.tensor([s % 2 for s in HELD_OUT]), generators(HELD_OUT))


@pytest.mark.parametrize("method", ["policy_gradient", "reward_weighted"])
def test_one_round_of_each_update_raises_a_toy_reward(method, flat_images_ddpm):
    """The reward is the image's brightness; after one round on 64 chains, held-out chains (the same seeds before
    and after) come out brighter, with LoRA adapters; merging the adapters changes nothing."""
    pipe, chain = adapted_copy(flat_images_ddpm)
    before = brightness(held_out_chains(chain).images)
    pool = chain.sample(torch.arange(64) % 2, generators(range(64)))
    rewards = brightness(pool.images)
    if method == "policy_gradient":
        logged = policy_gradient_update(chain, pool, rewards, updates=30, batch_size=16, learning_rate=3e-3,
                                        clip_range=1.0)
        assert 0 < logged[-1]["clip_fraction"] < 1
    else:
        weights = reward_weights(rewards - rewards.min(), accepted=rewards >= rewards.median())
        reward_weighted_update(chain, pool.images, pool.labels, weights, updates=30, batch_size=16,
                               learning_rate=3e-3, pretrain_weight=0.0)
    after = brightness(held_out_chains(chain).images)
    gain = after - before
    assert gain.mean() > 4 * gain.std() / math.sqrt(len(gain)), (gain.mean(), gain.std())

    pipe.unet = merged(pipe.unet)
    assert type(pipe.unet) is UNet2DModel
    torch.testing.assert_close(brightness(held_out_chains(chain).images), after, atol=1e-4, rtol=0)


def test_the_kl_guard_keeps_the_policy_closer_to_the_reference(flat_images_ddpm):
    drift = {}
    for kl_weight in (0.0, 0.1):
        pipe, chain = adapted_copy(flat_images_ddpm)
        pool = chain.sample(torch.arange(64) % 2, generators(range(64)))
        assert kl_to_reference(chain, pool) < 1e-8  # the adapters start at zero
        policy_gradient_update(chain, pool, brightness(pool.images), updates=20, batch_size=16, learning_rate=3e-3,
                               clip_range=1.0, kl_weight=kl_weight)
        drift[kl_weight] = kl_to_reference(chain, held_out_chains(chain))
    assert 0 < drift[0.1] < 0.5 * drift[0.0], drift


def test_bad_inputs_are_named():
    pipe = tiny_ddpm()
    chain = sampling_chain(pipe, guidance_scale=1.0, num_inference_steps=4)
    pool = chain.sample(torch.tensor([0, 1]), generators([0, 1]))
    with pytest.raises(ValueError, match="every weight is 0"):
        reward_weighted_update(chain, pool.images, pool.labels, torch.zeros(2), updates=1)
    with pytest.raises(ValueError, match="non-negative"):
        reward_weights(torch.tensor([0.5, -1.0]))
    pipe.unet.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        policy_gradient_update(chain, pool, torch.tensor([0.1, 0.2]), updates=1)
    with pytest.raises(ValueError, match="eta"):
        DDIMChain(pipe, guidance_scale=1.0, eta=0.0)
    with pytest.raises(ValueError, match="class-conditional"):
        LangevinChain(get_dummy_pipeline(num_classes=None), guidance_scale=1.0)
    with pytest.raises(ValueError, match="generators"):
        chain.sample(torch.tensor([0, 1]), generators([0]))


def test_rewards_combine_the_selector_and_the_policy_and_accept_by_the_learned_threshold():
    from transformers import ViTForImageClassification

    from medsyn.rlhf.rewards import accepted_by, generator_rewards
    from medsyn.rlhf.selector import selector_config, selector_scores

    torch.manual_seed(0)
    selector = ViTForImageClassification(selector_config(8, 1, patch_size=4, hidden_size=16, num_attention_heads=2,
                                                         num_hidden_layers=1, intermediate_size=32)).eval()
    images = torch.rand(6, 1, 8, 8)
    prompts = ["dark", "bright"] * 3

    class HalfMatchPolicy:
        def predict(self, images, prompts, batch_size=64):
            return torch.tensor([0.5 if p == "dark" else 1.0 for p in prompts])

    scores = selector_scores(selector, images)
    assert not scores.requires_grad  # scoring keeps no graph of the ViT
    torch.testing.assert_close(generator_rewards(images, prompts, "selector", selector=selector), scores)
    torch.testing.assert_close(generator_rewards(images, prompts, "policy", policy=HalfMatchPolicy()),
                               torch.tensor([0.5, 1.0] * 3))
    torch.testing.assert_close(generator_rewards(images, prompts, "product", selector, HalfMatchPolicy()),
                               scores * torch.tensor([0.5, 1.0] * 3))
    with pytest.raises(ValueError, match="needs a policy"):
        generator_rewards(images, prompts, "product", selector=selector)
    with pytest.raises(ValueError, match="accept_threshold"):
        accepted_by(selector, images)
    selector.config.accept_threshold = float(scores.median())
    assert accepted_by(selector, images).tolist() == (scores >= scores.median()).tolist()


def test_rated_rewards_are_the_images_own_ratings_averaged_over_raters():
    from medsyn.rlhf.ratings import Rating
    from medsyn.rlhf.rewards import generator_rewards, rated_rewards

    def rated(image, rating, aspect, rater="dr-a"):
        return Rating(f"sha256:{image}", "glioma", rating, rater, aspect)

    ratings = [rated("a", 3, "quality"), rated("a", 3, "prompt_match"), rated("a", 1, "prompt_match", "dr-b"),
               rated("b", 2, "quality"), rated("b", 3, "prompt_match"), rated("c", 3, "quality"),
               rated("c", 3, "prompt_match")]
    rewards, accepted = rated_rewards(ratings, [f"sha256:{d}" for d in "abca"])
    # a: quality 1.0 x mean match (3 + 1) / 2 = 2 -> 0.5; b: 0.5 x 1.0; c: 1 x 1
    torch.testing.assert_close(rewards, torch.tensor([0.5, 0.5, 1.0, 0.5]))
    assert accepted.tolist() == [False, False, True, False]
    with pytest.raises(ValueError, match="every image rated for \\['prompt_match'\\]"):
        rated_rewards(ratings[:1], ["sha256:a"])
    with pytest.raises(ValueError, match="not a model's score"):
        generator_rewards(torch.rand(1, 1, 8, 8), ["x"], "ratings")


def test_the_text_guided_chain_is_medisyns_sampler():
    """MediSyn's latent DDIM chain: at eta -> 0 it is the pipeline's own DDIM sampler, with guidance against the
    empty caption and the autoencoder's decoding."""
    from .conftest import DUMMY_CAPTIONS, get_dummy_medisyn_pipeline

    pipe = get_dummy_medisyn_pipeline()
    prompts = DUMMY_CAPTIONS[:2]
    near_deterministic = sampling_chain(pipe, guidance_scale=3.0, num_inference_steps=4, prompts=prompts, eta=1e-6)
    labels = torch.tensor([0, 1, 1])
    chain_images = near_deterministic.sample(labels, generators([7, 8, 9])).images
    expected = pipe([prompts[i] for i in labels], guidance_scale=3.0, num_inference_steps=4,
                    generator=generators([7, 8, 9]), output_type="pt").images
    torch.testing.assert_close((chain_images / 2 + 0.5).clamp(0, 1), expected, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="prompts"):
        sampling_chain(pipe, guidance_scale=3.0)


def test_gradients_shared_across_processes_sum_to_the_whole_minibatchs():
    """``sum_gradients``: each process's gradient of its share's mean loss, weighted by the share and summed across
    processes, is the gradient of the whole minibatch's mean loss (two processes simulated by a reduce that adds the
    other's part)."""
    from types import SimpleNamespace

    from medsyn.rlhf.fitting import sum_gradients

    torch.manual_seed(0)
    weight, unused = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(2))
    data = torch.randn(5, 3)
    (data @ weight).pow(2).mean().backward()
    whole = weight.grad.clone()
    parts = []
    for share in (data[:2], data[2:]):
        weight.grad = None
        (share @ weight).pow(2).mean().backward()
        parts.append((weight.grad.clone(), len(share) / len(data)))
    (mine, my_share), (theirs, their_share) = parts
    weight.grad = mine
    # the other process's gradients, laid out as sum_gradients flattens them: weight's, then unused's (none: zeros)
    theirs_flat = torch.cat([theirs * their_share, torch.zeros(2)])
    other = SimpleNamespace(reduce=lambda t, reduction: t + (theirs_flat if len(t) == 5 else torch.tensor([1.0, 0.0])))
    sum_gradients([weight, unused], my_share, other)
    torch.testing.assert_close(weight.grad, whole)
    assert unused.grad is None  # no process computed one: the optimiser must not touch it (weight decay)


def test_tuning_class_embeddings_moves_only_the_rows_of_the_classes_it_was_rewarded_for():
    """Reward only class 1's chains, under guidance (which reads the null row) and with the label dropout of
    reward-weighted fine-tuning (which trains it): every weight but class 1's embedding row comes out bit-identical,
    so class 0's samples, guided, are unchanged; the unet left behind is a plain one that saves and loads."""
    from torch.nn.utils import parametrize

    from medsyn.rlhf.tuning import TunedWeights, tuned

    pipe = tiny_ddpm()
    chain = DDIMChain(pipe, guidance_scale=2.0, num_inference_steps=4)
    class0 = torch.zeros(8, dtype=torch.long)
    before_samples = chain.sample(class0, generators(range(100, 108))).images
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    pool = chain.sample(torch.ones(32, dtype=torch.long), generators(range(32)))
    tune = TunedWeights.CLASS_EMBEDDINGS
    with tuned(chain, tune):
        assert [n for n, p in pipe.unet.named_parameters() if p.requires_grad] == [
            "class_embedding.parametrizations.weight.original"]
        policy_gradient_update(chain, pool, brightness(pool.images), updates=3, batch_size=8, learning_rate=1e-1,
                               weight_decay=tune.weight_decay)
        reward_weighted_update(chain, pool.images, pool.labels, torch.ones(32), updates=3, batch_size=8,
                               learning_rate=1e-1, pretrain_weight=0.0, weight_decay=tune.weight_decay)
    assert type(pipe.unet) is UNet2DModel and not parametrize.is_parametrized(pipe.unet.class_embedding)
    assert not any(p.requires_grad for p in pipe.unet.parameters())
    after = pipe.unet.state_dict()
    assert after.keys() == before.keys()
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed == ["class_embedding.weight"]
    rows_changed = (before["class_embedding.weight"] != after["class_embedding.weight"]).any(1)
    assert rows_changed.tolist() == [False, True, False]  # class 0, class 1, the null class
    torch.testing.assert_close(chain.sample(class0, generators(range(100, 108))).images, before_samples,
                               atol=0, rtol=0)


def test_tuning_every_weight_keeps_a_reference_and_class_embeddings_need_a_class_table():
    from medsyn.rlhf.tuning import tuned

    pipe = tiny_ddpm()
    chain = DDIMChain(pipe, guidance_scale=1.0, num_inference_steps=4)
    pool = chain.sample(torch.tensor([0, 1, 0, 1]), generators(range(4)))
    with tuned(chain, "all"):
        assert all(p.requires_grad for p in pipe.unet.parameters())
        assert kl_to_reference(chain, pool) == 0
        policy_gradient_update(chain, pool, brightness(pool.images), updates=2, batch_size=4, learning_rate=1e-2)
        assert kl_to_reference(chain, pool) > 0
    assert not any(p.requires_grad for p in pipe.unet.parameters())

    from .conftest import DUMMY_CAPTIONS, get_dummy_medisyn_pipeline

    medisyn = get_dummy_medisyn_pipeline()
    text_chain = sampling_chain(medisyn, guidance_scale=1.0, num_inference_steps=4, prompts=DUMMY_CAPTIONS[:2])
    with pytest.raises(ValueError, match="--tune class_embeddings needs a unet with a class-embedding table"):
        with tuned(text_chain, "class_embeddings"):
            pass
    with pytest.raises(ValueError, match="not a valid TunedWeights"):
        with tuned(chain, "bias"):
            pass
