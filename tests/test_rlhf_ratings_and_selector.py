"""RLHF's first parts: the append-only ratings file (kill-safe, raters apart, undo by retraction, bad input named),
the selector (reward) model and the policy (alignment) model, which must learn synthetic rating rules."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time

import numpy as np
import pytest
import torch
from transformers import ViTForImageClassification

from medsyn.rlhf.policy import (
    AlignmentPolicy,
    agreement_reward,
    leave_one_out_baseline,
    reinforce_loss,
    train_policy_two_stages,
)
from medsyn.rlhf.ratings import Aspect, Rating, RatingsFile, image_digest, normalised
from medsyn.rlhf.selector import accept_threshold, fit_selector, selector_config, selector_metrics, selector_scores

DIGEST = image_digest(np.zeros((4, 4), dtype=np.uint8))


def rating(value: int = 3, rater: str = "dr-a", **extra) -> Rating:
    return Rating(image=extra.pop("image", DIGEST), prompt="fundus photograph, cataract", rating=value, rater=rater,
                  **extra)


def test_the_digest_follows_pixels_and_shape_not_the_container():
    pixels = np.arange(16, dtype=np.uint8).reshape(4, 4)
    assert image_digest(pixels) == image_digest(pixels.copy(order="F"))
    assert image_digest(pixels) != image_digest(pixels.reshape(2, 8)) != image_digest(pixels[::-1])
    with pytest.raises(ValueError, match="uint8 pixels"):
        image_digest(pixels.astype(np.float32))


def test_ratings_round_trip_per_rater_and_normalise(tmp_path):
    store = RatingsFile(tmp_path / "ratings.jsonl")
    assert store.ratings() == []
    first = store.append(rating(1, seed=4, model="m"))
    store.append(rating(3, rater="dr-b", aspect="prompt_match"))
    assert store.ratings() == [first, store.ratings()[1]] and store.ratings("dr-a") == [first]
    assert store.ratings()[1].aspect is Aspect.PROMPT_MATCH and first.seed == 4
    assert [normalised(r) for r in (1, 2, 3)] == [0.0, 0.5, 1.0] and first.score == 0.0
    assert store.rated_images("dr-b", "prompt_match") == {DIGEST} and store.rated_images("dr-b") == set()


def test_undo_appends_a_retraction_and_rewrites_nothing(tmp_path):
    store = RatingsFile(tmp_path / "ratings.jsonl")
    kept, undone = store.append(rating(2)), store.append(rating(3))
    before = (tmp_path / "ratings.jsonl").read_text()
    with pytest.raises(ValueError, match="'dr-a''s; 'dr-b' cannot undo it"):
        store.retract(undone.id, "dr-b")
    store.retract(undone.id, "dr-a")
    after = (tmp_path / "ratings.jsonl").read_text()
    assert after.startswith(before) and json.loads(after.splitlines()[-1])["type"] == "retraction"
    assert store.ratings() == [kept] and len(store.ratings(include_retracted=True)) == 2
    with pytest.raises(ValueError, match="no rating with id 'nope'"):
        store.retract("nope", "dr-a")


def test_bad_ratings_are_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"rating must be one of \[1, 2, 3\], got 4"):
        rating(4)
    with pytest.raises(ValueError, match="rating must be one of"):
        rating(True)
    with pytest.raises(ValueError, match="aspect must be one of"):
        rating(aspect="beauty")
    with pytest.raises(ValueError, match="rater must name"):
        rating(rater=" ")
    with pytest.raises(ValueError, match="content digest"):
        rating(image="some/path.png")
    with pytest.raises(ValueError, match="prompt has 1001 characters"):
        Rating(image=DIGEST, prompt="x" * 1001, rating=2, rater="dr-a")


def test_a_corrupt_line_is_named_but_a_torn_one_is_skipped(tmp_path):
    path = tmp_path / "ratings.jsonl"
    store = RatingsFile(path)
    good = store.append(rating(2))
    with open(path, "a") as handle:
        handle.write('{"type": "rating", "image": "sha256:ab", "prom')  # a write cut short
    later = store.append(rating(3))  # starts on a new line, after the torn one
    with pytest.warns(UserWarning, match="skipped 1 torn line"):
        assert store.ratings() == [good, later]
    with open(path, "a") as handle:
        handle.write(json.dumps({"type": "rating", **{**good.__dict__, "rating": 7, "aspect": "quality"}}) + "\n")
    with pytest.raises(ValueError, match=r"line 4: rating must be one of \[1, 2, 3\], got 7"), \
            pytest.warns(UserWarning, match="torn line"):
        store.ratings()


def _append_forever(path: str) -> None:
    store = RatingsFile(path)
    for index in range(100_000):
        store.append(rating(1 + index % 3, image=image_digest(np.full((2, 2), index % 256, dtype=np.uint8))))


def test_the_file_survives_a_kill_mid_write(tmp_path):
    path = tmp_path / "ratings.jsonl"
    process = multiprocessing.get_context("spawn").Process(target=_append_forever, args=(str(path),))
    process.start()
    deadline = time.monotonic() + 60
    while (not path.exists() or path.stat().st_size < 20_000) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.join()
    ratings = RatingsFile(path).ratings()  # every complete line reads back, in order
    assert len(ratings) > 50
    assert [r.rating for r in ratings] == [1 + i % 3 for i in range(len(ratings))]
    RatingsFile(path).append(rating(2))  # and the file takes more
    assert RatingsFile(path).ratings()[-1].rating == 2


def brightness_rated(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Images of uniform random brightness with texture; the synthetic rule: darker thirds rate 1, 2, 3."""
    generator = torch.Generator().manual_seed(seed)
    brightness = torch.rand(count, generator=generator)
    images = (brightness[:, None, None, None] * 0.8 + 0.2 * torch.rand(count, 1, 16, 16, generator=generator))
    ratings = 1 + (brightness > 1 / 3).long() + (brightness > 2 / 3).long()
    return images, ratings


