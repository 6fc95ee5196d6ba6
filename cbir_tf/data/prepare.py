"""Makes a benchmark ready on disk: download what is missing, check it, place it, mark it.

`prepare_dataset(name, data_root)` leaves `<data_root>/datasets/<name>/` in the revisitop
layout (see `cbir_tf.data.revisited`) and returns its `BenchmarkDataset`. The steps, each of
which a later run skips when its result is already in place:

  1. the ground truth (sha256-checked where a hash is pinned): it tells which images must be
     there, and is checked against the registry's counts before any image is fetched;
  2. the optional original-protocol ground truth (never fatal when unavailable);
  3. the image archives, while some listed image is missing: downloaded with resume into
     `downloads/`, safely extracted, their .jpg files flattened into `jpg/`;
  4. the `COMPLETE` marker, written last, listing what was verified.

Files placed by hand (the ground truth, the archives in `downloads/`, the images in `jpg/`)
are used without network access; when something cannot be obtained, the error names each
file to place and where. 'demo' is generated instead (`cbir_tf.data.synthetic`).

No TensorFlow: standard library, and the data modules it names.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import shutil
from collections.abc import Callable
from typing import Any

from cbir_tf import fileio as cio
from cbir_tf.data.archive import ArchiveError, safe_extract
from cbir_tf.data.download import (
    ChecksumError,
    DatasetUnavailableError,
    download_file,
    file_sha256,
    read_complete_marker,
    remove_complete_marker,
    write_complete_marker,
)
from cbir_tf.data.ground_truth import GroundTruthError, UnsafePickleError, load_ground_truth
from cbir_tf.data.revisited import (
    ALIASES,
    DATASETS,
    BenchmarkDataset,
    DatasetSpec,
    ImageListMismatchError,
    RemoteFile,
    dataset_dir,
    resolve_dataset_name,
)

__all__ = ["is_folder_benchmark", "open_benchmark", "prepare_dataset"]

logger = logging.getLogger(__name__)

Fetch = Callable[[str, str, "str | None"], str]
"""`fetch(url, dest, sha256) -> dest`: `download_file` with this run's network settings."""

# Said of a ground truth without a published hash (gnd_roxford5k.pkl): no checksum vouches for
# it; it is only read through the restricted unpickler and checked against the image counts.
_UNVERIFIED = (
    "unverified: no published sha256 is pinned for it, so only its structure and image counts "
    "are checked"
)


