"""Own image collections on disk: plain folders of images and labelled folders (one per class).

`list_images` lists any folder tree of images (the database of an own collection);
`list_labelled` reads a training collection laid out as `<root>/<class>/**/<image>`, the
layout of Keras' `image_dataset_from_directory` and of most landmark dumps. Neither reads
pixels: `verify_images` decodes each file once (at reduced scale) so that unreadable files
are skipped and counted before training starts instead of failing in the middle of an epoch.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS: tuple[str, ...] = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)


class CollectionError(ValueError):
    """A folder cannot serve as the requested collection (too few classes, images, ...)."""


class LabelledImages(NamedTuple):
    """A labelled collection; unpacks as `(paths, labels, class_names)`.

    Attributes:
      paths: N image paths, `os.path.join(root, <class>/<relative path>)`, sorted by class
        then by relative path.
      labels: int64 [N], index into `class_names`.
      class_names: sorted names of the class sub-folders that hold at least one image.
    """

    paths: list[str]
    labels: np.ndarray
    class_names: list[str]


def _normalise_extensions(extensions: Iterable[str]) -> tuple[str, ...]:
    exts = tuple(("." + e.lstrip(".")).lower() for e in extensions)
    if not exts:
        raise ValueError("extensions must name at least one file extension")
    return exts


def _check_dir(root: str | os.PathLike, what: str) -> str:
    root = os.fspath(root)
    if not os.path.exists(root):
        raise FileNotFoundError(f"{what} {root!r} does not exist")
    if not os.path.isdir(root):
        raise NotADirectoryError(f"{what} {root!r} is not a folder")
    return root


def list_images(
    root: str | os.PathLike,
    recursive: bool = True,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
) -> list[str]:
    """Lists the image files under `root`.

    Hidden files and folders (name starting with '.') are skipped: they are editor, OS or
    tool artefacts (`.DS_Store`, `.ipynb_checkpoints`, our own `.lock`), never images.
    Symbolic links to folders are not followed, so a link cycle cannot loop forever.

    Args:
      root: folder to scan: local, or on any filesystem tf.io.gfile reads (gs://...).
      recursive: descend into sub-folders.
      extensions: accepted file extensions, compared case-insensitively ('.JPG' matches).

    Returns:
      Sorted relative paths with '/' separators (stable ids across operating systems).

    Raises:
      FileNotFoundError / NotADirectoryError: `root` is missing or not a folder.
    """
    exts = _normalise_extensions(extensions)
    if "://" in os.fspath(root):
        from cbir_tf import remote  # imports TensorFlow: only for another filesystem

        if remote.is_remote(root):
            return remote.list_images(os.fspath(root), recursive, exts)
    root = _check_dir(root, "image folder")
    found: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = os.path.relpath(dirpath, root)
        for name in filenames:
            if name.startswith(".") or not name.lower().endswith(exts):
                continue
            rel = name if rel_dir == "." else os.path.join(rel_dir, name)
            found.append(rel.replace(os.sep, "/"))
        if not recursive:
            break
    return sorted(found)


def read_image_list(path: str | os.PathLike) -> list[str]:
    """The image paths a list file names, one per line (`extract.py --images=LIST.txt`).

    Blank lines and lines starting with '#' are skipped; a relative path is relative to the list
    file's folder (a path with a scheme, gs://..., is kept as it is). Files that do not exist are
    kept: indexing records them as unreadable, reported and counted.

    Args:
      path: a UTF-8 text file, local or on any filesystem tf.io.gfile reads.

    Returns:
      Absolute paths (or URLs), in the list's order.

    Raises:
      ValueError: the file is not UTF-8 text, names no path, names one twice, or names only
        local files none of which exists (not a list of images).
    """
    path = os.fspath(path)
    remote_list = "://" in path
    if remote_list:
        from cbir_tf import remote

        try:
            raw = remote.read_image_file(path).getvalue()
        except remote.RemoteFileError as e:
            raise FileNotFoundError(f"{path}: {e.reason}") from None
    else:
        with open(path, "rb") as f:
            raw = f.read()
    try:
        lines = raw.decode("utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not a UTF-8 text list of image paths ({e.reason})") from None
    base = path.rsplit("/", 1)[0] if remote_list else os.path.dirname(os.path.abspath(path))
    out, seen = [], {}
    for number, line in enumerate(lines, start=1):
        entry = line.strip()
        if not entry or entry.startswith("#"):
            continue
        if "://" not in entry:
            entry = os.path.expanduser(entry)
            if not os.path.isabs(entry):
                entry = f"{base}/{entry}" if remote_list else os.path.join(base, entry)
            entry = entry if remote_list else os.path.normpath(entry)
        if entry in seen:
            raise ValueError(
                f"{path}:{number}: {line.strip()!r} is listed twice (line {seen[entry]})"
            )
        seen[entry] = number
        out.append(entry)
    if not out:
        raise ValueError(f"{path}: the list names no image path (one path per line)")
    local = not remote_list and all("://" not in p for p in out)
    if local and not any(os.path.exists(p) for p in out):  # not a list of images: say so now
        raise ValueError(
            f"{path}: none of the {len(out)} paths it lists exists (first: {out[0]}); "
            "a list file names one image file per line"
        )
    return out


def list_labelled(
    root: str | os.PathLike,
    extensions: Iterable[str] = IMAGE_EXTENSIONS,
    min_images_per_class: int = 1,
    min_classes: int = 2,
) -> LabelledImages:
    """Lists a labelled collection: one sub-folder per class, images anywhere below it.

    Class folders without any image are left out (with a warning); images lying directly in
    `root` belong to no class and are ignored (with a warning).

    Args:
      root: the collection folder.
      extensions: accepted image extensions.
      min_images_per_class: every class needs at least this many images (metric learning
        needs 2: a query and a positive).
      min_classes: at least this many classes are required (a classifier or a
        negative needs another class).

    Returns:
      LabelledImages(paths, labels int64 [N], class_names).

    Raises:
      FileNotFoundError / NotADirectoryError: `root` is missing or not a folder.
      CollectionError: fewer than `min_classes` classes, or classes below
        `min_images_per_class` (all of them named).
    """
    root = _check_dir(root, "training folder")
    exts = _normalise_extensions(extensions)
    subdirs = sorted(
        e.name
        for e in os.scandir(root)
        if e.is_dir(follow_symlinks=True) and not e.name.startswith(".")
    )
    loose = list_images(root, recursive=False, extensions=exts)
    if loose:
        warnings.warn(
            f"{len(loose)} image(s) directly in {root} belong to no class and are ignored "
            f"(put each class in its own sub-folder), e.g. {loose[0]!r}",
            stacklevel=2,
        )
    paths: list[str] = []
    labels: list[int] = []
    class_names: list[str] = []
    empty: list[str] = []
    too_small: list[str] = []
    for name in subdirs:
        files = list_images(os.path.join(root, name), recursive=True, extensions=exts)
        if not files:
            empty.append(name)
            continue
        if len(files) < min_images_per_class:
            too_small.append(f"{name} ({len(files)})")
        label = len(class_names)
        class_names.append(name)
        paths.extend(os.path.join(root, name, f) for f in files)
        labels.extend([label] * len(files))
    if empty:
        warnings.warn(
            f"class folder(s) without images in {root} are ignored: {', '.join(empty)}",
            stacklevel=2,
        )
    if len(class_names) < min_classes:
        found = ", ".join(class_names) if class_names else "none"
        raise CollectionError(
            f"{root} holds {len(class_names)} class folder(s) with images (found: {found}); "
            f"training needs at least {min_classes} classes laid out as "
            f"{os.path.join(root, '<class_name>', '<image>.jpg')}"
        )
    if too_small:
        raise CollectionError(
            f"every class in {root} needs at least {min_images_per_class} images "
            f"(a query and a positive for metric learning); too few in: {', '.join(too_small)}. "
            "Add images, remove these classes, or use --recipe=head."
        )
    return LabelledImages(paths, np.asarray(labels, dtype=np.int64), class_names)


def split_indices(
    labels: Sequence[int] | np.ndarray,
    val_fraction: float,
    seed: int = 0,
    min_train_per_class: int = 1,
    min_val_per_class: int = 1,
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified random split of a labelled collection into train and validation indices.

    Each class gives round(n * val_fraction) images to validation, raised to
    `min_val_per_class` when that leaves enough for training (retrieval validation needs two
    images of a class: a query and its positive), and always keeps `min_train_per_class` for
    training (so a tiny class is never emptied).

    Args:
      labels: int [N] class of each image.
      val_fraction: fraction in (0, 1) held out for validation.
      seed: seed of the shuffle (the split is deterministic for a seed).
      min_train_per_class: images kept for training in every class.
      min_val_per_class: a class giving any image to validation gives at least this many.

    Returns:
      (train_idx, val_idx): sorted int64 index arrays, disjoint, covering all N images.

    Raises:
      ValueError: `val_fraction` outside (0, 1).
    """
    if not 0.0 < float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    train_parts: list[np.ndarray] = []
    val_parts: list[np.ndarray] = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        rng.shuffle(members)
        num_val = int(round(members.size * float(val_fraction)))
        if 0 < num_val < min_val_per_class:
            num_val = min_val_per_class
        num_val = max(0, min(num_val, members.size - min_train_per_class))
        val_parts.append(members[:num_val])
        train_parts.append(members[num_val:])
    empty = np.zeros(0, dtype=np.int64)
    train_idx = np.sort(np.concatenate(train_parts)) if train_parts else empty
    val_idx = np.sort(np.concatenate(val_parts)) if val_parts else empty
    return train_idx.astype(np.int64), val_idx.astype(np.int64)


def _verify_one(path: str) -> str:
    """'' when `path` decodes, else the reason (decoded at reduced scale: JPEG draft)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            # draft() lets libjpeg decode at 1/2..1/8 scale: the whole stream is still read,
            # so truncated files fail, at a fraction of the cost of a full decode.
            im.draft("RGB", (64, 64))
            im.load()
    except Exception as e:  # any decoder failure means the file is unusable
        return f"{type(e).__name__}: {e}"
    return ""


def verify_images(
    paths: Sequence[str], num_threads: int | None = None
) -> tuple[np.ndarray, list[tuple[str, str]]]:
    """Decodes every image once and reports the ones that cannot be read.

    Args:
      paths: image paths.
      num_threads: decoding threads (PIL releases the GIL while decoding); default: CPUs.

    Returns:
      (ok, skipped): ok bool [N]; skipped lists (path, reason) for each unreadable file.
    """
    num_threads = num_threads or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=num_threads) as pool:
        reasons = list(pool.map(_verify_one, paths))
    ok = np.asarray([r == "" for r in reasons], dtype=bool)
    skipped = [(p, r) for p, r in zip(paths, reasons, strict=True) if r]
    if skipped:
        logger.warning(
            "%d of %d images cannot be read and are skipped, e.g. %s (%s)",
            len(skipped),
            len(paths),
            skipped[0][0],
            skipped[0][1],
        )
    return ok, skipped
