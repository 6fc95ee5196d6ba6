"""What a new user hits in the first hour (issue 14): each item pinned by a test.

Items 2-5 and 11-14 of the issue; the test names say which.
"""

import os
import stat

import numpy as np
import pytest

from cbir_tf import fileio as cio
from cbir_tf.store import files as store
from cbir_tf.store.writer import StoreWriter


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
def test_outputs_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    assert cio.current_umask() == mask
    expected = 0o666 & ~mask
    cio.atomic_write_text(tmp_path / "report.txt", "x")
    cio.atomic_write_json(tmp_path / "results.json", {"a": 1})
    cio.atomic_save_npz(tmp_path / "a.npz", a=np.zeros(3))
    with StoreWriter(store.DescriptorStore(tmp_path / "store"), ["a", "b"], {"x": 1}) as w:
        w.add("a", np.ones(4, np.float32) / 2)
        w.add("b", np.ones(4, np.float32) / 2)
        w.finalize()
    written = [tmp_path / "report.txt", tmp_path / "results.json", tmp_path / "a.npz"]
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

    from cbir_tf.describe.layers import GeM, L2Normalization

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


def test_missing_or_empty_folder_is_refused_by_the_library(tiny_model, tmp_path):
    from cbir_tf.retriever import Retriever
    from cbir_tf.runs import extract as runs

    r = Retriever(tiny_model, image_size=64, directory=tmp_path / "index")
    with pytest.raises(FileNotFoundError, match="does/not/exist"):
        r.index(str(tmp_path / "does/not/exist"), progress=False)
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no image here")
    (empty / "notes.md").write_text("no image here")
    with pytest.raises(ValueError, match=f"{empty} holds no image files"):
        r.index(str(empty), progress=False)
    assert r.root is None and len(r) == 0
    cfg = {"model": {"backbone": "mobilenet", "weights": "none", "alpha": 0.25}}
    for bad, error in [
        (tmp_path / "nope", FileNotFoundError),
        (empty / "notes.md", NotADirectoryError),
        (empty / "notes.txt", ValueError),  # read as a list of images: none exists
        (empty, ValueError),
    ]:
        with pytest.raises(error, match=str(bad)):
            runs.build_index(cfg, str(bad), str(tmp_path / "out"), progress=False)
        assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_extract_with_a_missing_folder_exits_non_zero_with_one_line(tmp_path):
    proc = _run(["extract.py", f"--images={tmp_path / 'no/such/dir'}", f"--out={tmp_path / 'w3'}"])
    assert proc.returncode == 1, proc.stdout + proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no/such/dir" in errors[0] and "does not exist" in errors[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "w3").exists()


# -- item 4: k < 1 is an error; k beyond the index returns the whole index -----------------------


@pytest.mark.parametrize("k", [0, -3, 2.5, True])
def test_k_below_one_is_refused(small_index, photos, k):
    query = os.path.join(photos, "img1.jpg")
    with pytest.raises(ValueError, match="k .*>= 1"):
        small_index.search(query, k=k)
    with pytest.raises(ValueError, match="k .*>= 1"):
        small_index.search_descriptors(np.asarray(small_index.descriptors[:1]), k=k)


def test_k_beyond_the_index_returns_it_whole(small_index, photos):
    hits = small_index.search(os.path.join(photos, "img1.jpg"), k=100)
    assert sorted(h.id for h in hits) == sorted(small_index.ids) and len(hits) == 4
    assert [h.rank for h in hits] == [1, 2, 3, 4]


@pytest.mark.slow
def test_search_cli_refuses_k_zero(tmp_path):
    proc = _run(["search.py", f"--index={tmp_path}", f"--query={tmp_path}", "--k=0"])
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: k (results per query)")


# -- item 3: a saved model describes images at the size it was trained at ------------------------


