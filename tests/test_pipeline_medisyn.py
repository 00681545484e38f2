"""MediSynPipeline on tiny components: shapes, determinism, guidance algebra, round trips and input checks."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, UniPCMultistepScheduler

from medsyn import MediSynPipeline
from medsyn.models.latent_diffusion import prompt_max_length

from .conftest import get_dummy_medisyn_components, get_dummy_medisyn_pipeline
from .pipeline_test_mixin import MedsynPipelineTesterMixin

PROMPT = "axial T1 brain MRI, healthy"
OTHER = "fundus photograph with diabetic retinopathy"


def get_dummy_inputs(seed: int = 0, **overrides) -> dict:
    inputs = dict(
        prompt=PROMPT,
        num_inference_steps=2,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(seed),
        output_type="np",
    )
    return {**inputs, **overrides}


@pytest.fixture(scope="module")
def pipe() -> MediSynPipeline:
    return get_dummy_medisyn_pipeline()


@pytest.mark.parametrize("channels", [1, 3])
def test_output_shapes_for_grayscale_and_rgb(channels):
    pipe = get_dummy_medisyn_pipeline(in_channels=channels)
    images = pipe(**get_dummy_inputs()).images
    assert images.shape == (1, 16, 16, channels)
    assert 0 <= images.min() and images.max() <= 1
    pil = pipe(**get_dummy_inputs(output_type="pil", height=24, width=32)).images[0]
    assert pil.size == (32, 24) and pil.mode == ("L" if channels == 1 else "RGB")
    latents = pipe(**get_dummy_inputs(output_type="latent")).images
    assert latents.shape == (1, 4, 8, 8)


def test_same_seed_same_image_and_other_seed_differs(pipe):
    first = pipe(**get_dummy_inputs(seed=0)).images
    again = pipe(**get_dummy_inputs(seed=0)).images
    other = pipe(**get_dummy_inputs(seed=1)).images
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-3



def test_num_images_per_prompt_repeats_each_prompt(pipe):
    generators = [torch.Generator().manual_seed(s) for s in range(6)]
    images = pipe(**get_dummy_inputs(prompt=[PROMPT, OTHER], num_images_per_prompt=3, generator=generators)).images
    assert images.shape == (6, 16, 16, 1)
    second_prompt_first_image = pipe(**get_dummy_inputs(prompt=OTHER, seed=3)).images[0]
    np.testing.assert_allclose(images[3], second_prompt_first_image, atol=1e-5)


def test_guidance_and_negative_prompt_change_the_output(pipe):
    guided = pipe(**get_dummy_inputs(guidance_scale=5.0)).images
    unguided = pipe(**get_dummy_inputs(guidance_scale=1.0)).images
    negative = pipe(**get_dummy_inputs(guidance_scale=5.0, negative_prompt=OTHER)).images
    assert np.abs(guided - unguided).max() > 1e-3
    assert np.abs(guided - negative).max() > 1e-3


def test_guidance_against_the_prompt_itself_is_no_guidance(pipe):
    # eps_u + w (eps_c - eps_u) = eps_c when the negative prompt is the prompt: guidance must then do nothing.
    self_negative = pipe(**get_dummy_inputs(guidance_scale=7.0, negative_prompt=PROMPT)).images
    unguided = pipe(**get_dummy_inputs(guidance_scale=1.0)).images
    np.testing.assert_allclose(self_negative, unguided, atol=1e-5)


def test_prompt_embeds_give_the_same_image_as_the_prompt(pipe):
    embeds, mask, negative, negative_mask = pipe.encode_prompt(PROMPT, torch.device("cpu"), 1, True)
    from_text = pipe(**get_dummy_inputs()).images
    from_embeds = pipe(
        **get_dummy_inputs(
            prompt=None,
            prompt_embeds=embeds,
            negative_prompt_embeds=negative,
            prompt_attention_mask=mask,
            negative_prompt_attention_mask=negative_mask,
        )
    ).images
    np.testing.assert_allclose(from_text, from_embeds, atol=1e-6)


def test_the_unet_ignores_the_padding_states(pipe):
    embeds, mask, negative, negative_mask = pipe.encode_prompt(PROMPT, torch.device("cpu"), 1, True)
    inputs = dict(prompt=None, negative_prompt_embeds=negative, negative_prompt_attention_mask=negative_mask)
    masked = pipe(**get_dummy_inputs(prompt_embeds=embeds, prompt_attention_mask=mask, **inputs)).images
    garbled = torch.where(mask[..., None].bool(), embeds, torch.randn_like(embeds) * 10)
    np.testing.assert_allclose(
        pipe(**get_dummy_inputs(prompt_embeds=garbled, prompt_attention_mask=mask, **inputs)).images, masked, atol=1e-5
    )
    unmasked = pipe(**get_dummy_inputs(prompt_embeds=garbled, **inputs)).images  # no mask: every state counts
    assert np.abs(unmasked - masked).max() > 1e-3


def test_padding_tokens_are_masked_in_the_text_encoder(pipe):
    embeds, mask, _, _ = pipe.encode_prompt(PROMPT, torch.device("cpu"), 1, False)
    tokens = pipe.tokenizer(PROMPT, return_tensors="pt")
    unpadded = pipe.text_encoder(**tokens).last_hidden_state
    length = tokens["input_ids"].shape[1]
    assert embeds.shape[1] == prompt_max_length(pipe.tokenizer, pipe.text_encoder) > length
    torch.testing.assert_close(embeds[:, :length], unpadded, atol=1e-5, rtol=1e-5)
    assert mask[0].tolist() == [1] * length + [0] * (embeds.shape[1] - length)


def test_long_prompt_is_truncated_with_a_warning(pipe, caplog):
    words = PROMPT.split()
    long_prompt = " ".join(words * 10)
    with caplog.at_level(logging.WARNING):
        long_image = pipe(**get_dummy_inputs(prompt=long_prompt)).images
    assert "truncated" in caplog.text
    max_length = prompt_max_length(pipe.tokenizer, pipe.text_encoder)
    kept_ids = pipe.tokenizer(long_prompt, add_special_tokens=False)["input_ids"][: max_length - 2]
    kept = pipe.tokenizer.decode(kept_ids)
    np.testing.assert_allclose(long_image, pipe(**get_dummy_inputs(prompt=kept)).images, atol=1e-6)


def test_prompt_length_is_bounded_by_the_encoders_positions(pipe):
    tokenizer = pipe.tokenizer
    saved = tokenizer.model_max_length
    try:
        tokenizer.model_max_length = int(1e30)  # what BERT tokenizers without a limit report
        assert prompt_max_length(tokenizer, pipe.text_encoder) == pipe.text_encoder.config.max_position_embeddings
    finally:
        tokenizer.model_max_length = saved


@pytest.mark.parametrize(
    "scheduler_class", [DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler, EulerDiscreteScheduler]
)
def test_schedulers_swap_in_from_config(scheduler_class):
    pipe = get_dummy_medisyn_pipeline()
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    first = pipe(**get_dummy_inputs(num_inference_steps=3)).images
    again = pipe(**get_dummy_inputs(num_inference_steps=3)).images
    assert first.shape == (1, 16, 16, 1) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, again)


def test_save_and_load_round_trip_gives_identical_images(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = MediSynPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.tokenizer.get_vocab() == pipe.tokenizer.get_vocab()
    np.testing.assert_array_equal(loaded(**get_dummy_inputs()).images, pipe(**get_dummy_inputs()).images)


def test_callback_sees_every_step_and_can_replace_latents(pipe):
    steps = []

    def zero_latents(pipeline, step, timestep, tensors):
        steps.append(step)
        assert set(tensors) == {"latents", "prompt_embeds"}
        return {"latents": torch.zeros_like(tensors["latents"])}

    latents = pipe(
        **get_dummy_inputs(
            output_type="latent",
            num_inference_steps=3,
            callback_on_step_end=zero_latents,
            callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
        )
    ).images
    assert steps == [0, 1, 2]
    assert torch.count_nonzero(latents) == 0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(prompt=[]), "empty list"),
        (dict(prompt=3), "string or a list of strings"),
        (dict(height=15), "divisible by the autoencoder's factor 2"),
        (dict(prompt=[PROMPT, OTHER], negative_prompt=[OTHER]), "1 negative prompts for 2 prompts"),
        (dict(latents=torch.zeros(1, 4, 4, 4)), r"latents have shape \(1, 4, 4, 4\), expected \(1, 4, 8, 8\)"),
        (dict(latents=torch.full((1, 4, 8, 8), float("nan"))), "NaN"),
        (dict(guidance_scale=1.0, negative_prompt=OTHER), "only acts under classifier-free guidance"),
        (dict(prompt_embeds=torch.zeros(1, 16, 32)), "exactly one of prompt and prompt_embeds"),
        (dict(prompt=None, prompt_embeds=torch.zeros(1, 16, 7)), "width 7"),
        (dict(prompt=None, prompt_embeds=torch.zeros(1, 16, 32), prompt_attention_mask=torch.ones(1, 8)),
         r"prompt_attention_mask has shape \(1, 8\), expected \(1, 16\)"),
        (dict(output_type="tensor"), "output_type"),
        (dict(num_images_per_prompt=0), "num_images_per_prompt"),
        (dict(generator=[torch.Generator()] * 3), "3 generators for 1 images"),
        (dict(callback_on_step_end_tensor_inputs=["noise"]), "noise"),
    ],
)
def test_bad_input_gets_a_clear_error(pipe, overrides, message):
    with pytest.raises(ValueError, match=message):
        pipe(**get_dummy_inputs(**overrides))


def _unet_batches(pipe, **inputs) -> tuple[list[int], list[dict | None]]:
    """The batch size and cross_attention_kwargs of every unet call in one run."""
    sizes, kwargs = [], []

    def record(module, args, named):
        sizes.append(args[0].shape[0])
        kwargs.append(named.get("cross_attention_kwargs"))

    handle = pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        pipe(**inputs)
    finally:
        handle.remove()
    return sizes, kwargs


def test_diffusers_cfg_cutoff_callback_turns_guidance_off_midway(pipe):
    from diffusers.callbacks import SDCFGCutoffCallback

    sizes, _ = _unet_batches(pipe, **get_dummy_inputs(num_inference_steps=4),
                             callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=0.5))
    assert pipe.num_timesteps == 4 and sizes == [2, 2, 2, 1]  # cut off after step index 2 = 4 x 0.5
    assert not pipe.do_classifier_free_guidance and pipe.guidance_scale == 0.0


def test_interrupt_skips_the_remaining_steps_and_kwargs_reach_the_unet(pipe):
    def stop_after_first(pipeline, step, timestep, tensors):
        pipeline._interrupt = True
        return tensors

    inputs = get_dummy_inputs(num_inference_steps=3, cross_attention_kwargs={"scale": 1.0})
    sizes, kwargs = _unet_batches(pipe, **inputs, callback_on_step_end=stop_after_first)
    assert sizes == [2] and pipe.interrupt and kwargs == [{"scale": 1.0}]


class TestMediSynPipelineContract(MedsynPipelineTesterMixin):
    pipeline_class = MediSynPipeline

    def get_dummy_components(self):
        return get_dummy_medisyn_components()

    def get_dummy_inputs(self, seed=0, batch=1):
        prompts = [PROMPT, OTHER]
        return {"prompt": [prompts[(seed + i) % 2] for i in range(batch)], "num_inference_steps": 3,
                "guidance_scale": 3.0, "output_type": "np",
                "generator": [torch.Generator().manual_seed(seed + i) for i in range(batch)]}


def test_every_optional_component_can_be_none_and_the_pipeline_still_runs(pipe, tmp_path):
    """diffusers' test_save_load_optional_components: each optional component set to None, the pipeline runs on
    its default inputs, saves and reloads the same. vae and unet were declared optional though neither can be
    None for an image; now none is."""
    for name in pipe._optional_components:
        setattr(pipe, name, None)
    expected = pipe(**get_dummy_inputs()).images
    pipe.save_pretrained(tmp_path / "saved")
    loaded = MediSynPipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    assert all(getattr(loaded, name) is None for name in pipe._optional_components)
    np.testing.assert_allclose(loaded(**get_dummy_inputs()).images, expected, atol=1e-4)


def test_a_text_encoder_only_pipeline_encodes_prompts_like_the_full_one(pipe, tmp_path):
    """diffusers' way to precompute embeddings: from_pretrained(path, vae=None, unet=None)."""
    pipe.save_pretrained(tmp_path / "full")
    text_only = MediSynPipeline.from_pretrained(tmp_path / "full", vae=None, unet=None)
    assert text_only.vae is None and text_only.unet is None
    embeds, mask, negative, negative_mask = text_only.encode_prompt(PROMPT, "cpu", 1, True)
    expected = pipe.encode_prompt(PROMPT, "cpu", 1, True)
    for actual, wanted in zip((embeds, mask, negative, negative_mask), expected):
        assert torch.equal(actual, wanted)
    image = pipe(**get_dummy_inputs(prompt=None, prompt_embeds=embeds, prompt_attention_mask=mask,
                                    negative_prompt_embeds=negative, negative_prompt_attention_mask=negative_mask)).images
    np.testing.assert_array_equal(image, pipe(**get_dummy_inputs()).images)
    text_only.save_pretrained(tmp_path / "text-only")  # and saved, it loads back the same way
    with pytest.raises(ValueError, match="expected"):  # not optional components: diffusers asks for them
        MediSynPipeline.from_pretrained(tmp_path / "text-only")
    again = MediSynPipeline.from_pretrained(tmp_path / "text-only", vae=None, unet=None)
    assert again.vae is None and again.unet is None
    with pytest.raises(ValueError, match="no unet"):
        again(PROMPT)
    no_vae = MediSynPipeline.from_pretrained(tmp_path / "full", vae=None)
    with pytest.raises(ValueError, match="output_type='latent'"):
        no_vae(PROMPT)
    latents = no_vae(**get_dummy_inputs(output_type="latent")).images
    assert torch.equal(latents, pipe(**get_dummy_inputs(output_type="latent")).images)
