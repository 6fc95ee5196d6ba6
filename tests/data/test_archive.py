"""Safe archive extraction: hostile tar and zip members are refused before anything is written."""

from __future__ import annotations

import io
import os
import tarfile
import zipfile

import pytest

from cbir_tf.data.archive import ArchiveError, UnsafeArchiveError, safe_extract


def _tar(path, members, mode="w:gz"):
    """members: list of (TarInfo-like dict, bytes or None)."""
    with tarfile.open(path, mode) as tf:
        for spec, data in members:
            info = tarfile.TarInfo(spec["name"])
            info.type = spec.get("type", tarfile.REGTYPE)
            info.linkname = spec.get("linkname", "")
            info.mode = spec.get("mode", 0o644)
            if data is not None:
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
            else:
                tf.addfile(info)
    return path


def _no_stray_files(tmp_path, allowed):
    found = {p.name for p in tmp_path.iterdir()}
    assert found <= set(allowed), found - set(allowed)


def test_good_tar_extracts_files_dirs_and_inside_links(tmp_path):
    archive = _tar(
        tmp_path / "good.tgz",
        [
            ({"name": "paris/defense", "type": tarfile.DIRTYPE, "mode": 0o4777}, None),
            ({"name": "paris/defense/a.jpg", "mode": 0o4755}, b"AAA"),
            ({"name": "./paris/eiffel/b.jpg"}, b"BB"),
            (
                {"name": "paris/link.jpg", "type": tarfile.SYMTYPE, "linkname": "defense/a.jpg"},
                None,
            ),
            (
                {
                    "name": "paris/hard.jpg",
                    "type": tarfile.LNKTYPE,
                    "linkname": "paris/eiffel/b.jpg",
                },
                None,
            ),
        ],
    )
    dest = tmp_path / "out"
    files = safe_extract(archive, dest)
    assert files == ["paris/defense/a.jpg", "paris/eiffel/b.jpg", "paris/hard.jpg"]
    assert (dest / "paris/defense/a.jpg").read_bytes() == b"AAA"
    assert (dest / "paris/link.jpg").read_bytes() == b"AAA"
    assert (dest / "paris/hard.jpg").read_bytes() == b"BB"
    # No set-uid bits or world-writable folders from the archive.
    assert (dest / "paris/defense/a.jpg").stat().st_mode & 0o7777 == 0o644


@pytest.mark.parametrize(
    "member, what",
    [
        ({"name": "../evil.txt"}, "contains '..'"),
        ({"name": "ok/../../evil.txt"}, "contains '..'"),
        ({"name": "/tmp/cbir_tf_abs_evil.txt"}, "absolute path"),
        ({"name": "link", "type": tarfile.SYMTYPE, "linkname": "/etc"}, "outside the target"),
        ({"name": "a/link", "type": tarfile.SYMTYPE, "linkname": "../../.."}, "outside the target"),
        (
            {"name": "hard", "type": tarfile.LNKTYPE, "linkname": "../evil.txt"},
            "outside the target",
        ),
        (
            {"name": "hard", "type": tarfile.LNKTYPE, "linkname": "/etc/passwd"},
            "outside the target",
        ),
        ({"name": "dev", "type": tarfile.CHRTYPE}, "device file"),
        ({"name": "fifo", "type": tarfile.FIFOTYPE}, "device file"),
    ],
)
def test_hostile_tar_is_refused_naming_the_member_before_writing(tmp_path, member, what):
    is_file = member.get("type", tarfile.REGTYPE) == tarfile.REGTYPE
    archive = _tar(
        tmp_path / "evil.tar",
        [({"name": "first.jpg"}, b"1"), (member, b"evil" if is_file else None)],
        mode="w",
    )
    dest = tmp_path / "a" / "b" / "out"
    with pytest.raises(UnsafeArchiveError) as exc:
        safe_extract(archive, dest)
    assert repr(member["name"]) in str(exc.value) and what in str(exc.value)
    # Every member is checked before the first is written.
    assert list(dest.iterdir()) == []
    assert not os.path.exists("/tmp/cbir_tf_abs_evil.txt")
    _no_stray_files(tmp_path, {"evil.tar", "a"})