@pytest.fixture(scope="module")
def trained_at_48(tiny_model, tmp_path_factory):
    """A saved model that says it was trained at 48 px (as train.py's model.keras does)."""
    from cbir_tf.describe import models

    path = tmp_path_factory.mktemp("model") / "model.keras"
    return models.save_descriptor_model(tiny_model, path, {"image_size": 48, "recipe": "head"})


def test_train_py_models_carry_their_training_size(tmp_path, tiny_model):
    import dataclasses

    from cbir_tf import config as config_lib
    from cbir_tf.describe import models
    from cbir_tf.train import Settings
    from cbir_tf.train import outputs as export

    s = Settings.from_config(config_lib.load_config("train_head"))
    s = dataclasses.replace(s, backbone="efficientnetb1", image_size=160)
    info = export.model_info(s, "pooled")
    assert info["image_size"] == 160 and "alpha" not in info
    path = export.save_model(tiny_model, str(tmp_path), info)
    assert models.saved_model_info(path)["image_size"] == 160
    assert os.listdir(tmp_path) == ["model.keras"]  # no temporary file left
    # Models saved before the info moved into the file: the model.json beside them.
    old = tmp_path / "old"
    old.mkdir()
    tiny_model.save(old / "model.keras")
    (old / "model.json").write_text('{"model": "model.keras", "image_size": 224}')
    assert models.saved_model_info(old / "model.keras")["image_size"] == 224
    (old / "model.json").write_text('{"model": "other.keras", "image_size": 224}')
    assert models.saved_model_info(old / "model.keras") == {}


def test_from_model_and_benchmarks_use_the_trained_size(trained_at_48, caplog):
    from cbir_tf.describe.models import image_size_for_model
    from cbir_tf.retriever import Retriever

    assert Retriever.from_model(trained_at_48).image_size == 48
    with caplog.at_level("WARNING"):
        assert Retriever.from_model(trained_at_48, image_size=96).image_size == 96
    assert "at 96 px as asked, not at the 48 px" in caplog.text
    # The one rule the commands resolve `--model`'s image size with (`cli.set_model_image_size`).
    assert image_size_for_model(trained_at_48, None) == 48
    assert image_size_for_model(trained_at_48, 80) == 80


@pytest.mark.slow
def test_extract_uses_the_trained_size_unless_overridden(trained_at_48, photos, tmp_path):
    import json

    for out, override, size in (("a", [], 48), ("b", ["--config.data.image_size=80"], 80)):
        proc = _run(
            [
                "extract.py",
                f"--images={photos}",
                f"--out={tmp_path / out}",
                f"--model={trained_at_48}",
            ]
            + override
        )
        assert proc.returncode == 0, proc.stderr
        assert json.loads((tmp_path / out / "manifest.json").read_text())["image_size"] == size
    assert "at 80 px as asked, not at the 48 px" in proc.stderr


# -- item 5: an index folder holds the model that describes its queries -------------------------


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory):
    import keras

    keras.utils.set_random_seed(0)
    net = keras.applications.MobileNet(
        include_top=False, weights=None, alpha=0.25, input_shape=(None, None, 3)
    )
    # Batch-norm statistics from one random batch: untouched ones make every descriptor ~0.
    for layer in net.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0
    net(np.random.default_rng(0).uniform(-1, 1, (8, 64, 64, 3)).astype("float32"), training=True)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_025.weights.h5"
    net.save_weights(path)
    return str(path)


def _move_and_search(index, moved, model_file, query):
    """Moves the model file away and the index elsewhere, then searches the moved index."""
    import shutil

    from cbir_tf.retriever import Retriever

    shutil.move(model_file, model_file + ".moved")
    shutil.move(index, moved)
    try:
        r = Retriever.load(moved)  # what search.py --index=MOVED runs
        hits = r.search(query, k=2)
        row = r.ids.index(hits[0].id)
        np.testing.assert_allclose(r.describe([query])[0], r.descriptors[row], atol=1e-5)
        return hits
    finally:
        shutil.move(model_file + ".moved", model_file)


