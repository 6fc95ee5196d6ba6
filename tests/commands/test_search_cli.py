"""The fourth entry point, search.py: ranked table, HTML pages and PNG grids from an index."""

import io
import os
import subprocess
import sys
import urllib.parse
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image, ImageDraw

from cbir_tf import retriever as retriever_lib
from cbir_tf.runs.search import run_search

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _photo(path, seed, size=(80, 64)):
    r = np.random.default_rng(seed)
    img = Image.new("RGB", size, tuple(int(v) for v in r.integers(0, 256, 3)))
    d = ImageDraw.Draw(img)
    for _ in range(5):
        x, y = (int(v) for v in r.integers(0, 60, 2))
        w, h = (int(v) for v in r.integers(8, 30, 2))
        d.ellipse([x, y, x + w, y + h], fill=tuple(int(v) for v in r.integers(0, 256, 3)))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, quality=95)
    return str(path)


class _Refs(HTMLParser):
    def __init__(self):
        super().__init__()
        self.refs = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.refs.append(attrs["src"])
        elif tag == "a" and "href" in attrs:
            self.refs.append(attrs["href"])


def _assert_refs_exist(page):
    parser = _Refs()
    with open(page, encoding="utf-8") as f:
        parser.feed(f.read())
    assert parser.refs
    for ref in parser.refs:
        target = os.path.join(os.path.dirname(page), urllib.parse.unquote(ref))
        assert os.path.isfile(target), f"{page} links to missing {ref}"
    return parser.refs


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """An index of 8 photos built with a small saved model; and a folder of 2 query photos."""
    import keras

    from cbir_tf.describe.layers import GeM, L2Normalization

    base = tmp_path_factory.mktemp("cli")
    photos = base / "photos"
    for i in range(8):
        _photo(photos / f"p{i}.jpg", i)
    queries = base / "queries"
    for i in (2, 5):
        img = Image.open(photos / f"p{i}.jpg").point(lambda v: min(255, int(v * 1.1)))
        os.makedirs(queries / "more", exist_ok=True)
        img.save(queries / ("more" if i == 5 else "") / f"query_p{i}.jpg", quality=85)
    keras.utils.set_random_seed(1)
    inp = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inp)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    x = keras.layers.Conv2D(32, 3, strides=2, activation="relu")(x)
    model = keras.Model(inp, L2Normalization()(GeM()(x)))
    r = retriever_lib.Retriever(model, image_size=80)
    r.index(str(photos), progress=False)
    index_dir = r.save(base / "index")
    return {"index": index_dir, "photos": str(photos), "queries": str(queries)}


def _run(*args, timeout=120):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "search.py"), *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=timeout,
    )


def test_help():
    proc = _run("--help")
    # absl's --help exits with status 1 by design (as for every absl program).
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr, proc.stderr
    assert "python search.py --index=index/ --query=photo.jpg" in proc.stdout
    for flag in ("--index", "--query", "--k", "--out", "--rerank"):
        assert flag in proc.stdout


@pytest.mark.slow
def test_missing_index_is_one_clear_line(tmp_path):
    photo = _photo(tmp_path / "q.jpg", 0)
    proc = _run(f"--index={tmp_path / 'nothing'}", f"--query={photo}")
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "not an image index" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_single_query_prints_table_and_writes_page_and_grid(index, tmp_path):
    query = os.path.join(index["queries"], "query_p2.jpg")
    out = tmp_path / "out"
    stream = io.StringIO()
    pairs = run_search(index["index"], query, k=3, out=out, stream=stream)
    lines = stream.getvalue().splitlines()
    assert lines[0] == f"query: {query}"
    assert lines[1].split() == ["rank", "score", "image", "id"]
    rank, score, image_id = lines[2].split()
    assert (rank, image_id) == ("1", "p2.jpg") and 0.9 < float(score) <= 1.0001
    assert len(lines) >= 5 and lines[4].split()[0] == "3"
    assert pairs[0][1][0].path == os.path.join(index["photos"], "p2.jpg")
    assert sorted(n for n in os.listdir(out) if not n.endswith("_files")) == [
        "query_p2.html",
        "query_p2.png",
    ]
    refs = _assert_refs_exist(out / "query_p2.html")
    assert "query_p2.png" in refs  # the grid is shown on the page
    assert Image.open(out / "query_p2.png").size[0] > 200


@pytest.mark.slow
def test_folder_query_cli_writes_one_page_per_query_and_an_index(index, tmp_path):
    out = tmp_path / "out"
    proc = _run(
        f"--index={index['index']}",
        f"--query={index['queries']}",
        "--k=4",
        "--rerank=aqe",
        f"--out={out}",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    blocks = [b for b in proc.stdout.split("\n\n") if b.startswith("query:")]
    assert len(blocks) == 2
    for block, expected in zip(blocks, ("p5.jpg", "p2.jpg"), strict=True):
        rows = block.splitlines()[2:]
        assert len(rows) == 4 and rows[0].split()[2] == expected  # near-duplicate first
    assert f"results page: {out / 'index.html'}" in proc.stdout
    refs = _assert_refs_exist(out / "index.html")
    assert {"query_p2.html", "query_p5.html"} <= set(refs)
    for name in ("query_p2", "query_p5"):
        _assert_refs_exist(out / f"{name}.html")
        assert Image.open(out / f"{name}.png").format == "PNG"
