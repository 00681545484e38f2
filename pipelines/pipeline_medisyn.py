"""Text-guided latent diffusion for medical images (MediSyn), conditioned on a biomedical BERT encoder.

Example:
    ```py
    >>> import torch
    >>> from medsyn import MediSynPipeline

    >>> pipe = MediSynPipeline.from_pretrained("path/to/medisyn-brain-mri")
    >>> image = pipe(
    ...     "axial T1 contrast-enhanced brain MRI, large left frontal glioma with oedema",
    ...     guidance_scale=4.0,
    ...     generator=torch.Generator().manual_seed(0),
    ... ).images[0]
    >>> image.save("glioma.png")
    ```
"""

from __future__ import annotations

import inspect
import logging
import os
from pathlib import Path
from typing import Any, Callable

import torch
from diffusers import AutoencoderKL, DiffusionPipeline, ImagePipelineOutput, UNet2DConditionModel
from diffusers.callbacks import PipelineCallback
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils.torch_utils import randn_tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from medsyn.models.latent_diffusion import encode_prompts, prompt_max_length, vae_scale_factor
from medsyn.validation import finite_number, whole_number

from .hub_folder import HubFolderMixin
from .step_callbacks import StepCallbackMixin

logger = logging.getLogger(__name__)

Prompt = str | list[str]
#: Subfolder of a LoRA folder holding the text encoder's adapter (PEFT's format).
TEXT_ENCODER_LORA_FOLDER = "text_encoder_lora"