def test_index_built_with_a_weights_file_survives_moving(weights_file, photos, tmp_path):
    from cbir_tf.runs import extract as runs

    cfg = {
        "model": {"backbone": "mobilenet", "alpha": 0.25, "weights": weights_file},
        "data": {"image_size": 64},
    }
    runs.build_index(cfg, photos, str(tmp_path / "index"), progress=False)
    assert (tmp_path / "index" / "model.keras").is_file()
    query = os.path.join(photos, "img2.jpg")
    hits = _move_and_search(str(tmp_path / "index"), str(tmp_path / "moved"), weights_file, query)
    assert hits[0].id == "img2.jpg" and hits[0].score == pytest.approx(1.0, abs=1e-4)


def test_index_built_with_a_keras_model_survives_moving(trained_at_48, photos, tmp_path):
    from cbir_tf import config as config_lib
    from cbir_tf.runs import extract as runs

    index = str(tmp_path / "index")
    runs.build_index(config_lib.default_config(), photos, index, model_path=trained_at_48)
    query = os.path.join(photos, "sub", "img0.jpg")
    hits = _move_and_search(index, str(tmp_path / "moved"), trained_at_48, query)
    assert hits[0].id == "sub/img0.jpg"


# -- item 14: the width multiplier is printed only where it means something ---------------------


def test_alpha_is_shown_for_mobilenets_only():
    from cbir_tf.describe import backbones

    assert backbones.display_name("efficientnetb1", 1.0) == "efficientnetb1"
    assert backbones.display_name("VGG16", 0.5) == "vgg16"
    assert backbones.display_name("mobilenet", 0.25) == "mobilenet (alpha 0.25)"
    assert backbones.display_name("mobilenetv2", 1.0) == "mobilenetv2 (alpha 1)"


# -- item 11: descriptor caches are keyed by the model file's content ---------------------------


class _PhotoBenchmark:
    """The photo folder as a benchmark: every photo a database image, two of them queries."""

    name = "photos"

    def __init__(self, root):
        self.root = root
        self.imlist = ["img1", "img2", "img3"]
        self.qimlist = ["img1", "img2"]

    def image_paths(self):
        return [os.path.join(self.root, n + ".jpg") for n in self.imlist]

    def query_paths(self):
        return [os.path.join(self.root, n + ".jpg") for n in self.qimlist]

    def query_bboxes(self):
        return [None, None]


def test_two_fine_tuned_models_never_share_a_cache(tiny_model, photos, tmp_path):
    import keras

    from cbir_tf import config as config_lib
    from cbir_tf.describe import models
    from cbir_tf.evaluate import benchmark

    cfg = config_lib.default_config()
    # Non-model keys are unchanged, so caches of earlier runs stay valid.
    spec = benchmark.DescriptorSpec(model=config_lib.block(cfg, "model"))
    assert spec.key() == "efficientnetb1-imagenet-rmac-1024px-s1"
    work = {"data_root": str(tmp_path / "data"), "workdir": str(tmp_path / "work")}
    paths = []
    for run in ("run1", "run2"):
        keras.utils.set_random_seed(len(paths))
        other = keras.models.clone_model(tiny_model)  # new random weights, same layers
        info = {"image_size": 48}
        paths.append(models.save_descriptor_model(other, tmp_path / run / "model.keras", info))
    ds = _PhotoBenchmark(photos)
    stores = []
    for path in paths:
        spec = benchmark.DescriptorSpec(config_lib.defaults("model"), 48, model_path=path)
        db, _, meta = benchmark.extract_benchmark(
            ds, spec, benchmark.WhiteningSpec(), **work, progress=False
        )
        assert meta["model_sha256"] == benchmark.model_sha256(path)
        stores.append(meta["store"])
        assert db.descriptors.shape == (3, 8)
    assert stores[0] != stores[1]
    assert os.path.basename(stores[0]).startswith("model-")
    assert "-48px-s1" in os.path.basename(stores[0])  # at the size the model was trained at
    # The same model again reuses its own cache.
    spec = benchmark.DescriptorSpec(config_lib.defaults("model"), 48, model_path=paths[0])
    _, _, meta = benchmark.extract_benchmark(
        ds, spec, benchmark.WhiteningSpec(), **work, progress=False
    )
    assert meta["store"] == stores[0]


