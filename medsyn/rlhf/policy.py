"""The policy (image-text alignment) model of MINIM's RLHF: how well a generated image matches its prompt, in [0, 1].

The paper's shape: an image ViT (768-d) and a BERT-family text encoder (768-d, BioMedBERT's), their [CLS] features
concatenated (1536) and an MLP 1536 -> 768 -> 384 -> 1 with a sigmoid. Any transformers ViT and BERT-family model
fit; the head's widths follow their sum (d -> d/2 -> d/4 -> 1). The image tower may also be a transformers CNN
(ResNet, ConvNeXt: e.g. a classifier trained on the hospital's labelled scans), read by its pooled output: learned
from scratch on a few hundred ratings, a ViT hardly learns to tell the classes apart (RESULTS.md, issue 15). Or both
towers come from an open_clip model in a local folder (BiomedCLIP's architecture; ``ClipAlignmentPolicy``): its
image and text embeddings, frozen, feed the same head.

It is trained REINFORCE-style, as the paper says: the policy's output p is a Bernoulli policy over "this image
matches its prompt" (a = 1) or not (a = 0); for a sampled action the reward is the expert's agreement,
``1 - |a - r|`` with r the normalised prompt-match rating, and the loss is ``-(reward - baseline) * log pi(a)``.
Its expected gradient is ``(2r - 1) dp``, so p rises exactly where experts rated the match above 2. Stage 1 learns
from every rated sample without a baseline; stage 2 only from the samples the selector accepts, with a value
baseline: each sample's is the mean reward of the other samples in its batch (leave-one-out), which lowers the
variance without biasing the gradient and keeps no state, so a resumed run is exact.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from medsyn.metrics.clip import CONFIG_NAME as CLIP_CONFIG_NAME
from medsyn.metrics.clip import OpenClipModel
from medsyn.rlhf.fitting import fit_on_minibatches

#: The paper's towers, each 768 wide: ViT-base (16 px patches) and BioMedBERT's shape; train_policy.py's defaults.
POLICY_ARCHITECTURE = dict(patch_size=16, hidden_size=768, num_attention_heads=12, num_hidden_layers=12,
                           intermediate_size=3072)
HEAD_FILE = "policy_head.safetensors"
CONFIG_FILE = "policy_config.json"
#: Where a ``ClipAlignmentPolicy`` keeps its open_clip folder inside the policy's.
CLIP_FOLDER = "clip"


def alignment_head(width: int) -> nn.Sequential:
    """The paper's MLP on the concatenated features: width -> width/2 -> width/4 -> 1 (a logit)."""
    return nn.Sequential(nn.Linear(width, width // 2), nn.ReLU(), nn.Linear(width // 2, width // 4), nn.ReLU(),
                         nn.Linear(width // 4, 1))


class AlignmentPolicy(nn.Module):
    """p(image matches prompt) from a vision encoder and a text encoder.

    Args:
        image_encoder: a transformers vision model (e.g. ``ViTModel``) taking ``pixel_values`` in [-1, 1].
        text_encoder: a transformers BERT-family model.
        tokenizer: the text encoder's tokenizer.
        max_length: prompt tokens kept.
    """

    def __init__(self, image_encoder: nn.Module, text_encoder: nn.Module, tokenizer, max_length: int = 77):
        super().__init__()
        self.image_encoder, self.text_encoder, self.tokenizer = image_encoder, text_encoder, tokenizer
        self.max_length = max_length
        self.head = alignment_head(image_width(image_encoder.config) + text_encoder.config.hidden_size)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Match probabilities (B,) of images (B, C, H, W) in [0, 1] with their prompts."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        return torch.sigmoid(self.head(self.features(images, list(prompts)))[:, 0])

    def features(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """The towers' image and text features, concatenated (B, width): the head's input."""
        device = next(self.head.parameters()).device
        image_features = pooled_image_features(self.image_encoder(pixel_values=images.to(device).float() * 2 - 1))
        tokens = self.tokenizer(prompts, padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt").to(device)
        text_features = self.text_encoder(input_ids=tokens["input_ids"],
                                          attention_mask=tokens["attention_mask"]).last_hidden_state[:, 0]
        return torch.cat([image_features, text_features], dim=1)

    @torch.no_grad()
    def predict(self, images: torch.Tensor, prompts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Match probabilities (N,) on the CPU, ``batch_size`` images at a time."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts for {len(images)} images")
        return torch.cat([self(images[start : start + batch_size], prompts[start : start + batch_size]).cpu()
                          for start in range(0, len(images), batch_size)])

    def save_pretrained(self, folder: str | Path) -> None:
        """image_encoder/, text_encoder/ and tokenizer/ as transformers folders, the head as safetensors."""
        folder = Path(folder)
        self.image_encoder.save_pretrained(folder / "image_encoder")
        self.text_encoder.save_pretrained(folder / "text_encoder")
        self.tokenizer.save_pretrained(folder / "tokenizer")
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, folder / HEAD_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps({"max_length": self.max_length}))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> AlignmentPolicy:
        """A saved policy of either kind: transformers towers, or open_clip's (a ``clip/`` folder inside)."""
        from transformers import AutoModel, AutoTokenizer

        folder = Path(folder)
        if not (folder / HEAD_FILE).is_file():
            raise ValueError(f"{folder}: not a policy model folder (no {HEAD_FILE})")
        if (folder / CLIP_FOLDER / CLIP_CONFIG_NAME).is_file():
            return ClipAlignmentPolicy.from_pretrained(folder)
        config = json.loads((folder / CONFIG_FILE).read_text())
        policy = cls(AutoModel.from_pretrained(folder / "image_encoder"), AutoModel.from_pretrained(
            folder / "text_encoder"), AutoTokenizer.from_pretrained(folder / "tokenizer"), config["max_length"])
        policy.head.load_state_dict(load_file(folder / HEAD_FILE))
        return policy.eval()


class ClipAlignmentPolicy(AlignmentPolicy):
    """The policy on an open_clip model's two towers, from a local folder in open_clip's format (BiomedCLIP's
    architecture, see ``medsyn.metrics.clip``): its image and prompt embeddings, concatenated, feed the paper's head.
    The towers stay frozen, as in a linear probe: a few hundred ratings would only wear down what they learned from
    image-text pairs. Only the head learns; a saved policy carries the open_clip folder in ``clip/``.

    Args:
        clip_folder: the open_clip folder (``open_clip_config.json``, ``open_clip_model.safetensors``).
    """

    def __init__(self, clip_folder: str | Path):
        nn.Module.__init__(self)
        self.clip_folder = Path(clip_folder)
        self.clip = OpenClipModel.from_pretrained(self.clip_folder)
        embed_dim = json.loads((self.clip_folder / CLIP_CONFIG_NAME).read_text())["model_cfg"]["embed_dim"]
        self.head = alignment_head(2 * embed_dim)

    def train(self, mode: bool = True) -> ClipAlignmentPolicy:
        """Train the head; the frozen towers stay in eval mode (no dropout, fixed statistics)."""
        super().train(mode)
        self.clip.eval()
        return self

    def features(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        return torch.cat([self.clip.image_embeddings(images), self.clip.text_embeddings(prompts)], dim=1).float()

    def save_pretrained(self, folder: str | Path) -> None:
        """clip/ (the open_clip folder, as loaded) and the head as safetensors."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / CLIP_FOLDER).resolve() != self.clip_folder.resolve():
            shutil.copytree(self.clip_folder, folder / CLIP_FOLDER, dirs_exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.head.state_dict().items()}, folder / HEAD_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps({"towers": "open_clip"}))

    @classmethod
    def from_pretrained(cls, folder: str | Path) -> ClipAlignmentPolicy:
        folder = Path(folder)
        policy = cls(folder / CLIP_FOLDER)
        policy.head.load_state_dict(load_file(folder / HEAD_FILE))
        return policy.eval()


def image_width(config) -> int:
    """The feature width of a vision tower: a ViT's ``hidden_size``, a CNN's last stage (``hidden_sizes[-1]``)."""
    width = getattr(config, "hidden_size", None) or (getattr(config, "hidden_sizes", None) or [None])[-1]
    if width is None:
        raise ValueError(f"a {type(config).__name__} image encoder states neither hidden_size nor hidden_sizes")
    return width


def pooled_image_features(outputs) -> torch.Tensor:
    """(B, width) image features: a ViT's [CLS] token, a CNN's pooled output (its last feature map is 4-D)."""
    if outputs.last_hidden_state.ndim == 4:
        return outputs.pooler_output.flatten(1)
    return outputs.last_hidden_state[:, 0]


def reinforce_loss(probabilities: torch.Tensor, actions: torch.Tensor, rewards: torch.Tensor,
                   baseline: float | torch.Tensor = 0.0) -> torch.Tensor:
    """``-(reward - baseline) * log pi(action)`` averaged over the batch, for Bernoulli actions with
    ``pi(1) = probabilities``; ``baseline`` is a number or one per sample."""
    chosen = torch.where(actions.bool(), probabilities, 1 - probabilities)
    log_pi = chosen.clamp_min(1e-6).log()
    return -((rewards - baseline).detach() * log_pi).mean()


def leave_one_out_baseline(rewards: torch.Tensor) -> torch.Tensor:
    """Each sample's baseline: the mean reward of the others in the batch (0 for a batch of one)."""
    if len(rewards) < 2:
        return torch.zeros_like(rewards)
    return (rewards.sum() - rewards) / (len(rewards) - 1)


def policy_step_loss(policy: AlignmentPolicy, images: torch.Tensor, prompts: list[str], match_scores: torch.Tensor,
                     use_baseline: bool, generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(REINFORCE loss, mean reward) of one batch: actions drawn from the policy with ``generator``."""
    probabilities = policy(images, prompts)
    actions = torch.bernoulli(probabilities.detach().float().cpu(), generator=generator).to(probabilities.device)
    rewards = agreement_reward(actions, match_scores.to(probabilities.device))
    baseline = leave_one_out_baseline(rewards) if use_baseline else 0.0
    return reinforce_loss(probabilities.float(), actions, rewards, baseline), rewards.mean()


def agreement_reward(actions: torch.Tensor, match_scores: torch.Tensor) -> torch.Tensor:
    """The expert's agreement with the policy's action: ``1 - |a - r|`` for normalised prompt-match ratings r."""
    return 1 - (actions.float() - match_scores.float()).abs()


def train_policy(policy: AlignmentPolicy, images: torch.Tensor, prompts: list[str], match_scores: torch.Tensor,
                 steps: int, use_baseline: bool, learning_rate: float = 1e-4, batch_size: int = 32,
                 seed: int = 0) -> list[float]:
    """One REINFORCE stage on rated samples (images in [0, 1], their prompts, normalised prompt-match ratings);
    returns the mean reward per step. ``use_baseline``: the leave-one-out baseline (stage 2)."""
    if not len(images) == len(prompts) == len(match_scores) or len(images) == 0:
        raise ValueError(f"{len(images)} images, {len(prompts)} prompts and {len(match_scores)} ratings")

    def batch_loss(rows, generator):
        loss, reward = policy_step_loss(policy, images[rows], [prompts[i] for i in rows], match_scores[rows],
                                        use_baseline, generator)
        return loss, reward.item()

    return fit_on_minibatches(policy, len(images), steps, batch_loss, learning_rate, batch_size, seed)


def train_policy_two_stages(policy: AlignmentPolicy, images: torch.Tensor, prompts: list[str],
                            match_scores: torch.Tensor, accepted: torch.Tensor, steps: tuple[int, int],
                            **options) -> dict[str, list[float]]:
    """The paper's two stages: every rated sample without a baseline, then the selector-accepted ones with it."""
    accepted = torch.as_tensor(accepted, dtype=torch.bool)
    if not accepted.any():
        raise ValueError("the selector accepted no sample: stage 2 has nothing to learn from")
    first = train_policy(policy, images, prompts, match_scores, steps[0], use_baseline=False, **options)
    kept = accepted.nonzero()[:, 0]
    second = train_policy(policy, images[kept], [prompts[i] for i in kept], match_scores[kept], steps[1],
                          use_baseline=True, **options)
    return {"stage_1": first, "stage_2": second}