class MediSynPipeline(HubFolderMixin, DiffusionPipeline, StableDiffusionLoraLoaderMixin, StepCallbackMixin):
    r"""Pipeline for text-to-image generation in the latent space of a medical-image autoencoder.

    Parameters:
        vae ([`AutoencoderKL`]): encodes images (1 or 3 channels) to latents and decodes them back; its config's
            ``scaling_factor`` brings latents to unit variance.
        text_encoder ([`~transformers.PreTrainedModel`]): a BERT-family encoder (BioMedBERT's architecture by
            default); its ``last_hidden_state`` is what the unet attends to.
        tokenizer ([`~transformers.PreTrainedTokenizerBase`]): the encoder's tokenizer; prompts are padded and
            truncated to its ``model_max_length``, bounded by the encoder's position embeddings.
        unet ([`UNet2DConditionModel`]): denoises latents; ``cross_attention_dim`` equals the encoder's hidden size.
        scheduler ([`SchedulerMixin`]): any diffusers noise scheduler (DDPM, DDIM, DPMSolverMultistep, UniPC...);
            swap one in with ``SchedulerClass.from_config(pipe.scheduler.config)``.

    ``vae`` and ``unet`` may be None, as in diffusers: ``from_pretrained(path, vae=None, unet=None)`` loads only
    the text encoder, for precomputing ``prompt_embeds``; without a vae, ``output_type="latent"`` still works. They
    are not optional components in diffusers' sense (a pipeline without them cannot make an image from its default
    inputs), so a folder saved without them is loaded with the same ``None`` arguments.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = []
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(
        self,
        vae: AutoencoderKL,
        text_encoder: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        unet: UNet2DConditionModel,
        scheduler: KarrasDiffusionSchedulers,
    ):
        super().__init__()
        self.register_modules(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler)
        # Without a vae the factor only sizes latents from height and width; 8 is diffusers' default too.
        self.vae_scale_factor = vae_scale_factor(vae) if vae is not None else 8
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    def save_lora_adapters(self, save_directory: str | os.PathLike) -> None:
        """Save the LoRA adapters of the unet (diffusers' format) and, when it has them, of the text encoder (PEFT's
        format, in ``text_encoder_lora/``), for ``load_lora_weights`` on the base pipeline.

        The unet adapter's config (rank, alpha, target modules) travels as diffusers' adapter metadata: without it
        a reload assumes alpha = rank, and an adapter trained with ``--lora_alpha 16 --rank 4`` would come back
        with a quarter of its effect.
        """
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        (adapter,) = self.unet.active_adapters()
        self.save_lora_weights(
            save_directory,
            unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet)),
            unet_lora_adapter_metadata=self.unet.peft_config[adapter].to_dict(),
        )
        if getattr(self.text_encoder, "_hf_peft_config_loaded", False):
            self.text_encoder.save_pretrained(Path(save_directory) / TEXT_ENCODER_LORA_FOLDER)

    def load_lora_weights(
        self,
        pretrained_model_name_or_path_or_dict: str | os.PathLike | dict,
        adapter_name: str | None = None,
        **kwargs,
    ) -> None:
        """Load LoRA adapters saved by ``save_lora_adapters`` (or any diffusers unet LoRA) onto this pipeline.

        diffusers' own loader maps text-encoder keys for CLIP only, so a BERT encoder's adapters travel in PEFT's
        format (``text_encoder_lora/``) and load through transformers' PEFT integration.
        """
        super().load_lora_weights(pretrained_model_name_or_path_or_dict, adapter_name=adapter_name, **kwargs)
        if isinstance(pretrained_model_name_or_path_or_dict, dict):
            return
        source = str(pretrained_model_name_or_path_or_dict)
        local = Path(source) / TEXT_ENCODER_LORA_FOLDER
        if local.is_dir():
            self.text_encoder.load_adapter(str(local), adapter_name=adapter_name)
        elif not Path(source).is_dir():  # a Hub id: its text-encoder adapter, if it has one
            try:
                self.text_encoder.load_adapter(
                    source, adapter_name=adapter_name, adapter_kwargs={"subfolder": TEXT_ENCODER_LORA_FOLDER}
                )
            except (OSError, ValueError):
                logger.info("%s has no text-encoder adapter", source)

    def _warn_if_truncated(self, prompts: list[str], max_length: int) -> None:
        """Say which prompts are longer than the text encoder takes, and what of them is kept."""
        for prompt, ids in zip(prompts, self.tokenizer(prompts, truncation=False)["input_ids"]):
            if len(ids) > max_length:
                kept = self.tokenizer.decode(ids[: max_length - 1], skip_special_tokens=True)
                logger.warning(
                    "prompt has %d tokens but the text encoder takes %d; it was truncated to %r",
                    len(ids),
                    max_length,
                    kept,
                )

    def encode_prompt(
        self,
        prompt: Prompt | None,
        device: torch.device,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: Prompt | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Token states and attention masks of the prompts (and of the negative prompts under guidance), one row
        per image: ``(prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask)``.

        The unet attends only to the tokens the mask keeps: a short prompt padded to the prompt length is not diluted
        by the padding's states, which are nearly the same for every prompt. Precomputed embeddings without a mask
        keep every token. An unset negative prompt is the empty caption, which is what training's caption dropout
        teaches the unet as "unconditional".
        """
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds, prompt_attention_mask = self._embed(prompts, device)
        elif prompt_attention_mask is None:
            prompt_attention_mask = torch.ones(prompt_embeds.shape[:2], dtype=torch.long)
        batch_size = prompt_embeds.shape[0]
        dtype = self.unet.dtype if self.unet is not None else self.text_encoder.dtype

        def per_image(states: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            states = states.to(device, dtype).repeat_interleave(num_images_per_prompt, 0)
            return states, mask.to(device).repeat_interleave(num_images_per_prompt, 0)

        prompt_embeds, prompt_attention_mask = per_image(prompt_embeds, prompt_attention_mask)
        if not do_classifier_free_guidance:
            return prompt_embeds, prompt_attention_mask, None, None
        if negative_prompt_embeds is None:
            negatives = negative_prompt if negative_prompt is not None else ""
            negatives = [negatives] * batch_size if isinstance(negatives, str) else list(negatives)
            negative_prompt_embeds, negative_prompt_attention_mask = self._embed(negatives, device)
        elif negative_prompt_attention_mask is None:
            negative_prompt_attention_mask = torch.ones(negative_prompt_embeds.shape[:2], dtype=torch.long)
        negative_prompt_embeds, negative_prompt_attention_mask = per_image(
            negative_prompt_embeds, negative_prompt_attention_mask
        )
        return prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask

    def _embed(self, prompts: list[str], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        max_length = prompt_max_length(self.tokenizer, self.text_encoder)
        self._warn_if_truncated(prompts, max_length)
        return encode_prompts(self.text_encoder, self.tokenizer, prompts, max_length, device)

    def check_inputs(
        self,
        prompt: Prompt | None,
        height: int,
        width: int,
        guidance_scale: float,
        negative_prompt: Prompt | None,
        prompt_embeds: torch.Tensor | None,
        negative_prompt_embeds: torch.Tensor | None,
        prompt_attention_mask: torch.Tensor | None,
        negative_prompt_attention_mask: torch.Tensor | None,
        output_type: str,
    ) -> None:
        """Reject bad arguments with a message that names them, before any model runs."""
        height, width = whole_number(height, "height"), whole_number(width, "width")
        finite_number(guidance_scale, "guidance_scale", minimum=0)
        if height % self.vae_scale_factor or width % self.vae_scale_factor:
            raise ValueError(
                f"height and width must be divisible by the autoencoder's factor {self.vae_scale_factor}, "
                f"got {height}x{width}"
            )
        if (prompt is None) == (prompt_embeds is None):
            raise ValueError("give exactly one of prompt and prompt_embeds")
        if prompt is not None and not isinstance(prompt, str):
            if not isinstance(prompt, (list, tuple)) or not all(isinstance(p, str) for p in prompt):
                raise ValueError(f"prompt must be a string or a list of strings, got {prompt!r:.80}")
            if not prompt:
                raise ValueError("prompt is an empty list")
        if prompt_embeds is not None and prompt_embeds.shape[-1] != self.unet.config.cross_attention_dim:
            raise ValueError(
                f"prompt_embeds have width {prompt_embeds.shape[-1]}, the unet attends to "
                f"{self.unet.config.cross_attention_dim}"
            )
        if negative_prompt is not None and negative_prompt_embeds is not None:
            raise ValueError("give at most one of negative_prompt and negative_prompt_embeds")
        has_negative = negative_prompt is not None or negative_prompt_embeds is not None
        if has_negative and guidance_scale <= 1:
            raise ValueError(
                f"a negative prompt only acts under classifier-free guidance, but guidance_scale={guidance_scale} <= 1"
            )
        batch_size = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        if isinstance(negative_prompt, (list, tuple)) and len(negative_prompt) != batch_size:
            raise ValueError(f"got {len(negative_prompt)} negative prompts for {batch_size} prompts")
        if negative_prompt_embeds is not None and negative_prompt_embeds.shape != prompt_embeds.shape:
            raise ValueError(
                f"negative_prompt_embeds have shape {tuple(negative_prompt_embeds.shape)}, prompt_embeds "
                f"{tuple(prompt_embeds.shape)}"
            )
        for embeds, mask, name in (
            (prompt_embeds, prompt_attention_mask, "prompt_attention_mask"),
            (negative_prompt_embeds, negative_prompt_attention_mask, "negative_prompt_attention_mask"),
        ):
            if mask is not None and (embeds is None or tuple(mask.shape) != tuple(embeds.shape[:2])):
                expected = "no mask without embeddings" if embeds is None else tuple(embeds.shape[:2])
                raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {expected}")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")

    def prepare_latents(
        self,
        batch_size: int,
        height: int,
        width: int,
        dtype: torch.dtype,
        device: torch.device,
        generator: torch.Generator | list[torch.Generator] | None,
        latents: torch.Tensor | None,
    ) -> torch.Tensor:
        """Initial noise in latent space, scaled to the scheduler's starting noise level."""
        shape = (
            batch_size,
            self.unet.config.in_channels,
            height // self.vae_scale_factor,
            width // self.vae_scale_factor,
        )
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"got {len(generator)} generators for {batch_size} images")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}, expected {shape}")
        elif not torch.isfinite(latents).all():
            raise ValueError("latents contain NaN or Inf")
        return latents.to(device, dtype) * self.scheduler.init_noise_sigma

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from unit-variance latents (undoing the autoencoder's scaling and shift)."""
        latents = latents / self.vae.config.scaling_factor
        if getattr(self.vae.config, "shift_factor", None):
            latents = latents + self.vae.config.shift_factor
        return self.vae.decode(latents.to(self.vae.dtype), return_dict=False)[0]

    # Besides StepCallbackMixin's (SDCFGCutoffCallback sets _guidance_scale to 0, which turns this off).
    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1

    @property
    def cross_attention_kwargs(self) -> dict[str, Any] | None:
        return self._cross_attention_kwargs

    @torch.no_grad()
    def __call__(
        self,
        prompt: Prompt | None = None,
        negative_prompt: Prompt | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 4.0,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[Any, int, torch.Tensor, dict], dict] | PipelineCallback | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        cross_attention_kwargs: dict[str, Any] | None = None,
    ) -> ImagePipelineOutput | tuple:
        r"""Generate images from text.

        Args:
            prompt: a prompt or one per image group; or pass ``prompt_embeds``.
            negative_prompt: what to steer away from under guidance (default: the empty caption).
            height, width: image size in pixels, divisible by the autoencoder's factor (default: the unet's
                ``sample_size`` times that factor).
            num_inference_steps: denoising steps.
            guidance_scale: classifier-free guidance weight w (``eps_u + w (eps_c - eps_u)``); 1 or less turns
                guidance off.
            num_images_per_prompt: images generated for each prompt.
            generator: a generator, or one per image so that an image does not depend on its batch.
            latents: initial latent noise of shape (images, latent channels, height / factor, width / factor).
            prompt_embeds, negative_prompt_embeds: precomputed text-encoder states (batch, tokens, hidden size).
            prompt_attention_mask, negative_prompt_attention_mask: which tokens of precomputed states the unet
                attends to (batch, tokens), 1 to keep; default: all of them.
            output_type: "pil", "np" (B, H, W, C) in [0, 1], "pt" (B, C, H, W) in [0, 1] or "latent".
            return_dict: return an ``ImagePipelineOutput`` rather than a tuple.
            callback_on_step_end: called as ``f(pipe, step, timestep, tensors)`` after every step with the tensors
                named in ``callback_on_step_end_tensor_inputs``; tensors in the dict it returns replace them.
            callback_on_step_end_tensor_inputs: names from ``_callback_tensor_inputs`` (default: latents; a
                diffusers ``PipelineCallback`` brings its own ``tensor_inputs``). A callback may set
                ``pipe._guidance_scale`` (guidance off from the next step) or ``pipe._interrupt`` (skip the rest).
            cross_attention_kwargs: passed to the unet's attention processors (e.g. ``{"scale": 0.5}`` for LoRA).

        Returns:
            [`ImagePipelineOutput`] with ``images``, or a tuple ``(images,)`` when ``return_dict`` is False.
        """
        if self.unet is None:
            raise ValueError("this pipeline has no unet (loaded with unet=None): it can encode prompts, not generate")
        if self.vae is None and output_type != "latent":
            raise ValueError(f"this pipeline has no vae (loaded with vae=None): use output_type='latent', "
                             f"not {output_type!r}")
        # 0 is an error, not the default: only None means "the unet's size".
        height = self.unet.config.sample_size * self.vae_scale_factor if height is None else height
        width = self.unet.config.sample_size * self.vae_scale_factor if width is None else width
        callback_on_step_end_tensor_inputs = self.callback_tensor_inputs(
            callback_on_step_end, callback_on_step_end_tensor_inputs, default=["latents"])
        self.check_inputs(
            prompt,
            height,
            width,
            guidance_scale,
            negative_prompt,
            prompt_embeds,
            negative_prompt_embeds,
            prompt_attention_mask,
            negative_prompt_attention_mask,
            output_type,
        )
        whole_number(num_images_per_prompt, "num_images_per_prompt")
        whole_number(num_inference_steps, "num_inference_steps")
        device = self._execution_device
        self._guidance_scale, self._interrupt = guidance_scale, False
        self._cross_attention_kwargs = cross_attention_kwargs
        do_classifier_free_guidance = self.do_classifier_free_guidance

        prompt_embeds, prompt_attention_mask, negative_prompt_embeds, negative_prompt_attention_mask = (
            self.encode_prompt(
                prompt,
                device,
                num_images_per_prompt,
                do_classifier_free_guidance,
                negative_prompt,
                prompt_embeds,
                negative_prompt_embeds,
                prompt_attention_mask,
                negative_prompt_attention_mask,
            )
        )
        batch_size = prompt_embeds.shape[0]
        latents = self.prepare_latents(batch_size, height, width, prompt_embeds.dtype, device, generator, latents)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._num_timesteps = len(self.scheduler.timesteps)
        # Deterministic solvers (UniPC, DPM-Solver++) take no generator; stochastic ones (DDPM, Euler a) need it.
        takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        step_kwargs = {"generator": generator} if takes_generator else {}
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            if self.interrupt:
                continue
            # Read each step: a callback may have turned guidance off (and kept only the conditional states).
            do_classifier_free_guidance = self.do_classifier_free_guidance and negative_prompt_embeds is not None
            prompt_attention_mask = prompt_attention_mask[-len(prompt_embeds):]
            model_input = torch.cat([latents] * 2) if do_classifier_free_guidance else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            if do_classifier_free_guidance:
                context = torch.cat([prompt_embeds, negative_prompt_embeds])
                context_mask = torch.cat([prompt_attention_mask, negative_prompt_attention_mask])
            else:
                context, context_mask = prompt_embeds, prompt_attention_mask
            noise_pred = self.unet(
                model_input, t, encoder_hidden_states=context, encoder_attention_mask=context_mask,
                cross_attention_kwargs=self.cross_attention_kwargs, return_dict=False,
            )[0]
            if do_classifier_free_guidance:
                conditional, unconditional = noise_pred.chunk(2)
                noise_pred = unconditional + self.guidance_scale * (conditional - unconditional)
            latents = self.scheduler.step(noise_pred, t, latents, return_dict=False, **step_kwargs)[0]

            if callback_on_step_end is not None:
                tensors = {
                    "latents": latents,
                    "prompt_embeds": prompt_embeds,
                    "negative_prompt_embeds": negative_prompt_embeds,
                }
                outputs = callback_on_step_end(self, i, t, {k: tensors[k] for k in callback_on_step_end_tensor_inputs})
                latents = outputs.pop("latents", latents)
                prompt_embeds = outputs.pop("prompt_embeds", prompt_embeds)
                negative_prompt_embeds = outputs.pop("negative_prompt_embeds", negative_prompt_embeds)

        if output_type == "latent":
            image = latents
        else:
            image = self.image_processor.postprocess(self.decode_latents(latents), output_type=output_type)
        self.maybe_free_model_hooks()

        if not return_dict:
            return (image,)
        return ImagePipelineOutput(images=image)
