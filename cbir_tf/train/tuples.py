"""Training tuples for metric learning: (query, positive, hard negatives), re-mined each epoch.

Follows the reference method (Radenovic et al., "Fine-tuning CNN image retrieval with no human
annotation", TPAMI 2018; cnnimageretrieval-pytorch `datasets/traindataset.py`,
`TuplesDataset.create_epoch_tuples`): every epoch draws fresh queries, describes them and a
random pool of images with the *current* network, and gives each query the pool images closest
to it among those of other classes, at most one image per class, so that the negatives of a
tuple are hard *and* diverse (near-duplicates of a single hard class would dominate otherwise).

Labels here are class ids of a labelled collection: positives are other images of the query's
class and negatives are images of any other class.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EpochTuples:
    """The tuples of one epoch, as indices into the training collection.

    Attributes:
      queries: int64 [Q].
      positives: int64 [Q], same class as the query, never the query itself.
      negatives: int64 [Q, K], classes all different from each other and from the query's.
      mean_negative_distance: mean Euclidean distance from each query to its negatives
        (the reference prints it: it shrinks as mining finds harder negatives).
    """

    queries: np.ndarray
    positives: np.ndarray
    negatives: np.ndarray
    mean_negative_distance: float

    def __len__(self) -> int:
        return int(self.queries.shape[0])

    def as_array(self) -> np.ndarray:
        """int64 [Q, 2 + K]: per tuple, query, positive, then the negatives."""
        return np.concatenate(
            [self.queries[:, None], self.positives[:, None], self.negatives], axis=1
        )


def check_tuple_labels(labels: np.ndarray, num_negatives: int) -> None:
    """Checks that tuples with `num_negatives` negatives can be built from `labels`.

    Raises:
      ValueError: no class has two images (no positive possible), or fewer than
        num_negatives + 1 classes (at most one negative per class).
    """
    labels = np.asarray(labels)
    classes, counts = np.unique(labels, return_counts=True)
    if num_negatives < 1:
        raise ValueError(f"num_negatives must be >= 1, got {num_negatives}")
    if not (counts >= 2).any():
        raise ValueError("metric learning needs classes with at least two images (no positive)")
    if classes.size < num_negatives + 1:
        raise ValueError(
            f"num_negatives={num_negatives} needs at least {num_negatives + 1} classes (at most "
            f"one negative per class, none from the query's class); the training set has "
            f"{classes.size}. Lower --config.train.num_negatives."
        )


def sample_query_positive_pairs(
    labels: np.ndarray, num_queries: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draws queries uniformly among images of classes with >= 2 images, each with a positive.

    Args:
      labels: int [N] class of each training image.
      num_queries: tuples wanted; capped at the number of eligible images (no query repeats).
      rng: random generator.

    Returns:
      (queries, positives): int64 [Q] each; positives[i] != queries[i], same class.
    """
    labels = np.asarray(labels, dtype=np.int64)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    eligible = np.flatnonzero(counts[inverse] >= 2)
    if eligible.size == 0:
        raise ValueError("no class has two images: no positive can be drawn")
    num = min(int(num_queries), eligible.size)
    queries = rng.choice(eligible, size=num, replace=False).astype(np.int64)
    # Members of each class are a contiguous run of `order`; a positive is a uniformly drawn
    # other member: draw one of the size - 1 other slots and step over the query's own slot.
    order = np.argsort(labels, kind="stable")
    slot_of = np.empty_like(order)
    slot_of[order] = np.arange(order.size)
    starts = np.searchsorted(labels[order], labels[queries], side="left")
    sizes = counts[inverse[queries]]
    offsets = np.minimum((rng.random(num) * (sizes - 1)).astype(np.int64), sizes - 2)
    offsets += offsets >= slot_of[queries] - starts
    positives = order[starts + offsets]
    return queries, positives.astype(np.int64)


