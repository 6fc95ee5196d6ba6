"""Training data: labelled images in memory or streamed, and the tf.data pipelines that feed them.

Sources are a labelled folder (`cbir_tf.data.folder.list_labelled`) or a TensorFlow Datasets
image-classification dataset named `tfds:<name>` (or `tfds:<name>:<split>`), downloaded by
TFDS itself on the user's machine. Images are decoded once, downscaled to `load_size` (a little
more than the training crop, so crops keep their detail) and kept in memory when they fit
("cache where memory allows"); otherwise they are streamed from disk and decoded each epoch.
Unreadable images are skipped and counted up front, so an epoch never stops half-way.

Augmentations live in `cbir_tf.train.augment`. Images leave the pipelines as
float32 RGB in 0..255: the models hold their own preprocessing.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import tensorflow as tf

from cbir_tf.data import folder
from cbir_tf.data.download import DatasetUnavailableError
from cbir_tf.train.augment import Augment, augment_image, center_crop

logger = logging.getLogger(__name__)

TFDS_PREFIX = "tfds:"
CACHE_MODES = ("auto", "memory", "none")


def eval_shape(height: int, width: int, size: int) -> tuple[int, int]:
    """(h, w) of an image of `height` x `width` resized so that its longest side is `size`."""
    factor = size / max(height, width)
    return max(int(round(height * factor)), 1), max(int(round(width * factor)), 1)


# --------------------------------------------------------------------------- image sources


@dataclasses.dataclass
class TrainingImages:
    """A labelled image collection ready for training.

    Attributes:
      ids: N names (file paths, or `<tfds name>/<split>/<i>`).
      labels: int64 [N] index into `class_names`.
      class_names: the classes.
      load_size: images are downscaled so that their longest side is at most this.
      images: N decoded uint8 [h, w, 3] arrays (in-memory cache), or None when streaming.
      paths: N file paths to decode on demand when `images` is None.
      skipped: (id, reason) of images left out because they could not be read.
    """

    ids: list[str]
    labels: np.ndarray
    class_names: list[str]
    load_size: int
    images: list[np.ndarray] | None = None
    paths: list[str] | None = None
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        if self.images is None and self.paths is None:
            raise ValueError("TrainingImages needs decoded images or paths")
        n = len(self.images) if self.images is not None else len(self.paths)
        if n != self.labels.size or n != len(self.ids):
            raise ValueError(f"{n} images but {self.labels.size} labels and {len(self.ids)} ids")

    def __len__(self) -> int:
        return int(self.labels.size)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def image(self, index: int) -> np.ndarray:
        """uint8 [h, w, 3] image `index` (decoded now when streaming)."""
        if self.images is not None:
            return self.images[index]
        return _decode(self.paths[index], self.load_size)

    def subset(self, indices: Sequence[int] | np.ndarray) -> TrainingImages:
        """The images at `indices` (sharing the decoded arrays)."""
        indices = np.asarray(indices, dtype=np.int64)
        return TrainingImages(
            ids=[self.ids[i] for i in indices],
            labels=self.labels[indices],
            class_names=list(self.class_names),
            load_size=self.load_size,
            images=None if self.images is None else [self.images[i] for i in indices],
            paths=None if self.paths is None else [self.paths[i] for i in indices],
            skipped=list(self.skipped),
        )


def load_size_for(image_size: int) -> int:
    """Longest side kept in memory for training crops of `image_size` (15% margin)."""
    return int(math.ceil(image_size * 1.15))


def _decode(path: str, load_size: int) -> np.ndarray:
    from cbir_tf.data import decode

    return decode.load_resized(path, load_size)


def _decode_or_reason(path: str, load_size: int) -> tuple[np.ndarray | None, str]:
    try:
        return _decode(path, load_size), ""
    except Exception as e:  # any failure to read the file means it is skipped
        return None, f"{type(e).__name__}: {e}"


def _available_memory() -> int:
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 4 << 30


def estimated_cache_bytes(num_images: int, load_size: int) -> int:
    """Memory of `num_images` decoded images of longest side `load_size` (4:3 on average)."""
    return int(num_images * load_size * load_size * 3 * 0.75)


def _resolve_cache(cache: str, num_images: int, load_size: int) -> bool:
    if cache not in CACHE_MODES:
        raise ValueError(f"unknown cache mode {cache!r}; valid: {', '.join(CACHE_MODES)}")
    if cache == "memory":
        return True
    if cache == "none":
        return False
    need = estimated_cache_bytes(num_images, load_size)
    # Half the free memory at most: the model, tf.data buffers and the OS need the rest.
    fits = need <= _available_memory() // 2
    if not fits:
        logger.info(
            "decoded images would take %.1f GiB: streaming them from disk instead", need / 2**30
        )
    return fits


def _drop_skipped(
    paths: list[str], labels: np.ndarray, class_names: list[str], ok: np.ndarray, where: str
) -> tuple[list[str], np.ndarray]:
    keep = np.flatnonzero(ok)
    if keep.size == 0:
        raise folder.CollectionError(f"none of the {len(paths)} images in {where} can be read")
    labels = labels[keep]
    lost = [class_names[c] for c in range(len(class_names)) if not (labels == c).any()]
    if lost:
        raise folder.CollectionError(
            f"every image of class(es) {', '.join(lost)} in {where} is unreadable"
        )
    return [paths[i] for i in keep], labels


def images_from_paths(
    paths: Sequence[str],
    labels: np.ndarray,
    class_names: list[str],
    load_size: int,
    cache: str = "auto",
    num_threads: int | None = None,
    where: str = "the training set",
) -> TrainingImages:
    """Decodes (or verifies, when streaming) labelled images, skipping and counting bad ones.

    Args:
      paths: N image files.
      labels: int [N] class of each.
      class_names: the classes.
      load_size: longest side kept after decoding (downscale only).
      cache: 'memory' keeps decoded images, 'none' streams them from disk each epoch, 'auto'
        keeps them when they take less than half the free memory.
      num_threads: decoding threads (default: CPUs, at most 8).
      where: name of the collection in messages.

    Returns:
      TrainingImages without the unreadable images; `skipped` lists them with the reason.

    Raises:
      CollectionError: nothing readable, or a class left without any readable image.
    """
    paths = list(paths)
    labels = np.asarray(labels, dtype=np.int64)
    num_threads = num_threads or min(8, os.cpu_count() or 1)
    if _resolve_cache(cache, len(paths), load_size):
        with ThreadPoolExecutor(max_workers=num_threads) as pool:
            results = list(pool.map(lambda p: _decode_or_reason(p, load_size), paths))
        ok = np.asarray([img is not None for img, _ in results], dtype=bool)
        skipped = [(p, r) for p, (img, r) in zip(paths, results, strict=True) if img is None]
        kept_paths, kept_labels = _drop_skipped(paths, labels, class_names, ok, where)
        images = [img for img, _ in results if img is not None]
        out = TrainingImages(kept_paths, kept_labels, class_names, load_size, images=images)
    else:
        ok, skipped = folder.verify_images(paths, num_threads)
        kept_paths, kept_labels = _drop_skipped(paths, labels, class_names, ok, where)
        out = TrainingImages(kept_paths, kept_labels, class_names, load_size, paths=kept_paths)
    out.skipped = skipped
    if skipped:
        logger.warning(
            "%s: %d of %d images cannot be read and are skipped (first: %s: %s)",
            where,
            len(skipped),
            len(paths),
            skipped[0][0],
            skipped[0][1],
        )
    return out


def parse_tfds_spec(spec: str) -> tuple[str, str | None] | None:
    """`tfds:<name>[:<split>]` -> (name, split or None); None when `spec` is not a TFDS name."""
    if not spec.startswith(TFDS_PREFIX):
        return None
    rest = spec[len(TFDS_PREFIX) :]
    name, _, split = rest.partition(":")
    if not name:
        raise ValueError(f"{spec!r}: expected tfds:<name> or tfds:<name>:<split>")
    return name, (split or None)


# Seconds to wait for a TFDS dataset's download host before calling the machine offline: TFDS
# itself retries an unreachable host for minutes before it fails with a raw network error.
TFDS_PROBE_TIMEOUT_S = 10.0
_TFDS_BY_HAND = (
    "without network access, prepare it on a machine that has one (pip install "
    "tensorflow-datasets; tfds build {name} --data_dir=DIR) and copy DIR/{name} to the TFDS "
    "data folder here, or point --tfds_data_dir (config train.tfds_data_dir) at a folder "
    "holding the prepared {name}"
)


def _tfds_prepared(builder) -> bool:
    is_prepared = getattr(builder, "is_prepared", None)
    if is_prepared is not None:
        return bool(is_prepared())
    return tf.io.gfile.exists(os.path.join(builder.data_dir, "dataset_info.json"))


def _check_tfds_reachable(name: str, builder) -> None:
    """Fails at once, saying what to do, when the dataset's first download host is unreachable.

    Raises:
      DatasetUnavailableError: no DNS answer or no connection within TFDS_PROBE_TIMEOUT_S.
    """
    method = getattr(type(builder), "download_and_prepare", None)
    if getattr(method, "__module__", "").startswith("tensorflow_datasets.testing"):
        return  # tfds.testing.mock_data: preparing is a no-op that needs no network
    try:
        urls = list(builder.url_infos or {})
    except Exception:  # noqa: BLE001 - TFDS versions differ; then TFDS reports for itself
        urls = []
    if not urls or urllib.request.getproxies():
        return  # nothing to probe, or a proxy does the connecting
    parsed = urllib.parse.urlsplit(urls[0])
    if not parsed.hostname:
        return
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((parsed.hostname, port), timeout=TFDS_PROBE_TIMEOUT_S).close()
    except OSError as e:
        reason = "no DNS answer" if isinstance(e, socket.gaierror) else (str(e) or type(e).__name__)
        raise DatasetUnavailableError(
            f"TFDS dataset {name} is not prepared in {builder.data_dir} and its files cannot be "
            f"downloaded ({parsed.hostname}: {reason}): {_TFDS_BY_HAND.format(name=name)}"
        ) from None


def load_tfds(
    name: str,
    split: str,
    load_size: int,
    data_dir: str | None = None,
    download: bool = True,
) -> TrainingImages:
    """Loads an image-classification dataset of TensorFlow Datasets into memory.

    Args:
      name: TFDS name, e.g. 'oxford_flowers102' (optionally with a version, 'name:1.2.0' is
        written 'name/1.2.0' by TFDS).
      split: TFDS split expression, e.g. 'train', 'validation', 'train[:90%]'.
      load_size: longest side kept (downscale only).
      data_dir: TFDS data folder (default: TFDS's own, ~/tensorflow_datasets).
      download: let TFDS download and prepare the dataset when missing.

    Returns:
      TrainingImages in memory; class names from the dataset's label feature.

    Raises:
      ImportError: tensorflow_datasets is not installed (pip install tensorflow-datasets).
      ValueError: the dataset has no (image, label) supervised keys.
      DatasetUnavailableError: the dataset is not prepared and cannot be downloaded (offline).
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:  # optional dependency: only TFDS sources need it
        raise ImportError(
            "tfds: sources need TensorFlow Datasets: pip install tensorflow-datasets "
            "(or pip install -e .[tfds])"
        ) from e
    from cbir_tf.data import decode

    builder = tfds.builder(name, data_dir=data_dir)
    supervised = builder.info.supervised_keys
    if not supervised or len(supervised) != 2:
        raise ValueError(
            f"TFDS dataset {name!r} has no (image, label) supervised keys; use an "
            "image-classification dataset"
        )
    image_key, label_key = supervised
    label_feature = builder.info.features[label_key]
    class_names = list(getattr(label_feature, "names", None) or [])
    if not _tfds_prepared(builder):
        if not download:
            raise DatasetUnavailableError(
                f"TFDS dataset {name} is not prepared in {builder.data_dir}: "
                f"{_TFDS_BY_HAND.format(name=name)}"
            )
        _check_tfds_reachable(name, builder)
        builder.download_and_prepare()
    ds = builder.as_dataset(split=split, as_supervised=True, shuffle_files=False)
    images: list[np.ndarray] = []
    labels: list[int] = []
    for image, label in ds.as_numpy_iterator():
        if image.ndim == 2:
            image = image[:, :, None]
        if image.shape[-1] == 1:
            image = np.repeat(image, 3, axis=-1)
        images.append(decode.resize_longest(np.ascontiguousarray(image[..., :3]), load_size))
        labels.append(int(label))
    if not images:
        raise folder.CollectionError(f"TFDS {name} split {split!r} holds no images")
    labels_arr = np.asarray(labels, dtype=np.int64)
    if not class_names:
        class_names = [str(c) for c in range(int(labels_arr.max()) + 1)]
    ids = [f"{name}/{split}/{i}" for i in range(len(images))]
    return TrainingImages(ids, labels_arr, class_names, load_size, images=images)


# --------------------------------------------------------------------------- tf.data pipelines


def _image_lookup(images: TrainingImages):
    def fetch(index):
        return images.image(int(index))

    def lookup(index: tf.Tensor) -> tf.Tensor:
        image = tf.py_function(fetch, [index], tf.uint8)
        return tf.ensure_shape(image, [None, None, 3])

    return lookup


def _seeds(seed: int) -> tf.data.Dataset:
    """Endless [2] int64 seeds, one per element, reproducible from `seed`."""
    return tf.data.Dataset.random(seed=seed).batch(2, drop_remainder=True)


def classification_dataset(
    images: TrainingImages,
    image_size: int,
    batch_size: int,
    augment: Augment | None,
    seed: int = 0,
    shuffle: bool = True,
    drop_remainder: bool = False,
) -> tf.data.Dataset:
    """One epoch of (image, label) batches for the classification-head recipe.

    Args:
      images: the training images.
      image_size: side of the square training crops.
      batch_size: images per batch.
      augment: augmentation settings; None gives centre crops (validation).
      seed: seeds the shuffle and the augmentations (change it per epoch).
      shuffle: shuffle the order of images.
      drop_remainder: drop the last incomplete batch.

    Returns:
      tf.data.Dataset of (float32 [B, S, S, 3] in 0..255, int64 [B]).
    """
    n = len(images)
    order = np.arange(n, dtype=np.int64)
    if shuffle:
        # A full permutation from numpy is exact and cheap, unlike a bounded shuffle buffer.
        order = np.random.default_rng(seed).permutation(n)
    labels = images.labels
    lookup = _image_lookup(images)

    def load(index, element_seed):
        image = lookup(index)
        if augment is None:
            x = center_crop(image, image_size)
        else:
            x = augment_image(image, image_size, element_seed, augment)
        return x, tf.gather(labels, index)

    ds = tf.data.Dataset.zip(tf.data.Dataset.from_tensor_slices(order), _seeds(seed))
    ds = ds.map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch_size, drop_remainder=drop_remainder).prefetch(tf.data.AUTOTUNE)


