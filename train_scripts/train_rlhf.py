"""Improve a class-conditional generator with expert ratings (MINIM-style RLHF): rounds of generate, rate, train
the selector, update the generator, evaluate.

    # unattended, with the stand-in rater built from an expert classifier (train_expert.py):
    accelerate launch train_scripts/train_rlhf.py --pretrained_model_name_or_path ddpm-brain \\
        --stand_in_rater brain-expert --rounds 3 --update policy_gradient --output_dir rlhf-brain
    # with people: no rater; each round stops after writing its pool, to be rated with
    medsyn rate --images rlhf-brain/round-001/pool.npz --ratings rlhf-brain/round-001/ratings.jsonl
    # then the same command again continues the round.

The generator is a class-conditional pixel DDPM (sampled by DDIM with ``--eta``), a score model (annealed
Langevin), whose prompt for class c is ``--prompt_template`` with its name, or a MediSyn model (DDIM in latent
space) with its ``--prompts``. Each round: a pool of ``--pool_per_class`` images per class from the current
generator; each image rated for quality and for its match to the prompt (``--rater module:function`` or the
stand-in, or people through the ratings file); the selector trained on the quality ratings (``train_selector.py``)
and, unless ``--reward selector``, the policy model on the prompt-match ratings in the paper's two stages
(``train_policy.py``), each continuing from the last round's; the generator updated by ``--update``
(reward-weighted fine-tuning or DDPO's policy gradient, of the weights ``--tune`` names: LoRA by default) towards
``--reward``; then the same held-out classes and seeds every round, rated and measured (``metrics.json`` per round,
``rounds.json``, tensorboard).

The reward must see the prompt when the raters judge the match to it: a selector sees only the image, and a
generator rewarded by it alone learns to make whatever the selector likes, whatever it was asked for (RESULTS.md,
issue 15). The default reward is therefore MINIM's product, the selector's score times the policy's prompt match.

Every stage writes its result atomically (a temporary name, then a rename) and is skipped when its result is there;
its randomness is keyed by (``--seed``, round), so a run killed at any point and started again ends where an
uninterrupted one would. Round 0 holds the starting model's metrics.

Under ``accelerate launch`` with several processes, each samples its share of the pool and of the held-out images
(image i depends on (seed, round, i) alone, so the pool is the one a single process draws), the reward models train
data-parallel through their scripts, and each generator update step averages every process's share of the minibatch;
the main process rates, measures and writes, the others wait for it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import time
from enum import StrEnum
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object
from transformers import PreTrainedModel

from medsyn.flag_spellings import accept_both_spellings
from medsyn.pipelines import load_pipeline
from medsyn.rlhf.chain import SamplingChain, Trajectory, sampling_chain
from medsyn.rlhf.policy import POLICY_ARCHITECTURE, AlignmentPolicy
from medsyn.rlhf.policy_gradient import kl_to_reference, policy_gradient_update
from medsyn.rlhf.raters import ClassifierStandInRater, checked_ratings, load_rater
from medsyn.rlhf.ratings import Aspect, Rating, RatingsFile, image_digest
from medsyn.rlhf.reward_weighted import reward_weighted_update, reward_weights
from medsyn.rlhf.rewards import RewardKind, generator_rewards, rated_rewards, saved_threshold
from medsyn.rlhf.selector import SELECTOR_ARCHITECTURE, load_selector
from medsyn.rlhf.tuning import TunedWeights, class_embedding_table, tuned
from medsyn.seeding import keyed_generator
from medsyn.validation import DefaultsShown, count_argument, number_argument

logger = get_logger(__name__)  # the main process's lines only

#: Seeds of the held-out evaluation images live apart from every round's pool seeds.
HELD_OUT_KEY = -1


class RewardModelError(ValueError):
    """A reward model that does not rank its held-out ratings: the round stops before the update."""


class UpdateMethod(StrEnum):
    REWARD_WEIGHTED = "reward_weighted"
    POLICY_GRADIENT = "policy_gradient"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsShown)
    parser.add_argument("--pretrained_model_name_or_path", type=str, required=True,
                        help="The class-conditional DDPM or score-Langevin pipeline to improve.")
    parser.add_argument("--output_dir", type=str, default="medsyn-rlhf",
                        help="The run's folder: one sub-folder a round, rounds.json, logs.")
    parser.add_argument("--rounds", type=count_argument(), default=3,
                        help="Rounds to have done (a rerun with more continues).")
    parser.add_argument("--seed", type=int, default=0, help="Keys every round's randomness, with the round.")

    sampling = parser.add_argument_group("sampling (the policy)")
    sampling.add_argument("--pool_per_class", type=count_argument(), default=32, help="Rated images per class a round.")
    sampling.add_argument("--held_out_per_class", type=count_argument(), default=16,
                          help="Evaluation images per class, the same seeds every round.")
    sampling.add_argument("--prompt_template", type=str, default="{class_name}",
                          help="The prompt of a class, as the raters and the ratings file see it.")
    sampling.add_argument("--prompts", type=str, nargs="+", default=None,
                          help="A MediSyn model's prompts (each plays a class's part: pool and held-out images per "
                               "prompt).")
    sampling.add_argument("--guidance_scale", type=number_argument(0), default=2.0,
                          help="Classifier-free guidance of the policy (1: off).")
    sampling.add_argument("--num_inference_steps", type=count_argument(2), default=None,
                          help="DDIM steps (default 20) or Langevin levels (default: the trained schedule).")
    sampling.add_argument("--eta", type=number_argument(0, exclusive=True), default=1.0,
                          help="DDIM's stochasticity for a DDPM (1: DDPM's ancestral steps).")
    sampling.add_argument("--batch_size", type=count_argument(), default=64, help="Chains sampled at once.")

    rating = parser.add_argument_group("rating (one of them, or neither for people)")
    rating.add_argument("--rater", type=str, default=None,
                        help="module:function, a callable (images (N, C, H, W) in [0, 1], prompts) -> ratings 1-3.")
    rating.add_argument("--stand_in_rater", type=str, default=None,
                        help="An expert classifier folder (train_expert.py): the stand-in rater built from it. Its "
                             "ratings are a stand-in for experts', never a substitute.")

    selector = parser.add_argument_group("selector (default: the paper's ViT)")
    for name, value in SELECTOR_ARCHITECTURE.items():
        selector.add_argument(f"--selector_{name}", type=count_argument(), default=value,
                              help=f"Selector ViT {name.replace('_', ' ')}.")
    selector.add_argument("--selector_image_encoder", type=str, default=None,
                          help="A local transformers image-classification folder (e.g. a classifier trained on the "
                               "labelled scans, train_expert.py) whose backbone becomes the first round's selector, "
                               "with a new one-output head; default: a new ViT.")
    selector.add_argument("--selector_steps", type=count_argument(), default=300,
                          help="Optimiser steps of each round's selector.")
    selector.add_argument("--selector_learning_rate", type=number_argument(0, exclusive=True), default=1e-4,
                          help="The selector's learning rate.")

    policy = parser.add_argument_group("policy model (default: the paper's ViT and BERT, 768 wide)")
    for name, value in POLICY_ARCHITECTURE.items():
        policy.add_argument(f"--policy_{name}", type=count_argument(), default=value,
                            help=f"Policy towers' {name.replace('_', ' ')}.")
    policy.add_argument("--policy_image_encoder", type=str, default=None,
                        help="A local transformers vision model folder (e.g. a classifier trained on the labelled "
                             "scans, train_expert.py) as the policy's image tower; default: a new ViT.")
    policy.add_argument("--policy_text_encoder", type=str, default=None,
                        help="A local BERT-family folder for the policy's text tower; default: a new BERT with a "
                             "WordPiece vocabulary from the prompts.")
    policy.add_argument("--policy_clip_model", type=str, default=None,
                        help="A local open_clip folder (e.g. BiomedCLIP's architecture) whose frozen image and text "
                             "towers serve as the policy's encoders; only its head learns.")
    policy.add_argument("--policy_steps", type=count_argument(), default=300,
                        help="Optimiser steps of each of the policy's two stages a round.")
    policy.add_argument("--policy_learning_rate", type=number_argument(0, exclusive=True), default=1e-4,
                        help="The policy model's learning rate.")

    update = parser.add_argument_group("generator update")
    update.add_argument("--reward", type=RewardKind, default=RewardKind.PRODUCT, choices=list(RewardKind),
                        help="What the update maximises: the selector's score, the policy's prompt match, both "
                             "multiplied (MINIM), or the pool's own ratings (no reward model: DDPO's setting, "
                             "nothing to game, but only rated images can be rewarded).")
    update.add_argument("--min_reward_spearman", type=float, default=0.1,
                        help="A round stops before the update unless each reward model's held-out Spearman "
                             "correlation with its ratings reaches this (-1: never stop).")
    update.add_argument("--update", type=UpdateMethod, default=UpdateMethod.POLICY_GRADIENT,
                        choices=list(UpdateMethod), help="Reward-weighted fine-tuning, or DDPO's policy gradient.")
    update.add_argument("--updates_per_round", type=count_argument(), default=50, help="Optimiser steps a round.")
    update.add_argument("--update_batch_size", type=count_argument(), default=16,
                        help="Chains (policy gradient) or images (reward-weighted) per optimiser step.")
    update.add_argument("--learning_rate", type=number_argument(0, exclusive=True), default=3e-4,
                        help="The generator update's learning rate.")
    update.add_argument("--tune", type=TunedWeights, default=TunedWeights.LORA, choices=list(TunedWeights),
                        help="The weights an update trains: LoRA adapters (merged after each round), every weight, "
                             "or only the class-embedding rows (one class's update cannot move another's samples; "
                             "class-conditional unets only).")
    update.add_argument("--lora_rank", type=count_argument(), default=8, help="The adapters' rank (--tune lora).")
    update.add_argument("--kl_weight", type=number_argument(0), default=0.01,
                        help="Policy gradient: the KL guard's weight (KL to the round's starting generator).")
    update.add_argument("--clip_range", type=number_argument(0, exclusive=True), default=1.0,
                        help="Policy gradient: PPO's ratio clip.")
    update.add_argument("--steps_per_update", type=count_argument(), default=None,
                        help="Policy gradient: chain steps per optimiser step (default: all).")
    update.add_argument("--real_images", type=str, default=None,
                        help="An .npz of real training images (images, labels, class_names): mixed into "
                             "reward-weighted fine-tuning and the Frechet distance's reference.")
    update.add_argument("--pretrain_weight", type=number_argument(0), default=1.0,
                        help="Reward-weighted: the weight of the real images' loss (needs --real_images).")
    parser.add_argument("--report_to", type=str, default="tensorboard", help="Tracker: tensorboard, wandb or none.")

    args = accept_both_spellings(parser).parse_args(argv)
    if args.rater and args.stand_in_rater:
        parser.error("--rater and --stand_in_rater are alternatives: give one")
    if args.policy_clip_model and (args.policy_image_encoder or args.policy_text_encoder):
        parser.error("--policy_clip_model gives both of the policy's towers: leave out --policy_image_encoder and "
                     "--policy_text_encoder")
    if args.update == UpdateMethod.REWARD_WEIGHTED and args.pretrain_weight > 0 and not args.real_images:
        parser.error("reward-weighted fine-tuning mixes in real images: give --real_images or --pretrain_weight 0")
    return args


def atomic_json(path: Path, payload: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2))
    os.replace(partial, path)


def build_rater(args):
    """The rater callable and its id, or (None, None) when people rate."""
    if args.stand_in_rater:
        from medsyn.evaluation.generation_accuracy import ExpertClassifier

        rater = ClassifierStandInRater(ExpertClassifier.from_pretrained(args.stand_in_rater))
        return rater, rater.rater_id
    if args.rater:
        return load_rater(args.rater), args.rater
    return None, None


def load_real_images(path: str, class_names: list[str], prompts: list[str] | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images in [-1, 1] (N, C, H, W) and their labels, in the generator's class order; for a text-guided
    generator (``prompts``), each real class is the one prompt that names it."""
    with np.load(path, allow_pickle=False) as data:
        missing = {"images", "labels", "class_names"} - set(data.files)
        if missing:
            raise ValueError(f"--real_images {path}: missing arrays {sorted(missing)}")
        images, labels, names = data["images"], data["labels"], [str(n) for n in data["class_names"]]
    if prompts is not None:
        order = []
        for name in names:
            naming = [i for i, p in enumerate(prompts) if name.replace("_", " ").lower() in p.lower()]
            if len(naming) != 1:
                raise ValueError(f"--real_images {path}: class {name!r} is named by {len(naming)} of the prompts; "
                                 "each class needs exactly one")
            order.append(naming[0])
        labels = np.asarray(order)[labels]
    elif names != class_names:
        raise ValueError(f"--real_images {path} has classes {names}; the generator has {class_names}")
    if images.dtype != np.uint8:
        raise ValueError(f"--real_images {path}: expected uint8 images, got {images.dtype}")
    pixels = torch.from_numpy(images if images.ndim == 4 else images[..., None]).permute(0, 3, 1, 2)
    return pixels.float() / 127.5 - 1, torch.from_numpy(labels).long()