def mine_hard_negatives(
    query_descriptors: np.ndarray,
    query_labels: np.ndarray,
    pool_descriptors: np.ndarray,
    pool_labels: np.ndarray,
    num_negatives: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Hardest pool images of other classes, at most one per class, for each query.

    Equivalent to the reference's walk down each query's ranking of the pool, taking an image
    when its class is neither the query's nor one already taken: the first image met of a
    class is that class's most similar one, and classes are met in order of that similarity.
    Here that is computed for all queries at once as a per-class maximum.

    Args:
      query_descriptors: float [Q, D], L2-normalised.
      query_labels: int [Q].
      pool_descriptors: float [P, D], L2-normalised.
      pool_labels: int [P].
      num_negatives: K.

    Returns:
      (negatives, similarities): int64 [Q, K] indices into the pool, hardest first, and the
      float32 [Q, K] cosine similarities.

    Raises:
      ValueError: the pool holds fewer than K classes besides some query's class.
    """
    q = np.asarray(query_descriptors, dtype=np.float32)
    p = np.asarray(pool_descriptors, dtype=np.float32)
    query_labels = np.asarray(query_labels, dtype=np.int64)
    pool_labels = np.asarray(pool_labels, dtype=np.int64)
    k = int(num_negatives)
    scores = q @ p.T  # [Q, P]
    # Sort pool columns by class so that each class is a contiguous run of columns.
    order = np.argsort(pool_labels, kind="stable")
    sorted_labels = pool_labels[order]
    classes, starts = np.unique(sorted_labels, return_index=True)
    sorted_scores = scores[:, order]
    class_best = np.maximum.reduceat(sorted_scores, starts, axis=1)  # [Q, C]
    class_of_query = np.searchsorted(classes, query_labels)
    in_pool = (class_of_query < classes.size) & (
        classes[np.minimum(class_of_query, classes.size - 1)] == query_labels
    )
    rows = np.flatnonzero(in_pool)
    class_best[rows, class_of_query[rows]] = -np.inf
    available = classes.size - in_pool.astype(np.int64)
    if (available < k).any():
        raise ValueError(
            f"the mining pool holds {int(available.min())} classes besides a query's own, fewer "
            f"than num_negatives={k}; raise pool_size or lower num_negatives"
        )
    top_classes = np.argsort(-class_best, axis=1, kind="stable")[:, :k]  # [Q, K]
    # Within each chosen class, the column of its best-scoring member.
    ends = np.append(starts[1:], order.size)
    negatives = np.empty(top_classes.shape, dtype=np.int64)
    for c in range(classes.size):  # loop over classes only; queries are vectorised
        hit = top_classes == c
        if not hit.any():
            continue
        qi = np.nonzero(hit)[0]
        within = np.argmax(sorted_scores[qi, starts[c] : ends[c]], axis=1)
        negatives[hit] = order[starts[c] + within]
    similarities = np.take_along_axis(scores, negatives, axis=1).astype(np.float32)
    return negatives, similarities


def create_epoch_tuples(
    labels: np.ndarray,
    describe: Callable[[np.ndarray], np.ndarray],
    num_queries: int,
    pool_size: int,
    num_negatives: int,
    rng: np.random.Generator,
) -> EpochTuples:
    """Draws this epoch's queries and positives and mines their hard negatives.

    Args:
      labels: int [N] class of each training image.
      describe: maps int64 [M] image indices to float32 [M, D] L2-normalised descriptors
        computed with the current network (inference mode).
      num_queries: tuples per epoch (capped at the eligible images).
      pool_size: random images described as negative candidates (all when >= N).
      num_negatives: K negatives per tuple.
      rng: random generator (seed it for reproducible epochs).

    Returns:
      EpochTuples with indices into `labels`.
    """
    labels = np.asarray(labels, dtype=np.int64)
    check_tuple_labels(labels, num_negatives)
    queries, positives = sample_query_positive_pairs(labels, num_queries, rng)
    n = labels.size
    if pool_size >= n:
        pool = np.arange(n, dtype=np.int64)
    else:
        pool = np.sort(rng.choice(n, size=int(pool_size), replace=False)).astype(np.int64)
    # Describe each image once even when it is both a query and in the pool.
    needed, inverse = np.unique(np.concatenate([queries, pool]), return_inverse=True)
    desc = np.asarray(describe(needed), dtype=np.float32)
    if desc.shape[0] != needed.size:
        raise ValueError(f"describe returned {desc.shape[0]} rows for {needed.size} images")
    q_desc = desc[inverse[: queries.size]]
    p_desc = desc[inverse[queries.size :]]
    neg_in_pool, sims = mine_hard_negatives(
        q_desc, labels[queries], p_desc, labels[pool], num_negatives
    )
    negatives = pool[neg_in_pool]
    # ||a - b|| of unit vectors from their cosine.
    mean_dist = float(np.mean(np.sqrt(np.maximum(2.0 - 2.0 * sims, 0.0)))) if sims.size else 0.0
    return EpochTuples(queries, positives, negatives, mean_dist)
