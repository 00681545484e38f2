"""Samplers of the variance-exploding process for score models, checked against closed forms: with the exact score
of Gaussian data N(mu, s^2), each reproduces the mean and variance, its error shrinks at its order, and the
pipeline runs the same maths through a stand-in network with the unet's interface."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, EDMDPMSolverMultistepScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput

from medsyn.pipelines import ScoreLangevinPipeline
from medsyn.schedulers import AnnealedLangevinScheduler
from medsyn.schedulers.denoiser import SamplerInput, sampler_input, to_scheduler_output
from medsyn.schedulers.ncsn_rules import langevin_step_size
from medsyn.schedulers.scheduling_edm_heun import EDMHeunScheduler, karras_sigmas
from medsyn.schedulers.scheduling_predictor_corrector import PredictorCorrectorScheduler

MU, S = 0.5, 0.5  # data N(MU, S^2); images in [-1, 1] have per-pixel spreads of this order
SIGMA_MAX, SIGMA_MIN = 50.0, 0.01  # medsyn's score models' range


def exact_score(x: torch.Tensor, sigma) -> torch.Tensor:
    return -(x - MU) / (S**2 + float(sigma) ** 2)


def sample(scheduler, x: torch.Tensor, generator=None, steps: int | None = None) -> torch.Tensor:
    """The pipeline's loop on scalars, with the exact score (same conversion as the pipeline)."""
    scheduler.set_timesteps(steps)
    kind = sampler_input(scheduler)
    for t in scheduler.timesteps:
        if kind is SamplerInput.PRECONDITIONED:
            scheduler.scale_model_input(x, t)
            sigma = scheduler.sigmas[scheduler.step_index]
        else:
            sigma = t
        output = to_scheduler_output(scheduler, kind, x, exact_score(x, sigma).to(x.dtype), sigma)
        x = scheduler.step(output, t, x, generator=generator).prev_sample
    return x


