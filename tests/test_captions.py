"""Caption templates: several phrasings per class, held-out phrasings kept out of training, bad files named."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from medsyn.data.captions import CaptionTemplates, template_source


def test_both_forms_give_the_phrasings_with_the_label_filled_in():
    flat = CaptionTemplates.from_json({"glioma": "brain MRI, {label}", "notumor": ["normal brain MRI", "no tumour"]})
    assert flat.train == {"glioma": ["brain MRI, glioma"], "notumor": ["normal brain MRI", "no tumour"]}
    assert flat.held_out == {} and flat.training_phrasings() == ["brain MRI, glioma", "normal brain MRI", "no tumour"]
    split = CaptionTemplates.from_json({"train": {"glioma": ["brain MRI, {label}"]},
                                        "held_out": {"glioma": ["MR image of the brain showing a {label}"]}})
    assert split.held_out == {"glioma": ["MR image of the brain showing a glioma"]}


@pytest.mark.parametrize(("value", "message"), [
    ({}, "non-empty mapping"),
    ({"glioma": []}, "class 'glioma' needs a caption"),
    ({"glioma": ["ok", ""]}, "class 'glioma' needs a caption"),
    ({"glioma": 3}, "class 'glioma' needs a caption"),
    ({"held_out": {"glioma": "x"}}, "needs a 'train' section"),
    ({"train": {"glioma": ["a {label}"]}, "held_out": {"glioma": ["a glioma"]}},
     r"held-out phrasings of 'glioma' are also training phrasings: \['a glioma'\]"),
])
def test_bad_templates_are_named(value, message):
    with pytest.raises(ValueError, match=message):
        CaptionTemplates.from_json(value)


def test_a_class_without_a_caption_is_named():
    with pytest.raises(ValueError, match=r"no caption for the classes \['tumor'\]"):
        CaptionTemplates.from_json({"healthy": "x"}).check_classes(["healthy", "tumor"])


SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
CLASSES = {"brain_tumor_mri": ["notumor", "glioma", "meningioma", "pituitary"],
           "fundus_eye_disease": ["normal", "cataract", "diabetic_retinopathy", "glaucoma"]}


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_the_bundled_templates_cover_their_sets_classes_with_held_out_phrasings(name):
    templates = CaptionTemplates.from_json(json.loads(Path(template_source(name)).read_text()))
    templates.check_classes(CLASSES[name])
    assert set(templates.held_out) == set(templates.train) == set(CLASSES[name])
    assert all(len(options) >= 3 for options in templates.train.values())
    phrasings = templates.training_phrasings()
    assert len(set(phrasings)) == len(phrasings)  # no phrasing names two classes


def test_the_bundled_class_names_are_the_shared_sets():
    brain = SHARED / "brain_tumor_mri" / "brain_tumor_mri_4class_128.npz"
    fundus = SHARED / "fundus_eye_disease" / "labels.csv"
    if not (brain.is_file() and fundus.is_file()):
        pytest.skip(f"the shared data is not at {SHARED}")
    with np.load(brain) as archive:
        assert list(archive["class_names"]) == CLASSES["brain_tumor_mri"]
    with open(fundus) as handle:
        assert {row["class_name"] for row in csv.DictReader(handle)} == set(CLASSES["fundus_eye_disease"])
