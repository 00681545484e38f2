"""Generators keyed by a tuple of integers, so a random draw depends only on what it is for."""

from __future__ import annotations

import torch


def keyed_generator(*key: int, device: str | torch.device = "cpu") -> torch.Generator:
    """A generator seeded from ``key`` (hashes of int tuples are stable across runs and processes)."""
    return torch.Generator(device=device).manual_seed(hash(tuple(key)) & (2**63 - 1))
