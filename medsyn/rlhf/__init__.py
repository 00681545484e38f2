"""RLHF for medical generators (MINIM-style): expert ratings, a selector (reward) model, generator updates."""
