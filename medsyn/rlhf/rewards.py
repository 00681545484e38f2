"""What a generated image earns in RLHF: the selector's predicted rating, the policy's prompt match, or their
product (MINIM uses both models), and whether the selector accepts it."""

from __future__ import annotations

from enum import StrEnum

import torch

from medsyn.rlhf.selector import selector_scores


class RewardKind(StrEnum):
    """Which learned model scores a generated image."""

    SELECTOR = "selector"
    POLICY = "policy"
    PRODUCT = "product"


def generator_rewards(images: torch.Tensor, prompts: list[str], kind: RewardKind | str, selector=None,
                      policy=None, batch_size: int = 64) -> torch.Tensor:
    """Rewards in [0, 1] (N,) of images (N, C, H, W) in [0, 1] with their prompts.

    Args:
        kind: "selector" (predicted rating), "policy" (prompt match) or "product" (both).
        selector: a selector (``medsyn.rlhf.selector``), needed unless ``kind`` is "policy".
        policy: an ``AlignmentPolicy``, needed unless ``kind`` is "selector".
    """
    kind = RewardKind(kind)
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
