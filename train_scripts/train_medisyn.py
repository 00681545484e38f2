"""Train MediSyn's text-guided latent diffusion model (stage 2) on image-text pairs.

    # (a) from scratch, on a stage-1 autoencoder, with a new BERT encoder and a WordPiece vocabulary from the captions
    accelerate launch train_scripts/train_medisyn.py --vae_model_name_or_path medisyn-vae-brain-mri \\
        --train_data_dir ../shared/data/brain_tumor_mri/brain_tumor_mri_4class_128.npz \\
        --caption_templates brain_captions.json --use_ema --output_dir medisyn-brain-mri

    # (b) fine-tune a MediSyn or Stable-Diffusion-style pipeline (the autoencoder stays frozen)
    accelerate launch train_scripts/train_medisyn.py --pretrained_model_name_or_path medisyn-brain-mri \\
        --train_data_dir my_manifest.csv --train_text_encoder --output_dir medisyn-finetuned

    # (c) LoRA adapters on the unet (and the text encoder with --train_text_encoder), saved alone
    accelerate launch train_scripts/train_medisyn.py --pretrained_model_name_or_path medisyn-brain-mri \\
        --train_data_dir my_manifest.csv --use_lora --rank 8 --output_dir medisyn-lora

Captions come from the data (a manifest's ``caption``/``text`` column, the simulated MRI's own captions) or from
``--caption_templates`` (class name -> one caption or several phrasings, one drawn per image and step; see
``medsyn.data.captions`` for held-out phrasings). A share of them (``--caption_dropout``, default 10%) is replaced by
the empty caption, which teaches the unet the unconditional prediction that classifier-free guidance needs. The
result loads with ``MediSynPipeline.from_pretrained(output_dir)`` (with ``load_lora_weights`` for an adapter).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from accelerate.logging import get_logger
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import AutoModel, AutoTokenizer, BertModel

from medsyn.data import image_channels, image_transform
from medsyn.data.captions import CaptionTemplates, template_source
from medsyn.flag_spellings import accept_both_spellings
from medsyn.hub_upload import push_model_folder
from medsyn.model_card import card_reference, write_model_card
from medsyn.models.latent_diffusion import (
    bert_text_encoder_config,
    build_wordpiece_tokenizer,
    conditional_unet_config,
    encode_prompts,
    latent_size,
    prompt_max_length,
    unit_latents,
)
from medsyn.pipelines import MediSynPipeline
from medsyn.training.accelerator import (
    attach_ema,
    build_accelerator,
    build_lr_scheduler,
    build_optimizer,
    ema_or_trained_model,
    enable_gradient_checkpointing,
    step_budget,
)
from medsyn.training.checkpoints import seed_global_rng
from medsyn.training.denoising_loss import denoising_loss, offset_noise
from medsyn.training.differential_privacy import add_privacy_arguments, check_privacy_arguments, make_private
from medsyn.training.expert_noise import MEDISYN_BETAS, ExpertNoise
from medsyn.training.feature_alignment import (
    FeatureAligner,
    FrozenExpert,
    add_alignment_arguments,
    block_channels,
    describe_alignment,
)
from medsyn.training.loop import (
    TrainingResult,
    TrainingRun,
    public_image_count,
    run_card_fields,
    training_loop,
    write_training_summary,
)
from medsyn.training.script_args import (
    add_data_arguments,
    add_denoising_objective_arguments,
    add_ema_arguments,
    add_logging_and_hub_arguments,
    add_optimisation_arguments,
    add_pretrained_arguments,
    check_data_arguments,
    json_argument,
    load_training_data,
    pretrained_kwargs,
)
from medsyn.training.validation_images import image_grid, save_validation_image
from medsyn.validation import DefaultsShown, count_argument, number_argument

logger = get_logger(__name__)

LORA_UNET_MODULES = ["to_q", "to_k", "to_v", "to_out.0"]
LORA_BERT_MODULES = ["query", "key", "value"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsShown)
    add_data_arguments(parser)
    parser.add_argument("--caption_column", type=str, default="text",
                        help="Column holding the captions ('caption' is read when 'text' is missing).")
    parser.add_argument("--caption_templates", type=str, default=None,
                        help='JSON file or string mapping class name -> caption or list of phrasings ("{label}" is '
                             'replaced by the name; one phrasing is drawn per image and step); or {"train": {...}, '
                             '"held_out": {...}} with phrasings kept out of training (medsyn.data.captions); or a '
                             'bundled file by name: brain_tumor_mri, fundus_eye_disease.')
    parser.add_argument("--caption_dropout", type=number_argument(0), default=0.1,
                        help="Share of captions replaced by the empty caption, for classifier-free guidance.")

    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", type=str, default=None,
                       help="A MediSyn or Stable-Diffusion-style pipeline to fine-tune (modes b and c).")
    add_pretrained_arguments(model)
    model.add_argument("--vae_model_name_or_path", type=str, default=None,
                       help="The stage-1 AutoencoderKL (train_autoencoder.py) for training from scratch (mode a).")
    model.add_argument("--text_encoder_name_or_path", type=str, default=None,
                       help="A BERT-family encoder and tokenizer (e.g. BioMedBERT); default: a new BERT with a "
                            "WordPiece vocabulary learned from the captions.")
    model.add_argument("--text_encoder_layers", type=count_argument(), default=12, help="New encoder (BioMedBERT: 12).")
    model.add_argument("--text_encoder_width", type=count_argument(), default=768,
                       help="New encoder (BioMedBERT: 768).")
    model.add_argument("--text_encoder_heads", type=count_argument(), default=12, help="New encoder (BioMedBERT: 12).")
    model.add_argument("--vocab_size", type=count_argument(), default=4000,
                       help="Largest WordPiece vocabulary of a new encoder.")
    model.add_argument("--max_length", type=count_argument(), default=77, help="Tokens per prompt of a new tokenizer.")
    model.add_argument("--unet_block_out_channels", type=count_argument(), nargs="+", default=[128, 256, 512],
                       help="Channels per UNet level.")
    model.add_argument("--unet_layers_per_block", type=count_argument(), default=2,
                       help="Residual blocks per UNet level.")
    model.add_argument("--unet_norm_num_groups", type=count_argument(), default=32,
                       help="Groups of the UNet's group normalisation.")
    model.add_argument("--attention_head_dim", type=count_argument(), default=8, help="Channels per attention head.")
    add_denoising_objective_arguments(model)
    model.add_argument("--train_text_encoder", action="store_true",
                       help="Fine-tune the text encoder too (always on for a new encoder).")
    model.add_argument("--use_lora", action="store_true", help="Train LoRA adapters instead of the weights.")
    model.add_argument("--rank", type=count_argument(), default=4, help="LoRA rank.")
    model.add_argument("--lora_alpha", type=number_argument(0, exclusive=True), default=None,
                       help="LoRA alpha; default: the rank.")

    add_optimisation_arguments(parser, output_dir="medisyn-model", learning_rate=1e-4)
    add_ema_arguments(parser, decay=0.9999)
    add_alignment_arguments(parser)
    add_privacy_arguments(parser)
    add_logging_and_hub_arguments(parser)
    parser.add_argument("--validation_prompts", type=str, nargs="+", default=None,
                        help="Default: one caption per class of the training data.")
    parser.add_argument("--num_validation_images", type=count_argument(), default=4, help="Per prompt.")
    parser.add_argument("--validation_inference_steps", type=count_argument(), default=25,
                        help="Sampling steps of the validation images.")
    parser.add_argument("--validation_guidance_scale", type=number_argument(0), default=4.0,
                        help="Guidance weight of the validation images.")

    args = accept_both_spellings(parser).parse_args(argv)
    check_data_arguments(parser, args)
    if not 0.0 <= args.caption_dropout < 1.0:
        parser.error(f"--caption_dropout must be in [0, 1), got {args.caption_dropout}")
    if args.pretrained_model_name_or_path and (args.vae_model_name_or_path or args.text_encoder_name_or_path):
        parser.error("--pretrained_model_name_or_path brings its own autoencoder and text encoder; do not add "
                     "--vae_model_name_or_path or --text_encoder_name_or_path")
    if not args.pretrained_model_name_or_path and not args.vae_model_name_or_path:
        parser.error("training from scratch needs a stage-1 autoencoder: --vae_model_name_or_path "
                     "(train_scripts/train_autoencoder.py); or fine-tune one with --pretrained_model_name_or_path")
    if args.use_lora and not args.pretrained_model_name_or_path:
        parser.error("--use_lora adapts a trained pipeline: give --pretrained_model_name_or_path")
    if args.use_lora and args.use_ema:
        parser.error("--use_ema averages full weights; LoRA trains adapters only: drop one of them")
    check_privacy_arguments(parser, args, unsupported={  # DP-SGD covers the unet: nothing else may read the data
        "a new text encoder (its vocabulary is learned from the training captions; give --text_encoder_name_or_path "
        "or --pretrained_model_name_or_path)":
            not (args.pretrained_model_name_or_path or args.text_encoder_name_or_path),
        "--train_text_encoder": args.train_text_encoder,
        "--use_lora": args.use_lora,
        "--align_expert": bool(args.align_expert),
        "the default validation prompts (taken from the training captions; give --validation_prompts or "
        "--caption_templates)": not (args.validation_prompts or args.caption_templates),
    })
    return args


def caption_rows(dataset, templates: str | None) -> list[list[str]]:
    """Each training image's caption options: its class's training phrasings when templates are given (one is
    drawn per step), else the data's own caption."""
    if templates is None:
        if "caption" not in dataset.column_names:
            raise ValueError("the data has no captions: give --caption_templates, or --caption_column for --dataset_name")
        return [[caption] for caption in dataset["caption"]]
    phrasings = CaptionTemplates.from_json(json_argument(template_source(templates)))
    names = dataset.features["label"].names
    phrasings.check_classes(names)
    return [phrasings.train[names[label]] for label in dataset["label"]]


