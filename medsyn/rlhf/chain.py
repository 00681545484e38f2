"""The sampler as a Markov decision process (DDPO, Black et al. 2023; DPOK, Fan et al. 2023).

Each stochastic sampling step is a Gaussian policy pi(x' | x, t, c) = N(mean(x, t, c), std_t^2 I): the action is
the next sample, and its log-probability is differentiable in the generator's weights. medsyn has two such chains:

- annealed Langevin (score models): mean x + eta s(x, sigma), std sqrt(2 eta), with eta the scheduler's step size
  at sigma (``AnnealedLangevinScheduler.step_eta``);
- DDIM with eta > 0 (pixel DDPMs): diffusers' ``DDIMScheduler.step`` without noise is the mean, eta times the
  posterior standard deviation the std (eta = 1 is DDPM's ancestral sampler).

Classifier-free guidance is part of the policy: the mean uses the guided prediction. Deterministic steps (the
Langevin chain's last, noise-free Tweedie step; a DDIM step to t = 0 with alpha 1) are not actions and carry no
log-probability; as in DDPO, the policy gradient leaves out their direct dependence on the weights.

Each chain also gives its model's own training loss per image (``denoising_loss``), what reward-weighted
fine-tuning minimises, and a ``reference()`` context in which the unet is the one before the update (the adapters
off for LoRA, a frozen copy otherwise), what the KL guard compares with.
"""

from __future__ import annotations

import contextlib
import copy
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils.torch_utils import randn_tensor

from medsyn.models.latent_diffusion import encode_prompts, prompt_max_length, unit_latents
from medsyn.models.preconditioning import network_score
from medsyn.models.score_unet import null_class_label
from medsyn.schedulers.scheduling_annealed_langevin import AnnealedLangevinScheduler, geometric_sigmas
from medsyn.training.class_conditional import drop_labels
from medsyn.training.denoising_loss import noised_with_target
from medsyn.training.dsm_loss import dsm_loss, perturb