def test_the_selector_learns_a_rating_rule_and_its_threshold(tmp_path):
    torch.manual_seed(0)
    config = selector_config(16, 1, patch_size=4, hidden_size=32, num_attention_heads=2, num_hidden_layers=2,
                             intermediate_size=64)
    model = ViTForImageClassification(config)
    images, ratings = brightness_rated(256, seed=0)
    losses = fit_selector(model, images, ratings, steps=300, learning_rate=1e-3, batch_size=32)
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20
    held_out, held_out_ratings = brightness_rated(128, seed=1)
    with torch.no_grad():
        threshold = accept_threshold(selector_scores(model, images), ratings)
        metrics = selector_metrics(selector_scores(model, held_out), held_out_ratings, threshold)
    assert metrics["spearman"] > 0.9 and metrics["rating_accuracy"] > 0.8 and metrics["accept_accuracy"] > 0.9
    model.config.accept_threshold = threshold
    model.save_pretrained(tmp_path / "selector")
    loaded = ViTForImageClassification.from_pretrained(tmp_path / "selector")
    assert loaded.config.accept_threshold == threshold and (tmp_path / "selector" / "model.safetensors").is_file()


def test_the_threshold_is_the_best_split_and_bad_ratings_are_named():
    scores = torch.tensor([0.1, 0.2, 0.3, 0.6, 0.7, 0.9])
    ratings = torch.tensor([1, 2, 2, 3, 3, 3])
    assert accept_threshold(scores, ratings) == pytest.approx(0.45)
    with pytest.raises(ValueError, match="needs images rated 3 and images rated lower"):
        accept_threshold(scores, torch.full((6,), 3))
    model = ViTForImageClassification(selector_config(8, 1, patch_size=4, hidden_size=8, num_attention_heads=1,
                                                      num_hidden_layers=1, intermediate_size=8))
    with pytest.raises(ValueError, match=r"ratings must be in \[1, 2, 3\], got \[0, 1\]"):
        fit_selector(model, torch.rand(2, 1, 8, 8), torch.tensor([0, 1]), steps=1)
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        selector_config(20, 1)


