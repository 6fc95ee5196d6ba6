"""Re-ranking (numpy/scipy only): `pipeline.rerank` runs a method's steps.

Modules: `pipeline` (methods, settings, `rerank`), `auto` (what 'auto' settings are for a
collection), `query_expansion` (α-QE, DBA), `diffusion`
(Iscen et al.'s diffusion), `graph` (its mutual kNN graph), `cg` (the block conjugate-gradient
solver), `product` (the threaded sparse product the solver iterates with).
"""

from cbir_tf.rerank.cg import CGInfo, conjugate_gradient
from cbir_tf.rerank.diffusion import diffusion_scores, truncated_diffusion
from cbir_tf.rerank.graph import knn_affinity, normalize_affinity
from cbir_tf.rerank.pipeline import METHODS, RerankSettings, rerank
from cbir_tf.rerank.query_expansion import alpha_query_expansion, database_side_augmentation

__all__ = [
    "METHODS",
    "CGInfo",
    "RerankSettings",
    "alpha_query_expansion",
    "conjugate_gradient",
    "database_side_augmentation",
    "diffusion_scores",
    "knn_affinity",
    "normalize_affinity",
    "rerank",
    "truncated_diffusion",
]
