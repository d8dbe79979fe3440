"""MobileFaceNet (Chen et al., CCBR 2018) with the InsightFace arcface_torch `mbf` module names.

Module names, shapes, group counts and initialisation follow arcface_torch
`backbones/mobilefacenet.py` (itself from cavaface), so its `mbf` / `mbf_large` state dicts load
with `strict=True`. No autocast inside the model: precision is the caller's choice.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

MBF_BLOCKS = (1, 4, 6, 2)
MBF_SCALE = 2
MBF_LARGE_BLOCKS = (2, 8, 12, 4)
MBF_LARGE_SCALE = 4

_Pair = tuple[int, int]


class ConvBlock(nn.Module):
    """Conv (no bias) -> BatchNorm -> PReLU, or without the PReLU (`activation=False`)."""

    def __init__(
        self,
        in_c: int,
        out_c: int,
        kernel: _Pair = (1, 1),
        stride: _Pair = (1, 1),
        padding: _Pair = (0, 0),
        groups: int = 1,
        activation: bool = True,
    ):
        super().__init__()
        layers: list[nn.Module] = [
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
        ]
        if activation:
            layers.append(nn.PReLU(out_c))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class LinearBlock(ConvBlock):
    """Conv (no bias) -> BatchNorm, no activation (the linear bottleneck)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs, activation=False)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to `groups` channels, depthwise conv, 1x1 linear projection."""

    def __init__(
        self,
        in_c: int,
        out_c: int,
        residual: bool = False,
        kernel: _Pair = (3, 3),
        stride: _Pair = (2, 2),
        padding: _Pair = (1, 1),
        groups: int = 1,
    ):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, groups),
            ConvBlock(groups, groups, kernel, stride, padding, groups=groups),
            LinearBlock(groups, out_c),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """`num_block` residual DepthWise blocks at constant width and resolution."""

    def __init__(self, c: int, num_block: int, groups: int):
        super().__init__()
        self.layers = nn.Sequential(
            *(DepthWise(c, c, True, (3, 3), (1, 1), (1, 1), groups) for _ in range(num_block))
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise convolution (7x7 over the 7x7 map), then a linear embedding and BatchNorm1d."""

    def __init__(self, embedding_size: int):
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(512, 512, kernel=(7, 7), groups=512),
            nn.Flatten(),
            nn.Linear(512, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class MobileFaceNet(nn.Module):
    """MobileFaceNet: 112x112 RGB in, `num_features`-d embedding out (arcface_torch `mbf` layout)."""

    def __init__(self, num_features: int = 512, blocks: Sequence[int] = MBF_BLOCKS, scale: int = MBF_SCALE):
        super().__init__()
        if len(blocks) != 4 or any(n < 1 for n in blocks) or scale < 1:
            raise ValueError(f"blocks must be four positive counts and scale positive, got {blocks}, {scale}")
        c1, c2 = 64 * scale, 128 * scale
        stem = (
            ConvBlock(c1, c1, (3, 3), (1, 1), (1, 1), groups=64)
            if blocks[0] == 1
            else Residual(c1, blocks[0], groups=128)
        )
        # Expansion widths (groups) are absolute in arcface_torch, not multiplied by `scale`.
        self.layers = nn.ModuleList(
            [
                ConvBlock(3, c1, (3, 3), (2, 2), (1, 1)),
                stem,
                DepthWise(c1, c1, False, (3, 3), (2, 2), (1, 1), groups=128),
                Residual(c1, blocks[1], groups=128),
                DepthWise(c1, c2, False, (3, 3), (2, 2), (1, 1), groups=256),
                Residual(c2, blocks[2], groups=256),
                DepthWise(c2, c2, False, (3, 3), (2, 2), (1, 1), groups=512),
                Residual(c2, blocks[3], groups=256),
            ]
        )
        self.conv_sep = ConvBlock(c2, 512)
        self.features = GDC(num_features)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.features(self.conv_sep(x))


def mobilefacenet(
    num_features: int = 512, blocks: Sequence[int] = MBF_BLOCKS, scale: int = MBF_SCALE
) -> MobileFaceNet:
    """MobileFaceNet as arcface_torch `mbf`: blocks (1, 4, 6, 2), width scale 2."""
    return MobileFaceNet(num_features, blocks, scale)


def mobilefacenet_large(
    num_features: int = 512, blocks: Sequence[int] = MBF_LARGE_BLOCKS, scale: int = MBF_LARGE_SCALE
) -> MobileFaceNet:
    """MobileFaceNet as arcface_torch `mbf_large`: blocks (2, 8, 12, 4), width scale 4."""
    return MobileFaceNet(num_features, blocks, scale)