def unit_range(images: torch.Tensor) -> torch.Tensor:
    """Samples in [-1, 1] as images in [0, 1], what raters, the selector and the metrics take."""
    return (images / 2 + 0.5).clamp(0, 1)


def uint8_pixels(images: torch.Tensor) -> torch.Tensor:
    """Samples in [-1, 1] (N, C, H, W) as uint8 (N, C, H, W)."""
    return (unit_range(images) * 255).round().to(torch.uint8)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[-1, 1] (N, C, H, W) -> uint8 (N, H, W) or (N, H, W, 3), as medsyn generate writes them."""
    pixels = uint8_pixels(images).permute(0, 2, 3, 1).numpy()
    return pixels[..., 0] if pixels.shape[-1] == 1 else pixels


def sample_chains(chain: SamplingChain, labels: torch.Tensor, seeds: list[tuple[int, ...]], batch_size: int,
                  accelerator: Accelerator) -> Trajectory:
    """One chain per label, each from the generator its seed key names, ``batch_size`` at a time; every process
    samples a contiguous share of the chains and gets them all back, in order."""
    with accelerator.split_between_processes(list(range(len(labels)))) as own:
        parts = [chain.sample(labels[own[i : i + batch_size]],
                              [keyed_generator(*seeds[j]) for j in own[i : i + batch_size]])
                 for i in range(0, len(own), batch_size)]
    return Trajectory.cat(gather_object(parts))  # (one process: the parts as they are)


class Rounds:
    """The run's folder and what each round's stages need."""

    def __init__(self, args: argparse.Namespace, accelerator: Accelerator):
        self.args, self.accelerator = args, accelerator
        self.root = Path(args.output_dir)
        self.rater, self.rater_id = build_rater(args)
        start = load_pipeline(args.pretrained_model_name_or_path)
        self.text_guided = not hasattr(start, "class_names")
        if self.text_guided != bool(args.prompts):
            raise ValueError("--prompts are for a MediSyn model, and a MediSyn model needs them" if args.prompts
                             else f"{args.pretrained_model_name_or_path} is text-guided: give its --prompts")
        if self.text_guided:
            self.class_names = self.prompts = list(args.prompts)
        else:
            self.class_names = start.class_names
            if not self.class_names:
                raise ValueError(f"{args.pretrained_model_name_or_path}: RLHF needs a class-conditional model with "
                                 "class names (its prompts)")
            self.prompts = [args.prompt_template.format(class_name=name) for name in self.class_names]
        if args.tune == TunedWeights.CLASS_EMBEDDINGS:
            class_embedding_table(start.unet)  # refused before any round, not at its update
        self.real = None
        if args.real_images:
            self.real = load_real_images(args.real_images, self.class_names, self.prompts if self.text_guided
                                         else None)
            made = self.chain(0, start).image_shape()
            if tuple(self.real[0].shape[1:]) != made:
                raise ValueError(f"--real_images are {tuple(self.real[0].shape[1:])} (C, H, W); the generator "
                                 f"makes {made}")
        self.fid = None

    def folder(self, round_index: int) -> Path:
        return self.root / f"round-{round_index:03d}"

    def cleared(self, partial: Path) -> Path:
        """``partial`` emptied (what a killed run left there) by the main process, for every process."""
        if self.accelerator.is_main_process:
            shutil.rmtree(partial, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        return partial

    def publish(self, partial: Path, folder: Path) -> None:
        """``partial``, complete, renamed to ``folder`` by the main process, once every process is done with it."""
        self.accelerator.wait_for_everyone()
        if self.accelerator.is_main_process:
            os.replace(partial, folder)
        self.accelerator.wait_for_everyone()

    def generator_path(self, round_index: int) -> str:
        return self.args.pretrained_model_name_or_path if round_index == 0 else str(
            self.folder(round_index) / "generator")

    def chain(self, round_index: int, pipe=None) -> SamplingChain:
        """The sampling chain of the round's generator (``pipe``: that generator, already loaded)."""
        pipe = (pipe or load_pipeline(self.generator_path(round_index))).to(self.accelerator.device)
        pipe.set_progress_bar_config(disable=True)
        options = {} if pipe.__class__.__name__ == "ScoreLangevinPipeline" else {"eta": self.args.eta}
        if self.text_guided:
            options["prompts"] = self.prompts
        return sampling_chain(pipe, self.args.guidance_scale, self.args.num_inference_steps, **options)

    def labels_and_seeds(self, per_class: int, key: int) -> tuple[torch.Tensor, list[tuple[int, ...]]]:
        labels = torch.arange(len(self.class_names)).repeat_interleave(per_class)
        return labels, [(self.args.seed, key, i) for i in range(len(labels))]

    def rate(self, images: torch.Tensor, labels: torch.Tensor) -> dict[Aspect, list[int]]:
        return checked_ratings(self.rater, unit_range(images), [self.prompts[int(c)] for c in labels])

    @property
    def uses_models(self) -> bool:
        return self.args.reward != RewardKind.RATINGS

    @property
    def uses_policy(self) -> bool:
        return self.args.reward in (RewardKind.POLICY, RewardKind.PRODUCT)

    @property
    def aspects(self) -> list[Aspect]:
        """What the round needs rated: quality (the selector), prompt match (the policy); both for the ratings."""
        return [Aspect.QUALITY, *([] if self.args.reward == RewardKind.SELECTOR else [Aspect.PROMPT_MATCH])]

    # --- the stages -------------------------------------------------------------------------------------------

    def pool(self, r: int):
        """The round's pool from the generator it starts with: pool.npz (for rating) and its chains."""
        labels, seeds = self.labels_and_seeds(self.args.pool_per_class, r)
        chain = self.chain(r - 1)
        trajectory = sample_chains(chain, labels, seeds, self.args.batch_size, self.accelerator)
        path = self.folder(r) / "pool.npz"
        if not path.exists() and self.accelerator.is_main_process:
            partial = path.with_name("pool.partial.npz")
            np.savez(partial, images=to_uint8(trajectory.images), labels=labels.numpy(),
                     class_names=np.array(self.class_names), captions=np.array([self.prompts[c] for c in labels]),
                     seeds=np.array([s[-1] for s in seeds]))
            os.replace(partial, path)
        self.accelerator.wait_for_everyone()
        return chain, trajectory

    def ratings(self, r: int, trajectory) -> bool:
        """Rate the pool (a rater), or check that people have; False when ratings are still missing."""
        ratings_file = RatingsFile(self.folder(r) / "ratings.jsonl")
        pixels = to_uint8(trajectory.images)
        digests = [image_digest(p) for p in pixels]
        if self.rater is None:
            given = ratings_file.ratings()
            missing = {}
            for aspect in self.aspects:
                rated = {g.image for g in given if g.aspect == aspect}
                missing[aspect] = sum(d not in rated for d in set(digests))
            if any(missing.values()):
                logger.warning(
                    f"round {r}: pool images without a rating: "
                    + ", ".join(f"{count} for {aspect.value}" for aspect, count in missing.items()) + ". Rate them "
                    f"with\n  medsyn rate --images {self.folder(r) / 'pool.npz'} --ratings {ratings_file.path}\n"
                    "(the page's aspect=prompt_match rates the match to the prompt) and run this command again.")
            return not any(missing.values())
        if self.accelerator.is_main_process:  # the file's one writer; the others wait, not read it mid-append
            done = {aspect: ratings_file.rated_images(self.rater_id, aspect) for aspect in Aspect}
            todo = [i for i, d in enumerate(digests) if any(d not in done[aspect] for aspect in Aspect)]
            given = self.rate(trajectory.images[todo], trajectory.labels[todo]) if todo else {}
            for k, i in enumerate(todo):
                for aspect in Aspect:
                    if digests[i] not in done[aspect]:
                        ratings_file.append(Rating(digests[i], self.prompts[int(trajectory.labels[i])],
                                                   given[aspect][k], self.rater_id, aspect, path=f"pool.npz[{i}]",
                                                   model=self.generator_path(r - 1), seed=i))
        self.accelerator.wait_for_everyone()
        return True

    def selector(self, r: int) -> PreTrainedModel:
        folder = self.folder(r) / "selector"
        if not folder.exists():
            from medsyn.train_scripts import train_selector

            partial = self.cleared(folder.with_name("selector.partial"))
            shape = [f"--{name}={getattr(self.args, 'selector_' + name)}" for name in SELECTOR_ARCHITECTURE]
            if r > 1:
                previous = ["--selector_model_name_or_path", str(self.folder(r - 1) / "selector")]
            elif self.args.selector_image_encoder:
                previous = ["--image_encoder_name_or_path", self.args.selector_image_encoder]
            else:
                previous = []
            train_selector.main(train_selector.parse_args([
                *self.rated_data(r), "--aspect", Aspect.QUALITY.value, "--output_dir", str(partial),
                "--max_train_steps", str(self.args.selector_steps), "--learning_rate",
                str(self.args.selector_learning_rate), *shape, *previous]), keep_process_group=True)
            self.publish(partial, folder)
        self.check_ranks(folder / "selector.json", "selector", "quality")
        return load_selector(folder).to(self.accelerator.device).eval()

    def check_ranks(self, metrics_path: Path, model: str, aspect: str) -> None:
        """Refuse to update the generator against a reward model that does not rank held-out ratings: the update
        would chase its errors (RESULTS.md, issue 15)."""
        spearman = json.loads(metrics_path.read_text())["spearman"]
        if not spearman >= self.args.min_reward_spearman:  # NaN (a constant prediction) fails too
            raise RewardModelError(
                f"{metrics_path.parent}: the {model}'s held-out Spearman correlation with the {aspect} ratings is "
                f"{spearman:.3f}, under --min_reward_spearman {self.args.min_reward_spearman}; updating the generator "
                "against it would reward its errors. Rate more images, train it longer, or pass a lower "
                "--min_reward_spearman to go on anyway (the models are kept).")

    def rated_data(self, r: int) -> list[str]:
        """train_selector.py's and train_policy.py's flags for the round's rated pool."""
        return ["--ratings", str(self.folder(r) / "ratings.jsonl"), "--images", str(self.folder(r) / "pool.npz"),
                "--seed", str(self.args.seed + r), "--report_to", "none", "--checkpointing_steps", str(10**9)]

    def policy(self, r: int) -> AlignmentPolicy | None:
        """The round's policy model (None when the reward does not use it): stage 1 on every prompt-match rating,
        continuing from the last round's policy, then stage 2 on the selector's accepted images."""
        if not self.uses_policy:
            return None
        folder = self.folder(r) / "policy"
        if not folder.exists():
            from medsyn.train_scripts import train_policy

            args = self.args
            common = [*self.rated_data(r), "--max_train_steps", str(args.policy_steps), "--learning_rate",
                      str(args.policy_learning_rate)]
            stage1 = folder.with_name("policy-stage1")
            if not stage1.exists():
                partial = self.cleared(stage1.with_name("policy-stage1.partial"))
                start = (["--policy_model_name_or_path", str(self.folder(r - 1) / "policy")] if r > 1 else
                         [f"--{name}={getattr(args, 'policy_' + name)}" for name in POLICY_ARCHITECTURE]
                         + (["--text_encoder_name_or_path", args.policy_text_encoder] if args.policy_text_encoder
                            else [])
                         + (["--image_encoder_name_or_path", args.policy_image_encoder] if args.policy_image_encoder
                            else [])
                         + (["--clip_model", args.policy_clip_model] if args.policy_clip_model else []))
                train_policy.main(train_policy.parse_args([*common, "--output_dir", str(partial), *start]),
                                  keep_process_group=True)
                self.publish(partial, stage1)
            partial = self.cleared(folder.with_name("policy.partial"))
            train_policy.main(train_policy.parse_args([
                *common, "--stage", "2", "--selector", str(self.folder(r) / "selector"),
                "--policy_model_name_or_path", str(stage1), "--output_dir", str(partial)]), keep_process_group=True)
            self.publish(partial, folder)
        self.check_ranks(folder / "policy.json", "policy model", "prompt-match")
        return AlignmentPolicy.from_pretrained(folder).to(self.accelerator.device).eval()

    def rewards(self, images: torch.Tensor, labels: torch.Tensor, selector, policy
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``--reward`` of images in [-1, 1], and which are accepted: the selector's score at its threshold and,
        where the reward uses the policy, its match decision (p >= 0.5)."""
        images01 = unit_range(images)
        prompts = [self.prompts[int(c)] for c in labels]
        scores = generator_rewards(images01, prompts, RewardKind.SELECTOR, selector=selector)
        accepted = scores >= saved_threshold(selector)
        if policy is None:
            return scores, accepted
        match = generator_rewards(images01, prompts, RewardKind.POLICY, policy=policy)
        reward = match if self.args.reward == RewardKind.POLICY else scores * match
        return reward, accepted & (match >= 0.5)

    def update(self, r: int, chain: SamplingChain, trajectory, selector, policy) -> dict:
        """The generator after the round's update, saved merged (a plain pipeline) to round/generator."""
        folder = self.folder(r) / "generator"
        args = self.args
        if self.uses_models:
            rewards, accepted = self.rewards(trajectory.images, trajectory.labels, selector, policy)
        else:
            rewards, accepted = rated_rewards(RatingsFile(self.folder(r) / "ratings.jsonl").ratings(),
                                              [image_digest(p) for p in to_uint8(trajectory.images)])
        summary = {"pool_mean_reward": float(rewards.mean()), "pool_accept_rate": float(accepted.float().mean())}
        if folder.exists():
            return summary
        if args.update == UpdateMethod.REWARD_WEIGHTED and not accepted.any():
            raise ValueError(f"round {r}: the reward models accepted none of the pool; nothing to fine-tune on")
        started = time.perf_counter()
        common = dict(updates=args.updates_per_round, batch_size=args.update_batch_size,
                      learning_rate=args.learning_rate, seed=args.seed + r, accelerator=self.accelerator,
                      weight_decay=args.tune.weight_decay)
        with tuned(chain, args.tune, args.lora_rank, seed=args.seed + r):
            if args.update == UpdateMethod.POLICY_GRADIENT:
                logged = policy_gradient_update(chain, trajectory, rewards, clip_range=args.clip_range,
                                                kl_weight=args.kl_weight, steps_per_update=args.steps_per_update,
                                                **common)
                summary["kl_to_round_start"] = self.kl_to_round_start(chain, trajectory)
            else:
                real_images, real_labels = self.real if self.real is not None else (None, None)
                logged = reward_weighted_update(chain, trajectory.images, trajectory.labels,
                                                reward_weights(rewards, accepted), real_images=real_images,
                                                real_labels=real_labels, pretrain_weight=args.pretrain_weight,
                                                **common)
        summary["update_seconds"] = time.perf_counter() - started
        summary["last_update"] = logged[-1]
        partial = self.cleared(folder.with_name("generator.partial"))
        if self.accelerator.is_main_process:
            chain.pipe.save_pretrained(partial)
        self.publish(partial, folder)
        return summary

    def kl_to_round_start(self, chain: SamplingChain, trajectory: Trajectory) -> float:
        """``kl_to_reference`` over the pool, each process measuring its share of the chains."""
        with self.accelerator.split_between_processes(list(range(len(trajectory.labels)))) as own:
            part = [(kl_to_reference(chain, trajectory.rows(torch.tensor(own))), len(own))] if own else []
        parts = gather_object(part)
        return sum(kl * n for kl, n in parts) / sum(n for _, n in parts)

    def evaluate(self, r: int, selector=None, policy=None, extra: dict | None = None) -> dict:
        """The held-out images of the round's generator: the rater's mean ratings (``mean_rating`` is the match to
        the prompt, the aspect a class-conditional generator exists for), the learned reward and acceptance, the
        Frechet distance to the real images and the per-class MS-SSIM diversity. Every process samples its share;
        the main process measures and writes ``metrics.json``, which the others then read."""
        labels, seeds = self.labels_and_seeds(self.args.held_out_per_class, HELD_OUT_KEY)
        images = sample_chains(self.chain(r), labels, seeds, self.args.batch_size, self.accelerator).images
        path = self.folder(r) / "metrics.json"
        if self.accelerator.is_main_process:
            atomic_json(path, self.measure(r, images, labels, selector, policy, extra))
        self.accelerator.wait_for_everyone()
        return json.loads(path.read_text())

    def measure(self, r: int, images: torch.Tensor, labels: torch.Tensor, selector, policy,
                extra: dict | None) -> dict:
        """``evaluate``'s metrics of the held-out ``images`` (in [-1, 1]) of classes ``labels``."""
        from medsyn.metrics.diversity import mean_pairwise_ms_ssim

        images01 = unit_range(images)
        metrics = {"round": r, **(extra or {})}
        if self.rater is not None:
            given = self.rate(images, labels)
            ratings = torch.tensor(given[Aspect.PROMPT_MATCH], dtype=torch.float32)
            metrics["mean_rating"] = float(ratings.mean())
            metrics["mean_rating_per_class"] = {name: float(ratings[labels == c].mean())
                                                for c, name in enumerate(self.class_names)}
            metrics["ratings"] = ratings.int().tolist()  # per held-out seed, for paired comparisons across rounds
            metrics["mean_quality_rating"] = float(np.mean(given[Aspect.QUALITY]))
            metrics["quality_ratings"] = given[Aspect.QUALITY]
        if selector is not None:
            reward, accepted = self.rewards(images, labels, selector, policy)
            metrics["held_out_mean_reward"] = float(reward.mean())
            metrics["held_out_accept_rate"] = float(accepted.float().mean())
        if self.real is not None:
            metrics["frechet_distance"] = self.frechet_distance(images)
        per_class = [mean_pairwise_ms_ssim(images01[labels == c])[0] for c in range(len(self.class_names))]
        metrics["ms_ssim"] = float(np.mean(per_class))
        return metrics

    def frechet_distance(self, images: torch.Tensor) -> float:
        """Inception FID of generated images against the real ones (grayscale is repeated to RGB by the port)."""
        from medsyn.metrics.feature_distances import frechet_distance
        from medsyn.metrics.features import extract_features
        from medsyn.metrics.inception import FIDInceptionV3

        device = self.accelerator.device
        if self.fid is None:
            self.fid = FIDInceptionV3.from_pretrained()
            self.real_features = extract_features(uint8_pixels(self.real[0]), self.fid, 50, device)
        return frechet_distance(self.real_features, extract_features(uint8_pixels(images), self.fid, 50, device))


def main(args: argparse.Namespace) -> list[dict]:
    """Run the rounds not yet done; return every round's metrics (round 0: the starting model)."""
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    accelerator = Accelerator(log_with=None if args.report_to == "none" else args.report_to,
                              project_dir=args.output_dir)
    if args.update_batch_size < accelerator.num_processes:
        raise ValueError(f"--update_batch_size {args.update_batch_size} is shared by {accelerator.num_processes} "
                         "processes: give at least one chain each")
    rounds = Rounds(args, accelerator)
    rounds.root.mkdir(parents=True, exist_ok=True)
    accelerator.init_trackers("rlhf", config={k: str(v) for k, v in vars(args).items()})
    history = []
    for r in range(args.rounds + 1):
        folder = rounds.folder(r)
        folder.mkdir(exist_ok=True)
        if (folder / "metrics.json").exists():
            history.append(json.loads((folder / "metrics.json").read_text()))
            continue
        if r == 0:
            metrics = rounds.evaluate(0)
        else:
            chain, trajectory = rounds.pool(r)
            if not rounds.ratings(r, trajectory):
                break
            selector = rounds.selector(r) if rounds.uses_models else None
            policy = rounds.policy(r)
            summary = rounds.update(r, chain, trajectory, selector, policy)
            metrics = rounds.evaluate(r, selector, policy, summary)
        history.append(metrics)
        accelerator.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=r)
        logger.info(f"round {r}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()
                                               if isinstance(v, float)))
    if accelerator.is_main_process:
        atomic_json(rounds.root / "rounds.json", {"rounds": history, "rater": rounds.rater_id,
                                                  "update": str(args.update), "reward": str(args.reward)})
    accelerator.end_training()
    return history


if __name__ == "__main__":
    main(parse_args())
