"""Unattended raters: any callable ``(images, prompts) -> ratings in {1, 2, 3}`` can stand where the experts sit, so
that an RLHF loop runs in tests and benchmarks without people.

``--rater module:function`` names one. It returns one rating per image (an overall judgement, taken for both aspects)
or a mapping from aspect ("quality", "prompt_match") to ratings, as experts rate the two apart (MINIM's selector
learns the first, its policy model the second). medsyn ships one stand-in, built from measurable things: an expert
classifier's confidence that the image shows the class its prompt asks for (prompt match), its confidence in
whichever class it sees (quality), and a check that the image is not blank. It is a stand-in for expert judgement,
never a substitute for it: its ratings are recorded under the rater id ``stand-in:<classifier>``, and results
obtained with it say so.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence

import torch

from medsyn.evaluation.generation_accuracy import ExpertClassifier
from medsyn.rlhf.ratings import Aspect

Rater = Callable[[torch.Tensor, Sequence[str]], Sequence[int] | Mapping[str, Sequence[int]]]


def load_rater(spec: str) -> Rater:
    """The callable ``module:function`` names (``function`` may be a dotted attribute path)."""
    module_name, separator, attribute = spec.partition(":")
    if not separator or not module_name or not attribute:
        raise ValueError(f"--rater {spec!r}: expected module:function")
    try:
        target = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"--rater {spec!r}: cannot import {module_name!r} ({error})") from None
    for part in attribute.split("."):
        if not hasattr(target, part):
            raise ValueError(f"--rater {spec!r}: {module_name!r} has no {attribute!r}")
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"--rater {spec!r}: {attribute!r} is not callable")
    return target


def checked_ratings(rater: Rater, images: torch.Tensor, prompts: Sequence[str]) -> dict[Aspect, list[int]]:
    """Call ``rater`` and insist on one rating in {1, 2, 3} per image and aspect; one list rates both aspects."""
    given = rater(images, prompts)
    if isinstance(given, Mapping):
        unknown = sorted(str(a) for a in given if a not in set(Aspect))
        if unknown or len(given) != len(Aspect):
            raise ValueError(f"the rater rated aspects {sorted(map(str, given))}; expected one list of ratings or "
                             f"one for each of {[a.value for a in Aspect]}")
        by_aspect = {Aspect(aspect): given[aspect] for aspect in given}
    else:
        by_aspect = dict.fromkeys(Aspect, given)
    checked = {}
    for aspect, ratings in by_aspect.items():
        ratings = [int(r) for r in ratings]
        if len(ratings) != len(images):
            raise ValueError(f"the rater gave {len(ratings)} {aspect.value} ratings for {len(images)} images")
        bad = sorted({r for r in ratings if r not in (1, 2, 3)})
        if bad:
            raise ValueError(f"the rater gave {aspect.value} ratings {bad}; ratings are 1, 2 or 3")
        checked[aspect] = ratings
    return checked


class ClassifierStandInRater:
    """A stand-in rater of both aspects. Prompt match: 3 when an expert classifier gives the prompted class
    probability >= ``good``, 2 when >= ``fair``, else 1. Quality: the same cut-offs on its probability of the class
    it finds most likely (a scan it recognises clearly, whatever it shows). A blank image (standard deviation under
    ``min_std`` on [0, 1]) is 1 on both.

    Args:
        classifier: the expert classifier (``train_expert.py``'s).
        class_of_prompt: the class each prompt asks for; default: the one class name found in the prompt.
        good, fair: the probability cut-offs.
        min_std: below this intensity spread an image counts as blank.
    """

    def __init__(self, classifier: ExpertClassifier, class_of_prompt: dict[str, str] | None = None,
                 good: float = 0.8, fair: float = 0.5, min_std: float = 0.02):
        if not 0 < fair < good <= 1:
            raise ValueError(f"need 0 < fair < good <= 1, got fair={fair}, good={good}")
        self.classifier, self.class_of_prompt = classifier, class_of_prompt or {}
        self.good, self.fair, self.min_std = good, fair, min_std

    @property
    def rater_id(self) -> str:
        return "stand-in:" + "/".join(self.classifier.class_names)

    def prompted_class(self, prompt: str) -> int:
        names = self.classifier.class_names
        if prompt in self.class_of_prompt:
            return names.index(self.class_of_prompt[prompt])
        text = prompt.replace("_", " ").lower()
        found = [i for i, name in enumerate(names) if name.replace("_", " ").lower() in text]
        if len(found) != 1:
            raise ValueError(f"prompt {prompt!r} names {len(found)} of the classes {names}; give class_of_prompt")
        return found[0]

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, list[int]]:
        images = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        classes = torch.tensor([self.prompted_class(p) for p in prompts])
        probabilities = self.classifier.probabilities(images)
        blank = images.flatten(1).std(1) < self.min_std

        def rating(confidence: torch.Tensor) -> list[int]:
            levels = 1 + (confidence >= self.fair).long() + (confidence >= self.good).long()
            return torch.where(blank, torch.ones_like(levels), levels).tolist()

        return {Aspect.PROMPT_MATCH.value: rating(probabilities[torch.arange(len(images)), classes]),
                Aspect.QUALITY.value: rating(probabilities.max(dim=1).values)}
