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


# -- a tiny model and photo folder shared by the retriever tests --------------------------------

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _photo(path, seed, size=(64, 48)):
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)
    return str(path)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for i in range(4):
        _photo(root / ("sub" if i == 0 else "") / f"img{i}.jpg", i)
    return str(root)


@pytest.fixture(scope="module")
def tiny_model():
    import keras

    from cbir_tf.layers import GeM, L2Normalization

    keras.utils.set_random_seed(0)
    inp = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inp)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    return keras.Model(inp, L2Normalization()(GeM()(x)))


@pytest.fixture(scope="module")
def small_index(photos, tiny_model):
    from cbir_tf.retriever import Retriever

    r = Retriever(tiny_model, image_size=64)
    r.index(photos, progress=False)
    return r


def _run(args, cwd=ROOT, timeout=300):
    import subprocess
    import sys

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


# -- item 2: a missing or empty --images folder is an error ------------------------------------


def test_item2_missing_or_empty_folder_is_refused_by_the_library(tiny_model, tmp_path):
    from cbir_tf import retriever
    from cbir_tf.retriever import Retriever

    r = Retriever(tiny_model, image_size=64, directory=tmp_path / "index")
    with pytest.raises(FileNotFoundError, match="does/not/exist"):
        r.index(str(tmp_path / "does/not/exist"), progress=False)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no image here")
    with pytest.raises(ValueError, match=f"{empty} holds no image files"):
        r.index(str(empty), progress=False)
    assert r.root is None and len(r) == 0
    cfg = {"model": {"backbone": "mobilenet", "weights": "none", "alpha": 0.25}}
    for bad, error in [
        (tmp_path / "nope", FileNotFoundError),
        (empty / "notes.txt", NotADirectoryError),
        (empty, ValueError),
    ]:
        with pytest.raises(error, match=str(bad)):
            retriever.build_index(cfg, str(bad), str(tmp_path / "out"), progress=False)
        assert not (tmp_path / "out").exists()


def test_item2_extract_with_a_missing_folder_exits_non_zero_with_one_line(tmp_path):
    proc = _run(["extract.py", f"--images={tmp_path / 'no/such/dir'}", f"--out={tmp_path / 'w3'}"])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no/such/dir" in errors[0] and "does not exist" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "w3").exists()


# -- item 4: k < 1 is an error; k beyond the index returns the whole index -----------------------


@pytest.mark.parametrize("k", [0, -3, 2.5, True])
def test_item4_k_below_one_is_refused(small_index, photos, k):
    query = os.path.join(photos, "img1.jpg")
    with pytest.raises(ValueError, match="k .*>= 1"):
        small_index.search(query, k=k)
    with pytest.raises(ValueError, match="k .*>= 1"):
        small_index.search_descriptors(np.asarray(small_index.descriptors[:1]), k=k)


def test_item4_k_beyond_the_index_returns_it_whole(small_index, photos):
    hits = small_index.search(os.path.join(photos, "img1.jpg"), k=100)
    assert sorted(h.id for h in hits) == sorted(small_index.ids) and len(hits) == 4
    assert [h.rank for h in hits] == [1, 2, 3, 4]


def test_item4_search_cli_refuses_k_zero(tmp_path):
    proc = _run(["search.py", f"--index={tmp_path}", f"--query={tmp_path}", "--k=0"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: k (results per query)")
