import numpy as np
import pytest
import torch

from medsyn import ScoreLangevinPipeline

from .conftest import get_dummy_components, get_dummy_pipeline
from .pipeline_test_mixin import MedsynPipelineTesterMixin


def get_dummy_inputs(seed=0, **overrides):
    inputs = {"class_labels": ["healthy", "tumor"], "generator": torch.Generator().manual_seed(seed), "output_type": "np"}
    return {**inputs, **overrides}


@pytest.mark.parametrize("channels", [1, 3])
def test_output_shapes_and_range(channels):
    pipe = get_dummy_pipeline(in_channels=channels)
    images = pipe(**get_dummy_inputs()).images
    assert images.shape == (2, 16, 16, channels)
    assert images.min() >= 0 and images.max() <= 1
    pil = pipe(**get_dummy_inputs(output_type="pil")).images
    assert pil[0].mode == ("L" if channels == 1 else "RGB") and pil[0].size == (16, 16)
    tensor = pipe(**get_dummy_inputs(output_type="pt")).images
    assert tensor.shape == (2, channels, 16, 16)


def test_same_seed_same_images_other_seed_differs(pipe):
    a = pipe(**get_dummy_inputs(seed=0)).images
    b = pipe(**get_dummy_inputs(seed=0)).images
    c = pipe(**get_dummy_inputs(seed=1)).images
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3


def test_chunked_equals_one_batch(pipe):
    labels = [0, 1, 1, 0, 1]
    whole = pipe(**get_dummy_inputs(class_labels=labels, output_type="pt")).images
    chunked = pipe(**get_dummy_inputs(class_labels=labels, output_type="pt", max_batch_size=2)).images
    torch.testing.assert_close(whole, chunked, atol=1e-5, rtol=0)


def test_per_image_generators_equal_one_by_one(pipe):
    seeds = [3, 4, 5]
    batched = pipe(class_labels=[1, 1, 1], generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="pt")
    for i, seed in enumerate(seeds):
        single = pipe(class_labels=[1], generator=[torch.Generator().manual_seed(seed)], output_type="pt")
        torch.testing.assert_close(batched.images[i], single.images[0], atol=1e-5, rtol=0)



def test_a_pipeline_moved_to_bfloat16_samples_close_to_float32(pipe):
    generators = lambda: [torch.Generator().manual_seed(s) for s in (0, 1)]  # noqa: E731
    full = pipe(class_labels=[1, 0], generator=generators(), guidance_scale=2.0, output_type="pt").images
    pipe.to(torch.bfloat16)
    half = pipe(class_labels=[1, 0], generator=generators(), guidance_scale=2.0, output_type="pt").images
    assert pipe.unet.dtype == torch.bfloat16 and half.dtype == torch.float32
    assert (half - full).abs().mean() < 0.01


def test_guidance_changes_output_and_one_equals_conditional(pipe):
    plain = pipe(**get_dummy_inputs()).images
    guided = pipe(**get_dummy_inputs(guidance_scale=3.0)).images
    assert np.abs(plain - guided).max() > 1e-3
    # w = 1 is the conditional score exactly; w = 0 is the unconditional (null-class) score.
    unguided = pipe(**get_dummy_inputs(guidance_scale=0.0)).images
    null = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    np.testing.assert_allclose(unguided, null, atol=1e-5)


def test_class_label_changes_output(pipe):
    healthy = pipe(**get_dummy_inputs(class_labels=["healthy", "healthy"])).images
    tumour = pipe(**get_dummy_inputs(class_labels=["tumor", "tumor"])).images
    assert np.abs(healthy - tumour).max() > 1e-3


def test_save_and_reload_gives_identical_images(pipe, tmp_path):
    before = pipe(**get_dummy_inputs()).images
    pipe.save_pretrained(tmp_path)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    loaded = ScoreLangevinPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.class_names == ["healthy", "tumor"]
    np.testing.assert_array_equal(before, loaded(**get_dummy_inputs()).images)


def test_schedule_arguments_set_the_number_of_evaluations(pipe):
    seen = []
    pipe(**get_dummy_inputs(num_inference_steps=3, n_steps_each=4, callback_on_step_end=lambda p, i, t, d: seen.append(t) or d))
    assert len(seen) == 3 * 4 + 1


def test_callback_can_replace_latents(pipe):
    zero = lambda p, i, t, d: {"latents": torch.zeros_like(d["latents"])}  # noqa: E731
    images = pipe(**get_dummy_inputs(callback_on_step_end=zero)).images
    np.testing.assert_allclose(images, 0.5)


def test_autocast_bf16_stays_close(pipe):
    full = pipe(**get_dummy_inputs(output_type="pt")).images
    bf16 = pipe(**get_dummy_inputs(output_type="pt", autocast_dtype=torch.bfloat16)).images
    assert bf16.dtype == torch.float32
    assert (full - bf16).abs().mean() < 0.05


def test_unconditional_model():
    pipe = get_dummy_pipeline(num_classes=None)
    assert pipe(batch_size=3, generator=torch.Generator().manual_seed(0), output_type="np").images.shape == (3, 16, 16, 1)
    with pytest.raises(ValueError, match="unconditional"):
        pipe(class_labels=[0])


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"class_labels": ["glioma"]}, "unknown class label 'glioma'"),
        ({"class_labels": [2]}, "out of range"),
        ({"output_type": "jpeg"}, "output_type"),
        ({"latents": torch.zeros(2, 1, 8, 8)}, "latents have shape"),
        ({"latents": torch.full((2, 1, 16, 16), float("nan"))}, "NaN"),
        ({"generator": [torch.Generator()]}, "1 generators for 2 images"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
    ],
)
def test_bad_inputs_raise_clear_errors(pipe, overrides, message):
    with pytest.raises(ValueError, match=message):
        pipe(**get_dummy_inputs(**overrides))



def test_callbacks_can_read_steps_change_guidance_and_interrupt(pipe):
    seen = []

    def callback(pipeline, step, sigma, tensors):
        seen.append((step, pipeline.num_timesteps, pipeline.guidance_scale))
        if step == 1:
            pipeline._guidance_scale = 1.0  # guidance off from the next step
        if step == 3:
            pipeline._interrupt = True
        return tensors

    pipe(class_labels=[1], guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
         callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["latents"])
    total = pipe.scheduler.num_inference_steps * pipe.scheduler.n_steps_each + int(pipe.scheduler.config.denoise_final)
    assert seen == [(0, total, 3.0), (1, total, 3.0), (2, total, 1.0), (3, total, 1.0)]
    with pytest.raises(ValueError, match="not among"):
        pipe(callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["prompt_embeds"])


def test_components_round_trip_keeps_the_class_names(pipe):
    rebuilt = type(pipe)(**pipe.components)
    assert rebuilt.class_names == ["healthy", "tumor"]
    assert torch.equal(rebuilt.encode_class_labels("tumor", 1), pipe.encode_class_labels("tumor", 1))


class TestScoreLangevinPipelineContract(MedsynPipelineTesterMixin):
    pipeline_class = ScoreLangevinPipeline

    def get_dummy_components(self):
        return get_dummy_components()

    def get_dummy_inputs(self, seed=0, batch=1):
        return {"class_labels": [(seed + i) % 2 for i in range(batch)], "guidance_scale": 2.0, "output_type": "np",
                "generator": [torch.Generator().manual_seed(seed + i) for i in range(batch)]}