def gaussian_log_prob(sample: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """log N(sample; mean, std^2 I) per image (B,), summed over the pixels, in float64-safe float32."""
    if std <= 0:
        raise ValueError(f"a deterministic step (std {std}) has no log-probability")
    dims = sample[0].numel()
    squared = (sample.float() - mean.float()).pow(2).flatten(1).sum(1)
    return -squared / (2 * std**2) - dims * (math.log(std) + 0.5 * math.log(2 * math.pi))


@dataclass
class Trajectory:
    """One batch of sampling chains: every stochastic step's input, output and log-probability under the model
    that sampled it.

    Attributes:
        labels: the class of each chain (B,).
        inputs, outputs: the sample before and after each stochastic step (K, B, C, H, W).
        step_indices: each stochastic step's index in the schedule (K,).
        log_probs: log pi(output | input) under the sampling model (K, B).
        images: the final samples in [-1, 1] (B, C, H, W).
    """

    labels: torch.Tensor
    inputs: torch.Tensor
    outputs: torch.Tensor
    step_indices: torch.Tensor
    log_probs: torch.Tensor
    images: torch.Tensor

    def rows(self, rows: torch.Tensor) -> Trajectory:
        """The chains ``rows`` of this batch."""
        return Trajectory(self.labels[rows], self.inputs[:, rows], self.outputs[:, rows], self.step_indices,
                          self.log_probs[:, rows], self.images[rows])

    @staticmethod
    def cat(trajectories: list[Trajectory]) -> Trajectory:
        """Batches of the same schedule joined along the batch."""
        first = trajectories[0]
        def joined(name: str, dim: int) -> torch.Tensor:
            return torch.cat([getattr(t, name) for t in trajectories], dim)

        return Trajectory(joined("labels", 0), joined("inputs", 1), joined("outputs", 1), first.step_indices,
                          joined("log_probs", 1), joined("images", 0))


class SamplingChain(ABC):
    """A conditional pipeline's sampler, one Gaussian step at a time. Each chain's condition is an index ("label"):
    a class of a class-conditional model, or a prompt of a text-guided one.

    Args:
        pipe: the pipeline; its ``unet`` may be wrapped by peft (LoRA).
        guidance_scale: classifier-free guidance weight of the policy.
        label_drop_rate: the share of unconditional samples in ``denoising_loss`` (keeps guidance's unconditional
            half trained, as in the original training).
    """

    def __init__(self, pipe, guidance_scale: float, label_drop_rate: float = 0.1):
        self.pipe, self.guidance_scale, self.label_drop_rate = pipe, guidance_scale, label_drop_rate
        self._reference_unet = None

    def sample_shape(self, batch_size: int) -> tuple[int, ...]:
        """The shape of the chain's state for ``batch_size`` chains (the unet's input)."""
        return self.pipe.sample_shape(batch_size)

    def to_images(self, state: torch.Tensor) -> torch.Tensor:
        """The images in [-1, 1] the chain's final state stands for (the state itself in pixel space)."""
        return state

    def image_shape(self) -> tuple[int, ...]:
        """(C, H, W) of the images the chain makes."""
        return tuple(self.sample_shape(1)[1:])

    @property
    def timesteps(self) -> torch.Tensor:
        return self.scheduler.timesteps

    @property
    def prior_sigma(self) -> float:
        """The standard deviation of the chain's first sample."""
        return float(self.scheduler.init_noise_sigma)

    @abstractmethod
    def step_distribution(self, sample: torch.Tensor, index: int, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(mean, std) of step ``index`` from ``sample``; std 0 for a deterministic step. Differentiable."""

    @abstractmethod
    def denoising_loss(self, clean: torch.Tensor, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The model's own training loss per image (B,) on clean images in [-1, 1]."""

    def guided(self, sample: torch.Tensor, t, labels: torch.Tensor) -> torch.Tensor:
        return self.pipe.guided_prediction(sample, t, labels.to(sample.device), self.guidance_scale)

    def keep_reference(self) -> None:
        """Keep a frozen copy of the unet as the reference (full fine-tuning; LoRA needs none)."""
        if not hasattr(self.pipe.unet, "disable_adapter"):
            self._reference_unet = copy.deepcopy(self.pipe.unet).requires_grad_(False).eval()

    @contextlib.contextmanager
    def reference(self):
        """The generator as it was before the update: LoRA adapters off, or the copy ``keep_reference`` made."""
        unet = self.pipe.unet
        if hasattr(unet, "disable_adapter"):
            with unet.disable_adapter():
                yield
            return
        if self._reference_unet is None:
            raise ValueError("no reference model: call keep_reference() before updating a fully trained unet")
        self.pipe.unet = self._reference_unet
        try:
            yield
        finally:
            self.pipe.unet = unet

    @torch.no_grad()
    def sample(self, labels: torch.Tensor, generators: list[torch.Generator]) -> Trajectory:
        """Run the chain for one image per label, each drawing its noise from its own generator."""
        if len(generators) != len(labels):
            raise ValueError(f"{len(generators)} generators for {len(labels)} labels")
        device = self.pipe.device
        x = randn_tensor(self.sample_shape(len(labels)), generator=generators, device=device) * self.prior_sigma
        inputs, outputs, indices, log_probs = [], [], [], []
        for index in range(len(self.timesteps)):
            mean, std = self.step_distribution(x, index, labels)
            if std == 0:
                x = mean
                continue
            noise = randn_tensor(x.shape, generator=generators, device=device)
            following = mean + std * noise
            inputs.append(x.cpu())
            outputs.append(following.cpu())
            indices.append(index)
            log_probs.append(gaussian_log_prob(following, mean, std).cpu())
            x = following
        if not inputs:
            raise ValueError("this schedule has no stochastic step: nothing for a policy gradient to act on")
        return Trajectory(labels.cpu(), torch.stack(inputs), torch.stack(outputs), torch.tensor(indices),
                          torch.stack(log_probs), self.to_images(x).float().cpu())

    def step_log_prob(self, trajectory: Trajectory, k: int) -> tuple[torch.Tensor, torch.Tensor, float]:
        """(log-probability (B,) of the k-th stochastic step's output under the current model, its mean, std)."""
        device = self.pipe.device
        index = int(trajectory.step_indices[k])
        mean, std = self.step_distribution(trajectory.inputs[k].to(device), index, trajectory.labels)
        return gaussian_log_prob(trajectory.outputs[k].to(device), mean, std), mean, std


def check_class_conditional(pipe) -> None:
    if null_class_label(pipe.unet) is None:
        raise ValueError("RLHF on this generator needs a class-conditional unet (its prompts are its classes)")


class LangevinChain(SamplingChain):
    """Annealed Langevin dynamics of a score model (``ScoreLangevinPipeline`` with its ``AnnealedLangevinScheduler``).

    ``num_inference_steps`` and ``n_steps_each`` as in the pipeline (default: the trained schedule)."""

    def __init__(self, pipe, guidance_scale: float, num_inference_steps: int | None = None,
                 n_steps_each: int | None = None, label_drop_rate: float = 0.1):
        super().__init__(pipe, guidance_scale, label_drop_rate)
        check_class_conditional(pipe)
        if not isinstance(pipe.scheduler, AnnealedLangevinScheduler):
            raise ValueError(f"a Langevin chain needs the AnnealedLangevinScheduler, not "
                             f"{type(pipe.scheduler).__name__}")
        self.scheduler = AnnealedLangevinScheduler.from_config(pipe.scheduler.config)
        self.scheduler.set_timesteps(num_inference_steps, n_steps_each=n_steps_each)
        config = self.scheduler.config
        self.train_sigmas = geometric_sigmas(config.sigma_max, config.sigma_min, config.num_train_timesteps).float()

    def step_distribution(self, sample, index, labels):
        sigma = self.timesteps[index].to(sample.device)
        score = self.guided(sample, sigma, labels)
        if self.scheduler.is_final_denoise(index):
            return sample + sigma**2 * score, 0.0
        eta = self.scheduler.step_eta(float(sigma))
        return sample + eta * score, math.sqrt(2 * eta)

    def denoising_loss(self, clean, labels, generator):
        labels = drop_labels(labels, null_class_label(self.pipe.unet), self.label_drop_rate, generator)
        noisy, noise, sigma = perturb(clean, self.train_sigmas.to(clean.device), generator=generator)
        score = network_score(self.pipe.unet, noisy, sigma, class_labels=labels)
        return dsm_loss(score, noise.float(), sigma.float())


class DDIMChain(SamplingChain):
    """DDIM with stochasticity ``eta`` (> 0; 1 is DDPM's ancestral sampler) on a pixel DDPM
    (``ClassConditionalDDPMPipeline``), whatever scheduler the pipeline samples with."""

    def __init__(self, pipe, guidance_scale: float, num_inference_steps: int = 20, eta: float = 1.0,
                 label_drop_rate: float = 0.1):
        super().__init__(pipe, guidance_scale, label_drop_rate)
        self._ddim(num_inference_steps, eta)
        check_class_conditional(pipe)

    def _ddim(self, num_inference_steps: int, eta: float) -> None:
        pipe = self.pipe
        if not 0 < eta <= 1:
            raise ValueError(f"eta must be in (0, 1] for a stochastic chain, got {eta}")
        self.eta = eta
        # Clipping x0 (diffusers' DDIM default) only where the model's own schedule asks for it (medsyn's DDPMs don't).
        # "leading" spacing whatever the saved scheduler's: DDIMScheduler.step goes back a fixed
        # num_train_timesteps // steps, which only "leading" timesteps are spaced by (a DPM-Solver config's "linspace"
        # stepped 999 -> 949 while the next step started from 946).
        self.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="leading",
                                                   clip_sample=pipe.scheduler.config.get("clip_sample", False))
        self.scheduler.set_timesteps(num_inference_steps)
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def step_distribution(self, sample, index, labels):
        t = self.timesteps[index]
        prediction = self.guided(self.scheduler.scale_model_input(sample, t), t.to(sample.device), labels)
        mean = self.scheduler.step(prediction, t, sample, eta=self.eta,
                                   variance_noise=torch.zeros_like(sample)).prev_sample
        previous = int(t) - self.scheduler.config.num_train_timesteps // self.scheduler.num_inference_steps
        return mean, self.eta * float(self.scheduler._get_variance(int(t), previous)) ** 0.5

    def denoising_loss(self, clean, labels, generator):
        labels = drop_labels(labels, null_class_label(self.pipe.unet), self.label_drop_rate, generator)
        noisy, timesteps, target = noised_with_target(self.noise_scheduler, clean, generator)
        prediction = self.pipe.unet(noisy, timesteps, class_labels=labels).sample
        return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)


