"""What a new user hits in the first hour (issue 14): each item pinned by a test.

Items 2-5 and 11-14 of the issue; the test names say which.
"""

import os
import stat

import numpy as np
import pytest

from cbir_tf import io as cio
from cbir_tf import store


@pytest.fixture
def umask():
    """Sets a chosen umask for one test and restores the old one."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


# -- item 13: output files follow the user's umask ---------------------------------------------


@pytest.mark.parametrize("mask", [0o022, 0o027, 0o002])
def test_item13_outputs_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    assert cio.current_umask() == mask
    expected = 0o666 & ~mask
    cio.atomic_write_text(tmp_path / "report.txt", "x")
    cio.atomic_write_json(tmp_path / "results.json", {"a": 1})
    cio.atomic_save_npy(tmp_path / "a.npy", np.zeros(3))
    with store.StoreWriter(store.DescriptorStore(tmp_path / "store"), ["a", "b"], {"x": 1}) as w:
        w.add("a", np.ones(4, np.float32) / 2)
        w.add("b", np.ones(4, np.float32) / 2)
        w.finalize()
    written = [tmp_path / "report.txt", tmp_path / "results.json", tmp_path / "a.npy"]
    written += [p for p in (tmp_path / "store").iterdir() if p.is_file() and p.name != ".lock"]
    assert len(written) > 6
    for p in written:
        assert _mode(p) == expected, (p, oct(_mode(p)))
