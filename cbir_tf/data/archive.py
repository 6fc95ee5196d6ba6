"""Archive extraction that survives hostile archives.

`safe_extract` unpacks tar (any compression) and zip archives without letting a member write
outside the target folder: absolute paths, `..` members, links leaving the folder and device
files are refused, naming the member, before anything is written.

Standard library only.
"""

from __future__ import annotations

import contextlib
import gzip
import lzma
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from typing import Any

__all__ = ["ArchiveError", "UnsafeArchiveError", "safe_extract"]


class ArchiveError(ValueError):
    """An archive cannot be read (corrupt, truncated, unknown format)."""


class UnsafeArchiveError(ArchiveError):
    """An archive holds a member that would write outside the target folder (or a device file)."""


_CORRUPT_ARCHIVE_ERRORS = (
    tarfile.TarError,
    zipfile.BadZipFile,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    lzma.LZMAError,
)


class _Member:
    """One archive entry, independent of the archive format."""

    __slots__ = ("name", "kind", "linkname", "size", "open")

    def __init__(
        self,
        name: str,
        kind: str,
        linkname: str = "",
        size: int = 0,
        open: Callable[[], Any] | None = None,  # noqa: A002 - mirrors the archive APIs
    ):
        self.name = name
        self.kind = kind  # 'file' | 'dir' | 'symlink' | 'hardlink' | 'device'
        self.linkname = linkname
        self.size = size
        self.open = open


def _clean_member_name(name: str, archive: str) -> str:
    """Returns the member's path relative to the target, or raises naming the member."""
    if "\x00" in name:
        raise UnsafeArchiveError(f"{archive}: member {name!r} has a NUL byte in its name")
    unified = name.replace("\\", "/")
    if unified.startswith("/") or re.match(r"^[A-Za-z]:", unified):
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} has an absolute path; refusing to extract the archive"
        )
    parts = [p for p in unified.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} contains '..' and would be written outside the target "
            f"folder; refusing to extract the archive"
        )
    return "/".join(parts)


def _link_target_inside(member: str, linkname: str, hard: bool) -> str | None:
    """Returns the link target relative to the target folder, or None when it leaves it."""
    unified = linkname.replace("\\", "/")
    if not unified or unified.startswith("/") or re.match(r"^[A-Za-z]:", unified):
        return None
    # Symlink targets are relative to the link's folder, hard-link targets to the archive root.
    base = [] if hard else member.split("/")[:-1]
    stack = list(base)
    for p in unified.split("/"):
        if p in ("", "."):
            continue
        if p == "..":
            if not stack:
                return None
            stack.pop()
        else:
            stack.append(p)
    return "/".join(stack)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root + os.sep)


def _tar_members(tf: tarfile.TarFile, archive: str) -> Iterator[_Member]:
    for info in tf:
        if info.isreg():
            yield _Member(info.name, "file", size=info.size, open=lambda i=info: tf.extractfile(i))
        elif info.isdir():
            yield _Member(info.name, "dir")
        elif info.issym():
            yield _Member(info.name, "symlink", linkname=info.linkname)
        elif info.islnk():
            yield _Member(info.name, "hardlink", linkname=info.linkname)
        else:
            yield _Member(info.name, "device")


def _zip_members(zf: zipfile.ZipFile, archive: str) -> Iterator[_Member]:
    for info in zf.infolist():
        # Unix file-type bits live in the high half of external_attr (zips made on Unix);
        # a zip made elsewhere leaves them 0, which means a plain file or folder.
        fmt = stat.S_IFMT((info.external_attr >> 16) & 0xFFFF) if info.create_system == 3 else 0
        if info.is_dir():
            yield _Member(info.filename, "dir")
        elif fmt == stat.S_IFLNK:
            target = zf.read(info).decode("utf-8", "surrogateescape")
            yield _Member(info.filename, "symlink", linkname=target)
        elif fmt and fmt not in (stat.S_IFREG, stat.S_IFDIR):
            yield _Member(info.filename, "device")
        else:
            yield _Member(
                info.filename, "file", size=info.file_size, open=lambda i=info: zf.open(i)
            )


def _check_members(members: list[_Member], archive: str) -> list[tuple[_Member, str, str]]:
    """Validates every member before anything is written; returns (member, rel, link_rel)."""
    checked = []
    for m in members:
        rel = _clean_member_name(m.name, archive)
        if m.kind == "device":
            raise UnsafeArchiveError(
                f"{archive}: member {m.name!r} is a device file, FIFO or other special file; "
                f"refusing to extract the archive"
            )
        link_rel = ""
        if m.kind in ("symlink", "hardlink"):
            target = _link_target_inside(rel, m.linkname, hard=m.kind == "hardlink")
            if target is None or (m.kind == "hardlink" and not target):
                raise UnsafeArchiveError(
                    f"{archive}: member {m.name!r} is a {'hard ' if m.kind == 'hardlink' else ''}"
                    f"link to {m.linkname!r}, outside the target folder; refusing to extract "
                    f"the archive"
                )
            link_rel = target
        if not rel and m.kind != "dir":
            raise UnsafeArchiveError(f"{archive}: member {m.name!r} has an empty path")
        checked.append((m, rel, link_rel))
    return checked


