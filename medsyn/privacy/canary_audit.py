"""An empirical lower bound on a trained model's epsilon from one training run (Steinke, Nasr and Jagielski 2023,
"Privacy auditing with one (1) training run").

The accountant's epsilon is an upper bound that holds if the DP-SGD implementation is right. The audit checks it
from the other side: m canary images are each put into the training set by an independent fair coin; after the one
training run a membership statistic scores every canary, the auditor guesses "in" for the ``k_plus`` highest and
"out" for the ``k_minus`` lowest and abstains on the rest. Under (epsilon, delta)-DP the number of correct guesses
is dominated by Binomial(r, e^eps / (1 + e^eps)) (r guesses), up to a delta term (their Theorem 3.3 / Prop. 5.3).
The lower bound is the largest epsilon whose p-value for the observed count is at most 1 - ``confidence``: with
that confidence the model is not epsilon-DP for any smaller epsilon. A bound above the accountant's epsilon means
the implementation leaks more than it claims.

One run gives a loose bound (the paper's own black-box bounds are far below the true epsilon); it is a check for
broken DP, not a measurement of the true epsilon. ``k_plus`` and ``k_minus`` must be chosen before the scores are
seen, or the p-value is wrong.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import stats

from medsyn.validation import finite_number


def guess_accuracy(epsilon: float) -> float:
    """How often randomized response with ``epsilon`` answers right: the best any guess can do under epsilon-DP."""
    return 1 / (1 + math.exp(-epsilon))


def audit_p_value(canaries: int, guesses: int, correct: int, epsilon: float, delta: float) -> float:
    """The probability of at least ``correct`` right guesses out of ``guesses`` (of ``canaries`` coin-flipped
    canaries) under (epsilon, delta)-DP. delta = 0 gives the binomial tail; delta > 0 adds the paper's term:
    delta times 2 m times the largest average, over i, of the binomial mass i steps below ``correct``."""
    if not 0 <= correct <= guesses <= canaries:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got {correct}, {guesses}, {canaries}")
    q = guess_accuracy(epsilon)
    tail = float(stats.binom.sf(correct - 1, guesses, q))
    if delta == 0 or correct == 0:
        return min(1.0, tail)
    steps = np.arange(1, correct + 1)
    mass = np.cumsum(stats.binom.pmf(correct - steps, guesses, q))  # P[correct - i <= Bin < correct], i = 1..
    return min(1.0, tail + 2 * canaries * delta * float((mass / steps).max()))


def epsilon_lower_bound(canaries: int, guesses: int, correct: int, delta: float, confidence: float = 0.95,
                        tolerance: float = 1e-4) -> float:
    """The largest epsilon that ``correct`` right guesses rule out at ``confidence`` (0 when none is)."""
    confidence = finite_number(confidence, "confidence", 0, exclusive=True, maximum=1)
    level = 1 - confidence
    if audit_p_value(canaries, guesses, correct, 0.0, delta) > level:
        return 0.0
    low, high = 0.0, 1.0
    while audit_p_value(canaries, guesses, correct, high, delta) <= level:
        low, high = high, 2 * high
        if high > 100:
            return math.inf  # every guess right, delta negligible: no finite epsilon survives
    while high - low > tolerance:
        middle = (low + high) / 2
        low, high = (middle, high) if audit_p_value(canaries, guesses, correct, middle, delta) <= level else (
            low, middle)
    return low


@dataclass(frozen=True)
class CanaryAudit:
    canaries: int
    guesses: int
    correct: int
    delta: float
    confidence: float
    epsilon_lower_bound: float

    def to_dict(self) -> dict:
        return self.__dict__.copy()


def canary_audit(scores: np.ndarray, included: np.ndarray, k_plus: int, k_minus: int, delta: float,
                 confidence: float = 0.95) -> CanaryAudit:
    """Guess "in" for the ``k_plus`` highest ``scores`` and "out" for the ``k_minus`` lowest (ties by index), count
    the right guesses against ``included`` (the coin flips), and bound epsilon from below."""
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    if scores.shape != included.shape or scores.ndim != 1:
        raise ValueError(f"scores {scores.shape} and included {included.shape} must be one value per canary")
    if not np.isfinite(scores).all():
        raise ValueError("scores contain NaN or Inf")
    if k_plus < 0 or k_minus < 0 or k_plus + k_minus > len(scores) or k_plus + k_minus == 0:
        raise ValueError(f"k_plus {k_plus} + k_minus {k_minus} must be between 1 and the {len(scores)} canaries")
    order = np.argsort(-scores, kind="stable")
    guessed_in, guessed_out = order[:k_plus], order[len(order) - k_minus:]
    correct = int(included[guessed_in].sum() + (~included[guessed_out]).sum())
    guesses = k_plus + k_minus
    return CanaryAudit(len(scores), guesses, correct, delta, confidence,
                       epsilon_lower_bound(len(scores), guesses, correct, delta, confidence))
