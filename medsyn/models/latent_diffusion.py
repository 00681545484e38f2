"""Components of a MediSyn text-guided latent diffusion model, built from configs when no checkpoint is at hand.

A MediSyn model is diffusers' ``AutoencoderKL`` (stage 1: images <-> latents), a BERT-family text encoder
(BioMedBERT's architecture by default) and a ``UNet2DConditionModel`` that denoises latents while attending to
the text encoder's token states. The functions here give each a config sized for medical scans (1 or 3 channels,
64-256 px) and, for training from scratch where no pretrained vocabulary exists, a WordPiece tokenizer learned
from the training captions.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from transformers import BertConfig, BertTokenizerFast, PreTrainedModel, PreTrainedTokenizerBase

#: BioMedBERT (microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract-fulltext) is BERT-base with its own vocabulary.
BIOMEDBERT_ARCHITECTURE = dict(
    vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072
)
#: Special tokens of an uncased BERT vocabulary, in the order BERT's vocab.txt lists them.
BERT_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def _check_groups(name: str, channels: tuple[int, ...], norm_num_groups: int) -> None:
    if any(c % norm_num_groups for c in channels):
        raise ValueError(f"norm_num_groups={norm_num_groups} must divide every entry of {name}={channels}")


def autoencoder_config(
    in_channels: int = 1,
    latent_channels: int = 4,
    block_out_channels: tuple[int, ...] = (64, 128, 256),
    layers_per_block: int = 2,
    norm_num_groups: int = 32,
    sample_size: int = 128,
) -> dict[str, Any]:
    """Config of an ``AutoencoderKL`` that downsamples by ``2 ** (len(block_out_channels) - 1)``.

    Args:
        in_channels: 1 for grayscale scans, 3 for RGB; the decoder outputs as many.
        latent_channels: channels of the latent the diffusion UNet works on.
        block_out_channels: channels per resolution level; one level fewer than entries is downsampled.
        layers_per_block: residual blocks per level.
        norm_num_groups: GroupNorm groups; must divide every level's channels.
        sample_size: image size the autoencoder is trained at (recorded in the config).
    """
    _check_groups("block_out_channels", block_out_channels, norm_num_groups)
    levels = len(block_out_channels)
    return dict(
        in_channels=in_channels,
        out_channels=in_channels,
        latent_channels=latent_channels,
        block_out_channels=block_out_channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        sample_size=sample_size,
    )


def conditional_unet_config(
    sample_size: int = 32,
    latent_channels: int = 4,
    cross_attention_dim: int = 768,
    block_out_channels: tuple[int, ...] = (128, 256, 512),
    layers_per_block: int = 2,
    cross_attention_levels: tuple[bool, ...] | None = None,
    attention_head_dim: int = 8,
    norm_num_groups: int = 32,
) -> dict[str, Any]:
    """Config of a ``UNet2DConditionModel`` on latents that attends to the text encoder's token states.

    Args:
        sample_size: latent height and width (image size divided by the autoencoder's factor).
        latent_channels: the autoencoder's ``latent_channels``.
        cross_attention_dim: the text encoder's hidden size.
        block_out_channels: channels per resolution level.
        layers_per_block: residual blocks per level.
        cross_attention_levels: which levels attend to the text; default all but the full-resolution one.
        attention_head_dim: channels per attention head.
        norm_num_groups: GroupNorm groups; must divide every level's channels.
    """
    _check_groups("block_out_channels", block_out_channels, norm_num_groups)
    levels = len(block_out_channels)
    if cross_attention_levels is None:
        cross_attention_levels = tuple(i > 0 or levels == 1 for i in range(levels))
    if len(cross_attention_levels) != levels:
        raise ValueError(f"cross_attention_levels has {len(cross_attention_levels)} entries for {levels} levels")
    return dict(
        sample_size=sample_size,
        in_channels=latent_channels,
        out_channels=latent_channels,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in cross_attention_levels),
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(cross_attention_levels)),
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim,
        norm_num_groups=norm_num_groups,
    )


def bert_text_encoder_config(max_length: int = 77, **overrides: Any) -> BertConfig:
    """BioMedBERT's architecture (BERT-base), with ``overrides`` (e.g. a smaller ``hidden_size`` for CPU runs).

    ``max_position_embeddings`` is ``max_length``: a prompt never has more tokens than that.
    """
    settings = {**BIOMEDBERT_ARCHITECTURE, "max_position_embeddings": max_length, **overrides}
    return BertConfig(**settings)


def build_wordpiece_tokenizer(
    captions: Iterable[str], vocab_size: int = 2000, max_length: int = 77, min_frequency: int = 2
) -> BertTokenizerFast:
    """An uncased BERT WordPiece tokenizer whose vocabulary comes from ``captions``, for a text encoder trained
    from scratch.

    The vocabulary is every character (as a word start and as a ``##`` continuation) plus the most frequent
    whole words, split as BERT splits text (the ``tokenizers`` library's BERT normaliser and pre-tokeniser). Any
    word can then be spelled, and frequent clinical terms are single tokens. It is built by counting rather than
    with ``tokenizers``' WordPiece trainer, whose vocabulary changes from run to run on the same captions, which
    would make training irreproducible.

    Args:
        captions: the training captions.
        vocab_size: largest vocabulary size, special tokens and characters included.
        max_length: the tokenizer's ``model_max_length``, saved with it so prompts are padded and truncated to it.
        min_frequency: how often a word must occur to get its own token.
    """
    from tokenizers.normalizers import BertNormalizer
    from tokenizers.pre_tokenizers import BertPreTokenizer

    normaliser, splitter = BertNormalizer(lowercase=True), BertPreTokenizer()
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(word for word, _ in splitter.pre_tokenize_str(normaliser.normalize_str(caption)))
    if not counts:
        raise ValueError("build_wordpiece_tokenizer needs at least one non-empty caption")
    characters = sorted({c for word in counts for c in word})
    vocab = BERT_SPECIAL_TOKENS + characters + ["##" + c for c in characters]
    if len(vocab) > vocab_size:
        raise ValueError(f"vocab_size={vocab_size} cannot hold the captions' {len(characters)} characters")
    frequent = sorted((w for w, n in counts.items() if n >= min_frequency and len(w) > 1), key=lambda w: (-counts[w], w))
    vocab += frequent[: vocab_size - len(vocab)]
    # Through a vocab.txt: the one constructor that transformers 4 and 5 both read the same way.
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "vocab.txt").write_text("\n".join(vocab) + "\n")
        return BertTokenizerFast.from_pretrained(folder, do_lower_case=True, model_max_length=max_length)


def prompt_max_length(tokenizer: PreTrainedTokenizerBase, text_encoder: PreTrainedModel) -> int:
    """Tokens per prompt: the tokenizer's ``model_max_length``, bounded by the encoder's position embeddings.

    BERT tokenizers often leave ``model_max_length`` unset (a huge sentinel), so the bound is what keeps long
    prompts from overflowing the position table.
    """
    positions = getattr(text_encoder.config, "max_position_embeddings", None)
    lengths = [n for n in (tokenizer.model_max_length, positions) if n is not None and n < 1_000_000]
    if not lengths:
        raise ValueError("neither the tokenizer nor the text encoder says how many tokens a prompt may have")
    return min(lengths)


def encode_prompts(
    text_encoder: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: list[str], max_length: int, device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token states and attention mask of ``prompts`` padded and truncated to ``max_length`` tokens.

    The one encoding that training and ``MediSynPipeline`` share, so the unet sees at inference what it learned
    from. ``text_encoder`` may be wrapped (DDP); it must return ``last_hidden_state`` (a base encoder, not a head).
    """
    tokens = tokenizer(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    mask = tokens["attention_mask"].to(device)
    output = text_encoder(tokens["input_ids"].to(device), attention_mask=mask, return_dict=True)
    states = getattr(output, "last_hidden_state", None)
    if states is None:
        raise ValueError(f"{type(text_encoder).__name__} returns no last_hidden_state; use a base encoder")
    return states, mask


@torch.no_grad()
def unit_latents(vae: AutoencoderKL, pixels: torch.Tensor, generator: torch.Generator | None,
                 posterior_mean: bool = False) -> torch.Tensor:
    """Latents of unit variance (float32) of images in [-1, 1]: a draw from the autoencoder's posterior (or its mean,
    deterministic), shifted and scaled as the unet learns them (what ``MediSynPipeline.decode_latents`` undoes)."""
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    posterior = vae.encode(pixels).latent_dist
    latents = posterior.mean if posterior_mean else posterior.sample(generator=generator)
    return (latents.float() - shift) * vae.config.scaling_factor


def vae_scale_factor(vae: AutoencoderKL) -> int:
    """How many times the autoencoder downsamples: ``2 ** (levels - 1)``."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def latent_size(vae: AutoencoderKL, resolution: int) -> int:
    """The latent side for images of ``resolution`` px; an error when the autoencoder's factor does not divide it."""
    factor = vae_scale_factor(vae)
    if resolution % factor:
        raise ValueError(f"resolution {resolution} is not divisible by the autoencoder's factor {factor}")
    return resolution // factor
