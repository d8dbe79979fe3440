"""Face backbones with InsightFace arcface_torch module names, built by name through a registry."""

from femb.backbones.iresnet import IRESNET_LAYERS, IBasicBlock, IResNet
from femb.backbones.mobilefacenet import MobileFaceNet
from femb.backbones.registry import ALIASES, canonical_backbone_name, create_backbone, list_backbones
from femb.backbones.vit import VIT_LAYOUTS, VisionTransformer

__all__ = [
    "ALIASES",
    "IRESNET_LAYERS",
    "IBasicBlock",
    "IResNet",
    "MobileFaceNet",
    "VIT_LAYOUTS",
    "VisionTransformer",
    "canonical_backbone_name",
    "create_backbone",
    "list_backbones",
]
