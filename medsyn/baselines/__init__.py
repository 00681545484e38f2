"""Baselines that generators are compared against."""

from .pixel_noise import pixel_noise_baseline

__all__ = ["pixel_noise_baseline"]