def describe_templates(templates: str) -> str:
    """``--caption_templates`` for the model card: a file by its name, inline JSON as it is."""
    return card_reference(templates) if Path(templates).is_file() else f"`{templates}`"


def default_validation_prompts(dataset, captions: list[list[str]]) -> list[str]:
    """The first caption of each class, so the validation grid shows every class."""
    first: dict[int, str] = {}
    for label, options in zip(dataset["label"], captions):
        first.setdefault(label, options[0])
    return [first[label] for label in sorted(first)]


def load_components(args: argparse.Namespace, captions: list[list[str]]):
    """(vae, text_encoder, tokenizer, unet, noise_scheduler, whether the text encoder is new)."""
    if args.pretrained_model_name_or_path:
        path = args.pretrained_model_name_or_path
        kwargs = pretrained_kwargs(args)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kwargs)
        text_encoder = AutoModel.from_pretrained(path, subfolder="text_encoder", **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(path, subfolder="tokenizer", revision=args.revision,
                                                  cache_dir=args.cache_dir)
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kwargs)
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler", revision=args.revision,
                                                        cache_dir=args.cache_dir)
        return vae, text_encoder, tokenizer, unet, noise_scheduler, False

    vae = AutoencoderKL.from_pretrained(args.vae_model_name_or_path)
    if args.text_encoder_name_or_path:
        text_encoder = AutoModel.from_pretrained(args.text_encoder_name_or_path)
        tokenizer = AutoTokenizer.from_pretrained(args.text_encoder_name_or_path)
        # Explicit prompt length: many BERT tokenizers leave it unset, others allow 512 tokens the unet would attend to.
        tokenizer.model_max_length = min(args.max_length, prompt_max_length(tokenizer, text_encoder))
        new_encoder = False
    else:
        every = [caption for options in captions for caption in options]
        tokenizer = build_wordpiece_tokenizer(every, vocab_size=args.vocab_size, max_length=args.max_length)
        config = bert_text_encoder_config(
            max_length=args.max_length, vocab_size=tokenizer.vocab_size, hidden_size=args.text_encoder_width,
            num_hidden_layers=args.text_encoder_layers, num_attention_heads=args.text_encoder_heads,
            intermediate_size=4 * args.text_encoder_width,
        )
        text_encoder = BertModel(config)
        new_encoder = True
    unet = UNet2DConditionModel(
        **conditional_unet_config(
            sample_size=latent_size(vae, args.resolution),
            latent_channels=vae.config.latent_channels,
            cross_attention_dim=text_encoder.config.hidden_size,
            block_out_channels=tuple(args.unet_block_out_channels),
            layers_per_block=args.unet_layers_per_block,
            attention_head_dim=args.attention_head_dim,
            norm_num_groups=args.unet_norm_num_groups,
        )
    )
    noise_scheduler = DDPMScheduler(**MEDISYN_BETAS, clip_sample=False, prediction_type=args.prediction_type)
    return vae, text_encoder, tokenizer, unet, noise_scheduler, new_encoder


