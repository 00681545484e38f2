"""One evaluation of generated images against real ones: fidelity, variety, image statistics and privacy.

Features are extracted once per set and encoder and shared by every metric that reads them. Each section of
the result is either numbers or a ``note`` that says why it was not computed (no weights, no training set),
never a placeholder number.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medsyn.metrics.clip import CLIP_SCORE_WEIGHT, ClipImageEncoder, OpenClipModel, prompt_adherence
from medsyn.metrics.diversity import mean_pairwise_ms_ssim
from medsyn.metrics.feature_distances import frechet_distance, kernel_distance
from medsyn.metrics.features import extract_features
from medsyn.metrics.image_statistics import STATISTICS, image_statistics, radial_power_spectrum
from medsyn.metrics.manifold import manifold_metrics, realism_scores
from medsyn.privacy import AuditSpace, MemorisationAudit, memorisation_audit, save_flagged_pairs
from medsyn.privacy.membership import (
    AttackMethod,
    AttackSettings,
    attack_report,
    membership_statistics,
    roc_points,
)

from .downstream import binarise, downstream_utility
from .image_sets import ImageSet
from .score_error import per_sigma_score_error

WORST_SHOWN = 8


def check_compatible(sets: list[ImageSet]) -> None:
    """Pixel metrics compare images one to one: every set needs the same channels and size."""
    shapes = {tuple(s.images.shape[1:]) for s in sets}
    if len(shapes) > 1:
        listing = ", ".join(f"--{s.name}: {tuple(s.images.shape[1:])}" for s in sets)
        raise ValueError(f"image sets differ in (channels, height, width): {listing}")


def _sample(image_set: ImageSet | None, max_images: int | None, rng: np.random.Generator) -> ImageSet | None:
    """The set, or a seeded sample of ``max_images`` of it."""
    if image_set is None or not max_images or len(image_set) <= max_images:
        return image_set
    return image_set.subset(np.sort(rng.choice(len(image_set), max_images, replace=False)))


def _generated_indices(sample: ImageSet, whole: ImageSet, positions: np.ndarray) -> list[int]:
    """Indices into the whole generated set of ``positions`` in its sample (reports show images of the whole)."""
    kept = np.arange(len(whole)) if sample.kept is None else sample.kept
    return kept[positions].tolist()


def _feature_section(
    real: torch.Tensor, generated: torch.Tensor, k: int, k_density: int, kid_subset_size: int, seed: int
) -> tuple[dict, np.ndarray]:
    # Subsets of at most half the smaller set, so that they differ and the spread over them means something.
    kid_subset_size = min(kid_subset_size, max(2, min(len(real), len(generated)) // 2))
    kid_mean, kid_std = kernel_distance(real, generated, subset_size=kid_subset_size, seed=seed)
    # FID shrinks as samples grow, so the floor is read at one size: against the second half of the real set,
    # the first half of it (two samples of one distribution) and as many generated images.
    half = min(len(real) // 2, len(generated))
    section = {
        "fid": frechet_distance(real, generated),
        "kid_mean": kid_mean,
        "kid_std": kid_std,
        "kid_subset_size": kid_subset_size,
        **manifold_metrics(real, generated, k=k, k_density=k_density).to_dict(),
        "half_size": half,
        "real_halves_fid": frechet_distance(real[:half], real[-half:]) if half >= 2 else None,
        "half_size_fid": frechet_distance(generated[:half], real[-half:]) if half >= 2 else None,
    }
    return section, realism_scores(real, generated, k=k)


def _statistics_section(real: ImageSet, generated: ImageSet) -> dict:
    section = {}
    for name, values in (("real", image_statistics(real.images)), ("generated", image_statistics(generated.images))):
        for statistic in STATISTICS:
            column = values[statistic]
            section.setdefault(statistic, {})[name] = {"mean": float(column.mean()), "std": float(column.std())}
    frequency, real_power = radial_power_spectrum(real.images)
    _, generated_power = radial_power_spectrum(generated.images)
    section["radial_power_spectrum"] = {
        "frequency": frequency.tolist(),
        "real": real_power.tolist(),
        "generated": generated_power.tolist(),
    }
    return section


def _diversity_section(real: ImageSet, generated: ImageSet, pairs: int, seed: int) -> dict:
    section: dict = {"metric": "mean pairwise MS-SSIM (lower = more diverse)"}
    for name, image_set in (("real", real), ("generated", generated)):
        value, scales = mean_pairwise_ms_ssim(image_set.images, max_pairs=pairs, seed=seed)
        section.setdefault("overall", {})[name] = value
        section["scales"] = scales
    names = generated.class_names if generated.labels is not None and real.labels is not None else None
    if names is not None and real.class_names == names:
        per_class = {}
        for index, class_name in enumerate(names):
            row = {}
            for name, image_set in (("real", real), ("generated", generated)):
                members = np.flatnonzero(image_set.labels == index)
                if len(members) >= 2:
                    row[name] = mean_pairwise_ms_ssim(image_set.images[members], max_pairs=pairs, seed=seed)[0]
            if row:
                per_class[class_name] = row
        section["per_class"] = per_class
    return section


def _privacy_section(
    generated: ImageSet,
    train: ImageSet,
    held_out: ImageSet,
    threshold: float | None,
    percentile: float,
    space: AuditSpace | str,
    output_dir: Path,
    progress: bool,
    features: dict[str, dict[str, torch.Tensor]],
) -> tuple[dict, list[Path]]:
    audit = memorisation_audit(
        generated.images, train.images, held_out.images, threshold=threshold, percentile=percentile, space=space,
        progress=progress,
    )
    section = {"images": _audit_summary(audit)}
    section["images"]["held_out_set"] = held_out.name
    paths = save_flagged_pairs(audit, generated.as_hwc(), train.as_hwc(), output_dir / "flagged")
    flags = {"domain": "--domain-encoder", "clip": "--clip-model"}
    for name, flag in flags.items():
        if name not in features:
            section[f"{name}_features"] = {"note": f"not run: pass {flag} for a feature-space audit"}
            continue
        # Always calibrated: a fixed threshold is an image distance, meaningless in feature space. Held-out
        # images found to be copies of training images are left out here too.
        keep = np.setdiff1d(np.arange(len(features[name]["held_out"])), audit.held_out_excluded_indices)
        feature_audit = memorisation_audit(
            features[name]["audited"], features[name]["train"], features[name]["held_out"][keep],
            percentile=percentile, space=AuditSpace.FEATURES,
        )
        section[f"{name}_features"] = _audit_summary(feature_audit)
    return section, paths


def _prompt_adherence_section(clip, real: ImageSet, generated: ImageSet, class_prompts: dict[str, str] | None,
                              batch_size: int) -> dict:
    """CLIPScore and prompt retrieval per class, of the generated images and, as the encoder's ceiling, the real."""
    if clip is None or not class_prompts:
        return {"note": "not run: pass --clip-model and --prompts CLASS=TEXT for every class"}
    if generated.labels is None or generated.class_names is None:
        return {"note": "not run: the generated images have no class labels to match prompts to"}
    names = list(generated.class_names)
    prompts = [class_prompts[name] for name in names]
    section: dict = {"prompts": dict(zip(names, prompts)), "clip_score_weight": CLIP_SCORE_WEIGHT}
    for label, image_set in (("generated", generated), ("real", real)):
        if image_set.labels is None or image_set.class_names is None:
            continue
        prompt_of_class = np.array([names.index(n) if n in names else -1 for n in image_set.class_names])
        codes = prompt_of_class[image_set.labels]  # each image's prompt; -1 for a class the prompts do not name
        rows = np.flatnonzero(codes >= 0)
        codes = codes[rows]
        scores = prompt_adherence(clip, image_set.images[torch.as_tensor(rows)], codes, prompts, batch_size)
        per_class = {name: {"clip_score": float(scores["clip_score"][codes == i].mean()),
                            "retrieval_accuracy": float(scores["retrieved"][codes == i].float().mean()),
                            "count": int((codes == i).sum())}
                     for i, name in enumerate(names) if (codes == i).any()}
        section[label] = {"clip_score": float(scores["clip_score"].mean()),
                          "retrieval_accuracy": float(scores["retrieved"].float().mean()),
                          "chance": 1 / len(names), "per_class": per_class}
    return section


