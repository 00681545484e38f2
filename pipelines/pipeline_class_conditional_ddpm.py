"""Class-conditional generation with a pixel-space DDPM and classifier-free guidance (the MONAI tutorial's method).

Example:
    ```py
    >>> import torch
    >>> from medsyn import ClassConditionalDDPMPipeline

    >>> pipe = ClassConditionalDDPMPipeline.from_pretrained("path/to/ddpm-brain-mri")
    >>> generator = torch.Generator().manual_seed(0)
    >>> images = pipe(class_labels=["glioma"] * 4, guidance_scale=2.0, generator=generator).images
    ```
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Any, Callable

import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.callbacks import PipelineCallback
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from medsyn.validation import finite_number, whole_number

from .class_conditioning import ClassConditionalMixin, ClassLabels
from .hub_folder import HubFolderMixin
from .step_callbacks import StepCallbackMixin

#: Steps when ``num_inference_steps`` is not given: what the saved DPM-Solver++ 2M needs (diffusers' SD default).
DEFAULT_STEPS = 25


class ClassConditionalDDPMPipeline(ClassConditionalMixin, HubFolderMixin, DiffusionPipeline, StepCallbackMixin):
    r"""Pipeline for class-conditional image generation with a denoising diffusion model in pixel space.

    Parameters:
        unet ([`UNet2DModel`]): predicts the noise (or v) of a variance-preserving diffusion, with
            ``num_class_embeds = classes + 1`` (the last is the null class of classifier-free guidance).
        scheduler ([`SchedulerMixin`]): any of diffusers' DDPM-family schedulers (``DDPMScheduler``,
            ``DDIMScheduler``, ``DPMSolverMultistepScheduler``, ``UniPCMultistepScheduler``, ...); swap with
            ``pipe.scheduler = X.from_config(pipe.scheduler.config)``. Each takes one network evaluation per step
            (two with guidance), except Heun-type schedulers (two per step).
        class_names (`list[str]`, *optional*): names of the unet's classes, so labels can be given by name.
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet: UNet2DModel, scheduler: SchedulerMixin,
                 class_names: list[str] | dict[str, str] | None = None, default_guidance_scale: float | None = None):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_class_names(class_names)
        self.register_to_config(default_guidance_scale=default_guidance_scale)

    def check_inputs(self, batch_size: int, num_inference_steps: int | None, guidance_scale: float, output_type: str,
                     max_batch_size: int | None) -> None:
        """Reject bad arguments with a message that names them, before any model runs."""
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        finite_number(guidance_scale, "guidance_scale", minimum=0)
        whole_number(batch_size, "batch_size")
        if num_inference_steps is not None:
            whole_number(num_inference_steps, "num_inference_steps")
            trained = self.scheduler.config.num_train_timesteps
            if num_inference_steps > trained:
                raise ValueError(f"num_inference_steps {num_inference_steps} exceeds the {trained} training timesteps")
        if max_batch_size is not None:
            whole_number(max_batch_size, "max_batch_size")

    def _sample_chunk(self, latents, labels, generators, num_inference_steps, autocast_dtype, callback_on_step_end):
        # Multistep solvers keep past outputs: every chunk starts from a fresh schedule.
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        autocast = (
            torch.autocast(self.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
        )
        # Deterministic solvers (UniPC, Heun) take no generator; stochastic ones draw each image's noise from its own.
        takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generators} if takes_generator else {}
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            if self.interrupt:
                continue
            model_input = self.scheduler.scale_model_input(latents, t)
            with autocast:
                prediction = self.guided_prediction(model_input, t, labels, self.guidance_scale)
            latents = self.scheduler.step(prediction, t, latents, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                outputs = callback_on_step_end(self, i, t, {"latents": latents})
                latents = outputs.pop("latents", latents)
        return latents

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        class_labels: ClassLabels | None = None,
        num_inference_steps: int | None = None,
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
                class-conditional model samples the unconditional (null-class) prediction.
            num_inference_steps: denoising steps (default 25); one network evaluation each, two with guidance.
            guidance_scale: classifier-free guidance weight w; 1 disables guidance. Default: the weight the model
                was judged at when saved (``default_guidance_scale`` in its config), else 1.
            generator: a generator, or one per image; the only source of randomness. An image depends only on its
                own generator, so results are the same for any ``max_batch_size``.
            latents: initial noise of shape (batch, channels, height, width).
            output_type: "pil", "np" (B, H, W, C) in [0, 1], "pt" (B, C, H, W) in [0, 1], or "latent": the raw
                sample (B, C, H, W) in the model's range [-1, 1], unclipped.
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
            callback_on_step_end: called as ``f(pipe, step, t, {"latents": x})`` after every step; a "latents"
                entry in what it returns replaces the sample; it may set ``pipe._guidance_scale`` or
                ``pipe._interrupt``.
            callback_on_step_end_tensor_inputs: names from ``_callback_tensor_inputs`` ("latents").
            max_batch_size: generate in chunks of at most this many images.
            autocast_dtype: run the network under autocast in this dtype; the scheduler's updates stay float32.

        Returns:
            [`ImagePipelineOutput`] with ``images``, or a tuple ``(images,)`` when ``return_dict`` is False.
        """
        # 1. Check inputs
        if guidance_scale is None:
            guidance_scale = self.guidance_default
        if isinstance(class_labels, (list, tuple, torch.Tensor)):
            batch_size = len(class_labels)
        self.check_inputs(batch_size, num_inference_steps, guidance_scale, output_type, max_batch_size)
        self.callback_tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs, default=["latents"])
        self._guidance_scale, self._interrupt = guidance_scale, False
        num_inference_steps = num_inference_steps or DEFAULT_STEPS

        # 2. Labels, generators, timesteps and the initial noise
        labels = self.encode_class_labels(class_labels, batch_size)
        generators = self.prepare_generators(generator, batch_size)
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        self._num_timesteps = len(self.scheduler.timesteps)
        latents = self.prepare_latents(batch_size, generators, latents, self.scheduler.init_noise_sigma)

        # 3. Denoising loop, chunk by chunk
        chunk = max_batch_size or batch_size
        samples = [
            self._sample_chunk(latents[start:start + chunk],
                               None if labels is None else labels[start:start + chunk].to(self.device),
                               generators[start:start + chunk], num_inference_steps, autocast_dtype,
                               callback_on_step_end)
            for start in range(0, batch_size, chunk)
        ]

        # 4. Post-process
        image = self.to_output_type(torch.cat(samples), output_type, self.numpy_to_pil)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
