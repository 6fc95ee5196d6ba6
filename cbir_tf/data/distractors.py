"""Distractor images: the Revisited 1M set (downloaded, resumable) or any folder of images.

`open_distractors(value, data_root)` returns the `DistractorSet` that `data.distractors` (or
`--distractors`) names:

  * 'r1m' (or 'revisitop1m'): the revisitop 1M distractors, laid out as the reference code
    lays them out: `<data_root>/datasets/revisitop1m/revisitop1m.txt` (the image list, paths
    relative to `jpg/`) and `jpg/` unpacked from the 100 archives `revisitop1m.1.tar.gz` ...
    `revisitop1m.100.tar.gz` of the revisitop image server. They are fetched one at a time
    (resumed from the bytes already there), each unpacked safely into `jpg/` and deleted, and
    `downloads/<archive>.extracted` is written then, so an interrupted download starts again
    at the archive it stopped in. The `COMPLETE` marker is written last, once every listed
    image is in place: a partial set is never used. Offline, the error lists the files to
    place by hand.
  * a folder: every image under it (recursively), ids its relative paths.

No TensorFlow: standard library and the data modules it names.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
from typing import Any

from cbir_tf import fileio as cio
from cbir_tf.data.archive import ArchiveError, safe_extract
from cbir_tf.data.download import (
    DatasetUnavailableError,
    download_file,
    read_complete_marker,
    remove_complete_marker,
    write_complete_marker,
)
from cbir_tf.data.revisited import RemoteFile, dataset_dir

__all__ = ["R1M", "DistractorSet", "DistractorSpec", "open_distractors", "prepare_distractors"]

log = logging.getLogger(__name__)

_R1M_URL = "http://ptak.felk.cvut.cz/revisitop/revisitop1m"


@dataclasses.dataclass(frozen=True)
class DistractorSpec:
    """A downloadable distractor set: its image list and archives (unpacked into `jpg/`)."""

    name: str
    title: str
    image_list: RemoteFile
    archives: tuple[RemoteFile, ...]
    num_images: int | None = None


R1M = DistractorSpec(
    name="revisitop1m",
    title="Revisited 1M distractors",
    image_list=RemoteFile("revisitop1m.txt", f"{_R1M_URL}/revisitop1m.txt"),
    archives=tuple(
        RemoteFile(f"revisitop1m.{i}.tar.gz", f"{_R1M_URL}/jpg/revisitop1m.{i}.tar.gz")
        for i in range(1, 101)
    ),
    num_images=1_001_001,
)
SPECS = {"r1m": R1M, "revisitop1m": R1M}


@dataclasses.dataclass
class DistractorSet:
    """Distractor images: `root/<id>` for each id (a path relative to `root`, '/'-separated).

    Attributes:
      name: store name: 'revisitop1m', or 'folder-<basename>-<hash of the path>'.
      title: in words, for the table title ('r1m').
      root: the image folder.
      ids: relative paths, in list order (the store's ids).
    """

    name: str
    title: str
    root: str
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def paths(self) -> list[str]:
        """Absolute image paths, in id order."""
        return [os.path.join(self.root, *i.split("/")) for i in self.ids]


def open_distractors(
    value: str,
    data_root: str | os.PathLike,
    *,
    download: bool = True,
    progress: bool = True,
    **fetch_options: Any,
) -> DistractorSet | None:
    """The distractor set `value` names ('' -> None): 'r1m' or a folder of images.

    Raises:
      ValueError: neither a known set nor an existing folder (the message says which exist).
      DatasetUnavailableError: R1M files missing and not obtainable (files to place, listed).
    """
    value = str(value or "").strip()
    if not value:
        return None
    spec = SPECS.get(value.lower())
    if spec is not None:
        return prepare_distractors(
            spec, data_root, download=download, progress=progress, **fetch_options
        )
    folder = os.path.abspath(os.path.expanduser(value))
    if not os.path.isdir(folder):
        raise ValueError(
            f"--distractors={value!r} is neither a known distractor set ({', '.join(SPECS)}) "
            f"nor an existing folder of images"
        )
    from cbir_tf.data.folder import list_images

    ids = list_images(folder, recursive=True)
    if not ids:
        raise ValueError(f"the distractor folder {folder} holds no images")
    return DistractorSet(_folder_name(folder), os.path.basename(folder) or folder, folder, ids)


def named(value: str, data_root: str | os.PathLike) -> DistractorSet:
    """The set `value` names, without its images or ids (its descriptors are given: the ids
    come from their store); no download, no listing."""
    spec = SPECS.get(str(value).strip().lower())
    if spec is not None:
        return DistractorSet(
            spec.name, "r1m", os.path.join(dataset_dir(data_root, spec.name), "jpg"), []
        )
    folder = os.path.abspath(os.path.expanduser(str(value)))
    return DistractorSet(_folder_name(folder), os.path.basename(folder) or folder, folder, [])


def _folder_name(folder: str) -> str:
    tag = hashlib.sha1(folder.encode()).hexdigest()[:8]
    base = "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.basename(folder))
    return f"folder-{base}-{tag}"


def _read_list(path: str) -> list[str]:
    """The image list: one path relative to `jpg/` per line; hostile names refused."""
    with open(path, encoding="utf-8") as f:
        ids = [line.strip() for line in f if line.strip()]
    for i, name in enumerate(ids):
        parts = name.replace("\\", "/").split("/")
        if name.startswith("/") or ".." in parts or "" in parts:
            raise DatasetUnavailableError(
                f"{path}: line {i + 1} names {name!r}, not a path inside jpg/; delete the file "
                "(it is downloaded again) or replace it with the published list"
            )
    if not ids:
        raise DatasetUnavailableError(f"{path} lists no images; delete it and run again")
    return ids


def _listed_missing(jpg_dir: str, ids: list[str]) -> list[str]:
    present = set()
    for dirpath, _, files in os.walk(jpg_dir):
        rel = os.path.relpath(dirpath, jpg_dir).replace(os.sep, "/")
        present.update(f if rel == "." else f"{rel}/{f}" for f in files)
    return [i for i in ids if i not in present]


def prepare_distractors(
    spec: DistractorSpec,
    data_root: str | os.PathLike,
    *,
    download: bool = True,
    progress: bool = True,
    opener: Any = None,
    timeout: float = 60.0,
    retries: int = 3,
) -> DistractorSet:
    """Makes a distractor set ready in `<data_root>/datasets/<name>` (see the module docstring).

    Raises:
      DatasetUnavailableError: a file could not be obtained (the message lists every file to
        place by hand, and where), or the archives lack listed images.
      cbir_tf.data.archive.UnsafeArchiveError: a hostile archive (deleted; named).
    """
    folder = dataset_dir(data_root, spec.name)
    list_path = os.path.join(folder, spec.image_list.filename)
    jpg_dir = os.path.join(folder, "jpg")
    marker = read_complete_marker(folder)
    if marker is not None and marker.get("dataset") == spec.name and os.path.isfile(list_path):
        return DistractorSet(spec.name, "r1m", jpg_dir, _read_list(list_path))
    os.makedirs(folder, exist_ok=True)
    fetch = functools.partial(
        download_file, progress=progress, opener=opener, timeout=timeout, retries=retries
    )
    with cio.folder_lock(folder, what=f"the {spec.name} distractors"):
        remove_complete_marker(folder)
        problems: list[str] = []
        if not os.path.isfile(list_path):
            _fetch_or_note(fetch, spec.image_list, list_path, download, problems)
        # Without the list the archives would fail the same way (offline): stop at once. Images
        # unpacked by hand (no progress records) need no archive.
        if not problems and _listed_missing(jpg_dir, _read_list(list_path)):
            _fetch_archives(spec, folder, download, fetch, progress, problems)
        if problems:
            raise DatasetUnavailableError(_place_by_hand(spec, folder, problems))
        ids = _read_list(list_path)
        missing = _listed_missing(jpg_dir, ids)
        if missing:
            raise DatasetUnavailableError(
                f"{len(missing)} of the {len(ids)} images listed in {list_path} are missing "
                f"from {jpg_dir} after every archive was unpacked (first: {missing[:5]}); "
                f"delete {os.path.join(folder, 'downloads')} to fetch the archives again"
            )
        write_complete_marker(
            folder, {"dataset": spec.name, "num_images": len(ids), "archives": len(spec.archives)}
        )
    return DistractorSet(spec.name, "r1m", jpg_dir, ids)


def _fetch_or_note(fetch, remote: RemoteFile, dest: str, download: bool, problems: list[str]):
    if not download:
        problems.append(f"{dest} is missing (download=False)")
        return
    try:
        fetch(remote.url, dest, remote.sha256)
    except DatasetUnavailableError as e:
        problems.append(str(e))


def _fetch_archives(spec, folder, download, fetch, progress, problems) -> None:
    """Each archive not yet unpacked: fetched (resumed), unpacked safely into jpg/, deleted."""
    from cbir_tf.progressbar import progress_bar

    downloads = os.path.join(folder, "downloads")
    done = [
        os.path.isfile(os.path.join(downloads, a.filename + ".extracted")) for a in spec.archives
    ]
    bar = progress_bar(
        total=len(spec.archives), initial=sum(done), desc=f"{spec.name} archives", unit="archive",
        disable=not progress,
    )  # fmt: skip
    with bar:
        for a, finished in zip(spec.archives, done, strict=True):
            if finished:
                continue
            path = os.path.join(downloads, a.filename)
            if not os.path.isfile(path):
                _fetch_or_note(fetch, a, path, download, problems)
                if not os.path.isfile(path):
                    if problems and "download=False" not in problems[-1]:
                        return  # the network is gone: the rest would fail the same way
                    continue
            try:
                files = safe_extract(path, os.path.join(folder, "jpg"))
            except ArchiveError as e:
                os.unlink(path)  # a truncated or hostile archive is never used again
                raise type(e)(f"{e}; the archive was deleted, run again to download it") from None
            cio.atomic_write_json(
                path + ".extracted", {"filename": a.filename, "url": a.url, "files": len(files)}
            )
            os.unlink(path)
            bar.update(1)
    log.info("%s: %d of %d archives unpacked", spec.name, bar.n, len(spec.archives))


def _place_by_hand(spec: DistractorSpec, folder: str, problems: list[str]) -> str:
    downloads = os.path.join(folder, "downloads")
    lines = [
        f"  {os.path.join(folder, spec.image_list.filename)}\n      from {spec.image_list.url}"
    ]
    for a in spec.archives:
        if not os.path.isfile(os.path.join(downloads, a.filename + ".extracted")):
            lines.append(f"  {os.path.join(downloads, a.filename)}\n      from {a.url}")
    size = f" ({spec.num_images:,} images in all)" if spec.num_images else ""
    return (
        f"the {spec.title} could not be obtained: {problems[0]}\n"
        f"Place these files by hand{size}, then run the same command again (files in place are "
        "used as they are, without network access; an archive already unpacked is not needed "
        "again):\n" + "\n".join(lines) + "\n  (or unpack the archives yourself into "
        f"{os.path.join(folder, 'jpg')}{os.sep}, keeping their sub-folders)"
    )


def describe(ds: DistractorSet | None) -> dict[str, Any] | None:
    """What the results file records of the distractors."""
    if ds is None:
        return None
    return {"name": ds.name, "title": ds.title, "root": ds.root, "images": len(ds)}
