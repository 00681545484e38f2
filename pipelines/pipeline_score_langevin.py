"""Class-conditional generation with a noise-conditional score network and annealed Langevin dynamics.

Example:
    ```py
    >>> import torch
    >>> from medsyn import ScoreLangevinPipeline

    >>> pipe = ScoreLangevinPipeline.from_pretrained("path/to/score-langevin-brain-mri")
    >>> images = pipe(class_labels=["tumor"] * 4, generator=torch.Generator().manual_seed(0)).images
    >>> images[0].save("tumour.png")
    ```
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.callbacks import PipelineCallback

from medsyn.models.preconditioning import network_score
from medsyn.schedulers.denoiser import SamplerInput, sampler_input, to_scheduler_output
from medsyn.schedulers.scheduling_annealed_langevin import AnnealedLangevinScheduler

# Imported so that a saved folder with this scheduler ships its code and loads it back as medsyn's.
from medsyn.schedulers.scheduling_edm_heun import DEFAULT_STEPS, EDMHeunScheduler  # noqa: F401
from medsyn.schedulers.scheduling_predictor_corrector import PredictorCorrectorScheduler  # noqa: F401
from medsyn.validation import finite_number, whole_number

from .class_conditioning import ClassConditionalMixin, ClassLabels
from .hub_folder import HubFolderMixin
from .step_callbacks import StepCallbackMixin


class ScoreLangevinPipeline(ClassConditionalMixin, HubFolderMixin, DiffusionPipeline, StepCallbackMixin):
    r"""Pipeline for image generation by annealed Langevin dynamics on a learned score.

    Parameters:
        unet ([`UNet2DModel`]): a noise-conditional score network (``time_embedding_type="fourier"``; see
            ``medsyn.models.score_unet``). Its ``timestep`` input is the noise level sigma.
        scheduler ([`AnnealedLangevinScheduler`]): the sampler. Annealed Langevin dynamics by default; any sampler
            of the variance-exploding process swaps in with ``X.from_config(pipe.scheduler.config)``: medsyn's
            ``EDMHeunScheduler`` (EDM's Heun, deterministic or stochastic), ``PredictorCorrectorScheduler``
            (Song et al.'s predictor-corrector) or diffusers' EDM schedulers such as
            ``EDMDPMSolverMultistepScheduler`` (DPM-Solver++ 2M), which see the score model as the denoiser
            D(x, sigma) = x + sigma^2 s(x, sigma).
        class_names (`list[str]`, *optional*): names of the unet's classes, so labels can be given by name. The
            config holds them as ``{"0": name, ...}`` (transformers' ``id2label``): a list in model_index.json
            is what diffusers' Hub download reads as a component.
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(
        self,
        unet: UNet2DModel,
        scheduler: AnnealedLangevinScheduler,
        class_names: list[str] | dict[str, str] | None = None,
        default_guidance_scale: float | None = None,
    ):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_class_names(class_names)
        self.register_to_config(default_guidance_scale=default_guidance_scale)

    def check_inputs(
        self,
        batch_size: int,
        num_inference_steps: int | None,
        n_steps_each: int | None,
        step_size: float | None,
        guidance_scale: float,
        output_type: str,
        max_batch_size: int | None,
    ) -> None:
        """Reject bad arguments with a message that names them, before any model runs (None means the default;
        0 is an error, never the default)."""
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        finite_number(guidance_scale, "guidance_scale", minimum=0)
        whole_number(batch_size, "batch_size")
        if num_inference_steps is not None:
            whole_number(num_inference_steps, "num_inference_steps", minimum=2)
        sampler_input(self.scheduler)  # an unsupported scheduler is an error here
        langevin = isinstance(self.scheduler, AnnealedLangevinScheduler)
        if not langevin and (n_steps_each is not None or step_size is not None):
            raise ValueError(f"n_steps_each and step_size set annealed Langevin's steps; "
                             f"{type(self.scheduler).__name__} takes num_inference_steps only")
        if n_steps_each is not None:
            whole_number(n_steps_each, "n_steps_each")
        if step_size is not None:
            finite_number(step_size, "step_size", minimum=0, exclusive=True)
        if max_batch_size is not None:
            whole_number(max_batch_size, "max_batch_size")

    def network_output(self, sample: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """The score at ``(sample, sigma = t)``, whatever the unet's parameterisation (NCSN or EDM)."""
        return network_score(self.unet, sample, t, class_labels=labels)

    @property
    def prior_sigma(self) -> float:
        """The standard deviation of the first sample: the scheduler's, except that diffusers' EDM schedulers
        report the variance-preserving sqrt(sigma_max^2 + 1), where a variance-exploding model starts at sigma_max."""
        if sampler_input(self.scheduler) is SamplerInput.PRECONDITIONED:
            return float(self.scheduler.sigmas[0])
        return float(self.scheduler.init_noise_sigma)

    def _sample_chunk(
        self,
        latents: torch.Tensor,
        labels: torch.Tensor | None,
        generators: list[torch.Generator],
        autocast_dtype: torch.dtype | None,
        callback_on_step_end: Callable | None,
        schedule: dict[str, Any],
    ) -> torch.Tensor:
        self.set_schedule(schedule)
        kind = sampler_input(self.scheduler)
        autocast = (
            torch.autocast(self.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        )
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            if self.interrupt:
                continue
            if kind is SamplerInput.PRECONDITIONED:  # diffusers' EDM schedulers: t is c_noise(sigma)
                self.scheduler.scale_model_input(latents, t)  # only its step bookkeeping; the unet takes x as it is
                sigma = self.scheduler.sigmas[self.scheduler.step_index].to(latents.device)
            else:
                sigma = t
            with autocast:
                score = self.guided_prediction(latents, sigma, labels, self.guidance_scale)  # a callback may change w
            output = to_scheduler_output(self.scheduler, kind, latents, score, sigma)
            latents = self.scheduler.step(output, t, latents, generator=generators).prev_sample
            if callback_on_step_end is not None:
                outputs = callback_on_step_end(self, i, t, {"latents": latents})
                latents = outputs.pop("latents", latents)
        return latents

    def set_schedule(self, schedule: dict[str, Any]) -> None:
        """``set_timesteps`` with the arguments this scheduler takes (Langevin's own only for Langevin)."""
        if not isinstance(self.scheduler, AnnealedLangevinScheduler):
            schedule = {"num_inference_steps": schedule.get("num_inference_steps")}
        if schedule["num_inference_steps"] is None and sampler_input(self.scheduler) is SamplerInput.PRECONDITIONED:
            schedule["num_inference_steps"] = DEFAULT_STEPS  # diffusers' EDM schedulers have no default of their own
        self.scheduler.set_timesteps(device=self.device, **schedule)
        self._num_timesteps = len(self.scheduler.timesteps)

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: ClassLabels | None = None,
        num_inference_steps: int | None = None,
        n_steps_each: int | None = None,
        step_size: float | None = None,
        guidance_scale: float | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | PipelineCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        max_batch_size: int | None = None,
        autocast_dtype: torch.dtype | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images.

        Args:
            batch_size: number of images when ``class_labels`` is a single label or None.
            class_labels: a class index or name, or one per image (then it sets the batch size). None on a
                class-conditional model samples the unconditional (null-class) score.
            num_inference_steps: annealed Langevin: the number of noise levels L (default: the number trained on;
                another L re-derives the step size); other samplers: their steps (EDM Heun 2N - 1 network
                evaluations, DPM-Solver++ N, predictor-corrector 2N; default 18, or 100 for predictor-corrector).
            n_steps_each: Langevin steps per level (default: the scheduler's); annealed Langevin only.
            step_size: alpha of the Langevin step size (default: the scheduler's); annealed Langevin only.
            guidance_scale: classifier-free guidance weight w; 1 disables guidance. Default: the weight the model
                was judged at when saved (``default_guidance_scale`` in its config), else 1.
            generator: a generator, or one per image; the only source of randomness. An image depends only on its
                own generator, so results are the same for any ``max_batch_size``.
            latents: initial samples of shape (batch, channels, height, width); default: N(0, sigma_1^2 I).
            output_type: "pil", "np" (B, H, W, C) in [0, 1], "pt" (B, C, H, W) in [0, 1], or "latent": the raw
                sample (B, C, H, W) in the model's range [-1, 1], unclipped.
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
            callback_on_step_end: called as ``f(pipe, step, sigma, {"latents": x})`` after every step (a function
                or a diffusers ``PipelineCallback``); a "latents" entry in the dict it returns replaces the sample.
                It may set ``pipe._guidance_scale`` or ``pipe._interrupt`` (skip the remaining steps).
            callback_on_step_end_tensor_inputs: names from ``_callback_tensor_inputs`` ("latents").
            max_batch_size: generate in chunks of at most this many images (bounds memory for large n).
            autocast_dtype: run the network under autocast in this dtype (e.g. ``torch.bfloat16``); the Langevin
                updates stay in float32.

        Returns:
            [`ImagePipelineOutput`] with ``images``, or a tuple ``(images,)`` when ``return_dict`` is False.
        """
        # 1. Check inputs
        if guidance_scale is None:
            guidance_scale = self.guidance_default
        if isinstance(class_labels, (list, tuple, torch.Tensor)):
            batch_size = len(class_labels)
        self.check_inputs(batch_size, num_inference_steps, n_steps_each, step_size, guidance_scale, output_type,
                          max_batch_size)
        self.callback_tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs, default=["latents"])
        self._guidance_scale, self._interrupt = guidance_scale, False
        # 2. Labels, generators and the initial sample
        labels = self.encode_class_labels(class_labels, batch_size)
        generators = self.prepare_generators(generator, batch_size)
        schedule = dict(num_inference_steps=num_inference_steps, n_steps_each=n_steps_each, step_size=step_size)
        self.set_schedule(schedule)  # the prior's width can depend on it (EDM's churn)
        latents = self.prepare_latents(batch_size, generators, latents, self.prior_sigma)

        # 3. Sampling, chunk by chunk
        chunk = max_batch_size or batch_size
        samples = []
        for start in range(0, batch_size, chunk):
            part = slice(start, start + chunk)
            samples.append(
                self._sample_chunk(
                    latents[part],
                    None if labels is None else labels[part].to(self.device),
                    generators[part],
                    autocast_dtype,
                    callback_on_step_end,
                    schedule,
                )
            )
        # 4. Post-process
        image = self.to_output_type(torch.cat(samples), output_type, self.numpy_to_pil)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
