"""Stage 2 on CPU: the three training modes (from scratch, fine-tune, LoRA) on tiny models, resume, and reload."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from medsyn import MediSynPipeline
from medsyn.models.latent_diffusion import autoencoder_config
from medsyn.train_scripts.train_medisyn import main, parse_args

from .conftest import assert_same_weights
from .ddp_launch import run_two_ranks

TINY_MODEL = [
    "--resolution", "16", "--text_encoder_layers", "2", "--text_encoder_width", "32", "--text_encoder_heads", "4",
    "--vocab_size", "300", "--max_length", "24", "--unet_block_out_channels", "8", "16",
    "--unet_layers_per_block", "1", "--unet_norm_num_groups", "4", "--attention_head_dim", "4",
]
TINY_RUN = [
    "--simulated_num_images", "24", "--train_batch_size", "4", "--num_validation_images", "2",
    "--validation_inference_steps", "3", "--report_to", "none", "--seed", "5", "--validation_steps", "100",
    "--checkpointing_steps", "100",
]


@pytest.fixture(scope="module")
def scratch_model(vae_path, tmp_path_factory) -> str:
    """Mode (a): a model trained a few steps from scratch, saved as a pipeline folder."""
    out = tmp_path_factory.mktemp("scratch")
    main(parse_args([*TINY_MODEL, *TINY_RUN, "--vae_model_name_or_path", vae_path, "--max_train_steps", "3",
                     "--learning_rate", "1e-3", "--output_dir", str(out)]))
    return str(out)


def run(tmp_path, name, *extra) -> MediSynPipeline:
    return main(parse_args([*TINY_RUN, "--output_dir", str(tmp_path / name), *extra]))


PROMPT = "axial T1 brain MRI, no tumor, normal brain"


def images(pipe: MediSynPipeline, prompt: str = PROMPT) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt, num_inference_steps=3, guidance_scale=3.0, generator=torch.Generator().manual_seed(0),
                output_type="np").images


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_from_scratch_with_ema_saves_a_pipeline_that_reloads_identically(vae_path, tmp_path):
    trained = run(tmp_path, "a", *TINY_MODEL, "--vae_model_name_or_path", vae_path, "--max_train_steps", "3",
                  "--use_ema", "--validation_steps", "2")
    out = tmp_path / "a"
    loaded = MediSynPipeline.from_pretrained(out)
    np.testing.assert_array_equal(images(loaded), images(trained))
    assert loaded.tokenizer.model_max_length == 24 and loaded.text_encoder.config.max_position_embeddings == 24
    assert "tumor" in loaded.tokenizer.get_vocab()  # the WordPiece vocabulary was learned from the captions
    assert (out / "validation" / "step-000002.png").is_file()
    assert np.asarray(Image.open(out / "samples.png")).shape == (2 * 16, 2 * 16)  # 2 classes x 2 images
    card = (out / "README.md").read_text()
    assert "$" not in card and "from scratch on the autoencoder" in card and "decay 0.9999" in card


def test_resume_ends_with_the_same_unet_and_text_encoder(vae_path, tmp_path):
    extra = [*TINY_MODEL, "--vae_model_name_or_path", vae_path, "--learning_rate", "1e-3", "--checkpointing_steps",
             "2", "--gradient_accumulation_steps", "2"]
    straight = run(tmp_path, "straight", *extra, "--max_train_steps", "4")
    run(tmp_path, "resumed", *extra, "--max_train_steps", "2")
    resumed = run(tmp_path, "resumed", *extra, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")
    for name in ("unet", "text_encoder"):
        assert_same_weights(getattr(resumed, name), getattr(straight, name))


def test_fine_tuning_trains_unet_and_text_encoder_but_not_the_autoencoder(scratch_model, tmp_path):
    base = MediSynPipeline.from_pretrained(scratch_model)
    tuned = run(tmp_path, "b", "--pretrained_model_name_or_path", scratch_model, "--train_text_encoder",
                "--max_train_steps", "2", "--learning_rate", "1e-3", "--resolution", "16")
    assert_same_weights(tuned.vae, base.vae)
    for name in ("unet", "text_encoder"):
        before, after = weights(getattr(base, name)), weights(getattr(tuned, name))
        assert any(not torch.equal(before[k], after[k]) for k in before), name
    assert tuned.tokenizer.get_vocab() == base.tokenizer.get_vocab()


def test_dp_fine_tuning_trains_the_unet_alone_and_says_what_the_guarantee_covers(scratch_model, tmp_path, capsys):
    base = MediSynPipeline.from_pretrained(scratch_model)
    tuned = run(tmp_path, "dp", "--pretrained_model_name_or_path", scratch_model, "--max_train_steps", "2",
                "--learning_rate", "1e-3", "--dp_epsilon", "8", "--dp_noise_multiplicity", "2",
                "--validation_prompts", PROMPT)
    assert_same_weights(tuned.text_encoder, base.text_encoder)
    before, after = weights(base.unet), weights(tuned.unet)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    summary = json.loads((tmp_path / "dp" / "training_summary.json").read_text())["differential_privacy"]
    assert summary["steps"] == 2 and summary["epsilon"] <= 8 and summary["noise_multiplicity"] == 2
    assert "does not extend to them" in (tmp_path / "dp" / "README.md").read_text()
    # what else would read the private data is refused by name
    for argv, named in ((["--train_text_encoder"], "--train_text_encoder"),
                        ([], "validation prompts"),  # the defaults are training captions
                        (["--use_lora"], "--use_lora")):
        with pytest.raises(SystemExit):
            parse_args([*TINY_RUN, "--pretrained_model_name_or_path", scratch_model, "--dp_epsilon", "8", *argv,
                        *(["--validation_prompts", PROMPT] if argv else [])])
        assert named in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a new text encoder's vocabulary is learned from the captions
        parse_args([*TINY_MODEL, *TINY_RUN, "--vae_model_name_or_path", "v", "--dp_epsilon", "8",
                    "--validation_prompts", PROMPT])
    assert "new text encoder" in capsys.readouterr().err

@pytest.mark.parametrize("alpha", [[], ["--lora_alpha", "16"]])  # alpha != rank: the scaling must survive too
def test_lora_adapters_change_the_output_and_reload_onto_the_base(scratch_model, tmp_path, alpha):
    adapted = run(tmp_path, "c", "--pretrained_model_name_or_path", scratch_model, "--use_lora", "--rank", "4",
                  "--train_text_encoder", "--max_train_steps", "3", "--learning_rate", "1e-2", "--resolution", "16",
                  *alpha)
    out = tmp_path / "c"
    assert (out / "pytorch_lora_weights.safetensors").is_file() and not (out / "unet").exists()
    assert (out / "text_encoder_lora" / "adapter_model.safetensors").is_file()
    base = MediSynPipeline.from_pretrained(scratch_model)
    before = images(base)
    base.load_lora_weights(out)
    after = images(base)
    assert np.abs(after - before).max() > 1e-3
    np.testing.assert_allclose(after, images(adapted), atol=1e-5)
    assert "pipe.load_lora_weights" in (out / "README.md").read_text()


def test_a_pretrained_bert_with_captions_from_templates(vae_path, tmp_path, monkeypatch):
    from transformers import BertConfig, BertModel

    from medsyn.models.latent_diffusion import build_wordpiece_tokenizer

    encoder_dir = tmp_path / "bert"
    tokenizer = build_wordpiece_tokenizer(["healthy brain", "brain tumor", "glioma"], vocab_size=100, min_frequency=1)
    tokenizer.model_max_length = int(1e30)  # as BERT tokenizers without a limit report it
    tokenizer.save_pretrained(encoder_dir)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=37, max_position_embeddings=64)
    BertModel(config).save_pretrained(encoder_dir)
    templates = {"healthy": "axial brain MRI of a {label} volunteer",
                 "tumor": ["axial brain MRI with a brain tumor", "brain MR image showing a tumor"]}
    from medsyn.train_scripts import train_medisyn

    seen, encode = [], train_medisyn.encode_prompts

    def recording(encoder, tokenizer, captions, *rest):
        seen.extend(captions)
        return encode(encoder, tokenizer, captions, *rest)

    monkeypatch.setattr(train_medisyn, "encode_prompts", recording)
    trained = run(tmp_path, "t", *TINY_MODEL, "--vae_model_name_or_path", vae_path, "--text_encoder_name_or_path",
                  str(encoder_dir), "--caption_templates", json.dumps(templates), "--max_train_steps", "4",
                  "--caption_dropout", "0")
    # both phrasings of 'tumor' were trained on (drawn per image and step), the one of 'healthy' too
    assert set(seen) >= {"axial brain MRI of a healthy volunteer", "axial brain MRI with a brain tumor",
                         "brain MR image showing a tumor"}
    assert trained.tokenizer.model_max_length == 24  # --max_length, bounded by the encoder's 64 positions
    card = (tmp_path / "t" / "README.md").read_text()
    assert "axial brain MRI of a healthy volunteer; axial brain MRI with a brain tumor" in card and "frozen" in card
    with pytest.raises(ValueError, match=r"no caption for the classes \['tumor'\]"):
        run(tmp_path, "x", *TINY_MODEL, "--vae_model_name_or_path", vae_path, "--text_encoder_name_or_path",
            str(encoder_dir), "--caption_templates", json.dumps({"healthy": "x"}), "--max_train_steps", "1")


def test_rgb_pairs_from_a_manifest(tmp_path):
    rng = np.random.default_rng(0)
    rows = ["path,caption"]
    for i in range(8):
        name = f"fundus_{i}.png"
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(tmp_path / name)
        rows.append(f"{name},fundus photograph {'with diabetic retinopathy' if i % 2 else 'of a normal retina'}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    torch.manual_seed(0)
    config = autoencoder_config(3, latent_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                                norm_num_groups=4, sample_size=16)
    AutoencoderKL(**config).save_pretrained(tmp_path / "rgb-vae")
    trained = run(tmp_path, "rgb", *TINY_MODEL, "--vae_model_name_or_path", str(tmp_path / "rgb-vae"),
                  "--train_data_dir", str(tmp_path / "pairs.csv"), "--max_train_steps", "2",
                  "--validation_prompts", "fundus photograph with diabetic retinopathy")
    assert images(trained, "fundus photograph of a normal retina").shape == (1, 16, 16, 3)
    assert "retinopathy" in trained.tokenizer.get_vocab()
    assert np.asarray(Image.open(tmp_path / "rgb" / "samples.png")).shape == (16, 32, 3)  # one prompt x 2 images


def test_fine_tunes_a_stable_diffusion_style_folder(tmp_path):
    from diffusers import StableDiffusionPipeline

    from .conftest import get_dummy_medisyn_components

    parts = get_dummy_medisyn_components()
    StableDiffusionPipeline(**parts, safety_checker=None, feature_extractor=None,
                            requires_safety_checker=False).save_pretrained(tmp_path / "sd")
    tuned = run(tmp_path, "from-sd", "--pretrained_model_name_or_path", str(tmp_path / "sd"), "--resolution", "16",
                "--max_train_steps", "2", "--learning_rate", "1e-3")
    changed = [k for k, v in tuned.unet.state_dict().items() if not torch.equal(v, parts["unet"].state_dict()[k])]
    assert changed and images(tuned).shape == (1, 16, 16, 1)
    assert MediSynPipeline.from_pretrained(tmp_path / "from-sd").text_encoder.config.hidden_size == 32


def test_bad_arguments_fail_clearly(vae_path, tmp_path):
    for argv in (
        [],  # no autoencoder and no pipeline
        ["--pretrained_model_name_or_path", "p", "--vae_model_name_or_path", "v"],
        ["--vae_model_name_or_path", "v", "--use_lora"],
        ["--pretrained_model_name_or_path", "p", "--use_lora", "--use_ema"],
        ["--vae_model_name_or_path", "v", "--caption_dropout", "1"],
    ):
        with pytest.raises(SystemExit):
            parse_args(argv)
    with pytest.raises(ValueError, match="not divisible by the autoencoder's factor 2"):
        run(tmp_path, "x", *TINY_MODEL, "--vae_model_name_or_path", vae_path, "--resolution", "17")


@pytest.mark.slow
def test_two_process_ddp_training_the_text_encoder_keeps_ranks_identical(vae_path, tmp_path):
    out = tmp_path / "ddp"
    ranks = run_two_ranks(tmp_path, "medsyn.train_scripts.train_medisyn", [
        *TINY_MODEL, *TINY_RUN, "--vae_model_name_or_path", vae_path, "--max_train_steps", "3", "--use_ema",
        "--output_dir", str(out)])
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
    assert "| optimiser steps, batch size | 3, 4 (x1 accumulation, 2 processes)" in (out / "README.md").read_text()


@pytest.mark.slow
def test_learning_the_prompt_decides_the_contrast(tmp_path):
    """Both stages on CPU (~4 min): simulated brain MRI at 32 px with its own captions, which name the contrast.
    A probe trained on real T1 and T2 slices then judges samples for a T1 and a T2 prompt with the same seeds."""
    from medsyn.data import SimulatedBrainMRI
    from medsyn.metrics import fit_label_probe
    from medsyn.metrics.label_probe import probe_outputs
    from medsyn.train_scripts import train_autoencoder

    common = ["--resolution", "32", "--simulated_num_images", "800", "--train_batch_size", "16", "--report_to", "none",
              "--validation_steps", "10000", "--checkpointing_steps", "10000", "--seed", "0"]
    train_autoencoder.main(train_autoencoder.parse_args([
        *common, "--block_out_channels", "32", "64", "--layers_per_block", "1", "--norm_num_groups", "8",
        "--max_train_steps", "300", "--learning_rate", "1e-3", "--adversarial_weight", "0",
        "--output_dir", str(tmp_path / "vae")]))
    pipe = main(parse_args([
        *common, "--vae_model_name_or_path", str(tmp_path / "vae"), "--text_encoder_layers", "2",
        "--text_encoder_width", "64", "--text_encoder_heads", "4", "--unet_block_out_channels", "32", "64",
        "--unet_layers_per_block", "1", "--unet_norm_num_groups", "8", "--attention_head_dim", "8",
        "--max_train_steps", "600", "--learning_rate", "5e-4", "--num_validation_images", "1",
        "--output_dir", str(tmp_path / "ldm")]))

    real = [SimulatedBrainMRI(resolution=32, seed=50 + i, contrasts=(c,), tumour_fraction=0.0).generate(300)["images"]
            for i, c in enumerate(("T1", "T2"))]
    probe = fit_label_probe(np.concatenate([r[:250] for r in real]), np.repeat([0, 1], 250), num_classes=2, epochs=10)
    assert (probe_outputs(probe, np.concatenate([r[250:] for r in real]))[0] == np.repeat([0, 1], 50)).mean() > 0.95
    judged_t1 = []
    for contrast in ("T1", "T2"):
        generators = [torch.Generator().manual_seed(i) for i in range(32)]
        samples = pipe(f"axial {contrast}-weighted brain MRI, no tumor, normal brain", num_images_per_prompt=32,
                       num_inference_steps=25, guidance_scale=3.0, generator=generators, output_type="np").images
        judged_t1.append((probe_outputs(probe, samples[..., 0])[0] == 0).mean())
    # Measured: 1.00 of the T1-prompt samples and 0.31 of the T2-prompt samples read as T1 (a gap of 0.69).
    assert judged_t1[0] - judged_t1[1] >= 0.4, judged_t1


def test_lora_loads_onto_the_base_without_medsyn(scratch_model, tmp_path):
    """The base folder's shipped pipeline code reads the adapters (text encoder included) as medsyn does."""
    from .test_hub_sharing import BLOCK_MEDSYN

    adapted = run(tmp_path, "lora", "--pretrained_model_name_or_path", scratch_model, "--use_lora", "--rank", "4",
                  "--lora_alpha", "16", "--train_text_encoder", "--max_train_steps", "2", "--learning_rate", "1e-2",
                  "--resolution", "16")
    np.save(tmp_path / "adapted.npy", images(adapted))
    code = BLOCK_MEDSYN + textwrap.dedent(f'''
        import numpy as np, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained("{scratch_model}", trust_remote_code=True)
        pipe.set_progress_bar_config(disable=True)
        pipe.load_lora_weights("{tmp_path / 'lora'}")
        assert pipe.text_encoder.active_adapters(), "the text encoder's adapter was dropped"
        image = pipe({PROMPT!r}, num_inference_steps=3, guidance_scale=3.0, output_type="np",
                     generator=torch.Generator().manual_seed(0)).images
        np.testing.assert_allclose(image, np.load("{tmp_path / 'adapted.npy'}"), atol=1e-5)
    ''')
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules")}
    result = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