def safe_extract(archive: str | os.PathLike, dest: str | os.PathLike) -> list[str]:
    """Extracts a tar (any compression) or zip archive into `dest`, refusing hostile members.

    Every member is checked before anything is written; the archive is refused, naming the
    member, when one has an absolute path, a `..` component, is a symbolic or hard link whose
    target leaves `dest`, or is a device file / FIFO. While writing, no file is written through
    a link that resolves outside `dest` (links created by earlier members included), and links
    are re-checked once everything is in place. Permissions from the archive are not applied
    (no set-uid bits); files get 0644, folders 0755.

    Args:
      archive: path of a .tar, .tar.gz/.tgz, .tar.bz2, .tar.xz or .zip file.
      dest: target folder (created).

    Returns:
      The relative paths (POSIX separators) of the regular files extracted, in archive order.

    Raises:
      UnsafeArchiveError: a member would escape `dest` (the message names the member).
      ArchiveError: the archive is not a readable tar or zip file.
    """
    archive = os.fspath(archive)
    dest = os.fspath(dest)
    if not os.path.isfile(archive):
        raise ArchiveError(f"archive {archive} does not exist")
    os.makedirs(dest, exist_ok=True)
    root = os.path.realpath(dest)

    try:
        if zipfile.is_zipfile(archive):
            ctx: Any = zipfile.ZipFile(archive)
            members_of: Callable[[Any, str], Iterator[_Member]] = _zip_members
        elif tarfile.is_tarfile(archive):
            ctx = tarfile.open(archive, "r:*")
            members_of = _tar_members
        else:
            raise ArchiveError(f"{archive} is neither a tar nor a zip archive")
    except (*_CORRUPT_ARCHIVE_ERRORS, OSError) as e:
        raise ArchiveError(f"cannot open archive {archive}: {e}") from None

    extracted: list[str] = []
    links: list[tuple[str, str]] = []
    with ctx:
        try:
            checked = _check_members(list(members_of(ctx, archive)), archive)
            for m, rel, link_rel in checked:
                target = _place_member(m, rel, link_rel, root, archive)
                if m.kind in ("file", "hardlink"):
                    extracted.append(rel)
                elif m.kind == "symlink":
                    links.append((m.name, target))
        except _CORRUPT_ARCHIVE_ERRORS as e:
            raise ArchiveError(f"archive {archive} is corrupt or truncated: {e}") from None
    # A link created early may point through a link created later; check the final state.
    for name, link in links:
        if not _inside(os.path.realpath(link), root):
            os.unlink(link)
            raise UnsafeArchiveError(
                f"{archive}: member {name!r} is a link that resolves outside the target folder "
                f"once the archive is unpacked; it was removed"
            )
    return extracted


def _place_member(m: _Member, rel: str, link_rel: str, root: str, archive: str) -> str:
    """Writes one checked member under `root`, never through a link; returns its path."""
    target = os.path.join(root, *rel.split("/")) if rel else root
    parent = os.path.dirname(target)
    if m.kind == "dir":
        _makedirs_inside(target, root, archive, m.name)
        return target
    _makedirs_inside(parent, root, archive, m.name)
    if not _inside(os.path.realpath(parent), root):
        raise UnsafeArchiveError(
            f"{archive}: member {m.name!r} would be written through a link leaving "
            f"the target folder; refusing to extract the archive"
        )
    if os.path.islink(target) or (os.path.lexists(target) and not os.path.isdir(target)):
        os.unlink(target)  # never write through a link left at the same name
    if m.kind == "file":
        _write_member(m, target)
    elif m.kind == "symlink":
        os.symlink(m.linkname, target)
    elif m.kind == "hardlink":
        source = os.path.join(root, *link_rel.split("/"))
        real_source = os.path.realpath(source)
        if not _inside(real_source, root) or not os.path.isfile(real_source):
            raise UnsafeArchiveError(
                f"{archive}: member {m.name!r} is a hard link to {m.linkname!r}, "
                f"which is not a file extracted inside the target folder"
            )
        shutil.copyfile(real_source, target)  # a copy: no inode shared with source
        os.chmod(target, 0o644)
    return target


def _makedirs_inside(path: str, root: str, archive: str, name: str) -> None:
    # realpath resolves the links that already exist on the way, e.g. one made by an earlier
    # member: a folder reached through a link leaving the target is refused before creation.
    if _inside(os.path.realpath(path), root):
        os.makedirs(path, mode=0o755, exist_ok=True)
    if not _inside(os.path.realpath(path), root):
        raise UnsafeArchiveError(
            f"{archive}: member {name!r} would be written through a link leaving the target "
            f"folder; refusing to extract the archive"
        )


def _write_member(m: _Member, target: str) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(target, flags, 0o644)
    with os.fdopen(fd, "wb") as out:
        src = m.open()
        with contextlib.closing(src):
            shutil.copyfileobj(src, out, 1 << 20)