def tuple_dataset(
    images: TrainingImages,
    tuples: np.ndarray,
    image_size: int,
    batch_size: int,
    augment: Augment | None,
    seed: int = 0,
) -> tf.data.Dataset:
    """One epoch of training tuples for the metric recipe.

    Args:
      images: the training images.
      tuples: int [Q, T] indices into `images`: query, positive, negatives (see
        `cbir_tf.train.tuples.EpochTuples.as_array`).
      image_size: side of the square crops.
      batch_size: tuples per batch.
      augment: augmentation settings, or None for centre crops.
      seed: seeds the order and the augmentations.

    Returns:
      tf.data.Dataset of (float32 [B, T, S, S, 3] in 0..255, float32 [B] zeros: the tuple
      layout carries the labels, Keras wants a target).
    """
    tuples = np.asarray(tuples, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(tuples.shape[0])
    tuples = tuples[order]
    lookup = _image_lookup(images)
    width = tuples.shape[1]

    def load_one(index, element_seed):
        image = lookup(index)
        if augment is None:
            return center_crop(image, image_size)
        return augment_image(image, image_size, element_seed, augment)

    # Tuples are flattened to images so every image gets its own parallel decode/augment.
    ds = tf.data.Dataset.zip(tf.data.Dataset.from_tensor_slices(tuples.reshape(-1)), _seeds(seed))
    ds = ds.map(load_one, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.batch(width, drop_remainder=True)
    ds = ds.map(lambda x: (x, tf.zeros([], tf.float32)))
    return ds.batch(batch_size).prefetch(tf.data.AUTOTUNE)


def eval_batches(
    images: TrainingImages,
    indices: Sequence[int] | np.ndarray,
    image_size: int,
    batch_size: int,
    stream_chunk: int = 512,
) -> Iterator[tuple[np.ndarray, tf.Tensor]]:
    """Batches for describing whole images, longest side `image_size` (as extraction does).

    Images of equal resized shape are grouped, so batches need neither padding nor crops.
    Streamed images are decoded `stream_chunk` at a time (in parallel threads), so memory stays
    bounded whatever the number of images.

    Args:
      images: the images.
      indices: int [M] which images to describe.
      image_size: longest side.
      batch_size: images per batch at most.
      stream_chunk: images decoded at once when streaming.

    Yields:
      (positions int64 [b] into `indices`, float32 [b, h, w, 3] in 0..255).
    """
    indices = np.asarray(indices, dtype=np.int64)
    if images.in_memory:
        yield from _grouped_batches(
            images.images, indices, np.arange(indices.size), image_size, batch_size
        )
        return
    step = max(int(stream_chunk), int(batch_size))
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        for start in range(0, indices.size, step):
            positions = np.arange(start, min(start + step, indices.size))
            decoded = list(pool.map(lambda i: images.image(int(i)), indices[positions]))
            yield from _grouped_batches(
                decoded, np.arange(positions.size), positions, image_size, batch_size
            )


def _grouped_batches(pixels, keys, positions, image_size, batch_size):
    """Batches of `pixels[keys[j]]` grouped by resized shape; yields (positions[j...], batch)."""
    groups: dict[tuple[int, int], list[int]] = {}
    for j, key in enumerate(keys):
        shape = eval_shape(*pixels[int(key)].shape[:2], image_size)
        groups.setdefault(shape, []).append(j)
    for shape, members in groups.items():
        for start in range(0, len(members), batch_size):
            chunk = members[start : start + batch_size]
            # Resize to the group's shape computed once in Python, so members always stack.
            batch = [
                tf.image.resize(tf.cast(pixels[int(keys[j])], tf.float32), shape, antialias=True)
                for j in chunk
            ]
            yield np.asarray(positions[chunk], dtype=np.int64), tf.stack(batch)
