"""Simulated axial brain MRI slices, healthy or with a tumour, each with a caption from its sampled anatomy.

The simulator is the offline default dataset: it powers the demo and the tests and is a teaching set with
known ground truth. Geometry lives in normalised coordinates, so any resolution renders the same anatomy.
Image ``i`` of a seeded simulator depends only on ``(seed, i)``: the first 100 of 10,000 images are the
first 100 of 100.

What varies: head size, shape and position, scalp and skull thickness, brain size, grey/white contrast and
texture, cortical ribbon and sulci, ventricle size and shape, deep grey nuclei, the contrast (T1, T1-CE, T2,
FLAIR), bias field and Rician noise. Tumours vary in location, size, irregularity, enhancement, necrotic core
and oedema, and push neighbouring anatomy aside (mass effect). Both classes draw the contrast from the same
distribution, so, unlike many real sets, the label cannot be read off the protocol.

Sides follow the radiological convention: the patient's right is on the image's left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

CLASS_NAMES = ("healthy", "tumor")

# Tissue intensities per contrast (0..1): scalp fat, skull, marrow, CSF, grey matter, white matter, and the
# tumour's enhancing rim, solid part, necrotic core and oedema.
_TISSUE = {
    "T1": dict(fat=0.85, skull=0.06, marrow=0.55, csf=0.12, gm=0.50, wm=0.72, rim=0.45, solid=0.40, core=0.18, oedema=0.50),
    "T1-CE": dict(fat=0.85, skull=0.06, marrow=0.55, csf=0.12, gm=0.50, wm=0.70, rim=0.95, solid=0.75, core=0.16, oedema=0.48),
    "T2": dict(fat=0.65, skull=0.05, marrow=0.45, csf=0.95, gm=0.55, wm=0.36, rim=0.70, solid=0.72, core=0.92, oedema=0.82),
    "FLAIR": dict(fat=0.60, skull=0.05, marrow=0.40, csf=0.10, gm=0.55, wm=0.42, rim=0.75, solid=0.78, core=0.35, oedema=0.88),
}
_CONTRAST_NAMES = {
    "T1": "T1-weighted",
    "T1-CE": "contrast-enhanced T1-weighted",
    "T2": "T2-weighted",
    "FLAIR": "FLAIR",
}


def _soft_inside(signed_distance: np.ndarray, softness: float) -> np.ndarray:
    """1 inside (negative distance), 0 outside, with a smooth edge about ``softness`` wide (anti-aliasing)."""
    return 1.0 / (1.0 + np.exp(np.clip(signed_distance / softness, -40, 40)))


def _smooth_field(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """A smooth random field of unit-ish amplitude: a coarse Gaussian grid upsampled bicubically."""
    coarse = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BICUBIC))


def _radial_wobble(rng: np.random.Generator, angle: np.ndarray, orders: range, amplitude: float) -> np.ndarray:
    """1 + a random low-order Fourier series in the polar angle: irregular outlines of heads, brains, tumours."""
    out = np.ones_like(angle)
    for k in orders:
        out += rng.normal(0.0, amplitude) * np.cos(k * angle + rng.uniform(0, 2 * np.pi))
    return out


@dataclass
class SimulatedSlice:
    """One simulated slice: ``image`` is float32 (H, W) in [0, 1]; ``label`` indexes ``CLASS_NAMES``;
    ``tumour_mask`` is the tumour's ground-truth mask (bool (H, W)), all False for a healthy slice."""

    image: np.ndarray
    label: int
    caption: str
    tumour_mask: np.ndarray
    attributes: dict[str, Any] = field(default_factory=dict)