# -- item 12: a finished training run and changed settings --------------------------------------


def _finished_workdir(workdir, settings):
    """A workdir as a finished train.py run leaves it (state, model.keras, model.json)."""
    import json

    os.makedirs(os.path.join(workdir, "checkpoints"))
    state = {"version": 1, "identity": settings.identity(), "finished": True, "class_names": []}
    with open(os.path.join(workdir, "checkpoints", "state.json"), "w") as f:
        json.dump(state, f)
    open(os.path.join(workdir, "model.keras"), "wb").close()
    info = {"model": "model.keras", "history": [], "settings": settings.as_dict()}
    with open(os.path.join(workdir, "model.json"), "w") as f:
        json.dump(cio.json_safe(info), f)


def test_finished_run_with_other_settings_names_them(tmp_path):
    from cbir_tf import config as config_lib
    from cbir_tf import train as finetune

    cfg = config_lib.load_config("train_head")
    workdir = str(tmp_path / "run")
    _finished_workdir(workdir, finetune.Settings.from_config(cfg))
    # Same settings (the way the run executes may change): the finished run is returned.
    cfg.train.mixed_precision = "off"
    result = finetune.train(cfg, str(tmp_path / "no-data-needed"), workdir, progress=False)
    assert result.model_path == os.path.join(workdir, "model.keras")
    cfg.train.epochs = 3
    cfg.train.image_size = 320
    with pytest.raises(finetune.CheckpointMismatchError) as e:
        finetune.train(cfg, str(tmp_path / "no-data-needed"), workdir, progress=False)
    msg = str(e.value)
    assert "already holds a finished run made with other settings" in msg
    assert "epochs (finished run: 10, now: 3)" in msg
    assert "image_size (finished run: 224, now: 320)" in msg
    assert "--workdir=" in msg and "\n" not in msg


# -- item 14: the HTML report is one file, and says 'no whitening' -------------------------------


def test_report_embeds_its_images_and_says_no_whitening(photos, tmp_path):
    import re

    from cbir_tf import config as config_lib
    from cbir_tf.evaluate import methods as evaluation
    from cbir_tf.evaluate import report
    from cbir_tf.runs import evaluate as run_evaluate

    ds = _PhotoBenchmark(photos)
    ds.num_images, ds.num_queries = 3, 2
    ds.gnd = [
        {"easy": [0], "hard": [], "junk": [2]},
        {"easy": [1], "hard": [2], "junk": []},
    ]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cfg = config_lib.default_config()
    results, rankings = evaluation.evaluate_methods(
        x[:2], x, ds.gnd, methods=("plain",), rerank_cfg=cfg.rerank.to_dict()
    )
    out = str(tmp_path / "eval")
    files = report.write_results(out, results, (1, 5, 10), extra={"report": "report.html"})
    meta = {"backbone": "vgg16", "weights": "imagenet", "pooling": "gem", "whitening": None}
    meta.update(image_size=64, scales=[1.0])
    title = "photos: " + run_evaluate._describe(meta)
    loaded = run_evaluate.LoadedBenchmark(
        ds, None, "photos", x, x[:2], np.zeros(0, np.int64), meta, {}, title, None
    )
    page = run_evaluate.write_visual_report(out, loaded, results, rankings, cfg, title, files)[
        "report"
    ]
    text = open(page, encoding="utf-8").read()
    sources = re.findall(r'<img src="([^"]*)"', text)
    assert len(sources) >= 3  # the PR plot and a grid per query
    assert all(src.startswith("data:image/png;base64,") for src in sources)
    assert "no whitening" in title
    assert '<th class="name">whitening</th><td class="name">no whitening</td>' in text
    assert "None" not in re.sub(r"data:[^\"]*", "", text)


