"""Generation accuracy under an expert: exact bookkeeping on a stub, the expert applied as trained, and the CLI."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from medsyn.cli import main as cli
from medsyn.evaluation.generation_accuracy import (
    ExpertClassifier,
    generate_class_images,
    generation_accuracy,
    paired_difference,
)

from .conftest import get_dummy_pipeline


class BrightnessPipeline:
    """Stub: "dark" images are black; "bright" images are white except every 4th, which comes out black."""

    config = SimpleNamespace(class_names=["dark", "bright"])

    def __call__(self, class_labels, generator, output_type, **_):
        images = torch.zeros(len(class_labels), 1, 16, 16)
        for i, (label, g) in enumerate(zip(class_labels, generator)):
            noise = torch.rand(1, 1, 16, 16, generator=g) * 0.1
            images[i] = noise + (0.8 if label == "bright" and i % 4 != 3 else 0.0)
        return SimpleNamespace(images=images)


class BrightnessExpert:
    class_names = ["dark", "bright"]

    def predict(self, images):
        return (images.mean(dim=(1, 2, 3)) > 0.4).long()


def test_accuracy_and_confusion_matrix_are_counted_exactly():
    result = generation_accuracy(BrightnessPipeline(), BrightnessExpert(), per_class=8, seeds=[0, 1, 2])
    assert result["accuracy_per_seed"] == [0.875] * 3  # (8 + 6) / 16
    assert result["confusion_matrix"] == [[24, 0], [6, 18]]
    assert result["accuracy_std"] == 0.0 and set(result["ms_ssim_per_class"]) == {"dark", "bright"}


def test_same_seeds_give_the_same_images_so_a_model_against_itself_differs_by_zero():
    pipe = get_dummy_pipeline()
    expert = SimpleNamespace(class_names=["healthy", "tumor"], predict=lambda x: (x.mean(dim=(1, 2, 3)) > 0.5).long())
    first = generation_accuracy(pipe, expert, per_class=3, seeds=[4, 5], num_inference_steps=2)
    second = generation_accuracy(pipe, expert, per_class=3, seeds=[4, 5], num_inference_steps=2)
    assert first == second
    assert paired_difference(first, second)["accuracy_difference_per_seed"] == [0.0, 0.0]
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference(first, generation_accuracy(pipe, expert, per_class=3, seeds=[6, 5], num_inference_steps=2))


def test_classes_the_model_or_the_prompts_lack_are_named():
    expert = SimpleNamespace(class_names=["healthy", "glioma"], predict=None)
    with pytest.raises(ValueError, match=r"does not know the expert's classes \['glioma'\]"):
        generation_accuracy(get_dummy_pipeline(), expert, per_class=2, seeds=[0])
    with pytest.raises(ValueError, match=r"no prompt for the expert's classes \['glioma'\]"):
        generation_accuracy(get_dummy_pipeline(), expert, per_class=2, seeds=[0], prompts={"healthy": "x"})


def test_the_expert_classifies_as_it_was_trained(tmp_path):
    from medsyn.train_scripts import train_expert

    train_expert.main(train_expert.parse_args([
        "--resolution", "24", "--embedding_size", "8", "--hidden_sizes", "8", "16", "--depths", "1", "1",
        "--layer_type", "basic", "--simulated_num_images", "40", "--train_batch_size", "8", "--max_train_steps", "2",
        "--report_to", "none", "--output_dir", str(tmp_path / "expert")]))
    expert = ExpertClassifier.from_pretrained(str(tmp_path / "expert"))
    assert expert.class_names == ["healthy", "tumor"] and expert.encoder.image_size == 24
    images = torch.rand(5, 1, 16, 16)
    resized = torch.nn.functional.interpolate(images, size=(24, 24), mode="bilinear", align_corners=False)
    with torch.no_grad():
        logits = expert.model(pixel_values=(resized - 0.5) / 0.5).logits  # a new expert normalises to [-1, 1]
    assert torch.equal(expert.predict(images, batch_size=2), logits.argmax(1))

    pipe = get_dummy_pipeline()
    pipe.save_pretrained(tmp_path / "model")
    out = tmp_path / "eval"
    assert cli(["evaluate-expert", "--model", str(tmp_path / "model"), "--model", str(tmp_path / "model"),
                "--expert", str(tmp_path / "expert"), "--per-class", "2", "--seeds", "0", "1",
                "--num-inference-steps", "2", "--output-dir", str(out)]) == 0
    report = json.loads((out / "expert_accuracy.json").read_text())
    result = report["models"][str(tmp_path / "model")]
    assert np.sum(result["confusion_matrix"]) == 2 * 2 * 2  # classes x per class x seeds
    assert report["paired_vs_first"][str(tmp_path / "model")]["accuracy_difference_mean"] == 0.0
    assert cli(["evaluate-expert", "--model", str(tmp_path / "model"), "--expert", str(tmp_path / "expert"),
                "--output-dir", str(out)]) == 2  # never overwrites without --overwrite


def test_a_text_guided_model_is_asked_by_prompt():
    from .conftest import get_dummy_medisyn_pipeline

    pipe = get_dummy_medisyn_pipeline()
    expert = SimpleNamespace(class_names=["healthy", "tumor"], predict=lambda x: torch.zeros(len(x), dtype=torch.long))
    prompts = {"healthy": "axial T1 brain MRI, healthy", "tumor": "large left frontal glioma with oedema"}
    result = generation_accuracy(pipe, expert, per_class=2, seeds=[0], prompts=prompts, num_inference_steps=2,
                                 guidance_scale=3.0)
    assert result["confusion_matrix"] == [[2, 0], [2, 0]] and result["accuracy_mean"] == 0.5
    generators = lambda: [torch.Generator().manual_seed(i) for i in range(2)]  # noqa: E731
    healthy, tumour = (generate_class_images(pipe, name, generators(), prompts[name], 2, 3.0) for name in prompts)
    assert healthy.shape == (2, 1, 16, 16) and (healthy - tumour).abs().max() > 1e-3  # the prompt was used