def _audit_summary(audit: MemorisationAudit) -> dict:
    summary = json.loads(audit.to_json())
    summary["flagged_indices"] = summary["flagged_indices"][:1000]
    summary["near_copy_indices"] = summary["near_copy_indices"][:1000]
    summary["held_out_excluded_indices"] = summary["held_out_excluded_indices"][:1000]
    summary["num_flagged"] = len(audit.flagged_indices)
    summary["num_near_copies"] = len(audit.near_copy_indices)
    return summary


def _downstream_section(train, test, generated, options: dict | None, seed: int, progress: bool) -> dict:
    if options is None:
        return {"note": "not run: --no-downstream"}
    if train is None or test is None:
        return {"note": "not run: needs labelled --train and --test sets"}
    if any(s.labels is None for s in (train, test, generated)):
        unlabelled = [s.name for s in (train, test, generated) if s.labels is None]
        return {"note": f"not run: unlabelled sets {unlabelled}"}
    options = dict(options)
    positive = options.pop("positive", None)
    if positive:
        train, test, generated = (binarise(s, positive) for s in (train, test, generated))
    return downstream_utility(train, test, generated, seed=seed, progress=progress, **options)


def _score_error_section(pipeline, held_out: ImageSet, batch_size: int, seed: int) -> dict:
    labels = None
    if pipeline.unet.config.num_class_embeds is not None:
        labels = held_out.labels_for_model(pipeline.class_names, required=True)
    section = per_sigma_score_error(pipeline, held_out.images, labels, batch_size=batch_size, seed=seed)
    section["images_from"] = held_out.name
    return section