def test_file_written_through_a_link_that_escapes_later_is_refused(tmp_path):
    """`e -> up/../x` looks inside until `up -> sub/..` exists; then it points outside."""
    (tmp_path / "x").mkdir()
    archive = _tar(
        tmp_path / "order.tar",
        [
            ({"name": "sub", "type": tarfile.DIRTYPE}, None),
            ({"name": "e", "type": tarfile.SYMTYPE, "linkname": "up/../x"}, None),
            ({"name": "up", "type": tarfile.SYMTYPE, "linkname": "sub/.."}, None),
            ({"name": "e/pwned.txt"}, b"pwned"),
        ],
        mode="w",
    )
    dest = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match="'e/pwned.txt'.*link leaving"):
        safe_extract(archive, dest)
    assert list((tmp_path / "x").iterdir()) == []


def test_link_escaping_only_in_the_final_state_is_removed(tmp_path):
    archive = _tar(
        tmp_path / "order.tar",
        [
            ({"name": "sub", "type": tarfile.DIRTYPE}, None),
            ({"name": "e", "type": tarfile.SYMTYPE, "linkname": "up/../x"}, None),
            ({"name": "up", "type": tarfile.SYMTYPE, "linkname": "sub/.."}, None),
        ],
        mode="w",
    )
    dest = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError, match="'e' is a link that resolves outside"):
        safe_extract(archive, dest)
    assert not os.path.lexists(dest / "e")


def test_existing_link_in_target_is_not_written_through(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "out"
    dest.mkdir()
    os.symlink(outside, dest / "pre")
    archive = _tar(tmp_path / "a.tar", [({"name": "pre/f.txt"}, b"x")], mode="w")
    with pytest.raises(UnsafeArchiveError, match="'pre/f.txt'"):
        safe_extract(archive, dest)
    assert list(outside.iterdir()) == []


def test_existing_link_at_a_file_name_is_replaced_not_followed(tmp_path):
    outside = tmp_path / "victim.txt"
    outside.write_text("keep")
    dest = tmp_path / "out"
    dest.mkdir()
    os.symlink(outside, dest / "f.txt")
    safe_extract(_tar(tmp_path / "a.tar", [({"name": "f.txt"}, b"new")], mode="w"), dest)
    assert outside.read_text() == "keep"
    assert not (dest / "f.txt").is_symlink() and (dest / "f.txt").read_bytes() == b"new"


def _zip(path, entries):
    with zipfile.ZipFile(path, "w") as zf:
        for name, data, mode in entries:
            info = zipfile.ZipInfo(name)
            if mode is not None:
                info.external_attr = mode << 16
            zf.writestr(info, data)
    return path


def test_good_zip_extracts(tmp_path):
    archive = _zip(
        tmp_path / "good.zip",
        [("d/", b"", 0o40755), ("d/a.jpg", b"AAA", 0o100644), ("b.jpg", b"B", None)],
    )
    files = safe_extract(archive, tmp_path / "out")
    assert files == ["d/a.jpg", "b.jpg"]
    assert (tmp_path / "out/d/a.jpg").read_bytes() == b"AAA"


@pytest.mark.parametrize(
    "entry, what",
    [
        (("../evil.txt", b"x", None), "contains '..'"),
        (("/abs_evil.txt", b"x", None), "absolute path"),
        (("C:/evil.txt", b"x", None), "absolute path"),
        (("..\\evil.txt", b"x", None), "contains '..'"),
        (("link", b"/etc/passwd", 0o120777), "outside the target"),
        (("link", b"../../x", 0o120777), "outside the target"),
        (("fifo", b"", 0o010644), "device file"),
    ],
)
def test_hostile_zip_is_refused(tmp_path, entry, what):
    archive = _zip(tmp_path / "evil.zip", [entry])
    dest = tmp_path / "out"
    with pytest.raises(UnsafeArchiveError) as exc:
        safe_extract(archive, dest)
    assert repr(entry[0]) in str(exc.value) and what in str(exc.value)
    assert list(dest.iterdir()) == []
    _no_stray_files(tmp_path, {"evil.zip", "out"})


def test_corrupt_and_truncated_archives_raise_archive_error(tmp_path):
    junk = tmp_path / "junk.tgz"
    junk.write_bytes(os.urandom(2000))
    with pytest.raises(ArchiveError, match="neither a tar nor a zip"):
        safe_extract(junk, tmp_path / "o1")
    good = _tar(
        tmp_path / "good.tgz", [({"name": f"f{i}.jpg"}, os.urandom(20_000)) for i in range(5)]
    )
    truncated = tmp_path / "truncated.tgz"
    truncated.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    with pytest.raises(ArchiveError) as exc:
        safe_extract(truncated, tmp_path / "o2")
    assert not isinstance(exc.value, UnsafeArchiveError)
    with pytest.raises(ArchiveError, match="does not exist"):
        safe_extract(tmp_path / "nope.tar", tmp_path / "o3")