def prepare_dataset(
    name: str,
    data_root: str | os.PathLike,
    download: bool = True,
    progress: bool = True,
    *,
    images: bool = True,
    opener: Any = None,
    timeout: float = 60.0,
    retries: int = 3,
    keep_archives: bool = False,
) -> BenchmarkDataset:
    """Makes a benchmark ready in `<data_root>/datasets/<name>` and returns it.

    A folder holding a valid `COMPLETE` marker is used as is. Otherwise what is missing is
    obtained: the ground truth (sha256-checked where a hash is pinned), the optional
    original-protocol ground truth, and the image archives (downloaded with resume into
    `downloads/`, safely extracted, .jpg files flattened into `jpg/`, archives deleted unless
    `keep_archives`). The image folder is checked against the ground truth's image list, then
    the `COMPLETE` marker is written last, listing what was verified; an interrupted run
    leaves no marker and the next run continues where it stopped. Files placed by hand (the
    ground truth, the archives in `downloads/`, or the images in `jpg/`) are used without
    network access. 'demo' is generated instead (`cbir_tf.data.synthetic`).

    Args:
      name: 'oxford5k', 'paris6k', 'roxford5k', 'rparis6k' or 'demo'.
      data_root: the data folder (datasets live in `<data_root>/datasets/`).
      download: allow network access for what is missing.
      progress: show download progress bars.
      images: also obtain the images; False fetches only the ground truth (enough to evaluate
        precomputed descriptors): the returned dataset is then not image-checked and no
        marker is written unless the images happen to be complete.
      opener: injectable URL opener (see `cbir_tf.data.download.download_file`).
      timeout: network timeout in seconds.
      retries: retries per file after transient network failures.
      keep_archives: keep the downloaded image archives after extraction.

    Returns:
      The BenchmarkDataset.

    Raises:
      KeyError: unknown name (lists the valid ones).
      DatasetUnavailableError: something could not be obtained; the message names each file
        to place by hand and where (exact paths and URLs).
      ImageListMismatchError: the archives did not provide every listed image.
      UnsafePickleError, GroundTruthError: a ground-truth file is hostile or malformed.
    """
    canonical = resolve_dataset_name(name)
    spec = DATASETS[canonical]
    folder = dataset_dir(data_root, canonical)
    ready = _load_if_complete(canonical, folder)
    if ready is not None:
        return ready
    os.makedirs(folder, exist_ok=True)
    with cio.folder_lock(folder, what=f"the {canonical} dataset"):
        ready = _load_if_complete(canonical, folder)  # another process may have finished it
        if ready is not None:
            return ready
        remove_complete_marker(folder)
        if spec.synthetic:
            from cbir_tf.data.synthetic import make_synthetic_benchmark

            make_synthetic_benchmark(data_root, name=canonical)
            return BenchmarkDataset(canonical, folder)
        fetch = functools.partial(
            download_file, progress=progress, opener=opener, timeout=timeout, retries=retries
        )
        complete = _prepare_download(
            spec, folder, images=images, download=download, fetch=fetch, keep_archives=keep_archives
        )
        return BenchmarkDataset(canonical, folder, check_images=complete)


def is_folder_benchmark(value: str) -> bool:
    """Whether `--dataset=value` names an own benchmark folder rather than a known dataset."""
    key = str(value).strip().lower()
    if key in DATASETS or key in ALIASES:
        return False
    return os.path.isdir(os.path.expanduser(str(value))) or os.sep in str(value)


def open_benchmark(
    value: str,
    data_root: str | os.PathLike,
    download: bool = True,
    progress: bool = True,
    *,
    images: bool = True,
) -> BenchmarkDataset:
    """A known benchmark by name (prepared as `prepare_dataset` does) or an own benchmark folder
    (`cbir_tf.data.own`: `FOLDER/jpg/` and `gnd.json` or `gnd_<name>.pkl`)."""
    if is_folder_benchmark(value):
        from cbir_tf.data.own import open_folder

        return open_folder(value, check_images=images)
    return prepare_dataset(
        resolve_dataset_name(value), data_root, download=download, progress=progress, images=images
    )


# ----------------------------------------------------------------------------------------------
# A folder already complete
# ----------------------------------------------------------------------------------------------


def _marker_is_current(folder: str, name: str, marker: dict[str, Any]) -> bool:
    """Whether the files the marker vouches for are still the ones it verified."""
    if marker.get("dataset") != name:
        return False
    for fname, rec in (marker.get("files") or {}).items():
        path = os.path.join(folder, fname)
        if not os.path.isfile(path) or os.path.getsize(path) != rec.get("size"):
            return False
        # Ground-truth files are small: re-hash them, a replaced file is caught at once.
        if rec.get("sha256") and file_sha256(path) != rec["sha256"]:
            return False
    return True


def _load_if_complete(name: str, folder: str) -> BenchmarkDataset | None:
    marker = read_complete_marker(folder)
    if marker is None or not _marker_is_current(folder, name, marker):
        return None
    try:
        return BenchmarkDataset(name, folder)
    except ImageListMismatchError:
        return None  # images deleted since: repair below


# ----------------------------------------------------------------------------------------------
# Download and placement
# ----------------------------------------------------------------------------------------------