def add_lora(model: torch.nn.Module, target_modules: list[str], args: argparse.Namespace) -> None:
    """Freeze ``model`` and add trainable LoRA adapters (peft) on ``target_modules``."""
    from peft import LoraConfig

    model.requires_grad_(False)
    config = LoraConfig(r=args.rank, lora_alpha=args.lora_alpha or args.rank, init_lora_weights="gaussian",
                        target_modules=target_modules)
    model.add_adapter(config)


def main(args: argparse.Namespace) -> MediSynPipeline:
    """Train and save (main process); return the final pipeline (with LoRA adapters loaded in LoRA mode)."""
    accelerator = build_accelerator(args)
    dataset, data_description = load_training_data(args, caption_column=None if args.caption_templates else
                                                   args.caption_column)
    captions = caption_rows(dataset, args.caption_templates)
    dataset = dataset.remove_columns([c for c in ("caption",) if c in dataset.column_names]).add_column("caption", captions)
    channels = image_channels(dataset)
    vae, text_encoder, tokenizer, unet, noise_scheduler, new_encoder = load_components(args, captions)
    if vae.config.in_channels != channels:
        raise ValueError(f"the data has {channels} channels but the autoencoder takes {vae.config.in_channels}")
    latent_size(vae, args.resolution)  # an error now, not mid-training, when the sizes do not fit
    train_text_encoder = args.train_text_encoder or new_encoder
    validation_prompts = args.validation_prompts or default_validation_prompts(dataset, captions)

    vae.requires_grad_(False).eval()
    text_encoder.requires_grad_(train_text_encoder)
    if hasattr(text_encoder, "pooler") and text_encoder.pooler is not None:
        text_encoder.pooler.requires_grad_(False)  # unused by the unet: DDP would wait forever for its gradient
    if args.use_lora:
        add_lora(unet, LORA_UNET_MODULES, args)
        if train_text_encoder:
            add_lora(text_encoder, LORA_BERT_MODULES, args)
    enable_gradient_checkpointing(args, unet, *([text_encoder] if train_text_encoder else []))
    # Frozen parts run in the mixed-precision dtype; trained weights stay float32 (autocast handles the rest).
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    vae.to(accelerator.device)
    text_encoder.to(accelerator.device)
    if weight_dtype != torch.float32:
        vae.to(dtype=weight_dtype)
        if not train_text_encoder:
            text_encoder.to(dtype=weight_dtype)

    max_length = prompt_max_length(tokenizer, text_encoder)
    to_tensor = image_transform(args.resolution, center_crop=args.center_crop)

    def collate(rows):
        return {"pixel_values": torch.stack([to_tensor(row["image"]) for row in rows]),
                "captions": [row["caption"] for row in rows]}

    dataloader = torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, shuffle=True, collate_fn=collate,
        num_workers=args.dataloader_num_workers, drop_last=len(dataset) >= args.train_batch_size,
    )
    aligner = build_aligner(args, unet, vae, text_encoder, noise_scheduler, max_length, accelerator.device)
    parameters = [p for model in [unet, text_encoder][:1 + train_text_encoder] for p in model.parameters()
                  if p.requires_grad]
    if aligner is not None:
        parameters += list(aligner.head.parameters())
    optimizer = build_optimizer(args, parameters)
    unet, optimizer, dataloader, privacy = make_private(args, accelerator, unet, optimizer, dataloader)
    if train_text_encoder:
        unet, text_encoder, optimizer, dataloader = accelerator.prepare(unet, text_encoder, optimizer, dataloader)
    else:
        unet, optimizer, dataloader = accelerator.prepare(unet, optimizer, dataloader)
    trained = [unet, text_encoder][:1 + train_text_encoder]
    head = accelerator.prepare(aligner.head) if aligner else None
    updates_per_epoch, max_train_steps, _ = step_budget(args, len(dataloader))
    lr_scheduler = build_lr_scheduler(args, accelerator, optimizer, max_train_steps)
    ema = attach_ema(accelerator, unet, args.ema_decay, "unet_ema") if args.use_ema else None

    def loss_fn(batch, step):
        """The DDPM noise-prediction loss on the frozen autoencoder's latents, captions dropped for guidance."""
        generator = step.generator
        seed_global_rng(args.seed, step.micro_step, accelerator.process_index)  # text-encoder dropout
        pixels = batch["pixel_values"].to(weight_dtype)
        batch_size = pixels.shape[0]
        drop = torch.rand(batch_size, generator=generator, device=pixels.device) < args.caption_dropout
        # one of each image's phrasings (a draw only where there is a choice), then dropout for guidance
        chosen = [options[int(torch.randint(len(options), (), generator=generator, device=generator.device))]
                  if len(options) > 1 else options[0] for options in batch["captions"]]
        captions = ["" if dropped else caption for dropped, caption in zip(drop.tolist(), chosen)]
        latents = unit_latents(vae, pixels, generator)
        noise = torch.randn(latents.shape, generator=generator, device=latents.device)
        if args.noise_offset:
            noise = offset_noise(noise, args.noise_offset, generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch_size,),
                                  generator=generator, device=latents.device)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        with torch.set_grad_enabled(train_text_encoder):
            context, context_mask = encode_prompts(text_encoder, tokenizer, captions, max_length, latents.device)
        prediction = unet(noisy, timesteps, encoder_hidden_states=context, encoder_attention_mask=context_mask,
                          return_dict=False)[0]
        target = noise if noise_scheduler.config.prediction_type == "epsilon" else \
            noise_scheduler.get_velocity(latents, noise, timesteps)
        losses = {"loss": denoising_loss(prediction, target, timesteps, noise_scheduler, args.snr_gamma)}
        if aligner is not None:
            # The expert sees the pixel image noised to the latent's timestep (see medsyn.training.feature_alignment).
            seen, level = pixels.float(), None
            if args.align_on == "noisy":
                pixel_noise = torch.randn(seen.shape, generator=generator, device=seen.device)
                seen = noise_scheduler.add_noise(seen, pixel_noise, timesteps)
                level = aligner.model_noise.timestep_sigmas(timesteps)
            losses["align_loss"] = aligner.loss(seen, level, head)
            losses["loss"] = losses["loss"] + args.align_weight * losses["align_loss"]
        return losses

    def validate(step):
        pipeline = assemble_pipeline(accelerator, vae, text_encoder, tokenizer, unet, ema, noise_scheduler)
        grid = sample_grid(pipeline, validation_prompts, args.num_validation_images,
                           args.validation_inference_steps, args.validation_guidance_scale, args.seed)
        save_validation_image(args, accelerator, grid, step)

    logger.info(f"{len(dataset)} image-text pairs, {max_train_steps} steps; text encoder "
                f"{'new' if new_encoder else 'pretrained'}, {'trained' if train_text_encoder else 'frozen'}"
                f"{'; LoRA rank ' + str(args.rank) if args.use_lora else ''}")
    run = TrainingRun(accelerator, trained, parameters, optimizer, lr_scheduler, dataloader, updates_per_epoch,
                      max_train_steps, ema, privacy)
    result = training_loop(args, run, loss_fn, tracker_project_name="medisyn", validate=validate)

    if aligner is not None:
        aligner.features.remove()  # the hook was for training; the saved pipeline runs without it
    if weight_dtype != torch.float32:  # the frozen parts ran in the mixed-precision dtype; the saved model is float32
        vae.to(dtype=torch.float32)
        text_encoder.to(dtype=torch.float32)
    pipeline = assemble_pipeline(accelerator, vae, text_encoder, tokenizer, unet, ema, noise_scheduler)
    if accelerator.is_main_process:
        save_result(args, accelerator, pipeline, validation_prompts, data_description, len(dataset), channels,
                    result, new_encoder, train_text_encoder, alignment=describe_alignment(args, aligner))
    accelerator.end_training()
    return pipeline


