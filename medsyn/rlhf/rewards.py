"""What a generated image earns in RLHF: the selector's predicted rating, the policy's prompt match, or their
product (MINIM uses both models), and whether the selector accepts it; or, for images people (or a rater) have
rated, their own ratings, which no update can game."""

from __future__ import annotations

from collections import defaultdict
from enum import StrEnum

import torch

from medsyn.rlhf.ratings import RATING_SCALE, Aspect, normalised
from medsyn.rlhf.selector import selector_scores


class RewardKind(StrEnum):
    """Which learned model scores a generated image."""

    SELECTOR = "selector"
    POLICY = "policy"
    PRODUCT = "product"
    RATINGS = "ratings"


def generator_rewards(images: torch.Tensor, prompts: list[str], kind: RewardKind | str, selector=None,
                      policy=None, batch_size: int = 64) -> torch.Tensor:
    """Rewards in [0, 1] (N,) of images (N, C, H, W) in [0, 1] with their prompts.

    Args:
        kind: "selector" (predicted rating), "policy" (prompt match) or "product" (both).
        selector: a selector (``medsyn.rlhf.selector``), needed unless ``kind`` is "policy".
        policy: an ``AlignmentPolicy``, needed unless ``kind`` is "selector".
    """
    kind = RewardKind(kind)
    if kind is RewardKind.RATINGS:
        raise ValueError("reward 'ratings' is the rated images' own ratings (rated_rewards), not a model's score")
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
    if kind is not RewardKind.POLICY and selector is None:
        raise ValueError(f"reward {kind.value!r} needs a selector")
    if kind is not RewardKind.SELECTOR and policy is None:
        raise ValueError(f"reward {kind.value!r} needs a policy model")
    reward = torch.ones(len(images))
    with torch.no_grad():
        if selector is not None and kind is not RewardKind.POLICY:
            reward = reward * selector_scores(selector, images, batch_size)
        if policy is not None and kind is not RewardKind.SELECTOR:
            reward = reward * policy.predict(images, prompts, batch_size)
    return reward


def saved_threshold(selector) -> float:
    """The accept threshold ``train_selector.py`` learned from the ratings and saved in the selector's config."""
    threshold = getattr(selector.config, "accept_threshold", None)
    if threshold is None:
        raise ValueError("the selector has no accept_threshold in its config (train it with train_selector.py)")
    return threshold


def accepted_by(selector, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The selector's accept decision (N,): its score at or above the threshold learned from the ratings."""
    return selector_scores(selector, images, batch_size) >= saved_threshold(selector)


def rated_rewards(ratings, digests: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards in [0, 1] (N,) of rated images, by pixel digest: the product over aspects of each aspect's mean
    normalised rating (several raters of one image are averaged); accepted where every aspect's mean rating is 3.

    Args:
        ratings: ``Rating`` records (``RatingsFile.ratings()``), of both aspects for every digest.
    """
    given = defaultdict(list)
    for rating in ratings:
        given[rating.image, Aspect(rating.aspect)].append(rating.rating)
    missing = sorted({aspect.value for d in digests for aspect in Aspect if (d, aspect) not in given})
    if missing:
        raise ValueError(f"reward 'ratings' needs every image rated for {missing}")
    means = torch.tensor([[sum(given[d, a]) / len(given[d, a]) for a in Aspect] for d in digests], dtype=torch.float64)
    return normalised(means).prod(dim=1).float(), (means == RATING_SCALE[-1]).all(dim=1)