def _prepare_download(
    spec: DatasetSpec,
    folder: str,
    *,
    images: bool,
    download: bool,
    fetch: Fetch,
    keep_archives: bool,
) -> bool:
    """Obtains what is missing; returns whether the folder is complete (marker written)."""
    assert spec.gnd is not None
    problems: list[str] = []
    gnd_path = os.path.join(folder, spec.gnd.filename)
    jpg_dir = os.path.join(folder, "jpg")

    # 1. Ground truth: it tells which images must be there.
    _obtain_gnd(spec, gnd_path, download, fetch, problems)
    have_gnd = os.path.isfile(gnd_path)
    needed: list[str] = []
    files: dict[str, Any] = {}
    if have_gnd:
        # Loads through BenchmarkDataset's checks (counts against the registry) early, so a
        # wrong file is reported before gigabytes of images are fetched.
        probe = BenchmarkDataset(spec.name, folder, check_images=False, original_gnd_path="")
        needed = [n + ".jpg" for n in (*probe.imlist, *probe.qimlist)]
        files[spec.gnd.filename] = _file_record(gnd_path, spec.gnd.sha256 is not None)
        # 2. Original-protocol ground truth: optional, never fatal when unavailable.
        if spec.original_gnd is not None:
            entry = _prepare_original(spec.original_gnd, folder, download, fetch)
            if entry is not None:
                files[spec.original_gnd.filename] = entry

    def missing_images() -> list[str]:
        present = _list_jpgs(jpg_dir)
        return [n for n in needed if n not in present]

    # 3. Images: fetch and unpack archives while some listed image is missing. Without the
    # ground truth we cannot tell, so the archives are fetched unless jpg/ already has files.
    need_images = bool(missing_images()) if have_gnd else not _list_jpgs(jpg_dir)
    archives_info: list[dict[str, Any]] = []
    if images and need_images:
        archives_info = _fetch_archives(
            spec, folder, have_gnd, missing_images, download, fetch, keep_archives, problems
        )
    if problems:
        absent = missing_images() if have_gnd else []
        raise _unavailable(spec, folder, problems, absent, len(needed), have_gnd, images)
    missing = missing_images()
    if missing and not images:
        return False
    if missing:
        raise _still_missing(spec, folder, missing, len(needed))

    # 4. The marker, after a full check of the folder.
    _mark_complete(spec, folder, files, archives_info)
    return True


def _obtain_gnd(
    spec: DatasetSpec, gnd_path: str, download: bool, fetch: Fetch, problems: list[str]
) -> None:
    """Downloads the ground truth if absent (appending failures); refuses a wrong one in place."""
    assert spec.gnd is not None
    if not os.path.isfile(gnd_path):
        if not download:
            problems.append(f"{gnd_path} is missing (download=False)")
            return
        try:
            fetch(spec.gnd.url, gnd_path, spec.gnd.sha256)
            if not spec.gnd.sha256:
                logger.warning("%s: downloaded, %s", gnd_path, _UNVERIFIED)
        except DatasetUnavailableError as e:
            problems.append(str(e))
    elif spec.gnd.sha256 and file_sha256(gnd_path) != spec.gnd.sha256:
        raise ChecksumError(
            f"{gnd_path} does not have the sha256 of the published {spec.title} ground truth "
            f"({spec.gnd.sha256}); delete it (it is downloaded again from {spec.gnd.url}) or "
            f"replace it with the right file"
        )


def _prepare_original(
    remote: RemoteFile, folder: str, download: bool, fetch: Fetch
) -> dict[str, Any] | None:
    """Fetches and checks the optional original-protocol file; returns its marker entry."""
    path = os.path.join(folder, remote.filename)
    if not os.path.isfile(path) and download:
        try:
            fetch(remote.url, path, remote.sha256)
        except DatasetUnavailableError as e:
            logger.warning(
                "original-protocol ground truth unavailable (%s); only the revisited protocols "
                "will be evaluated",
                e,
            )
    if not os.path.isfile(path):
        return None
    try:
        load_ground_truth(path, kind="original")
    except UnsafePickleError:
        os.unlink(path)  # never keep a hostile file around
        raise
    except GroundTruthError as e:
        os.unlink(path)
        logger.warning("%s; deleted, only the revisited protocols will be evaluated", e)
        return None
    return _file_record(path, remote.sha256 is not None)