def build_aligner(args, unet, vae, text_encoder, noise_scheduler, max_length: int, device) -> FeatureAligner | None:
    """The feature-alignment term when --align_expert is given: the block's width from one forward pass."""
    if not args.align_expert:
        return None
    expert = FrozenExpert.from_pretrained(args.align_expert).to(device)
    size = latent_size(vae, args.resolution)
    latent = torch.zeros(1, unet.config.in_channels, size, size, device=device)
    context = torch.zeros(1, max_length, text_encoder.config.hidden_size, device=device)
    width = block_channels(unet.to(device), args.align_block, latent, timestep=torch.zeros(1, device=device),
                           encoder_hidden_states=context)
    return FeatureAligner(expert, unet, args.align_block, width, ExpertNoise.from_ddpm_scheduler(noise_scheduler),
                          args.resolution, args.align_min_margin, args.align_head_dim)


def assemble_pipeline(accelerator, vae, text_encoder, tokenizer, unet, ema, noise_scheduler) -> MediSynPipeline:
    """The trained components (the EMA unet when EMA is on) in eval mode, with a solver good at 25 steps."""
    pipeline = MediSynPipeline(
        vae=vae, text_encoder=accelerator.unwrap_model(text_encoder).eval(), tokenizer=tokenizer,
        unet=ema_or_trained_model(accelerator, unet, ema),
        scheduler=DPMSolverMultistepScheduler.from_config(noise_scheduler.config),
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def sample_grid(pipeline: MediSynPipeline, prompts: list[str], per_prompt: int, steps: int, guidance: float,
                seed: int) -> np.ndarray:
    """A (prompts x per_prompt) uint8 grid, one row per prompt, from per-image seeds ``seed, seed + 1, ...``."""
    generators = [torch.Generator().manual_seed(seed + i) for i in range(len(prompts) * per_prompt)]
    images = pipeline(prompts, num_images_per_prompt=per_prompt, num_inference_steps=steps, guidance_scale=guidance,
                      generator=generators, output_type="np").images
    return image_grid(images, rows=len(prompts))


def save_result(args, accelerator, pipeline, prompts, data_description, num_images, channels,
                result: TrainingResult, new_encoder, train_text_encoder, alignment: str) -> None:
    """The pipeline (or, with LoRA, the adapters alone), sample grid and model card; then the Hub upload."""
    output_dir = Path(args.output_dir)
    if args.use_lora:
        pipeline.save_lora_adapters(output_dir)
    else:
        pipeline.save_pretrained(output_dir)
    grid = sample_grid(pipeline, prompts, args.num_validation_images, args.validation_inference_steps,
                       args.validation_guidance_scale, args.seed)
    Image.fromarray(grid).save(output_dir / "samples.png")
    unet, text_encoder = pipeline.unet, pipeline.text_encoder
    if args.pretrained_model_name_or_path:
        mode = f"{'LoRA (rank ' + str(args.rank) + ') on' if args.use_lora else 'fine-tuned from'} " \
               f"{card_reference(args.pretrained_model_name_or_path)}"
    else:
        mode = f"from scratch on the autoencoder {card_reference(args.vae_model_name_or_path)}"
    encoder_origin = "new, WordPiece vocabulary learned from the captions" if new_encoder else \
        f"pretrained {card_reference(args.text_encoder_name_or_path or args.pretrained_model_name_or_path)}"
    run_fields = run_card_fields(args, accelerator, result)
    if result.privacy:
        run_fields["differential_privacy"] += (
            "; for the unet's training: the autoencoder and text encoder were not trained here, and the guarantee "
            "does not extend to them if they saw these images")
    write_training_summary(output_dir, run_fields, result)
    write_model_card(
        output_dir,
        "medisyn_lora" if args.use_lora else "medisyn",
        **run_fields,
        example_prompt=json.dumps(prompts[0]),
        guidance_scale=args.validation_guidance_scale,
        sample_caption=f"Rows: {'; '.join(prompts)}. {args.validation_inference_steps} DPM-Solver steps, guidance "
                       f"{args.validation_guidance_scale}, seeds {args.seed} onwards.",
        training_mode=mode,
        data_description=data_description,
        num_train_images=public_image_count(num_images, result),
        caption_source=f"templates {describe_templates(args.caption_templates)}" if args.caption_templates
        else "the data's captions",
        caption_dropout=args.caption_dropout,
        resolution=args.resolution,
        channels=channels,
        prediction_type=pipeline.scheduler.config.prediction_type,
        text_encoder=f"{type(text_encoder).__name__}, {text_encoder.config.num_hidden_layers} layers x "
                     f"{text_encoder.config.hidden_size}, {encoder_origin}, "
                     f"{'trained' if train_text_encoder else 'frozen'}; {prompt_max_length(pipeline.tokenizer, text_encoder)} tokens per prompt",
        unet_summary=f"UNet2DConditionModel, {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters, "
                     f"channels {list(unet.config.block_out_channels)}",
        alignment=alignment,
        vae_summary=f"AutoencoderKL, {pipeline.vae.config.latent_channels} latent channels, downsampling "
                    f"x{pipeline.vae_scale_factor}, scaling factor {pipeline.vae.config.scaling_factor:.4g}",
    )
    if args.push_to_hub:
        push_model_folder(output_dir, args.hub_model_id or output_dir.name, args.hub_token, args.hub_private_repo)


if __name__ == "__main__":
    main(parse_args())
