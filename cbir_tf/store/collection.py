"""The image files an index describes: ids relative to a root, file stats, unreadable files.

Image ids are paths relative to the collection root ('/' separators, '../' for images outside
it). The root is the first folder indexed (or the common folder of the first image files);
indexes written by earlier versions may hold absolute ids, which keep working. For each file
the index knows its size and modification time (a changed file is described again), the files
that could not be read and why (retried only once they change), and the files whose path is not
derived from their id (explicit ids). An index saves all of it in its manifest.json (`paths`,
`files`, `failed`; see `cbir_tf.store.index_folder`).
"""

from __future__ import annotations

import os
from collections.abc import Collection as Container
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from cbir_tf import remote
from cbir_tf.data.image_list import id_problem, printable_id


class Collection:
    """What an index knows about its image files, apart from their descriptors.

    Args:
      root: the collection root (None: set by the first folder or files indexed).
      manifest: an index's manifest, whose `paths`, `files` and `failed` entries are read.
    """

    def __init__(self, root: str | os.PathLike | None = None, manifest: Mapping | None = None):
        self.root = absolute_path(root) if root else None
        manifest = manifest or {}
        self.paths: dict[str, str] = dict(manifest.get("paths", {}))  # ids not root-relative
        self.stats = {i: list(v) for i, v in manifest.get("files", {}).items()}  # [size, mtime]
        self.failed: dict[str, dict[str, Any]] = dict(manifest.get("failed", {}))

    def manifest_entries(self, ids: Sequence[str]) -> dict[str, Any]:
        """The manifest's `paths`, `files` and `failed` entries for an index of rows `ids`."""
        present = set(ids) | set(self.failed)
        return {
            "paths": {i: p for i, p in self.paths.items() if i in present},
            "files": {i: self.stats[i] for i in ids if i in self.stats},
            "failed": self.failed,
        }

    def path_of(self, image_id: str) -> str | None:
        """The file of an image (None when unknown)."""
        if image_id in self.paths:
            return self.paths[image_id]
        if os.path.isabs(image_id):
            return image_id
        if remote.is_remote(image_id):
            return image_id
        if self.root is None:
            return None
        if remote.is_remote(self.root):
            return remote.normpath(remote.join(self.root, image_id))
        # normpath resolves the '..' of images outside the root.
        return os.path.normpath(os.path.join(self.root, *image_id.split("/")))

    def id_of(self, path: str | os.PathLike, indexed: Container[str] = ()) -> str:
        """The id an image file gets: its path relative to the root.

        Args:
          path: the image file.
          indexed: the ids of the index's rows; an absolute id an earlier version gave an image
            outside the root is kept.
        """
        p = absolute_path(path)
        absolute = p.replace(os.sep, "/") if os.sep != "/" else p
        if self.root is None or p == self.root:
            return absolute
        if remote.is_remote(p) or remote.is_remote(self.root):
            # Another filesystem: ids relative to a root there, else the whole URL.
            return p[len(self.root) + 1 :] if is_inside(p, self.root) else absolute
        if not is_inside(p, self.root) and (absolute in indexed or absolute in self.failed):
            return absolute
        try:
            return os.path.relpath(p, self.root).replace(os.sep, "/")
        except ValueError:  # another drive (Windows): no relative path exists
            return absolute

    def resolve(self, paths_or_folder, ids, recursive: bool, prune: bool, indexed=()):
        """What `Retriever.index` was given: (absolute file paths, ids, folder or None, unusable).

        `unusable` maps the escaped id (`printable_id`) of each file whose name cannot be an id
        (not UTF-8, a line break; see `id_problem`) to the reason: those files are skipped and
        reported, never allowed to stop the others.
        """
        from cbir_tf.data.folder import list_images

        one = isinstance(paths_or_folder, (str, os.PathLike))
        if one and path_isdir(absolute_path(paths_or_folder)):
            if ids is not None:
                raise ValueError("ids can only be given with a list of image paths")
            folder = absolute_path(paths_or_folder)
            rel = list_images(folder, recursive=recursive)
            if not rel and not prune:
                # Indexing nothing would "succeed" silently; an empty prune may drop files.
                raise ValueError(no_images_message(folder, recursive))
            if self.root is None:
                self.root = folder
            files = [_join(folder, r) for r in rel]
        else:
            folder = None
            if one:
                if not path_exists(absolute_path(paths_or_folder)):
                    raise FileNotFoundError(
                        f"{os.fspath(paths_or_folder)} does not exist: give an image folder, "
                        "an image file or a list of image files"
                    )
                paths_or_folder = [paths_or_folder]
            files = [absolute_path(p) for p in paths_or_folder]
            if self.root is None and ids is None and files and not remote.is_remote(files[0]):
                # The first images indexed fix the root: their common folder, so that their
                # ids are relative like those of a folder's images.
                self.root = os.path.commonpath([os.path.dirname(f) for f in files])
        unusable: dict[str, str] = {}
        if ids is None:
            file_ids = [self.id_of(p, indexed) for p in files]
            kept = []
            for k, i in enumerate(file_ids):
                problem = id_problem(i)
                if problem:
                    unusable[printable_id(i)] = problem
                else:
                    kept.append(k)
            files, file_ids = [files[k] for k in kept], [file_ids[k] for k in kept]
        else:
            file_ids = [str(i) for i in ids]
            if len(file_ids) != len(files):
                raise ValueError(f"{len(files)} paths but {len(file_ids)} ids")
        _check_ids(file_ids)
        return files, file_ids, folder, unusable

    def record_unusable(self, unusable: Mapping[str, str]) -> int:
        """Records files whose name cannot be an id as unreadable (skipped.json lists them).

        Returns:
          How many were not recorded yet (with that reason).
        """
        new = 0
        for image_id, reason in unusable.items():
            if self.failed.get(image_id, {}).get("reason") != reason:
                self.failed[image_id] = {"reason": reason, "stat": None}
                new += 1
        return new

    def changes(self, files: Sequence[str], file_ids: Sequence[str], indexed: Container[str]):
        """Which files need describing: (ids, {id: path}, {id: stat}, counts).

        A file is described again when it is new or changed (other size or modification time);
        an unreadable file only once it changed. `counts` has 'unchanged' and 'failed' (files
        that cannot even be stat'ed; recorded as failed).
        """
        todo, new_paths, stats = [], {}, {}
        counts = {"unchanged": 0, "failed": 0}
        for path, image_id in zip(files, file_ids, strict=True):
            try:
                stat = _stat(path)
            except OSError as e:
                self.failed[image_id] = {"reason": f"cannot stat: {e.strerror}", "stat": None}
                counts["failed"] += 1
                continue
            if image_id in indexed and self.stats.get(image_id) == stat:
                counts["unchanged"] += 1
            elif image_id in self.failed and self.failed[image_id].get("stat") == stat:
                counts["unchanged"] += 1  # still the same unreadable file: not retried
            else:
                todo.append(image_id)
                new_paths[image_id] = path
                stats[image_id] = stat
        return todo, new_paths, stats, counts

    def pending_changes(self, pending: Mapping[str, Any]) -> list[str]:
        """The files of a saved batch (`cbir_tf.store.index_folder.save_pending`) that are gone
        or changed since, or whose id cannot be one (escaped); empty when it can resume."""
        changed = []
        batch = zip(pending["ids"], pending["paths"], pending["stats"], strict=True)
        for image_id, path, stat in batch:
            if not isinstance(image_id, str) or id_problem(image_id):
                changed.append(printable_id(str(image_id)))
                continue
            try:
                now = _stat(path)
            except (OSError, TypeError, ValueError):
                now = None
            if now != stat:
                changed.append(image_id)
        return changed

    def vanished(self, folder: str, present: Iterable[str], indexed: Iterable[str]) -> set[str]:
        """Ids (indexed or failed) of files under `folder` that no longer exist."""
        present = set(present)
        gone = set()
        for i in list(indexed) + list(self.failed):
            p = self.path_of(i)
            if i not in present and p and is_inside(p, folder) and not path_exists(p):
                gone.add(i)
        return gone

    def record(self, described, skipped, new_paths, stats, dropped, removed) -> None:
        """Updates the bookkeeping after a batch was described.

        Args:
          described: ids of the images now described.
          skipped: (id, reason) of the images that could not be read.
          new_paths: {id: file} of the batch.
          stats: {id: [size, mtime_ns]} of the batch.
          dropped: ids whose old rows are gone (re-described, removed).
          removed: ids removed from the index altogether.
        """
        for i in dropped:
            self.stats.pop(i, None)
        for i in removed:
            self.failed.pop(i, None)
            self.paths.pop(i, None)
        for i in list(described) + [i for i, _ in skipped]:
            # Explicit ids (not derived from the path) keep their file in the manifest.
            self.paths.pop(i, None)
            if self.path_of(i) != new_paths[i]:
                self.paths[i] = new_paths[i]
        for i in described:
            self.stats[i] = stats[i]
            self.failed.pop(i, None)
        for i, reason in skipped:
            self.failed[i] = {"reason": str(reason), "stat": stats.get(i)}
            self.stats.pop(i, None)