def _fetch_archives(
    spec: DatasetSpec,
    folder: str,
    have_gnd: bool,
    missing_images: Callable[[], list[str]],
    download: bool,
    fetch: Fetch,
    keep_archives: bool,
    problems: list[str],
) -> list[dict[str, Any]]:
    """Downloads (resumably) and safely unpacks the image archives; appends failures.

    An archive whose images are in `jpg/` leaves `downloads/<archive>.extracted` behind, so a
    run interrupted at the second archive does not fetch the first one again.
    """
    downloads = os.path.join(folder, "downloads")
    info = []
    for a in spec.archives:
        if have_gnd and not missing_images():
            break
        path = os.path.join(downloads, a.filename)
        done = path + ".extracted"
        if os.path.isfile(done):
            with open(done, encoding="utf-8") as f:
                info.append(json.load(f))
            continue
        if not os.path.isfile(path):
            if not download:
                problems.append(f"{path} is missing (download=False)")
                continue
            try:
                fetch(a.url, path, a.sha256)
            except DatasetUnavailableError as e:
                problems.append(str(e))
                continue
        try:
            record = _unpack_archive(spec.name, a, path, folder)
        except ArchiveError as e:
            os.unlink(path)  # a truncated or hostile archive must not be used again
            problems.append(f"{e}; the archive was deleted, run again to download it again")
            continue
        cio.atomic_write_json(done, record)
        if not keep_archives:
            os.unlink(path)
        info.append(record)
    return info