def attack_statistics(pipe, image_sets: tuple[ImageSet, ...], settings: AttackSettings,
                      prompt: str | None = None) -> list[np.ndarray]:
    """The membership statistics of each set's images, conditioned on the set's labels (matched to the model's
    classes by name) or, for a latent model, on ``prompt``."""
    statistics = []
    for image_set in image_sets:
        labels = image_set.labels_for_model(getattr(pipe, "class_names", None))
        statistics.append(membership_statistics(pipe, image_set.images, None if labels is None else labels.tolist(),
                                                settings, None if prompt is None else [prompt] * len(image_set)))
    return statistics


def _membership_section(attack: dict, members: ImageSet, non_members: ImageSet, seed: int) -> dict:
    """The membership attack ``attack`` describes (``model``, ``method``, optional ``prompt``) with ``members``
    (training images) against ``non_members`` (held-out ones): its report and ROC curve, per-image values left out."""
    settings = AttackSettings(method=AttackMethod(attack.get("method", "loss")), seed=seed)
    statistics = attack_statistics(attack["model"], (members, non_members), settings, attack.get("prompt"))
    report = attack_report(*statistics, settings).to_dict()
    fpr, tpr = roc_points(*statistics)
    del report["member_statistics"], report["non_member_statistics"]
    return {**report, "members_from": members.name, "non_members_from": non_members.name,
            "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist()}}


def evaluate(
    real: ImageSet,
    generated: ImageSet,
    output_dir: str | Path,
    train: ImageSet | None = None,
    test: ImageSet | None = None,
    inception: nn.Module | None = None,
    inception_note: str | None = None,
    domain_encoder: nn.Module | None = None,
    clip: OpenClipModel | None = None,
    class_prompts: dict[str, str] | None = None,
    k: int = 3,
    k_density: int = 5,
    kid_subset_size: int = 1000,
    diversity_pairs: int = 1000,
    audit_threshold: float | None = None,
    audit_percentile: float = 1.0,
    audit_space: AuditSpace | str = AuditSpace.STRUCTURE,
    max_images: int | None = None,
    downstream: dict | None = None,
    score_model=None,
    membership_attack: dict | None = None,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """All metrics of ``generated`` against ``real`` as a JSON-ready dict; flagged-pair PNGs go to ``output_dir``.

    Args:
        real: real images the generated ones should resemble (also the held-out set for the audit's
            threshold when ``test`` is not given: it must not overlap ``train``).
        generated: the synthetic images.
        train: the model's training images, for the memorisation audit.
        test: held-out real images (calibrate the audit threshold).
        inception: a feature extractor for FID/KID (``FIDInceptionV3``); None skips them with ``inception_note``.
        domain_encoder: a medical-image encoder for domain FID, precision/recall and a feature-space audit.
        clip: an open_clip model: its image tower gives the same metrics as ``domain_encoder``, and with
            ``class_prompts`` (class name -> prompt) it scores prompt adherence (CLIPScore, prompt retrieval).
        audit_space: the memorisation audit's image comparison: ``structure`` (robust to noise, blur, intensity,
            moves and mirrors) or ``pixels`` (RMS); ``audit_threshold`` is in its units.
        k: neighbours for the precision/recall balls (Kynkäänniemi et al.'s 3).
        k_density: neighbours for the density/coverage balls (Naeem et al.'s 5).
        max_images: use a seeded sample of at most this many images of ``real``, ``generated`` and ``test`` for
            every metric but the memorisation audit, which always checks every generated image (and calibrates
            on every held-out one).
        downstream: options for ``downstream_utility`` (plus ``positive``: classes to binarise on); None
            skips it. It needs labelled ``train``, ``test`` and ``generated`` sets.
        score_model: a ``ScoreLangevinPipeline`` whose per-noise-level error is measured on ``test`` (or
            ``real``).
        membership_attack: ``{"model": a DDPM, score or MediSyn pipeline, "method": "loss" or "pia", "prompt":
            a latent model's caption}``: a membership attack on that model with ``train`` as members and ``test``
            (or ``real``) as non-members.
    """
    if membership_attack is not None and train is None:
        raise ValueError("a membership attack needs the model's training images: pass --train")
    output_dir = Path(output_dir)
    sets = [s for s in (real, generated, train, test) if s is not None]
    check_compatible(sets)
    if max_images is not None and max_images < 2:
        raise ValueError(f"max_images must be >= 2, got {max_images}")
    if class_prompts and generated.class_names and set(generated.class_names) - set(class_prompts):
        raise ValueError(f"--prompts has no prompt for the classes "
                         f"{sorted(set(generated.class_names) - set(class_prompts))}")
    started = time.perf_counter()
    rng = np.random.default_rng(seed)
    # The audit sees every generated image and calibrates on every held-out one; other metrics may see samples.
    audited, calibration = generated, test if test is not None else real
    real, generated, test = (_sample(s, max_images, rng) for s in (real, generated, test))
    sets = [s for s in (real, generated, train, test) if s is not None]
    result: dict = {"inputs": {s.name: s.summary() for s in sets}, "seed": seed}
    result["inputs"]["generated"]["audited"] = len(audited)
    held_out = test if test is not None else real
    worst: dict[str, list[int]] = {}

    def features_of(image_set: ImageSet, encoder: nn.Module, label: str) -> torch.Tensor:
        return extract_features(image_set.images, encoder, batch_size, progress=progress,
                                description=f"{label} features: {image_set.name}")

    if inception is not None:
        generated_pool3 = features_of(generated, inception, "Inception")
        section, realism = _feature_section(
            features_of(real, inception, "Inception"), generated_pool3, k, k_density, kid_subset_size, seed
        )
        if getattr(inception, "fc", None) is not None:
            from medsyn.metrics.inception import inception_score

            section["inception_score"] = inception_score(inception.logits(generated_pool3))
        else:
            section["inception_score"] = None
            section["inception_score_note"] = "not computed: the Inception weights have no classifier (pool3 only)"
        result["inception"] = section
        worst["inception realism"] = _generated_indices(generated, audited, np.argsort(realism)[:WORST_SHOWN])
    else:
        result["inception"] = {"note": inception_note or "not computed"}

    encoders = {"domain": domain_encoder, "clip": None if clip is None else ClipImageEncoder(clip)}
    missing_notes = {"domain": "not computed: pass --domain-encoder (a model trained on medical images)",
                     "clip": "not computed: pass --clip-model (an open_clip folder)"}
    audit_features: dict[str, dict[str, torch.Tensor]] = {}
    for name, encoder in encoders.items():
        if encoder is None:
            result[name] = {"note": missing_notes[name]}
            continue
        features = {"real": features_of(real, encoder, name), "generated": features_of(generated, encoder, name)}
        section, realism = _feature_section(features["real"], features["generated"], k, k_density, kid_subset_size,
                                            seed)
        result[name] = section
        worst[f"{name} realism"] = _generated_indices(generated, audited, np.argsort(realism)[:WORST_SHOWN])
        if train is not None:
            features["audited"] = features["generated"] if audited is generated else features_of(
                audited, encoder, name)
            features["train"] = features_of(train, encoder, name)
            features["held_out"] = features["real"] if calibration is real else features_of(
                calibration, encoder, name)
            audit_features[name] = features
    result["prompt_adherence"] = _prompt_adherence_section(clip, real, generated, class_prompts, batch_size)

    result["diversity"] = _diversity_section(real, generated, diversity_pairs, seed)
    result["image_statistics"] = _statistics_section(real, generated)
    if train is None:
        result["privacy"], flagged = {"note": "not run: pass --train (the images the model was trained on)"}, []
    else:
        result["privacy"], flagged = _privacy_section(
            audited, train, calibration, audit_threshold, audit_percentile, AuditSpace(audit_space), output_dir,
            progress, audit_features
        )
    result["downstream"] = _downstream_section(train, test, generated, downstream, seed, progress)
    if score_model is not None:
        result["score_error"] = _score_error_section(score_model, held_out, batch_size, seed)
    if membership_attack is not None:
        members = _sample(train, max_images, rng)
        result["membership"] = _membership_section(membership_attack, members, held_out, seed)
    result["least_realistic"] = worst
    result["flagged_pair_images"] = [str(p.relative_to(output_dir)) for p in flagged]
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result
