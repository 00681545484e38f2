"""open_clip models from a local folder, for prompt adherence (CLIPScore, prompt retrieval) and as a feature encoder.

A folder in open_clip's own format, as BiomedCLIP is published: ``open_clip_config.json`` (``model_cfg`` and
``preprocess_cfg``) and ``open_clip_model.safetensors``. Nothing is downloaded: tower weights named in the config
(a timm image tower, a Hugging Face text tower) are never fetched, and a Hugging Face text tower or tokenizer named
by a path relative to the folder (e.g. ``"text"``) is read from there. Pickled ``.bin`` weights are refused.

- CLIPScore (Hessel et al. 2021): ``w * max(cos(image, prompt), 0)`` with ``w = 2.5``.
- Prompt retrieval: an image counts as correct when, among the class prompts, its own class's prompt is the
  closest to it, which asks whether the prompt decided the picture without a fixed scale for the cosine.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"
#: Hessel et al.'s rescaling of the cosine in CLIPScore.
CLIP_SCORE_WEIGHT = 2.5
#: open_clip's defaults when ``preprocess_cfg`` gives none (OpenAI CLIP's normalisation).
DEFAULT_MEAN = (0.48145466, 0.4578275, 0.40821073)
DEFAULT_STD = (0.26862954, 0.26130258, 0.27577711)


class OpenClipModel(nn.Module):
    """An open_clip model with its tokenizer and preprocessing, taking images in [0, 1] and prompts as strings.

    Args:
        model: an ``open_clip.CLIP`` or ``CustomTextCLIP``.
        tokenizer: the matching open_clip tokenizer (callable on a list of strings).
        image_size: the side the image tower takes.
        mean, std: its input normalisation (3 channels).
    """

    def __init__(self, model: nn.Module, tokenizer, image_size: int, mean=DEFAULT_MEAN, std=DEFAULT_STD):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, 3, 1, 1), persistent=False)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> OpenClipModel:
        """Load an open_clip folder (see the module docstring); errors name what is missing."""
        import open_clip
        from safetensors.torch import load_file

        folder = Path(path)
        if not (folder / CONFIG_NAME).is_file():
            raise ValueError(f"--clip-model {folder}: not an open_clip folder (no {CONFIG_NAME})")
        if not (folder / WEIGHTS_NAME).is_file():
            found = sorted(p.name for p in folder.glob("*.bin"))
            raise ValueError(f"--clip-model {folder}: no {WEIGHTS_NAME}" + (
                f" (found {found}: medsyn does not unpickle weights; convert them with safetensors)" if found else ""))
        try:
            config = json.loads((folder / CONFIG_NAME).read_text())
            model_cfg = copy.deepcopy(config["model_cfg"])
        except (json.JSONDecodeError, KeyError) as error:
            raise ValueError(f"--clip-model {folder}: {CONFIG_NAME} is not an open_clip config ({error})") from None
        preprocess = config.get("preprocess_cfg", {})
        text_cfg, vision_cfg = model_cfg["text_cfg"], model_cfg["vision_cfg"]
        for key in ("hf_model_name", "hf_tokenizer_name"):
            if key in text_cfg and (folder / text_cfg[key]).is_dir():
                text_cfg[key] = str(folder / text_cfg[key])
        if "hf_model_name" in text_cfg:
            text_cfg["hf_model_pretrained"] = False  # the weights come from the safetensors file
        if "timm_model_name" in vision_cfg:
            vision_cfg["timm_model_pretrained"] = False
        custom_text = model_cfg.pop("custom_text", False) or "hf_model_name" in text_cfg
        model = (open_clip.CustomTextCLIP if custom_text else open_clip.CLIP)(**model_cfg)
        try:
            model.load_state_dict(load_file(folder / WEIGHTS_NAME))
        except RuntimeError as error:
            details = " ".join(str(error).split("\n")[1:3]).strip()
            raise ValueError(f"--clip-model {folder}: the weights do not fit the config: {details}") from None
        context_length = text_cfg.get("context_length", 77)
        if "hf_tokenizer_name" in text_cfg:
            tokenizer = open_clip.tokenizer.HFTokenizer(text_cfg["hf_tokenizer_name"], context_length=context_length,
                                                        **text_cfg.get("tokenizer_kwargs", {}))
        else:
            tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=context_length)
        size = vision_cfg.get("image_size", 224)
        return cls(model, tokenizer, size if isinstance(size, int) else size[0],
                   preprocess.get("mean", DEFAULT_MEAN), preprocess.get("std", DEFAULT_STD))

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Images (N, 1 or 3, H, W) in [0, 1] at the tower's side (bicubic, antialiased), 3 channels, normalised."""
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
        images = images.float().expand(-1, 3, -1, -1)
        if images.shape[-2:] != (self.image_size, self.image_size):
            images = F.interpolate(images, size=(self.image_size,) * 2, mode="bicubic", antialias=True,
                                   align_corners=False).clamp(0, 1)
        return (images - self.mean) / self.std

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """The image tower's embeddings (N, D), not normalised."""
        return self.model.encode_image(self.preprocess(images.to(self.mean.device)))

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        """The text tower's embeddings (N, D), not normalised."""
        return self.model.encode_text(self.tokenizer(list(prompts)).to(self.mean.device))


class ClipImageEncoder(nn.Module):
    """The image tower as a feature encoder for ``extract_features`` (FID, precision/recall, the feature audit)."""

    def __init__(self, clip: OpenClipModel):
        super().__init__()
        self.clip = clip

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip.image_embeddings(images)


def prompt_similarities(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every image (N, D) with every prompt (P, D): (N, P)."""
    return F.normalize(image_embeddings.float(), dim=-1) @ F.normalize(text_embeddings.float(), dim=-1).T


def clip_score(cosine: torch.Tensor) -> torch.Tensor:
    """Hessel et al.'s CLIPScore of image-prompt cosines: ``2.5 * max(cos, 0)``."""
    return CLIP_SCORE_WEIGHT * cosine.clamp_min(0)


def prompt_adherence(clip: OpenClipModel, images: torch.Tensor, labels, class_prompts: list[str],
                     batch_size: int = 64) -> dict[str, torch.Tensor]:
    """Per image: CLIPScore against its own class's prompt and whether that prompt is the closest of all classes'.

    Args:
        clip: the open_clip model.
        images: (N, C, H, W) uint8 or [0, 1] float.
        labels: (N,) class indices into ``class_prompts``.
        class_prompts: one prompt per class.
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    if len(labels) != len(images):
        raise ValueError(f"{len(labels)} labels for {len(images)} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= len(class_prompts)):
        raise ValueError(f"labels outside the {len(class_prompts)} class prompts")
    floats = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    embeddings = torch.cat([clip.image_embeddings(batch) for batch in floats.split(batch_size)]).cpu()
    similarities = prompt_similarities(embeddings, clip.text_embeddings(class_prompts).cpu())
    own = similarities[torch.arange(len(labels)), labels]
    return {"clip_score": clip_score(own), "cosine": own, "retrieved": similarities.argmax(1) == labels}
