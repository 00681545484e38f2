"""A reference-model attack on the weights: the offline likelihood-ratio attack (LiRA, Carlini et al. 2022,
"Membership inference attacks from first principles").

The loss attack ranks images by the target model's loss alone, and some scans are simply easy (a dark, smooth
slice is denoised well by any model): they look like members whoever trained on them. LiRA asks instead whether
the target model does better on an image than models that did *not* train on it: k reference models, trained by
the same script on other images of the population, score every candidate with the same statistic; the candidate's
statistic under the target is then read against the Gaussian those reference scores make, (s - mu_out) / sigma_out.
Offline: the references never saw the candidates, so they can be trained once, before the candidates are known.
With few references (the CPU affords a handful) each candidate's own sigma is noisy, so, as Carlini et al. advise
for small k, one spread pooled over all candidates is used (``global_variance``).
"""

from __future__ import annotations

import numpy as np


def lira_offline_statistics(target: np.ndarray, references: np.ndarray, global_variance: bool = True) -> np.ndarray:
    """Per-candidate standardised scores, higher meaning "more likely a member".

    Args:
        target: (N,) the target model's statistic per candidate (higher = more member-like, as
            ``membership_statistics`` gives).
        references: (k, N) the same statistic under k reference models that never trained on the candidates.
        global_variance: one standard deviation pooled over candidates (right for small k); else each
            candidate's own (needs k >= 2 and is noisy below k ~ 16).
    """
    target, references = np.asarray(target, np.float64), np.asarray(references, np.float64)
    if target.ndim != 1 or references.ndim != 2 or references.shape[1] != len(target):
        raise ValueError(f"target must be (N,) and references (k, N); got {target.shape} and {references.shape}")
    if len(references) < 2:
        raise ValueError(f"need at least 2 reference models to estimate a spread, got {len(references)}")
    if not (np.isfinite(target).all() and np.isfinite(references).all()):
        raise ValueError("statistics contain NaN or Inf")
    mean = references.mean(axis=0)
    spread = references.std(axis=0, ddof=1)
    if global_variance:
        spread = np.full_like(spread, np.sqrt(np.mean(spread**2)))
    return (target - mean) / np.maximum(spread, np.finfo(np.float64).tiny)
