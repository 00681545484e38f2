"""One training set for a generalist text-guided model: brain MRI and colour fundus photographs together (issue 39).

    python benchmarks/prepare_generalist.py \\
        --brain ../shared/data/brain_tumor_mri/brain_tumor_mri_4class_128.npz \\
        --fundus ../shared/data/fundus_eye_disease --resolution 64 --output-dir ~/medsyn-runs/generalist

Both sets at ``--resolution`` as RGB (a grayscale MR slice repeated in three channels, so one autoencoder and one
unet serve both; a fundus photograph that is not square is resized, not cropped, which keeps the whole disc). Eight
classes (four per set; their names do not overlap). Held-out images per set, for FID, the judge and the audit, are
a seeded random part of each set's training data: the brain set's own test split is not exchangeable with its
training split (PROVENANCE.md), and the fundus set has no split. Writes ``train.npz`` (images, labels,
class_names, modality), ``held_out_<set>.npz`` per set and ``caption_templates.json``, the two bundled template
files merged (training and held-out phrasings), for ``train_medisyn.py --caption_templates``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from study_low_data import load_dataset

from medsyn.data.captions import BUNDLED_TEMPLATES, CaptionTemplates
from medsyn.output_files import write_npz_atomically, write_text_atomically

SETS = ("brain_tumor_mri", "fundus_eye_disease")


def as_rgb(images: np.ndarray) -> np.ndarray:
    return np.repeat(images[..., None], 3, axis=-1) if images.ndim == 3 else images


def merged_templates() -> dict:
    """The bundled templates of both sets in one file; a class named in both would be an error."""
    merged: dict = {"train": {}, "held_out": {}}
    for name in SETS:
        templates = CaptionTemplates.from_json(json.loads(BUNDLED_TEMPLATES[name].read_text()))
        for section, phrasings in (("train", templates.train), ("held_out", templates.held_out)):
            clash = set(phrasings) & set(merged[section])
            if clash:
                raise ValueError(f"class names {sorted(clash)} appear in both sets' templates")
            merged[section].update(phrasings)
    return merged


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--brain", required=True, help="The brain MRI NPZ (its training split is used).")
    parser.add_argument("--fundus", required=True, help="The fundus folder (class subfolders).")
    parser.add_argument("--resolution", type=int, default=64)
    parser.add_argument("--held-out", type=int, default=512, help="Held-out images per set.")
    parser.add_argument("--output-dir", required=True)
    args = parser.parse_args(argv)
    out = Path(args.output_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    images, labels, names, modality, record = [], [], [], [], {"resolution": args.resolution, "seed": 0}
    for number, (name, spec) in enumerate(zip(SETS, (args.brain, args.fundus))):
        loaded = load_dataset(spec, args.resolution)
        # Both of the loader's parts for the folder (its 80/20 split is ours to redraw); the NPZ's training split.
        pool = as_rgb(loaded["train"]) if name == "brain_tumor_mri" else np.concatenate(
            [as_rgb(loaded["train"]), as_rgb(loaded["test"])])
        pool_labels = loaded["train_labels"] if name == "brain_tumor_mri" else np.concatenate(
            [loaded["train_labels"], loaded["test_labels"]])
        held = np.random.default_rng(number).permutation(len(pool))[: args.held_out]
        kept = np.setdiff1d(np.arange(len(pool)), held)
        write_npz_atomically(out / f"held_out_{name}.npz", images=pool[held], labels=pool_labels[held],
                             class_names=np.array(loaded["class_names"]))
        images.append(pool[kept])
        labels.append(pool_labels[kept] + len(names))
        modality += [name] * len(kept)
        names += loaded["class_names"]
        record[name] = {"source": str(Path(spec).resolve()), "train": int(len(kept)), "held_out": int(len(held)),
                        "held_out_seed": number, "classes": loaded["class_names"]}
    write_npz_atomically(out / "train.npz", images=np.concatenate(images), labels=np.concatenate(labels),
                         class_names=np.array(names), modality=np.array(modality))
    write_text_atomically(out / "caption_templates.json", json.dumps(merged_templates(), indent=1))
    write_text_atomically(out / "prepared.json", json.dumps(record, indent=1))
    print(json.dumps(record, indent=1))


if __name__ == "__main__":
    main()