def test_the_reinforce_gradient_is_the_analytic_one_with_and_without_a_baseline():
    """For p = sigmoid(theta) and the agreement reward, E[reward] = p r + (1 - p)(1 - r), so the loss gradient is
    -(2r - 1) p (1 - p); a baseline changes the variance, not the mean."""
    theta, r, count = torch.tensor(0.4, requires_grad=True), 0.8, 400_000
    generator = torch.Generator().manual_seed(0)
    p = torch.sigmoid(theta)
    analytic = -(2 * r - 1) * p.item() * (1 - p.item())
    for baseline in (0.0, 0.7):
        probabilities = torch.sigmoid(theta).expand(count)
        actions = torch.bernoulli(probabilities.detach(), generator=generator)
        loss = reinforce_loss(probabilities, actions, agreement_reward(actions, torch.full((count,), r)), baseline)
        (gradient,) = torch.autograd.grad(loss, theta)
        assert gradient.item() == pytest.approx(analytic, abs=4e-3)


def test_the_leave_one_out_baseline_is_the_others_mean():
    rewards = torch.tensor([1.0, 0.0, 0.5, 0.5])
    torch.testing.assert_close(leave_one_out_baseline(rewards), torch.tensor([1 / 3, 2 / 3, 0.5, 0.5]))
    assert leave_one_out_baseline(torch.tensor([0.7])).item() == 0.0


def tiny_policy(captions: list[str]) -> AlignmentPolicy:
    from transformers import BertModel, ViTConfig, ViTModel

    from medsyn.models.latent_diffusion import bert_text_encoder_config, build_wordpiece_tokenizer

    torch.manual_seed(0)
    tokenizer = build_wordpiece_tokenizer(captions, vocab_size=100, max_length=8, min_frequency=1)
    text = BertModel(bert_text_encoder_config(max_length=8, vocab_size=len(tokenizer), hidden_size=32,
                                              num_hidden_layers=1, num_attention_heads=2, intermediate_size=64))
    image = ViTModel(ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=1,
                               num_attention_heads=2, intermediate_size=64), add_pooling_layer=False)
    return AlignmentPolicy(image, text, tokenizer, max_length=8)


def matching_pairs(count: int, seed: int) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Bright or dark images with the prompt "a bright scan" or "a dark scan": rated 3 when they match, 1 when not."""
    generator = torch.Generator().manual_seed(seed)
    bright = torch.rand(count, generator=generator) > 0.5
    says_bright = torch.rand(count, generator=generator) > 0.5
    images = torch.where(bright, 0.8, 0.2)[:, None, None, None] + 0.1 * torch.rand(count, 1, 16, 16,
                                                                                   generator=generator)
    prompts = ["a bright scan" if b else "a dark scan" for b in says_bright]
    return images, prompts, (bright == says_bright).float()  # normalised ratings: 3 -> 1, 1 -> 0


def test_the_policy_learns_which_prompt_an_image_matches_in_two_stages(tmp_path):
    policy = tiny_policy(["a bright scan", "a dark scan"])
    images, prompts, scores = matching_pairs(256, seed=0)
    accepted = torch.rand(256, generator=torch.Generator().manual_seed(3)) > 0.3  # the selector's verdicts
    rewards = train_policy_two_stages(policy, images, prompts, scores, accepted, steps=(120, 60),
                                      learning_rate=1e-3, batch_size=32)
    assert sum(rewards["stage_1"][-25:]) / 25 > sum(rewards["stage_1"][:25]) / 25 + 0.2
    held_out, held_out_prompts, truth = matching_pairs(128, seed=1)
    with torch.no_grad():
        predicted = policy(held_out, held_out_prompts)
    assert ((predicted > 0.5).float() == truth).float().mean() > 0.9
    policy.save_pretrained(tmp_path / "policy")
    with torch.no_grad():
        torch.testing.assert_close(AlignmentPolicy.from_pretrained(tmp_path / "policy")(held_out, held_out_prompts),
                                   predicted)
    with pytest.raises(ValueError, match="accepted no sample"):
        train_policy_two_stages(policy, images, prompts, scores, torch.zeros(256, dtype=torch.bool), steps=(1, 1))
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        policy(held_out[:3], held_out_prompts[:2])