def _check_ids(file_ids: Sequence[str]) -> None:
    """Refuses empty, multi-line, non-UTF-8 or repeated ids."""
    bad = [printable_id(i) for i in file_ids if id_problem(i)]
    if bad:
        raise ValueError(f"image ids must be non-empty single-line UTF-8 strings, got {bad[:3]}")
    if len(set(file_ids)) != len(file_ids):
        raise ValueError("the same image id appears twice in one call")


def is_inside(path: str, folder: str) -> bool:
    """Whether `path` is `folder` or lies under it."""
    if remote.is_remote(path) or remote.is_remote(folder):
        path, folder = path.rstrip("/"), folder.rstrip("/")
        return path == folder or path.startswith(folder + "/")
    path, folder = os.path.abspath(path), os.path.abspath(folder)
    return os.path.commonpath([path, folder]) == folder


def absolute_path(path: str | os.PathLike) -> str:
    """An absolute local path (`~` expanded), or a URL of another filesystem as given."""
    path = os.fspath(path)
    if remote.is_remote(path):
        return remote.normpath(path.rstrip("/"))
    return os.path.abspath(os.path.expanduser(path))


def path_isdir(path: str) -> bool:
    """Whether a local path or a URL (gs://...) is a folder."""
    return remote.isdir(path) if remote.is_remote(path) else os.path.isdir(path)


def path_exists(path: str) -> bool:
    """Whether a local path or a URL (gs://...) exists."""
    return remote.exists(path) if remote.is_remote(path) else os.path.exists(path)


def _join(folder: str, rel: str) -> str:
    if remote.is_remote(folder):
        return remote.join(folder, rel)
    return os.path.join(folder, *rel.split("/"))


def _stat(path: str) -> list[int]:
    """[size, modification time in ns] of a file (OSError when it cannot be stat'ed)."""
    if remote.is_remote(path):
        size, mtime_ns, _ = remote.stat(path)
        return [size, mtime_ns]
    st = os.stat(path)
    return [int(st.st_size), int(st.st_mtime_ns)]


def no_images_message(folder: str, recursive: bool) -> str:
    """The one-line error for a folder that holds no image file."""
    from cbir_tf.data.folder import IMAGE_EXTENSIONS

    where = "in it or its sub-folders" if recursive else "in it"
    return (
        f"the image folder {folder} holds no image files {where} "
        f"({', '.join(IMAGE_EXTENSIONS)}); check the path"
    )
