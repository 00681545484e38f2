"""Caption templates: several phrasings per class, held-out phrasings kept out of training, bad files named."""

import pytest

from medsyn.data.captions import CaptionTemplates


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
