"""Uploading a trained model folder to the Hub: the model, its shipped code and its card, not the run's by-products."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import ModelCard, create_repo, upload_folder

from medsyn.model_card import hub_id
from medsyn.output_files import TEMPORARY_PREFIX, write_text_atomically
from medsyn.pipelines.hub_folder import name_repo_in_card
from medsyn.training.checkpoints import CHECKPOINT_PREFIX, STAGING_PREFIX

#: Checkpoints, logs, validation images and unfinished files stay local.
LOCAL_ONLY = [f"{CHECKPOINT_PREFIX}*", f"{STAGING_PREFIX}*", f"{TEMPORARY_PREFIX}*", "**/" + f"{TEMPORARY_PREFIX}*",
              "logs/*", "validation/*"]


def check_model_card(folder: Path) -> None:
    """The card must exist and its metadata parse, with ``base_model`` naming Hub ids only."""
    path = folder / "README.md"
    if not path.is_file():
        raise ValueError(f"{folder}: no model card (README.md); the training scripts write one")
    try:
        data = ModelCard.load(path).data
    except Exception as error:  # huggingface_hub raises several types for broken YAML
        raise ValueError(f"{path}: the model card's metadata does not parse ({error})") from error
    base = data.get("base_model")
    for name in [base] if isinstance(base, str) else base or []:
        if hub_id(name) is None:
            raise ValueError(f"{path}: base_model {name!r} is not a Hub id; the Hub rejects such metadata")


def push_model_folder(folder: str | Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Create (or reuse) the repo, name it in the folder's card, upload the folder; returns the full repo id."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such model folder")
    check_model_card(folder)
    repo_id = create_repo(repo_id, exist_ok=True, token=token, private=private).repo_id
    card = folder / "README.md"
    write_text_atomically(card, name_repo_in_card(card.read_text(), repo_id))
    upload_folder(repo_id=repo_id, folder_path=folder, token=token, ignore_patterns=LOCAL_ONLY,
                  commit_message="Upload model trained with medsyn")
    return repo_id
