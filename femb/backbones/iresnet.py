"""IResNet (Deng et al., ArcFace, CVPR 2019; Duta et al. 2020) with InsightFace arcface_torch names.

Module names, parameter shapes, initialisation and forward order follow arcface_torch
`backbones/iresnet.py`, so an official `backbone.pth` loads with `strict=True` and no renaming.
Unlike the official file there is no autocast inside the model and no module-level switch: mixed
precision belongs to the caller (torch.autocast / Lightning precision), checkpointing to a constructor
argument.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

# Blocks per stage of each depth, as in arcface_torch.
IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
    "iresnet200": (6, 26, 60, 6),
}
STAGE_WIDTHS = (64, 128, 256, 512)
BN_EPS = 1e-5  # arcface_torch passes eps=1e-05 to every BatchNorm
FC_SCALE = 7 * 7  # spatial size after four stride-2 stages on a 112x112 input
TINY_WIDTHS = (16, 32, 64, 128)


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


class IBasicBlock(nn.Module):
    """Improved residual block: BN-conv3x3-BN-PReLU-conv3x3(stride)-BN, plus the (projected) input."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=BN_EPS)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        out += identity
        return out


@contextmanager
def _batchnorm_stats_kept(module: nn.Module) -> Iterator[None]:
    """Restore the BatchNorm running statistics of `module` on exit.

    Checkpointing recomputes a block's forward in training mode during backward; without this the
    recomputation would update every running mean/var a second time per step.
    """
    saved = [
        (m, m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone())
        for m in module.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for m, mean, var, count in saved:
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(count)


def _checkpoint_contexts(block: nn.Module) -> tuple[AbstractContextManager, AbstractContextManager]:
    return nullcontext(), _batchnorm_stats_kept(block)


class IResNet(nn.Module):
    """IResNet face backbone: 112x112 RGB in, `num_features`-d embedding out (arcface_torch layout)."""

    def __init__(
        self,
        layers: Sequence[int],
        num_features: int = 512,
        dropout: float = 0.0,
        zero_init_residual: bool = False,
        gradient_checkpointing: bool = False,
        widths: Sequence[int] = STAGE_WIDTHS,
        stem_stride: int = 1,
        input_size: int = 112,
    ):
        super().__init__()
        if len(layers) != 4 or any(n < 1 for n in layers):
            raise ValueError(f"layers must be four positive block counts, got {tuple(layers)}")
        if len(widths) != 4 or any(w < 1 for w in widths):
            raise ValueError(f"widths must be four positive channel counts, got {tuple(widths)}")
        if stem_stride not in (1, 2):
            raise ValueError(f"stem_stride must be 1 or 2, got {stem_stride}")
        self.gradient_checkpointing = gradient_checkpointing
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=stem_stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0], eps=BN_EPS)
        self.prelu = nn.PReLU(widths[0])
        inplanes = widths[0]
        for index, (planes, blocks) in enumerate(zip(widths, layers), start=1):
            setattr(self, f"layer{index}", self._make_stage(inplanes, planes, blocks))
            inplanes = planes
        side = -(-input_size // stem_stride)
        for _ in range(4):
            side = -(-side // 2)  # each stage's 3x3 stride-2 convolution (padding 1) rounds up
        self.bn2 = nn.BatchNorm2d(widths[-1], eps=BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(widths[-1] * side * side, num_features)
        self.features = nn.BatchNorm1d(num_features, eps=BN_EPS)
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False  # the embedding BN only shifts, as in arcface_torch

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0, 0.1)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if zero_init_residual:
            for m in self.modules():
                if isinstance(m, IBasicBlock):
                    nn.init.constant_(m.bn2.weight, 0)  # bn2, as arcface_torch does

    @staticmethod
    def _make_stage(inplanes: int, planes: int, blocks: int) -> nn.Sequential:
        # The first block of every stage halves the resolution, so it always needs a projection.
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes, kernel_size=1, stride=2, bias=False),
            nn.BatchNorm2d(planes, eps=BN_EPS),
        )
        stage = [IBasicBlock(inplanes, planes, stride=2, downsample=downsample)]
        stage += [IBasicBlock(planes, planes) for _ in range(1, blocks)]
        return nn.Sequential(*stage)

    def _run_stage(self, stage: nn.Sequential, x: Tensor) -> Tensor:
        if not (self.gradient_checkpointing and self.training and torch.is_grad_enabled()):
            return stage(x)
        for block in stage:
            if torch.compiler.is_compiling():
                # Dynamo accepts no custom context_fn; running stats then see the recomputation too.
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = checkpoint(block, x, use_reentrant=False, context_fn=partial(_checkpoint_contexts, block))
        return x

    def forward(self, x: Tensor) -> Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            x = self._run_stage(stage, x)
        x = self.bn2(x)
        x = torch.flatten(x, 1)
        x = self.dropout(x)
        x = self.fc(x)
        return self.features(x)


def iresnet18(
    num_features: int = 512,
    dropout: float = 0.0,
    zero_init_residual: bool = False,
    gradient_checkpointing: bool = False,
) -> IResNet:
    """IResNet-18: blocks per stage (2, 2, 2, 2)."""
    layers = IRESNET_LAYERS["iresnet18"]
    return IResNet(layers, num_features, dropout, zero_init_residual, gradient_checkpointing)


def iresnet34(
    num_features: int = 512,
    dropout: float = 0.0,
    zero_init_residual: bool = False,
    gradient_checkpointing: bool = False,
) -> IResNet:
    """IResNet-34: blocks per stage (3, 4, 6, 3)."""
    layers = IRESNET_LAYERS["iresnet34"]
    return IResNet(layers, num_features, dropout, zero_init_residual, gradient_checkpointing)


def iresnet50(
    num_features: int = 512,
    dropout: float = 0.0,
    zero_init_residual: bool = False,
    gradient_checkpointing: bool = False,
) -> IResNet:
    """IResNet-50: blocks per stage (3, 4, 14, 3)."""
    layers = IRESNET_LAYERS["iresnet50"]
    return IResNet(layers, num_features, dropout, zero_init_residual, gradient_checkpointing)


def iresnet100(
    num_features: int = 512,
    dropout: float = 0.0,
    zero_init_residual: bool = False,
    gradient_checkpointing: bool = False,
) -> IResNet:
    """IResNet-100: blocks per stage (3, 13, 30, 3)."""
    layers = IRESNET_LAYERS["iresnet100"]
    return IResNet(layers, num_features, dropout, zero_init_residual, gradient_checkpointing)


def iresnet200(
    num_features: int = 512,
    dropout: float = 0.0,
    zero_init_residual: bool = False,
    gradient_checkpointing: bool = False,
) -> IResNet:
    """IResNet-200: blocks per stage (6, 26, 60, 6)."""
    layers = IRESNET_LAYERS["iresnet200"]
    return IResNet(layers, num_features, dropout, zero_init_residual, gradient_checkpointing)


def iresnet_tiny(
    num_features: int = 512,
    dropout: float = 0.0,
    zero_init_residual: bool = False,
    gradient_checkpointing: bool = False,
) -> IResNet:
    """A CPU-sized IResNet for demos and tests: one block per stage, widths (16, 32, 64, 128), stride-2 stem.

    Same blocks and names as the official depths, about 1/60 of IResNet-18's multiply-adds; not a
    published architecture, so official checkpoints never match it.
    """
    return IResNet(
        (1, 1, 1, 1),
        num_features,
        dropout,
        zero_init_residual,
        gradient_checkpointing,
        widths=TINY_WIDTHS,
        stem_stride=2,
    )