# -- item 14: a merge of shards from different models names what differs -------------------------


def test_merge_of_shards_from_different_models_names_the_field(
    tiny_model, trained_at_48, photos, tmp_path
):
    from cbir_tf import config as config_lib
    from cbir_tf.describe import models
    from cbir_tf.runs import extract as runs
    from cbir_tf.store.index_folder import merge_indexes

    other = models.save_descriptor_model(tiny_model, tmp_path / "other.keras", {"image_size": 48})
    shards = []
    for k, path in enumerate([trained_at_48, other]):
        shards.append(str(tmp_path / f"shard{k}"))
        runs.build_index(
            config_lib.default_config(),
            photos,
            shards[-1],
            model_path=path,
            shard_index=k,
            num_shards=2,
        )
    with pytest.raises(ValueError) as e:
        merge_indexes(shards, tmp_path / "merged")
    assert f"model.path (first shard: {trained_at_48!r}, this shard: {other!r})" in str(e.value)


# -- item 14: image ids are relative to the collection root, whatever was indexed ---------------


def test_ids_are_relative_to_the_root(tiny_model, photos, tmp_path):
    import shutil

    from cbir_tf.retriever import Retriever

    r = Retriever(tiny_model, image_size=64)
    r.index(
        [os.path.join(photos, "img1.jpg"), os.path.join(photos, "sub", "img0.jpg")], progress=False
    )
    assert r.root == photos and sorted(r.ids) == ["img1.jpg", "sub/img0.jpg"]
    r.index(photos, progress=False)  # the rest of the folder: the same kind of ids
    assert sorted(r.ids) == ["img1.jpg", "img2.jpg", "img3.jpg", "sub/img0.jpg"]
    outside = tmp_path / "more"
    _photo(outside / "x.jpg", 9)
    r.index(str(outside), progress=False)
    rel = os.path.relpath(outside / "x.jpg", photos).replace(os.sep, "/")
    assert rel.startswith("../") and rel in r.ids
    assert not any(os.path.isabs(i) for i in r.ids)
    assert r.path_of(rel) == str(outside / "x.jpg")
    assert r.search(str(outside / "x.jpg"), k=1)[0].path == str(outside / "x.jpg")
    r.save(tmp_path / "index")
    assert Retriever.load(tmp_path / "index").path_of(rel) == str(outside / "x.jpg")
    # An index of an earlier version with an absolute id: re-indexing keeps that id.
    old = Retriever(tiny_model, image_size=64, root=photos)
    legacy = str(outside / "x.jpg")
    old.index([legacy], ids=[legacy], progress=False)
    shutil.copy(os.path.join(photos, "img2.jpg"), outside / "y.jpg")
    counts = old.index(str(outside), progress=False)
    assert counts["unchanged"] == 1 and counts["added"] == 1
    assert sorted(old.ids) == sorted([legacy, rel.replace("x.jpg", "y.jpg")])


# -- item 14: the package lists its public API, lazily ------------------------------------------


def test_dir_lists_the_public_api_without_loading_tensorflow():
    code = (
        "import sys, cbir_tf\n"
        "names = dir(cbir_tf)\n"
        "assert {'Retriever', 'SearchResult', 'compute_map', 'load_store'} <= set(names)\n"
        "assert 'Any' not in names and '_EXPORTS' not in names, names\n"
        "assert cbir_tf.compute_map is cbir_tf.evaluate.metrics.compute_map\n"
        "assert cbir_tf.load_store.__module__ == 'cbir_tf.store.files'\n"
        "assert 'tensorflow' not in sys.modules, 'numpy-only names loaded TensorFlow'\n"
        "print('ok')\n"
    )
    proc = _run(["-c", code])
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_every_public_name_resolves():
    import cbir_tf

    for name in cbir_tf.__all__:
        assert getattr(cbir_tf, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cbir_tf.nope  # noqa: B018