class SimulatedBrainMRI:
    """Deterministic, seedable generator of axial brain MRI-like slices.

    Args:
        resolution: image height and width in pixels (64, 128 and 256 are the intended sizes).
        tumour_fraction: probability that an image has a tumour.
        seed: the dataset's seed; image i depends only on ``(seed, i)``.
        contrasts: contrasts to draw from, uniformly, for both classes.
    """

    class_names = CLASS_NAMES

    def __init__(
        self,
        resolution: int = 128,
        tumour_fraction: float = 0.5,
        seed: int = 0,
        contrasts: tuple[str, ...] = ("T1", "T1-CE", "T2", "FLAIR"),
    ):
        if resolution < 16:
            raise ValueError(f"resolution must be >= 16 pixels, got {resolution}")
        if not 0.0 <= tumour_fraction <= 1.0:
            raise ValueError(f"tumour_fraction must be in [0, 1], got {tumour_fraction}")
        unknown = set(contrasts) - set(_TISSUE)
        if unknown or not contrasts:
            raise ValueError(f"unknown contrasts {sorted(unknown)}; choose from {sorted(_TISSUE)}")
        self.resolution = resolution
        self.tumour_fraction = tumour_fraction
        self.seed = seed
        self.contrasts = tuple(contrasts)
        axis = (np.arange(resolution, dtype=np.float32) + 0.5) / resolution * 2.0 - 1.0
        self._x, self._y = np.meshgrid(axis, axis)  # x: image right, y: image down (posterior)
        self._edge = 2.0 / resolution

    def __getitem__(self, index: int) -> SimulatedSlice:
        if index < 0:
            raise IndexError(f"index must be >= 0, got {index}")
        rng = np.random.default_rng([self.seed, index])
        has_tumour = rng.random() < self.tumour_fraction
        return self._render(rng, has_tumour)

    def generate(self, num_images: int, start: int = 0) -> dict[str, Any]:
        """Images ``start .. start + num_images - 1`` as uint8 (N, H, W), int64 labels, captions, tumour masks,
        attributes."""
        slices = [self[i] for i in range(start, start + num_images)]
        return dict(
            images=np.stack([np.round(s.image * 255).astype(np.uint8) for s in slices]),
            labels=np.array([s.label for s in slices], dtype=np.int64),
            captions=[s.caption for s in slices],
            tumour_masks=np.stack([s.tumour_mask for s in slices]),
            attributes=[s.attributes for s in slices],
            class_names=list(CLASS_NAMES),
        )

    def _render(self, rng: np.random.Generator, has_tumour: bool) -> SimulatedSlice:
        size, soft = self.resolution, self._edge
        contrast = self.contrasts[rng.integers(len(self.contrasts))]
        tissue = {k: v * rng.uniform(0.92, 1.08) for k, v in _TISSUE[contrast].items()}

        # Head frame: position, rotation, egg-shaped outline narrower at the front.
        centre = rng.normal(0.0, 0.03, size=2)
        rotation = rng.normal(0.0, 0.08)
        head_scale = rng.uniform(0.86, 1.0)
        semi_x, semi_y = head_scale * rng.uniform(0.70, 0.80), head_scale * rng.uniform(0.84, 0.92)
        cos_r, sin_r = np.cos(rotation), np.sin(rotation)
        dx, dy = self._x - centre[0], self._y - centre[1]
        hx, hy = cos_r * dx + sin_r * dy, -sin_r * dx + cos_r * dy
        egg = rng.uniform(0.03, 0.10)
        angle = np.arctan2(hy / semi_y, hx / semi_x)
        head_radius = np.hypot(hx / (semi_x * (1 + egg * hy)), hy / semi_y) / _radial_wobble(rng, angle, range(2, 5), 0.015)

        # Layers from outside in: scalp fat, skull (with marrow), subarachnoid CSF, brain.
        scalp, skull = rng.uniform(0.035, 0.06), rng.uniform(0.035, 0.06)
        atrophy = rng.beta(2, 5)
        csf_gap = 0.012 + 0.03 * atrophy
        brain_edge = 1.0 - scalp - skull - csf_gap
        rho = head_radius / brain_edge  # 1 at the brain surface
        unit = 1.0 / (brain_edge * semi_x)  # normalised-radius units per unit of image coordinate
        head = _soft_inside(head_radius - 1.0, soft / semi_x)
        inside_skull = _soft_inside(head_radius - (1.0 - scalp), soft / semi_x)
        inside_dura = _soft_inside(head_radius - (1.0 - scalp - skull), soft / semi_x)
        brain = _soft_inside(rho - 1.0, soft * unit)
        marrow = np.exp(-(((head_radius - (1.0 - scalp - skull / 2)) / (skull / 5)) ** 2))
        image = tissue["fat"] * (head - inside_skull)
        image += (tissue["skull"] + (tissue["marrow"] - tissue["skull"]) * 0.6 * marrow) * (inside_skull - inside_dura)
        image += tissue["csf"] * (inside_dura - brain)

        # Brain frame (normalised so the brain is the unit disc), then the tumour's mass effect on it.
        bx, by = hx / (semi_x * brain_edge), hy / (semi_y * brain_edge)
        tumour = self._sample_tumour(rng) if has_tumour else None
        if tumour is not None:
            offset_x, offset_y = bx - tumour["x"], by - tumour["y"]
            push = tumour["mass_effect"] * np.exp(-(offset_x**2 + offset_y**2) / (2 * (1.6 * tumour["radius"]) ** 2))
            bx, by = bx - push * offset_x, by - push * offset_y

        # Grey/white matter. Folds are level sets of a random polar Fourier field: meandering, roughly radial
        # sulci lined by grey matter, with white-matter fingers into the gyri; deep grey nuclei; textured WM.
        brain_angle = np.arctan2(by, bx)
        depth = 1.0 - np.hypot(bx, by)
        folds = self._fold_field(rng, brain_angle, depth)
        sulcal_depth = rng.uniform(0.16, 0.28) + 0.05 * np.cos(2 * brain_angle + rng.uniform(0, 2 * np.pi))
        cortex = rng.uniform(0.05, 0.08)
        gyral_grey = _soft_inside(np.abs(folds) - rng.uniform(0.45, 0.65), 0.08) * _soft_inside(depth - sulcal_depth - cortex, 0.03)
        grey = np.maximum(_soft_inside(depth - cortex, soft * unit * 1.5), gyral_grey)
        slice_level = "ventricular" if rng.random() < 0.75 else "supraventricular"
        if slice_level == "ventricular":  # caudate heads beside the frontal horns, thalami behind them
            for side in (-1, 1):
                for cx, cy, ax, ay in ((0.17, -0.12, 0.08, 0.12), (0.12, 0.13, 0.10, 0.12)):
                    nucleus = _soft_inside(np.hypot((bx - side * cx) / ax, (by - cy) / ay) - 1, 0.15)
                    grey = np.maximum(grey, 0.8 * nucleus)
        white_texture = 1 + 0.04 * _smooth_field(rng, size, 10) + 0.02 * _smooth_field(rng, size, 24)
        parenchyma = (tissue["wm"] * (1 - grey) + tissue["gm"] * grey) * white_texture

        sulcus_width = 0.07 + 0.12 * atrophy
        sulci = _soft_inside(np.abs(folds) - sulcus_width, 0.03) * _soft_inside(depth - sulcal_depth, 0.03)
        fissure = _soft_inside(np.abs(bx) - (0.012 + 0.015 * atrophy), soft * unit) * (
            _soft_inside(depth - 0.45, 0.03) * (np.abs(by) > 0.3)
        )
        ventricle_scale = rng.uniform(0.7, 1.2) * (1 + 0.8 * atrophy)
        if slice_level == "ventricular":
            ventricles = self._ventricles(bx, by, ventricle_scale, rng, soft * unit)
        else:
            ventricles = np.zeros_like(bx)
        if tumour is not None:
            effaced = 1 - np.exp(-((bx - tumour["x"]) ** 2 + (by - tumour["y"]) ** 2) / (2 * (2 * tumour["radius"]) ** 2))
            sulci, ventricles = sulci * effaced, ventricles * (0.4 + 0.6 * effaced)
        csf = np.clip(np.maximum.reduce([sulci, fissure, ventricles]), 0, 1)
        parenchyma = parenchyma * (1 - csf) + tissue["csf"] * csf

        tumour_mask = np.zeros((size, size), dtype=bool)
        if tumour is not None:
            parenchyma, mass = self._render_tumour(rng, parenchyma, hx, hy, semi_x, semi_y, brain_edge, tumour, tissue, soft, grey)
            tumour_mask = mass > 0.5
        image += parenchyma * brain

        # Acquisition: gain, smooth bias field, Rician noise.
        bias = np.exp(0.12 * _smooth_field(rng, size, 3) + rng.normal(0, 0.08) * self._x + rng.normal(0, 0.08) * self._y)
        image = image * bias * rng.uniform(0.85, 1.05)
        noise_sigma = rng.uniform(0.008, 0.035)
        real = image + noise_sigma * rng.standard_normal(image.shape)
        imaginary = noise_sigma * rng.standard_normal(image.shape)
        image = np.clip(np.hypot(real, imaginary), 0.0, 1.0).astype(np.float32)

        attributes: dict[str, Any] = dict(
            contrast=contrast,
            head_scale=round(float(head_scale), 3),
            atrophy=round(float(atrophy), 3),
            ventricle_scale=round(float(ventricle_scale), 3),
            slice_level=slice_level,
        )
        if tumour is not None:
            attributes.update({k: tumour[k] for k in ("side", "lobe", "size", "enhancing", "necrotic", "oedema")})
            attributes["mass_effect"] = tumour["mass_effect"] > 0.35
        caption = self._caption(attributes, has_tumour)
        return SimulatedSlice(image=image, label=int(has_tumour), caption=caption, tumour_mask=tumour_mask, attributes=attributes)

    @staticmethod
    def _ventricles(bx: np.ndarray, by: np.ndarray, scale: float, rng: np.random.Generator, soft: float) -> np.ndarray:
        """Lateral ventricles as two curved horns per side (frontal horn, body/trigone) and a slit third ventricle."""
        out = np.zeros_like(bx)
        splay, bend = rng.uniform(0.2, 0.5), rng.uniform(0.5, 2.5)
        horns = ((0.08, -0.17, 0.05, 0.17, splay), (0.12, 0.13, 0.045, 0.17, -0.7 * splay))
        for side in (-1, 1):
            asymmetry = rng.uniform(0.9, 1.1)
            for cx, cy, ax, ay, tilt in horns:
                u = bx - side * cx * scale * rng.uniform(0.85, 1.15)
                v = by - cy * rng.uniform(0.85, 1.15)
                c, s = np.cos(side * tilt), np.sin(side * tilt)
                ru, rv = c * u + s * v, -s * u + c * v
                ru = ru - side * bend * rv**2  # crescent: the horn curves around the caudate / thalamus
                ellipse = np.hypot(ru / (ax * scale * asymmetry), rv / (ay * np.sqrt(scale)))
                out = np.maximum(out, _soft_inside(ellipse - 1, 0.15))
        third = _soft_inside(np.hypot(bx / (0.012 * scale + soft), by / 0.08) - 1, 0.2)
        return np.maximum(out, third)

    @staticmethod
    def _fold_field(rng: np.random.Generator, angle: np.ndarray, depth: np.ndarray) -> np.ndarray:
        """Unit-variance random field in (angle, depth): its zero set traces sulci that run mostly inward."""
        field = np.zeros_like(angle)
        weights = rng.uniform(0.5, 1.0, size=14)
        for weight in weights:
            around, inward = rng.integers(6, 26), rng.uniform(0.0, 12.0)
            field += weight * np.cos(around * angle + inward * depth + rng.uniform(0, 2 * np.pi))
        return field / np.sqrt(0.5 * np.sum(weights**2))

    @staticmethod
    def _sample_tumour(rng: np.random.Generator) -> dict[str, Any]:
        """Where the tumour sits (brain frame), how big it is and what it looks like."""
        direction = rng.uniform(0, 2 * np.pi)
        distance = np.sqrt(rng.uniform(0.02, 0.45))
        x, y = distance * np.cos(direction), distance * np.sin(direction)
        radius = rng.uniform(0.07, 0.24)
        if y < -0.3:
            lobe = "frontal"
        elif y > 0.45:
            lobe = "occipital"
        elif abs(x) > 0.5:
            lobe = "temporal"
        else:
            lobe = "parietal"
        return dict(
            x=x,
            y=y,
            radius=radius,
            side="midline" if abs(x) < 0.1 else ("right" if x < 0 else "left"),  # radiological convention
            lobe=lobe,
            size="small" if radius < 0.12 else ("medium" if radius < 0.18 else "large"),
            enhancing=bool(rng.random() < 0.7),
            necrotic=bool(rng.random() < 0.5 and radius > 0.1),
            oedema=bool(rng.random() < 0.75),
            mass_effect=float(radius * rng.uniform(1.5, 3.5)),
        )

    def _render_tumour(self, rng, parenchyma, hx, hy, semi_x, semi_y, brain_edge, tumour, tissue, soft, grey):
        """Paint oedema, then the mass (enhancing rim or solid), then the necrotic core; return the image and mass."""
        tx, ty = (hx / (semi_x * brain_edge) - tumour["x"]), (hy / (semi_y * brain_edge) - tumour["y"])
        angle = np.arctan2(ty, tx)
        distance = np.hypot(tx, ty)
        edge = soft / (semi_x * brain_edge)
        mass_radius = tumour["radius"] * _radial_wobble(rng, angle, range(2, 6), 0.08)
        mass = _soft_inside(distance - mass_radius, edge)
        if tumour["oedema"]:
            extent = tumour["radius"] * rng.uniform(1.4, 2.2) * _radial_wobble(rng, angle, range(2, 8), 0.15)
            oedema = _soft_inside(distance - extent, 0.03) * (1 - 0.6 * grey)  # spreads in white matter
            parenchyma = parenchyma * (1 - oedema) + tissue["oedema"] * oedema
        texture = 1 + 0.06 * _smooth_field(rng, self.resolution, 16)
        if tumour["enhancing"]:
            rim_width = rng.uniform(0.18, 0.35)
            body = tissue["solid"] + (tissue["rim"] - tissue["solid"]) * np.clip(
                (distance / mass_radius - (1 - rim_width)) / rim_width, 0, 1
            )
        else:
            body = np.full_like(parenchyma, tissue["solid"] * 0.9)
        parenchyma = parenchyma * (1 - mass) + body * texture * mass
        if tumour["necrotic"]:
            core = _soft_inside(distance - mass_radius * rng.uniform(0.35, 0.6), edge * 2)
            parenchyma = parenchyma * (1 - core) + tissue["core"] * texture * core
        return parenchyma, mass

    @staticmethod
    def _caption(attributes: dict[str, Any], has_tumour: bool) -> str:
        contrast = _CONTRAST_NAMES[attributes["contrast"]]
        if not has_tumour:
            finding = "no tumor, normal brain"
            if attributes["ventricle_scale"] > 1.35:
                finding += " with prominent ventricles"
            return f"axial {contrast} brain MRI, {finding}"
        details = []
        if attributes["enhancing"]:
            details.append("ring enhancement" if attributes["necrotic"] else "solid enhancement")
        elif attributes["necrotic"]:
            details.append("a necrotic core")
        if attributes["oedema"]:
            details.append("surrounding oedema")
        if attributes["mass_effect"]:
            details.append("mass effect")
        text = f"axial {contrast} brain MRI, {attributes['size']} {attributes['side']} {attributes['lobe']} tumor"
        return text + (" with " + ", ".join(details) if details else "")