class TextLatentDDIMChain(DDIMChain):
    """DDIM with ``eta`` > 0 in the latent space of a text-guided model (``MediSynPipeline``); label i is
    ``prompts[i]``. Guidance is against the empty caption, as the pipeline's default; the chain's final latents are
    decoded by the autoencoder into the images that are rated."""

    def __init__(self, pipe, prompts: list[str], guidance_scale: float, num_inference_steps: int = 20,
                 eta: float = 1.0, label_drop_rate: float = 0.1):
        SamplingChain.__init__(self, pipe, guidance_scale, label_drop_rate)
        if pipe.vae is None or pipe.unet is None:
            raise ValueError("a text-guided chain needs the pipeline's vae and unet")
        if not prompts:
            raise ValueError("a text-guided chain needs its prompts")
        self._ddim(num_inference_steps, eta)
        self.prompts = list(prompts)
        with torch.no_grad():  # every prompt's token states once, the empty caption last
            self.states, self.masks = encode_prompts(pipe.text_encoder, pipe.tokenizer, self.prompts + [""],
                                                     prompt_max_length(pipe.tokenizer, pipe.text_encoder), pipe.device)

    def sample_shape(self, batch_size: int) -> tuple[int, ...]:
        side = self.pipe.unet.config.sample_size
        return (batch_size, self.pipe.unet.config.in_channels, side, side)

    def to_images(self, state: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.pipe.decode_latents(state)

    def image_shape(self) -> tuple[int, ...]:
        side = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        return (self.pipe.vae.config.in_channels, side, side)

    def _context(self, labels: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Token states and masks of each chain's prompt (label ``len(prompts)`` is the empty caption)."""
        labels = labels.to(self.states.device)
        return self.states[labels].to(device), self.masks[labels].to(device)

    def guided(self, sample: torch.Tensor, t, labels: torch.Tensor) -> torch.Tensor:
        unet = self.pipe.unet
        if self.guidance_scale == 1.0:
            context, mask = self._context(labels, sample.device)
            return unet(sample, t, encoder_hidden_states=context, encoder_attention_mask=mask,
                        return_dict=False)[0].float()
        empty = torch.full_like(labels, len(self.prompts))
        context, mask = self._context(torch.cat([labels.cpu(), empty.cpu()]), sample.device)
        both = unet(torch.cat([sample, sample]), t, encoder_hidden_states=context, encoder_attention_mask=mask,
                    return_dict=False)[0].float()
        conditional, unconditional = both.chunk(2)
        return unconditional + self.guidance_scale * (conditional - unconditional)

    def denoising_loss(self, clean, labels, generator):
        """MediSyn's training loss on the frozen autoencoder's latents of ``clean``, captions dropped at
        ``label_drop_rate``."""
        latents = unit_latents(self.pipe.vae, clean.to(self.pipe.vae.dtype), generator)
        drop = torch.rand(len(labels), generator=generator, device=labels.device) < self.label_drop_rate
        labels = torch.where(drop, torch.full_like(labels, len(self.prompts)), labels)
        noisy, timesteps, target = noised_with_target(self.noise_scheduler, latents, generator)
        context, mask = self._context(labels, latents.device)
        prediction = self.pipe.unet(noisy, timesteps, encoder_hidden_states=context, encoder_attention_mask=mask,
                                    return_dict=False)[0]
        return (prediction.float() - target.float()).pow(2).flatten(1).mean(1)


def sampling_chain(pipe, guidance_scale: float, num_inference_steps: int | None = None,
                   prompts: list[str] | None = None, **options) -> SamplingChain:
    """The chain of a score-Langevin, pixel-DDPM or MediSyn pipeline (``prompts``: MediSyn's, label i the i-th)."""
    from medsyn.pipelines import ClassConditionalDDPMPipeline, MediSynPipeline, ScoreLangevinPipeline

    if isinstance(pipe, ScoreLangevinPipeline):
        return LangevinChain(pipe, guidance_scale, num_inference_steps, **options)
    if isinstance(pipe, ClassConditionalDDPMPipeline):
        return DDIMChain(pipe, guidance_scale, num_inference_steps or 20, **options)
    if isinstance(pipe, MediSynPipeline):
        return TextLatentDDIMChain(pipe, prompts or [], guidance_scale, num_inference_steps or 20, **options)
    raise ValueError(f"no sampling chain for {type(pipe).__name__}: RLHF updates score-Langevin, DDPM and MediSyn "
                     "pipelines")
