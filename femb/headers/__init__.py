"""Margin heads for face recognition: softmax, SphereFace, CosFace, ArcFace, MagFace, ElasticFace, CurricularFace, AdaFace."""

from femb.headers.adaface import AdaFace
from femb.headers.arcface import ArcFace, arc_margin
from femb.headers.base import MarginHead
from femb.headers.cosface import CosFace
from femb.headers.curricularface import CurricularFace
from femb.headers.elasticface import ElasticArcFace, ElasticCosFace
from femb.headers.magface import MagFace, min_lambda_g
from femb.headers.registry import build_header, header_defaults, list_headers
from femb.headers.softmax import Softmax
from femb.headers.sphereface import SphereFace

__all__ = [
    "AdaFace",
    "ArcFace",
    "CosFace",
    "CurricularFace",
    "ElasticArcFace",
    "ElasticCosFace",
    "MagFace",
    "MarginHead",
    "Softmax",
    "SphereFace",
    "arc_margin",
    "build_header",
    "header_defaults",
    "list_headers",
    "min_lambda_g",
]
