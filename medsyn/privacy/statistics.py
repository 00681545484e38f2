"""The two one-sided tests behind the audit's verdict, written out so that they need no scipy at run time.

Both ask whether generated images sit closer to the training set than held-out real images do. Under the null
hypothesis (the generator draws fresh images from the data distribution) a generated image's distance to its
nearest training image is exchangeable with a held-out image's, which makes both tests exact or asymptotically
exact without any assumption on the distances' distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class TestResult:
    statistic: float
    p_value: float


def average_ranks(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """1-based ranks with ties given their mean rank, and the tie-group sizes."""
    unique, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return ((ends - counts + 1 + ends) / 2)[inverse], counts


def binary_auc(scores: np.ndarray, positive: np.ndarray) -> float:
    """ROC AUC as the Mann-Whitney statistic: the chance a positive outscores a negative, ties counting half."""
    ranks, _ = average_ranks(scores)
    count = int(positive.sum())
    if count in (0, len(positive)):
        raise ValueError("AUC needs positive and negative test images")
    return float((ranks[positive].sum() - count * (count + 1) / 2) / (count * (len(positive) - count)))


def data_copying_test(generated: np.ndarray, held_out: np.ndarray) -> TestResult:
    """Meehan, Chaudhuri and Dasgupta's (2020) data-copying test: Mann-Whitney U on nearest-training distances.

    ``statistic`` is their Z_U, (U - nm/2) / sd(U) with tie correction; well below 0 means the generated images
    are closer to the training set than new real images are. ``p_value`` is one-sided (alternative: generated
    distances are smaller), normal approximation with continuity correction, as ``scipy.stats.mannwhitneyu(...,
    alternative="less", method="asymptotic")``.
    """
    generated, held_out = np.asarray(generated, np.float64).ravel(), np.asarray(held_out, np.float64).ravel()
    n, m = len(generated), len(held_out)
    if n == 0 or m == 0:
        raise ValueError(f"the data-copying test needs both samples, got {n} generated and {m} held-out distances")
    ranks, ties = average_ranks(np.concatenate([generated, held_out]))
    u = ranks[:n].sum() - n * (n + 1) / 2
    total = n + m
    variance = n * m / 12 * ((total + 1) - (ties**3 - ties).sum() / (total * (total - 1)))
    if variance <= 0:  # every distance equal: nothing tells the samples apart
        return TestResult(0.0, 1.0)
    sd = math.sqrt(variance)
    z = (u - n * m / 2) / sd
    p = 0.5 * math.erfc(-((u - n * m / 2 + 0.5) / sd) / math.sqrt(2))
    return TestResult(float(z), float(min(1.0, p)))


def exchangeability_test(held_out: np.ndarray, training: np.ndarray) -> TestResult:
    """Two-sided Mann-Whitney test that held-out images' nearest-training distances and those of training images
    (left out of the reference half) come from one distribution: the calibration's assumption. ``statistic`` is
    Z_U (below 0: held-out images sit closer than training ones); ``p_value`` two-sided, normal approximation."""
    z = data_copying_test(held_out, training).statistic
    return TestResult(z, float(math.erfc(abs(z) / math.sqrt(2))))


def flagged_count_test(flagged: int, num_generated: int, rank: int, num_held_out: int) -> TestResult:
    """P(at least ``flagged`` of ``num_generated`` fall below the ``rank``-th smallest of ``num_held_out``).

    When the threshold is an order statistic of the held-out distances, the number of exchangeable generated
    distances below it is beta-binomial(n, rank, m - rank + 1): exact, including the randomness of the
    calibrated threshold itself (a binomial at the nominal percentile would ignore it). ``statistic`` is the
    expected count, n * rank / (m + 1).
    """
    if not 1 <= rank <= num_held_out:
        raise ValueError(f"rank must be in [1, {num_held_out}], got {rank}")
    if not 0 <= flagged <= num_generated:
        raise ValueError(f"flagged must be in [0, {num_generated}], got {flagged}")
    n, alpha, beta = num_generated, float(rank), float(num_held_out - rank + 1)
    x = torch.arange(flagged, n + 1, dtype=torch.float64)
    lgamma = lambda value: torch.lgamma(torch.as_tensor(value, dtype=torch.float64))  # noqa: E731
    log_pmf = (
        lgamma(n + 1) - lgamma(x + 1) - lgamma(n - x + 1)
        + lgamma(x + alpha) + lgamma(n - x + beta) - lgamma(n + alpha + beta)
        - (lgamma(alpha) + lgamma(beta) - lgamma(alpha + beta))
    )
    p = float(torch.logsumexp(log_pmf, 0).exp().clamp(max=1.0))
    return TestResult(n * rank / (num_held_out + 1), p)
