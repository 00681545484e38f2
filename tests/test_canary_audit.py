"""The one-run epsilon lower bound: the binomial tail when delta is 0, valid on randomized response of known epsilon,
and the guess count."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from medsyn.privacy.canary_audit import audit_p_value, canary_audit, epsilon_lower_bound, guess_accuracy


def test_without_delta_the_p_value_is_the_binomial_tail():
    for epsilon in (0.0, 0.5, 2.0):
        q = math.exp(epsilon) / (1 + math.exp(epsilon))
        assert audit_p_value(100, 40, 30, epsilon, 0.0) == pytest.approx(stats.binom.sf(29, 40, q), rel=1e-12)
    assert audit_p_value(100, 40, 30, 1.0, 1e-3) > audit_p_value(100, 40, 30, 1.0, 0.0)
    assert guess_accuracy(0.0) == 0.5


def test_on_randomized_response_the_bound_holds_at_its_confidence_and_comes_close():
    """Each of 1,000 canaries answered by epsilon-randomized response (epsilon 1): the bound exceeds the true
    epsilon in about 5% of runs at 95% confidence, and is not far below it."""
    rng = np.random.default_rng(0)
    bounds = []
    for _ in range(200):
        correct = int((rng.random(1000) < guess_accuracy(1.0)).sum())
        bounds.append(epsilon_lower_bound(1000, 1000, correct, delta=0.0))
    bounds = np.array(bounds)
    assert (bounds > 1.0).mean() <= 0.09  # 5% expected; 9% is 2 standard errors at 200 runs
    assert np.median(bounds) > 0.75


def test_the_audit_counts_right_guesses_and_abstains_in_the_middle():
    scores = np.array([9.0, 8.0, 7.0, 5.0, 1.0, 0.5, 0.2, 0.1])
    included = np.array([True, True, False, True, False, False, True, False])
    audit = canary_audit(scores, included, k_plus=3, k_minus=3, delta=0.0)
    # in: 9, 8, 7 (2 right); out: 0.5, 0.2, 0.1 (2 right); 5 and 1 abstained
    assert (audit.guesses, audit.correct) == (6, 4)
    assert audit.epsilon_lower_bound == 0.0  # 4 of 6 rules out nothing at 95%
    perfect = canary_audit(np.arange(200.0), np.arange(200) >= 100, k_plus=50, k_minus=50, delta=1e-5)
    assert perfect.correct == 100 and 2 < perfect.epsilon_lower_bound < math.inf
    with pytest.raises(ValueError, match="NaN"):
        canary_audit(np.array([1.0, np.nan]), np.array([True, False]), 1, 1, 0.0)
    with pytest.raises(ValueError, match="k_plus"):
        canary_audit(scores, included, 5, 5, 0.0)
