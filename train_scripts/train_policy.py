"""Train the policy (image-text alignment) model of RLHF on prompt-match ratings, in the paper's two stages.

    # stage 1: every prompt-match rating, no baseline
    accelerate launch train_scripts/train_policy.py --ratings ratings.jsonl --images pool/samples.npz \\
        --output_dir policy-stage1
    # stage 2: only the images the selector accepts, with the leave-one-out value baseline
    accelerate launch train_scripts/train_policy.py --ratings ratings.jsonl --images pool/samples.npz \\
        --stage 2 --selector my-selector --policy_model_name_or_path policy-stage1 --output_dir policy

The policy is ``medsyn.rlhf.policy.AlignmentPolicy``: a ViT and a BERT-family text encoder (new ones of the given
shape, or a local BERT folder with ``--text_encoder_name_or_path``) with the paper's MLP head; ``--clip_model``
takes both towers, frozen, from a local open_clip folder instead. Images, not ratings,
are held out; ``policy.json`` gives the held-out accuracy of its match decision (p > 0.5 against "rated above 2")
and the Spearman correlation of p with the ratings.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate.logging import get_logger
from transformers import BertModel, ViTConfig, ViTModel

from medsyn.flag_spellings import accept_both_spellings
from medsyn.models.latent_diffusion import bert_text_encoder_config, build_wordpiece_tokenizer
from medsyn.rlhf.policy import POLICY_ARCHITECTURE, AlignmentPolicy, ClipAlignmentPolicy, policy_step_loss
from medsyn.rlhf.rating_images import add_rated_data_arguments, rated_samples, split_by_image
from medsyn.rlhf.ratings import Aspect, normalised
from medsyn.rlhf.rewards import accepted_by
from medsyn.rlhf.selector import selector_metrics
from medsyn.training.accelerator import (
    build_accelerator,
    build_lr_scheduler,
    build_optimizer,
    end_training,
    step_budget,
)
from medsyn.training.loop import TrainingRun, training_loop
from medsyn.training.script_args import add_logging_and_hub_arguments, add_optimisation_arguments
from medsyn.validation import DefaultsShown, count_argument

logger = get_logger(__name__)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsShown)
    add_rated_data_arguments(parser)
    stage = parser.add_argument_group("stage")
    stage.add_argument("--stage", type=int, default=1, choices=(1, 2),
                       help="1: every rated sample, no baseline; 2: selector-accepted samples, with a baseline.")
    stage.add_argument("--selector", type=str, default=None, help="Stage 2: the selector folder (train_selector.py).")
    stage.add_argument("--policy_model_name_or_path", type=str, default=None,
                       help="A policy folder to continue from (stage 1's output for stage 2); default: a new one.")

    model = parser.add_argument_group("new model (both towers; default: ViT-base and BioMedBERT's width)")
    model.add_argument("--text_encoder_name_or_path", type=str, default=None,
                       help="A local BERT-family folder with its tokenizer; default: a new BERT with a WordPiece "
                            "vocabulary from the prompts.")
    model.add_argument("--image_encoder_name_or_path", type=str, default=None,
                       help="A local transformers vision model folder (a ViT, or a CNN such as train_expert.py's "
                            "classifier, whose backbone is taken) as the image tower; default: a new ViT.")
    model.add_argument("--clip_model", type=str, default=None,
                       help="A local open_clip folder (open_clip_config.json and open_clip_model.safetensors, e.g. "
                            "BiomedCLIP's architecture) whose image and text towers, frozen, serve as both encoders; "
                            "only the head learns.")
    for name, value in POLICY_ARCHITECTURE.items():
        model.add_argument(f"--{name}", type=count_argument(), default=value,
                           help=f"Both towers' {name.replace('_', ' ')} (patch size: the ViT's).")
    model.add_argument("--max_length", type=count_argument(2), default=77, help="Prompt tokens kept.")

    add_optimisation_arguments(parser, output_dir="medsyn-policy", learning_rate=1e-4)
    parser.set_defaults(train_batch_size=32, num_train_epochs=20)
    add_logging_and_hub_arguments(parser)
    args = accept_both_spellings(parser).parse_args(argv)
    if args.stage == 2 and not args.selector:
        parser.error("--stage 2 learns from the selector's accepted images: pass --selector")
    if args.clip_model and (args.image_encoder_name_or_path or args.text_encoder_name_or_path):
        parser.error("--clip_model gives both towers: leave out --image_encoder_name_or_path and "
                     "--text_encoder_name_or_path")
    return args


def build_policy(args, images: torch.Tensor, prompts: list[str]) -> AlignmentPolicy:
    if args.policy_model_name_or_path:
        return AlignmentPolicy.from_pretrained(args.policy_model_name_or_path)
    if args.clip_model:
        return ClipAlignmentPolicy(args.clip_model)
    tower = dict(hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
                 num_hidden_layers=args.num_hidden_layers, intermediate_size=args.intermediate_size)
    if args.image_encoder_name_or_path:
        from transformers import AutoModel

        image_encoder = AutoModel.from_pretrained(args.image_encoder_name_or_path)
        channels = image_encoder.config.num_channels
        if channels != images.shape[1]:
            raise ValueError(f"--image_encoder_name_or_path {args.image_encoder_name_or_path} takes {channels}-channel "
                             f"images; the rated images have {images.shape[1]}")
    else:
        image_encoder = ViTModel(ViTConfig(image_size=images.shape[-1], patch_size=args.patch_size,
                                           num_channels=images.shape[1], **tower), add_pooling_layer=False)
    if args.text_encoder_name_or_path:
        from transformers import AutoModel, AutoTokenizer

        text_encoder = AutoModel.from_pretrained(args.text_encoder_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(args.text_encoder_name_or_path)
    else:
        tokenizer = build_wordpiece_tokenizer(prompts, max_length=args.max_length, min_frequency=1)
        text_encoder = BertModel(bert_text_encoder_config(args.max_length, vocab_size=len(tokenizer), **tower))
    return AlignmentPolicy(image_encoder, text_encoder, tokenizer, args.max_length)


def main(args: argparse.Namespace, keep_process_group: bool = False) -> AlignmentPolicy:
    """Train one stage, save the policy and its held-out metrics (main process), return it on every rank.
    ``keep_process_group``: run inside a caller's processes, which go on after it (``end_training``)."""
    # the encoders' pooler heads are left out (the policy reads the [CLS] / first token's state)
    accelerator = build_accelerator(args, find_unused_parameters=True)
    images, ratings, digests, prompts = rated_samples(args.images, args.ratings, Aspect.PROMPT_MATCH, args.resolution)
    train_rows, held_out_rows = split_by_image(digests, args.validation_fraction, args.seed)
    if args.stage == 2:
        from medsyn.rlhf.selector import load_selector

        selector = load_selector(args.selector).to(accelerator.device).eval()
        with torch.no_grad():
            accepted = accepted_by(selector, images[train_rows])
        logger.info(f"the selector accepts {int(accepted.sum())} of {len(train_rows)} training samples")
        if not accepted.any():
            raise ValueError("the selector accepted no training sample: stage 2 has nothing to learn from")
        train_rows = train_rows[accepted.numpy()]
    policy = build_policy(args, images, prompts)
    scores = normalised(ratings.float())
    dataset = [(images[i], prompts[i], scores[i]) for i in train_rows]

    def collate(rows):
        return {"pixel_values": torch.stack([r[0] for r in rows]), "prompts": [r[1] for r in rows],
                "scores": torch.stack([r[2] for r in rows])}

    dataloader = torch.utils.data.DataLoader(dataset, batch_size=args.train_batch_size, shuffle=True,
                                             drop_last=len(dataset) >= args.train_batch_size, collate_fn=collate)
    optimizer = build_optimizer(args, policy.parameters())
    policy, optimizer, dataloader = accelerator.prepare(policy, optimizer, dataloader)
    updates_per_epoch, max_train_steps, _ = step_budget(args, len(dataloader))
    lr_scheduler = build_lr_scheduler(args, accelerator, optimizer, max_train_steps)

    def loss_fn(batch, step):
        loss, reward = policy_step_loss(policy, batch["pixel_values"], batch["prompts"], batch["scores"],
                                        use_baseline=args.stage == 2, generator=step.generator)
        return {"loss": loss, "reward": reward}

    run = TrainingRun(accelerator, [policy], list(policy.parameters()), optimizer, lr_scheduler, dataloader,
                      updates_per_epoch, max_train_steps)
    result = training_loop(args, run, loss_fn, tracker_project_name=f"policy_stage{args.stage}")

    policy = accelerator.unwrap_model(policy).eval()
    if accelerator.is_main_process:
        predicted = policy.predict(images[held_out_rows], [prompts[i] for i in held_out_rows])
        truth = ratings[held_out_rows]
        metrics = {"stage": args.stage, "match_accuracy": float(((predicted > 0.5) == (truth > 2)).double().mean()),
                   "spearman": selector_metrics(predicted, truth)["spearman"], "count": len(held_out_rows),
                   "train_samples": len(train_rows), "final_mean_reward": result.mean("reward")}
        logger.info(f"held out: match accuracy {metrics['match_accuracy']:.3f}, Spearman {metrics['spearman']:.3f}")
        output_dir = Path(args.output_dir)
        policy.save_pretrained(output_dir)
        (output_dir / "policy.json").write_text(json.dumps(metrics, indent=2))
    end_training(accelerator, keep_process_group)
    return policy


if __name__ == "__main__":
    main(parse_args())
