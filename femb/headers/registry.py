"""Head registry: ``build_header(name, embedding_size, num_classes, **hparams)`` and the list of names."""

from __future__ import annotations

import inspect
from typing import Any

from femb.errors import FembError
from femb.headers.adaface import AdaFace
from femb.headers.arcface import ArcFace
from femb.headers.base import MarginHead
from femb.headers.cosface import CosFace
from femb.headers.curricularface import CurricularFace
from femb.headers.elasticface import ElasticArcFace, ElasticCosFace
from femb.headers.magface import MagFace
from femb.headers.softmax import Softmax
from femb.headers.sphereface import SphereFace

# name -> (class, the arguments that make this variant; the user cannot override those)
_VARIANT_ARGS = ("plus",)
_HEADERS: dict[str, tuple[type[MarginHead], dict[str, Any]]] = {
    "softmax": (Softmax, {}),
    "sphereface": (SphereFace, {}),
    "cosface": (CosFace, {}),
    "arcface": (ArcFace, {}),
    "magface": (MagFace, {}),
    "elasticface-arc": (ElasticArcFace, {"plus": False}),
    "elasticface-cos": (ElasticCosFace, {"plus": False}),
    "elasticface-arc-plus": (ElasticArcFace, {"plus": True, "sigma": 0.0175}),
    "elasticface-cos-plus": (ElasticCosFace, {"plus": True, "sigma": 0.02}),
    "curricularface": (CurricularFace, {}),
    "adaface": (AdaFace, {}),
}

# Constructor arguments that are not hyper-parameters of a params file.
_NOT_HPARAMS = ("self", "embedding_size", "num_classes", "generator", *_VARIANT_ARGS)


def list_headers() -> list[str]:
    """Every head name build_header accepts, in the order of the registry."""
    return list(_HEADERS)


def _lookup(name: str) -> tuple[type[MarginHead], dict[str, Any]]:
    """The class and variant arguments of a head name, or a FembError listing the valid names."""
    if name not in _HEADERS:
        raise FembError(f"{name!r} is not a head; choose one of {', '.join(_HEADERS)}")
    return _HEADERS[name]


def header_defaults(name: str) -> dict[str, Any]:
    """The hyper-parameters a head takes and their defaults (papers' / official code's), e.g. for params.yaml."""
    cls, variant = _lookup(name)
    defaults = {
        key: param.default
        for key, param in inspect.signature(cls.__init__).parameters.items()
        if key not in _NOT_HPARAMS
    }
    defaults.update({key: value for key, value in variant.items() if key not in _VARIANT_ARGS})
    return defaults


def build_header(name: str, embedding_size: int, num_classes: int, **hparams: Any) -> MarginHead:
    """Build the named margin head; hparams override its defaults, unknown ones are refused."""
    cls, variant = _lookup(name)
    allowed = [*header_defaults(name), "generator"]
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise FembError(
            f"head {name}: unknown hyper-parameter {', '.join(unknown)}; it takes {', '.join(allowed[:-1]) or 'none'}"
        )
    return cls(embedding_size, num_classes, **{**variant, **hparams})
