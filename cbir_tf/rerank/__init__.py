"""Re-ranking: query expansion (alphaQE, AQE, DBA) and diffusion (numpy/scipy only)."""

from cbir_tf.rerank.diffusion import (
    CGInfo,
    OfflineDiffusion,
    conjugate_gradient,
    diffusion_scores,
    knn_affinity,
    normalize_affinity,
    truncated_diffusion,
)
from cbir_tf.rerank.query_expansion import (
    alpha_query_expansion,
    average_query_expansion,
    database_side_augmentation,
)

__all__ = [
    "CGInfo",
    "OfflineDiffusion",
    "alpha_query_expansion",
    "average_query_expansion",
    "conjugate_gradient",
    "database_side_augmentation",
    "diffusion_scores",
    "knn_affinity",
    "normalize_affinity",
    "truncated_diffusion",
]
