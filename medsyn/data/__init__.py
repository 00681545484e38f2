"""Data: the simulated brain MRI set, loaders for real images, and training transforms."""

from .loading import load_image_dataset, simulated_dataset
from .simulated_mri import CLASS_NAMES, SimulatedBrainMRI, SimulatedSlice
from .transforms import image_channels, image_transform, random_affine

__all__ = [
    "CLASS_NAMES",
    "SimulatedBrainMRI",
    "SimulatedSlice",
    "image_channels",
    "image_transform",
    "load_image_dataset",
    "random_affine",
    "simulated_dataset",
]
