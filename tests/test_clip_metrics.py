"""open_clip models from a local folder: they load offline as open_clip builds them, CLIPScore and prompt retrieval
match a brute-force computation, and ``medsyn evaluate --clip-model --prompts`` reports both and the image-tower
metrics."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from medsyn.metrics.clip import CLIP_SCORE_WEIGHT, ClipImageEncoder, OpenClipModel, prompt_adherence

#: A tiny CLIP with open_clip's own tokenizer (its vocabulary ships with the package).
TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
MEAN, STD = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]


def save_tiny_clip(folder) -> torch.nn.Module:
    import open_clip

    torch.manual_seed(0)
    model = open_clip.CLIP(**TINY_CLIP).eval()
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(json.dumps(
        {"model_cfg": TINY_CLIP, "preprocess_cfg": {"mean": MEAN, "std": STD}}))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return model


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip") / "tiny"
    return folder, save_tiny_clip(folder)


def test_loads_offline_and_embeds_as_open_clip_does(tiny_clip):
    import open_clip

    folder, reference = tiny_clip
    clip = OpenClipModel.from_pretrained(folder)
    gray = torch.rand(3, 1, 24, 24)
    resized = torch.nn.functional.interpolate(gray.expand(-1, 3, -1, -1), size=(32, 32), mode="bicubic",
                                              antialias=True, align_corners=False).clamp(0, 1)
    normalised = (resized - torch.tensor(MEAN).reshape(1, 3, 1, 1)) / torch.tensor(STD).reshape(1, 3, 1, 1)
    prompts = ["axial T1 brain MRI, glioma", "fundus photograph, cataract"]
    with torch.no_grad():
        torch.testing.assert_close(clip.image_embeddings(gray), reference.encode_image(normalised))
        tokens = open_clip.tokenizer.SimpleTokenizer(context_length=16)(prompts)
        torch.testing.assert_close(clip.text_embeddings(prompts), reference.encode_text(tokens))
    assert ClipImageEncoder(clip)(gray).shape == (3, 16)


def test_clip_score_and_retrieval_match_brute_force(tiny_clip):
    folder, _ = tiny_clip
    clip = OpenClipModel.from_pretrained(folder)
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 32, 32), generator=generator, dtype=torch.uint8)
    labels = np.arange(12) % 3
    prompts = ["normal fundus", "cataract fundus", "glaucoma fundus"]
    result = prompt_adherence(clip, images, labels, prompts, batch_size=5)
    image = torch.nn.functional.normalize(clip.image_embeddings(images.float() / 255), dim=-1)
    text = torch.nn.functional.normalize(clip.text_embeddings(prompts), dim=-1)
    cosine = image @ text.T
    own = cosine[torch.arange(12), torch.as_tensor(labels)]
    torch.testing.assert_close(result["cosine"], own)
    torch.testing.assert_close(result["clip_score"], CLIP_SCORE_WEIGHT * own.clamp_min(0))
    assert torch.equal(result["retrieved"], cosine.argmax(1) == torch.as_tensor(labels))
    with pytest.raises(ValueError, match="outside the 3 class prompts"):
        prompt_adherence(clip, images, np.full(12, 3), prompts)


def test_bad_folders_are_named(tiny_clip, tmp_path):
    with pytest.raises(ValueError, match="not an open_clip folder"):
        OpenClipModel.from_pretrained(tmp_path)
    folder, _ = tiny_clip
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "open_clip_config.json").write_text((folder / "open_clip_config.json").read_text())
    (pickled / "open_clip_pytorch_model.bin").write_bytes(b"a pickle")
    with pytest.raises(ValueError, match="does not unpickle weights"):
        OpenClipModel.from_pretrained(pickled)
    wider = tmp_path / "wider"
    wider.mkdir()
    config = {"model_cfg": {**TINY_CLIP, "embed_dim": 32}}
    (wider / "open_clip_config.json").write_text(json.dumps(config))
    (wider / "open_clip_model.safetensors").write_bytes((folder / "open_clip_model.safetensors").read_bytes())
    with pytest.raises(ValueError, match="the weights do not fit the config: size mismatch for text_projection"):
        OpenClipModel.from_pretrained(wider)


def test_evaluate_reports_prompt_adherence_and_the_image_tower(tiny_clip, tmp_path, capsys):
    from medsyn.cli import main
    from medsyn.data import SimulatedBrainMRI

    folder, _ = tiny_clip
    names = np.array(["healthy", "tumor"])
    for name, seed in (("real", 1), ("generated", 2), ("train", 3)):
        data = SimulatedBrainMRI(32, seed=seed).generate(24)
        np.savez(tmp_path / f"{name}.npz", images=data["images"], labels=data["labels"], class_names=names)
    out = tmp_path / "eval"
    argv = ["evaluate", "--real", str(tmp_path / "real.npz"), "--generated", str(tmp_path / "generated.npz"),
            "--train", str(tmp_path / "train.npz"), "--no-inception", "--no-downstream", "--diversity-pairs", "10",
            "--clip-model", str(folder), "--output-dir", str(out), "--prompts", "healthy=a healthy brain MRI",
            "tumor=a brain MRI with a tumour"]
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    adherence = metrics["prompt_adherence"]
    generated = np.load(tmp_path / "generated.npz")["labels"]
    assert adherence["prompts"] == {"healthy": "a healthy brain MRI", "tumor": "a brain MRI with a tumour"}
    assert adherence["generated"]["per_class"]["tumor"]["count"] == int((generated == 1).sum())
    assert 0 <= adherence["generated"]["clip_score"] <= CLIP_SCORE_WEIGHT and adherence["real"]["chance"] == 0.5
    assert metrics["clip"]["fid"] >= 0 and (metrics["clip"]["k"], metrics["clip"]["k_density"]) == (3, 5)
    assert "verdict" in metrics["privacy"]["clip_features"]
    page = (out / "report.html").read_text()
    assert "Prompt adherence" in page and "a brain MRI with a tumour" in page and "open_clip image tower" in page
    assert main([*argv[:-3], "--overwrite", "--prompts", "healthy=a healthy brain MRI"]) == 2
    assert "--prompts has no prompt for the classes ['tumor']" in capsys.readouterr().err
    assert main([*argv[:-3], "--overwrite", "--prompts", "just a prompt"]) == 2
    assert "expected CLASS=TEXT" in capsys.readouterr().err


def test_a_biomedclip_shaped_folder_loads_its_bert_text_tower_from_a_sub_folder(tmp_path):
    """BiomedCLIP's config names a Hugging Face BERT text tower and tokenizer; given as sub-folder paths they are read
    from the model folder, and nothing is fetched."""
    import open_clip
    from transformers import BertModel

    from medsyn.models.latent_diffusion import bert_text_encoder_config, build_wordpiece_tokenizer

    folder = tmp_path / "biomedclip-like"
    text_folder = folder / "text"
    captions = ["a healthy brain MRI", "a brain MRI with a tumour"] * 4
    tokenizer = build_wordpiece_tokenizer(captions, vocab_size=200, max_length=16, min_frequency=1)
    config = bert_text_encoder_config(max_length=16, vocab_size=len(tokenizer), hidden_size=32,
                                      num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
    BertModel(config).save_pretrained(text_folder)
    tokenizer.save_pretrained(text_folder)
    model_cfg = {"embed_dim": 16, "vision_cfg": TINY_CLIP["vision_cfg"],
                 "text_cfg": {"hf_model_name": "text", "hf_tokenizer_name": "text", "hf_proj_type": "mlp",
                              "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 16}}
    built_cfg = {**model_cfg, "text_cfg": {**model_cfg["text_cfg"], "hf_model_name": str(text_folder),
                                           "hf_tokenizer_name": str(text_folder), "hf_model_pretrained": False}}
    torch.manual_seed(0)
    reference = open_clip.CustomTextCLIP(**built_cfg).eval()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg}))
    save_file({k: v.contiguous() for k, v in reference.state_dict().items()}, folder / "open_clip_model.safetensors")

    clip = OpenClipModel.from_pretrained(folder)
    prompts = ["a healthy brain MRI", "a brain MRI with a tumour"]
    with torch.no_grad():
        expected = reference.encode_text(open_clip.tokenizer.HFTokenizer(str(text_folder), context_length=16)(prompts))
    torch.testing.assert_close(clip.text_embeddings(prompts), expected)
