"""Configs and the caption vocabulary of MediSyn components built from scratch."""

from __future__ import annotations

import pytest
from diffusers import AutoencoderKL, UNet2DConditionModel

from medsyn.data import simulated_dataset
from medsyn.models.latent_diffusion import autoencoder_config, build_wordpiece_tokenizer, conditional_unet_config


def test_wordpiece_vocabulary_is_reproducible_and_spells_every_caption():
    captions = simulated_dataset(200, resolution=16, seed=1)["caption"]
    first = build_wordpiece_tokenizer(captions, vocab_size=60)
    second = build_wordpiece_tokenizer(list(reversed(captions)), vocab_size=60)
    assert first.get_vocab() == second.get_vocab()  # same captions, any order: the same ids
    assert len(first.get_vocab()) == 60
    for caption in captions[:50] + ["Axial FLAIR glioblastoma"]:  # unseen words are spelled from known pieces
        assert first.unk_token_id not in first(caption, truncation=True)["input_ids"]
    assert first.tokenize("glioma 9") == ["g", "##l", "##i", "##o", "##m", "##a", "[UNK]"]  # "9" is never seen
    frequent = first.tokenize("axial brain mri tumor")
    assert frequent == ["axial", "brain", "mri", "tumor"]  # frequent words are single tokens


def test_wordpiece_vocabulary_too_small_for_the_alphabet_is_refused():
    with pytest.raises(ValueError, match="cannot hold the captions' 3 characters"):
        build_wordpiece_tokenizer(["abc abc"], vocab_size=8)


def test_configs_build_models_that_fit_together():
    vae = AutoencoderKL(**autoencoder_config(3, latent_channels=4, block_out_channels=(8, 16, 16), layers_per_block=1,
                                             norm_num_groups=4, sample_size=32))
    unet = UNet2DConditionModel(**conditional_unet_config(sample_size=8, latent_channels=4, cross_attention_dim=32,
                                                          block_out_channels=(8, 16), layers_per_block=1,
                                                          attention_head_dim=4, norm_num_groups=4))
    assert unet.config.down_block_types == ("DownBlock2D", "CrossAttnDownBlock2D")
    assert vae.config.in_channels == vae.config.out_channels == 3
    with pytest.raises(ValueError, match="norm_num_groups=32 must divide"):
        autoencoder_config(block_out_channels=(8, 16))
    with pytest.raises(ValueError, match="3 entries for 2 levels"):
        conditional_unet_config(block_out_channels=(32, 64), cross_attention_levels=(True, True, False))
