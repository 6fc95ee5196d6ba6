"""The images of a training run: training and validation sets, from folders or TFDS."""

from __future__ import annotations

import dataclasses

import numpy as np

from cbir_tf.data import folder
from cbir_tf.train import images as training
from cbir_tf.train import tuples
from cbir_tf.train.settings import Settings


@dataclasses.dataclass
class TrainingData:
    """Training and validation images of a run."""

    train: training.TrainingImages
    val: training.TrainingImages | None
    source: str
    val_source: str

    @property
    def skipped(self) -> list[tuple[str, str]]:
        """(image, reason) of the unreadable training and validation images."""
        val = list(self.val.skipped) if self.val is not None else []
        return list(self.train.skipped) + val


def _load_source(
    spec: str,
    load_size: int,
    min_per_class: int,
    min_classes: int,
    cache: str,
    tfds_data_dir: str | None,
    default_split: str,
) -> training.TrainingImages:
    parsed = training.parse_tfds_spec(spec)
    if parsed is not None:
        name, split = parsed
        return training.load_tfds(name, split or default_split, load_size, data_dir=tfds_data_dir)
    paths, labels, names = folder.list_labelled(
        spec, min_images_per_class=min_per_class, min_classes=min_classes
    )
    return training.images_from_paths(paths, labels, names, load_size, cache=cache, where=spec)


def load_training_data(
    train_data: str,
    val_data: str | None,
    settings: Settings,
    tfds_data_dir: str | None = None,
) -> TrainingData:
    """Lists and decodes the training (and validation) images of a run.

    Args:
      train_data: a labelled folder (one sub-folder per class) or `tfds:<name>[:<split>]`.
      val_data: the same for validation; None or '' holds out `settings.val_fraction` of the
        training images (stratified; none when the fraction is 0).
      settings: the run's settings (recipe, image size, cache, seed).
      tfds_data_dir: TFDS data folder (default TFDS's own).

    Returns:
      TrainingData.

    Raises:
      folder.CollectionError: fewer than two classes; with the metric recipe a class with a
        single image; a class whose images are all unreadable; a validation set without any
        class of two images.
    """
    load_size = training.load_size_for(settings.image_size)
    metric = settings.recipe == "metric"
    train = _load_source(
        train_data, load_size, 2 if metric else 1, 2, settings.cache, tfds_data_dir, "train"
    )
    if metric:
        tuples.check_tuple_labels(train.labels, settings.num_negatives)
    val_source = val_data or ""
    if val_data:
        val = _load_source(val_data, load_size, 1, 1, settings.cache, tfds_data_dir, "validation")
    elif settings.val_fraction > 0:
        tr_idx, va_idx = folder.split_indices(
            train.labels,
            settings.val_fraction,
            seed=settings.seed,
            min_train_per_class=2 if metric else 1,
            min_val_per_class=2,
        )
        val = train.subset(va_idx) if va_idx.size else None
        if val is not None:
            val.skipped = []  # the source's unreadable images are counted once, with train
        train = train.subset(tr_idx)
        val_source = f"{settings.val_fraction:g} of {train_data}"
    else:
        val = None
    if val is not None and np.bincount(val.labels).max(initial=0) < 2:
        raise folder.CollectionError(
            f"the validation set ({val_source}) has no class with two images: leave-one-out "
            "retrieval mAP needs a positive for each query"
        )
    return TrainingData(train, val, train_data, val_source)