def from_the_prior(scheduler, n: int, steps: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard normals and their image under the exact marginal at the first noise level, N(MU, S^2 + sigma^2)."""
    scheduler.set_timesteps(steps)
    first = scheduler.sigmas[0] if sampler_input(scheduler) is SamplerInput.PRECONDITIONED else scheduler.init_noise_sigma
    z = torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return z, MU + z * math.sqrt(S**2 + float(first) ** 2)


def test_karras_sigmas_follow_the_formula():
    sigmas = karras_sigmas(SIGMA_MAX, SIGMA_MIN, 5, rho=7.0)
    assert sigmas[0].item() == pytest.approx(SIGMA_MAX) and sigmas[-1].item() == pytest.approx(SIGMA_MIN)
    middle = (SIGMA_MAX ** (1 / 7) + 0.5 * (SIGMA_MIN ** (1 / 7) - SIGMA_MAX ** (1 / 7))) ** 7
    assert sigmas[2].item() == pytest.approx(middle)


def test_edm_heun_costs_two_evaluations_a_step_but_the_last():
    scheduler = EDMHeunScheduler(sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN)
    scheduler.set_timesteps(18)
    assert len(scheduler.timesteps) == 35
    assert scheduler.timesteps[0].item() == pytest.approx(SIGMA_MAX)  # no churn: t_hat_0 = sigma_max


def test_deterministic_edm_heun_is_second_order_and_reproduces_the_gaussian():
    """The ODE maps z to MU + S z exactly; Heun's error against that map falls ~4x per doubling of steps."""
    scheduler = EDMHeunScheduler(sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN)
    errors = []
    for steps in (10, 20, 40):
        z, x = from_the_prior(scheduler, 20000, steps)
        errors.append((sample(scheduler, x, steps=steps) - (MU + S * z)).abs().max().item())
    assert errors[0] / errors[1] > 3 and errors[1] / errors[2] > 3
    z, x = from_the_prior(scheduler, 200000, 35)  # 69 evaluations: within 2% on this Gaussian
    out = sample(scheduler, x, steps=35)
    assert out.mean().item() == pytest.approx(MU, rel=0.02)
    assert out.var().item() / (S**2 * z.var().item()) == pytest.approx(1, abs=0.02)


def test_stochastic_edm_heun_matches_within_sampling_error():
    scheduler = EDMHeunScheduler(sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN, s_churn=10, s_tmin=0.05, s_tmax=50)
    n = 100000
    _, x = from_the_prior(scheduler, n, 80)
    out = sample(scheduler, x, generator=torch.Generator().manual_seed(1), steps=80)  # 159 evaluations
    assert abs(out.mean().item() - MU) < 3 * S / math.sqrt(n)
    assert abs(out.var().item() / S**2 - 1) < 3 * math.sqrt(2 / n)
    assert scheduler.init_noise_sigma == pytest.approx(SIGMA_MAX * (1 + min(10 / 80, math.sqrt(2) - 1)))


def test_dpm_solver_pp_of_diffusers_reproduces_the_gaussian_within_50_evaluations():
    scheduler = EDMDPMSolverMultistepScheduler(sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
    errors = []
    for steps in (25, 50):
        z, x = from_the_prior(scheduler, 100000, steps)
        out = sample(scheduler, x.float(), steps=steps).double()
        errors.append(abs(out.var().item() / (S**2 * z.var().item()) - 1))
    assert errors[1] < 0.02 and out.mean().item() == pytest.approx(MU, rel=0.02)
    assert errors[0] / errors[1] > 3  # second order


def test_fewer_langevin_levels_rederive_the_step_size_instead_of_stalling():
    """The trained alpha at 10 levels x 2 steps leaves the samples at ~400 s^2; technique 4 for that schedule does
    not (annealed Langevin's own bias at such budgets remains)."""
    trained = langevin_step_size(SIGMA_MAX, SIGMA_MIN, 40, 6)
    scheduler = AnnealedLangevinScheduler(num_train_timesteps=40, sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN,
                                          step_size=trained, n_steps_each=6)
    scheduler.set_timesteps()
    assert scheduler.step_size == trained  # the trained schedule keeps its alpha
    scheduler.set_timesteps(10, n_steps_each=2)
    assert scheduler.step_size == langevin_step_size(SIGMA_MAX, SIGMA_MIN, 10, 2)
    scheduler.set_timesteps(10, n_steps_each=2, step_size=1e-5)
    assert scheduler.step_size == 1e-5  # an explicit alpha wins
    variances = {}
    for name, alpha in (("trained", trained), ("rederived", None)):
        scheduler.set_timesteps(10, n_steps_each=2, step_size=alpha)
        x = MU + SIGMA_MAX * torch.randn(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        generator = torch.Generator().manual_seed(1)
        for t in scheduler.timesteps:
            x = scheduler.step(exact_score(x, t), t, x, generator=generator).prev_sample
        variances[name] = x.var().item() / S**2
    assert variances["trained"] > 100 and variances["rederived"] < 5


class GaussianScoreNetwork(ModelMixin, ConfigMixin):
    """The exact score of N(mean, std^2) per pixel, with the interface of medsyn's score unet (timestep = sigma).
    The default keeps the data inside [-1, 1], where the pipeline's output lives."""

    @register_to_config
    def __init__(self, sample_size: int = 4, in_channels: int = 1, num_class_embeds: int | None = None,
                 mean: float = 0.1, std: float = 0.3):
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives the model a dtype and a device

    def forward(self, sample, timestep, class_labels=None):
        sigma = torch.as_tensor(timestep, dtype=sample.dtype, device=sample.device)
        score = -(sample - self.config.mean) / (self.config.std**2 + sigma**2)
        return BaseOutput(sample=score + 0 * self.anchor)


@pytest.mark.parametrize(("scheduler_class", "steps"), [(EDMHeunScheduler, 35), (EDMDPMSolverMultistepScheduler, 50)])
def test_the_pipeline_samples_the_gaussian_with_a_swapped_in_scheduler(scheduler_class, steps):
    langevin = AnnealedLangevinScheduler(num_train_timesteps=10, sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN)
    pipe = ScoreLangevinPipeline(GaussianScoreNetwork(), langevin)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.sigma_max == SIGMA_MAX and pipe.scheduler.config.sigma_min == SIGMA_MIN
    pipe.set_progress_bar_config(disable=True)
    images = pipe(batch_size=4000, num_inference_steps=steps, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).images  # (x / 2 + 0.5), clipped to [0, 1]
    pixels = (images * 2 - 1).flatten().double()
    network = pipe.unet.config
    assert pixels.mean().item() == pytest.approx(network.mean, abs=0.02 * network.std)
    assert pixels.var().item() == pytest.approx(network.std**2, rel=0.03)
    assert pipe.num_timesteps == (2 * steps - 1 if scheduler_class is EDMHeunScheduler else steps)


def test_langevin_only_arguments_and_unknown_schedulers_are_refused():
    pipe = ScoreLangevinPipeline(GaussianScoreNetwork(), EDMHeunScheduler(sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN))
    with pytest.raises(ValueError, match="n_steps_each and step_size set annealed Langevin's steps"):
        pipe(n_steps_each=2)
    pipe.scheduler = DDPMScheduler()
    with pytest.raises(ValueError, match="does not sample a variance-exploding score model"):
        pipe()


def test_a_folder_saved_with_a_swapped_in_sampler_loads_it_back(tmp_path):
    from .conftest import get_dummy_pipeline

    pipe = get_dummy_pipeline()
    pipe.scheduler = EDMHeunScheduler.from_config(pipe.scheduler.config, s_churn=5.0)
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "scheduler" / "scheduling_edm_heun.py").is_file()  # shipped, for users without medsyn
    loaded = ScoreLangevinPipeline.from_pretrained(tmp_path)
    assert type(loaded.scheduler) is EDMHeunScheduler and loaded.scheduler.config.s_churn == 5.0
    loaded.set_progress_bar_config(disable=True)

    def run(p):
        return p(class_labels=[0, 1], num_inference_steps=4, output_type="pt",
                 generator=[torch.Generator().manual_seed(s) for s in (0, 1)]).images

    assert torch.equal(run(pipe), run(loaded))


def predictor_corrector_variance(levels: int, correct_steps: int, dims: int = 1024, n: int = 2000) -> float:
    scheduler = PredictorCorrectorScheduler(sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN, correct_steps=correct_steps)
    generator = torch.Generator().manual_seed(0)
    x = MU + torch.randn(n, dims, generator=generator, dtype=torch.float64) * math.sqrt(S**2 + SIGMA_MAX**2)
    out = sample(scheduler, x, generator=generator, steps=levels)
    return out.var().item() / S**2


def test_predictor_corrector_converges_to_the_gaussian():
    """The predictor alone (ancestral sampling) is first order; the corrector at SNR 0.16 keeps a bias of about 3%
    of its own on image-sized data (1024 dimensions)."""
    errors = [abs(predictor_corrector_variance(levels, 0, dims=16, n=20000) - 1) for levels in (100, 200, 400)]
    assert errors[0] / errors[1] > 1.6 and errors[1] / errors[2] > 1.6
    assert abs(predictor_corrector_variance(200, 1, n=400) - 1) < 0.05  # 400 evaluations; SNR 0.16 costs ~3%


def test_predictor_corrector_images_do_not_depend_on_their_batch():
    """diffusers' ScoreSdeVeScheduler sizes the corrector step from norms averaged over the batch; here each
    image uses its own, so image i is the same alone or beside others."""
    scheduler = PredictorCorrectorScheduler(sigma_max=SIGMA_MAX, sigma_min=SIGMA_MIN, snr=0.16)
    start = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * SIGMA_MAX
    batch = sample(scheduler, start.clone(), [torch.Generator().manual_seed(s) for s in range(3)], steps=20)
    alone = sample(scheduler, start[1:2].clone(), [torch.Generator().manual_seed(1)], steps=20)
    torch.testing.assert_close(batch[1:2], alone, rtol=0, atol=1e-12)


@pytest.mark.parametrize("sampler", ["edm-heun", "dpm-solver++", "predictor-corrector"])
def test_generate_takes_a_sampler_by_name(tmp_path, sampler):
    import numpy as np
    from PIL import Image

    from medsyn.cli import main
    from medsyn.schedulers.samplers import sampler_scheduler
    from medsyn.seeding import keyed_generator

    from .conftest import get_dummy_pipeline

    pipe = get_dummy_pipeline()
    pipe.save_pretrained(tmp_path / "model")
    assert main(["generate", "--model", str(tmp_path / "model"), "--class-label", "tumor", "--num-images", "2",
                 "--sampler", sampler, "--num-inference-steps", "4", "--output-dir", str(tmp_path / "out")]) == 0
    pipe.scheduler = sampler_scheduler(sampler, pipe.scheduler.config)
    expected = pipe(class_labels=["tumor"] * 2, num_inference_steps=4, output_type="np",
                    generator=[keyed_generator(0, i) for i in range(2)]).images
    for i in range(2):
        written = np.asarray(Image.open(tmp_path / "out" / f"tumor_0_{i:06d}.png"))
        assert np.array_equal(written, np.round(expected[i, ..., 0] * 255).astype(np.uint8))
    assert main(["generate", "--model", str(tmp_path / "model"), "--sampler", sampler, "--n-steps-each", "2",
                 "--output-dir", str(tmp_path / "bad")]) == 2
