"""Evaluation: InsightFace pair verification (accuracy, TAR@FAR, AUC, EER) on embeddings."""

from femb.evaluation.verification import evaluate_pairs, mean_embedding_norm, pair_distances, roc_curve

__all__ = ["evaluate_pairs", "mean_embedding_norm", "pair_distances", "roc_curve"]