def _unpack_archive(name: str, remote: RemoteFile, path: str, folder: str) -> dict[str, Any]:
    """Extracts one archive's .jpg files into `jpg/`; returns its record (ArchiveError if bad)."""
    record: dict[str, Any] = {
        "filename": remote.filename,
        "url": remote.url,
        "size": os.path.getsize(path),
        "sha256": file_sha256(path),
    }
    tmp = os.path.join(folder, "_extracting")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        safe_extract(path, tmp)
        record["images"] = _flatten_jpgs(tmp, os.path.join(folder, "jpg"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("%s: %d images extracted from %s", name, record["images"], remote.filename)
    return record


def _flatten_jpgs(src: str, jpg_dir: str) -> int:
    """Moves every .jpg under `src` into `jpg_dir` (flat, as revisitop does); returns the count."""
    os.makedirs(jpg_dir, exist_ok=True)
    count = 0
    for dirpath, _, files in os.walk(src):
        for f in files:
            path = os.path.join(dirpath, f)
            if f.lower().endswith(".jpg") and os.path.isfile(path) and not os.path.islink(path):
                os.replace(path, os.path.join(jpg_dir, f))
                count += 1
    return count


def _list_jpgs(jpg_dir: str) -> set[str]:
    try:
        return set(os.listdir(jpg_dir))
    except (FileNotFoundError, NotADirectoryError):
        return set()


def _mark_complete(
    spec: DatasetSpec, folder: str, files: dict[str, Any], archives: list[dict[str, Any]]
) -> None:
    """Checks the whole folder, then vouches for it with the marker; drops progress records."""
    dataset = BenchmarkDataset(spec.name, folder)  # full check before vouching for it
    write_complete_marker(
        folder,
        {
            "dataset": spec.name,
            "files": files,
            "archives": archives,
            "num_images": dataset.num_images,
            "num_queries": dataset.num_queries,
            "images_checked": "every imlist and qimlist name is present as jpg/<name>.jpg",
            "original_protocol": dataset.has_original,
        },
    )
    _cleanup_downloads(folder)


def _cleanup_downloads(folder: str) -> None:
    """Drops the per-archive progress records once the dataset is complete."""
    downloads = os.path.join(folder, "downloads")
    if not os.path.isdir(downloads):
        return
    for f in os.listdir(downloads):
        if f.endswith(".extracted"):
            os.unlink(os.path.join(downloads, f))
    if not os.listdir(downloads):
        os.rmdir(downloads)


def _file_record(path: str, pinned: bool) -> dict[str, Any]:
    return {"size": os.path.getsize(path), "sha256": file_sha256(path), "sha256_pinned": pinned}


# ----------------------------------------------------------------------------------------------
# What to tell the user
# ----------------------------------------------------------------------------------------------


def _unavailable(
    spec: DatasetSpec,
    folder: str,
    problems: list[str],
    absent: list[str],
    num_needed: int,
    have_gnd: bool,
    images: bool,
) -> DatasetUnavailableError:
    """The error for what could not be obtained: each problem, then what to place where."""
    assert spec.gnd is not None
    if images and absent:
        # Name the images themselves: a few deleted files must not read as "fetch the whole
        # archive" only.
        problems.insert(
            0,
            f"{len(absent)} of the {num_needed} images listed in "
            f"{os.path.join(folder, spec.gnd.filename)} are missing from "
            f"{os.path.join(folder, 'jpg')}: {', '.join(absent[:10])}"
            f"{' ...' if len(absent) > 10 else ''}",
        )
    still_missing = bool(absent) if have_gnd else True
    return DatasetUnavailableError(
        f"dataset {spec.name} ({spec.title}) is not ready in {folder}:\n"
        + "\n".join(f"  - {p}" for p in problems)
        + "\n"
        + _placement_instructions(spec, folder, not have_gnd, images and still_missing)
    )


def _still_missing(
    spec: DatasetSpec, folder: str, missing: list[str], num_needed: int
) -> ImageListMismatchError:
    """The error for archives that were unpacked but did not provide every listed image."""
    assert spec.gnd is not None
    jpg_dir = os.path.join(folder, "jpg")
    return ImageListMismatchError(
        f"{len(missing)} of the {num_needed} images listed in "
        f"{os.path.join(folder, spec.gnd.filename)} are still missing from {jpg_dir} after "
        f"extracting the archives: {', '.join(missing[:10])}"
        f"{' ...' if len(missing) > 10 else ''}. The archives do not match the ground truth; "
        f"delete {jpg_dir} and {os.path.join(folder, 'downloads')} and run again, or place "
        f"the missing images there by hand.\n" + _placement_instructions(spec, folder, False, True)
    )


def _placement_instructions(
    spec: DatasetSpec, folder: str, need_gnd: bool, need_images: bool
) -> str:
    lines = []
    if need_gnd and spec.gnd is not None:
        sha = f" (sha256 {spec.gnd.sha256})" if spec.gnd.sha256 else f" ({_UNVERIFIED})"
        lines.append(f"  {os.path.join(folder, spec.gnd.filename)}\n      from {spec.gnd.url}{sha}")
    if need_images:
        for a in spec.archives:
            lines.append(f"  {os.path.join(folder, 'downloads', a.filename)}\n      from {a.url}")
        lines.append(
            f"  (or extract those archives yourself and put every .jpg, without sub-folders, in "
            f"{os.path.join(folder, 'jpg')}{os.sep})"
        )
    text = "Place these files by hand, then run the same command again (files in place are "
    text += "used as they are, without network access):\n" + "\n".join(lines)
    if spec.original_gnd is not None:
        text += (
            f"\nOptional, for the original {spec.title.replace('Revisited ', '')} protocol:\n"
            f"  {os.path.join(folder, spec.original_gnd.filename)}\n"
            f"      from {spec.original_gnd.url}"
        )
    return text
