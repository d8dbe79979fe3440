"""femb: train, evaluate and ship face-embedding models from InsightFace datasets."""

__version__ = "0.1.0"
