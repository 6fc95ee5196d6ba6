"""Extraction on Apache Beam (local worker threads or processes) gives the sequential index.

One folder (synthetic photos and broken files) is indexed sequentially, then with Beam twice:
a first run interrupted by a shard that always fails, then the same command again, in which
every worker fails once on each shard after writing it and tries again. The Beam index must
equal the sequential one (ids and order, descriptors, skipped.json, no missing or duplicated
rows), and the shards finished by the first run must not be described again. The second run's
worker processes start TensorFlow: that is most of the test's time.
"""

import json
import os
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from photos import synthetic_photo

from cbir_tf import config as config_lib
from cbir_tf.beam import extract as beam_extract
from cbir_tf.describe import models
from cbir_tf.runs import extract as runs
from cbir_tf.store import files as store
from cbir_tf.store.writer import StoreSink

NUM_PHOTOS = 9
SHARD_IMAGES = 3  # 12 files -> 4 shards


class ShardLog:
    """Fault hook: records every call in `folder` and fails as told (picklable, by reference).

    Args:
      folder: one file per call, '<shard>-<stage>-<pid>-<ns>'.
      stage: the stage at which to fail: 'start' or 'written' (the shard's store is complete).
      always: None, or the one shard that fails every time, but only once another shard's
        store is complete (so that the run leaves finished work behind); otherwise every shard
        fails once at `stage`.
      store_dir: where the shard stores are (to wait for another shard).
    """

    def __init__(self, folder, stage, always=None, store_dir=None):
        self.folder, self.stage, self.always, self.store_dir = str(folder), stage, always, store_dir
        os.makedirs(self.folder, exist_ok=True)

    def __call__(self, shard, stage):
        name = f"{shard}-{stage}-{os.getpid()}-{time.monotonic_ns()}"
        open(os.path.join(self.folder, name), "w").close()
        if stage != self.stage:
            return
        if self.always is None:
            if len(self.calls(stage, shard)) == 1:
                raise RuntimeError(f"worker fails once on shard {shard}")
            return
        if shard == self.always:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not self._others_done():
                time.sleep(0.1)
            raise RuntimeError(f"shard {shard} always fails")

    def _others_done(self):
        shards = os.path.join(self.store_dir, beam_extract.SHARDS_DIR)
        return any(
            store.DescriptorStore(os.path.join(shards, d)).is_complete
            for d in os.listdir(shards) if d.startswith("shard-")
        )  # fmt: skip

    def calls(self, stage="start", shard=None):
        """Shard indices of the calls at `stage` (of `shard` only if given), one per call."""
        found = [int(n.split("-")[0]) for n in os.listdir(self.folder) if f"-{stage}-" in n]
        return sorted(i for i in found if shard is None or i == shard)


class FailOn(ShardLog):
    """Records every call (as ShardLog) and fails each time shard `shard` starts."""

    def __init__(self, folder, shard):
        super().__init__(folder, "never")
        self.shard = shard

    def __call__(self, shard, stage):
        super().__call__(shard, stage)
        if shard == self.shard and stage == "start":
            raise RuntimeError(f"shard {shard} always fails")


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("beam_photos")
    for i in range(NUM_PHOTOS):
        synthetic_photo(root / ("sub" if i % 4 == 0 else "") / f"img{i}.jpg", i)
    (root / "sub" / "truncated.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_text("not an image")
    return str(root)


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    """A small deterministic descriptor model (conv -> GeM -> L2) as a .keras file."""
    from cbir_tf.describe.layers import GeM, L2Normalization

    keras.utils.set_random_seed(0)
    inp = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inp)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    out = L2Normalization()(GeM()(keras.layers.Conv2D(16, 3, strides=2)(x)))
    return models.save_descriptor_model(
        keras.Model(inp, out), str(tmp_path_factory.mktemp("model") / "tiny.keras")
    )


def _cfg(runner="local"):
    cfg = config_lib.default_config()
    cfg.data.image_size = 64
    cfg.extract.runner = runner
    return cfg


def _index(cfg, folder, out, model_file, extract_fn=None):
    return runs.build_index(
        cfg, folder, out, model_path=model_file, progress=False,
        extract_fn=extract_fn,
    )  # fmt: skip


def _skipped(index_dir):
    with open(os.path.join(index_dir, "skipped.json"), encoding="utf-8") as f:
        return json.load(f)


@pytest.mark.slow
def test_beam_index_equals_sequential_and_resumes_after_failures(
    folder, model_file, tmp_path, monkeypatch
):
    from apache_beam.runners.portability import prism_runner

    def no_prism(*args, **kwargs):
        raise AssertionError("the Prism runner (downloaded at run time) must not be used")

    monkeypatch.setattr(prism_runner.PrismRunner, "run_pipeline", no_prism)
    # The worker processes import the fault hooks from this module by name.
    here = os.path.dirname(os.path.abspath(__file__))
    paths = [here, os.path.dirname(here), os.environ.get("PYTHONPATH", "")]  # and the helpers
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(paths))

    seq = _index(_cfg(), folder, tmp_path / "seq", model_file)
    assert len(seq) == NUM_PHOTOS and len(seq.failed) == 3

    out = str(tmp_path / "beam")
    staging = os.path.join(out, "pending")
    first = ShardLog(tmp_path / "log1", "start", always=1, store_dir=staging)
    # Two worker threads in this process, which has TensorFlow loaded already: the interrupted
    # run costs no worker start-up (the second run starts two worker processes).
    threads = "--direct_running_mode=multi_threading --direct_num_workers=2"
    beam1 = beam_extract.BeamExtractor(
        threads, shard_images=SHARD_IMAGES, attempts=2, fault_hook=first
    )
    with pytest.raises(
        beam_extract.BeamExtractionError, match=r"shards \[.*1.*\] of 4 unfinished.*run the same"
    ):
        _index(_cfg("beam"), folder, out, model_file, beam1.extract)
    assert first.calls(shard=1) == [1, 1]  # tried again in its worker before the run fails
    shards = os.path.join(staging, beam_extract.SHARDS_DIR)
    finished = {
        int(d.split("-")[1])
        for d in os.listdir(shards)
        if d.startswith("shard-") and store.DescriptorStore(os.path.join(shards, d)).is_complete
    }
    assert finished and 1 not in finished

    # The same command again; every shard's worker fails once after writing it, and retries.
    # Worker processes this time: they load the model the driver saved for them.
    second = ShardLog(tmp_path / "log2", "written")
    beam2 = beam_extract.BeamExtractor(
        "--direct_running_mode=multi_processing", shard_images=SHARD_IMAGES, attempts=2,
        num_workers=2, fault_hook=second,
    )  # fmt: skip
    r = _index(_cfg("beam"), folder, out, model_file, beam2.extract)
    todo = sorted(set(range(4)) - finished)
    # Shards finished before are not described again; a retried shard is read back, not redone.
    assert second.calls("start") == sorted(todo * 2) and second.calls("written") == sorted(todo * 2)
    m = beam2.last_metrics
    assert m["shard_retries"] == m["shards_written"] == len(todo)
    assert m["images_computed"] + m["images_skipped"] == SHARD_IMAGES * len(todo)

    assert r.ids == seq.ids and len(set(r.ids)) == len(r.ids)
    desc_b, ids_b, _ = store.load_store(out)
    desc_s, ids_s, _ = store.load_store(str(tmp_path / "seq"))
    assert ids_b == ids_s
    np.testing.assert_allclose(desc_b, desc_s, atol=1e-5)
    assert _skipped(out) == _skipped(str(tmp_path / "seq")) and len(_skipped(out)) == 3
    assert r.failed == seq.failed
    assert not os.path.exists(staging)  # committed: no shard stores left behind


def test_runner_choice_and_local_options():
    assert runs.extract_function({"runner": "local"}) is None
    fn = runs.extract_function({"runner": "beam", "beam_options": "", "beam_workers": 3})
    # The Fn API runner, pinned (never Prism, downloaded at run time), with worker processes
    # that share the cores and load the saved model, as a cluster's workers do.
    assert fn.__self__.options[:3] == [
        "--runner=FnApiRunner",
        "--direct_running_mode=multi_processing",
        "--direct_num_workers=3",
    ]
    assert fn.__self__.threads == max(1, len(os.sched_getaffinity(0)) // 3)
    assert not beam_extract._in_process(fn.__self__.options)
    # Worker threads use the driver's model (nothing to start or load).
    threads = beam_extract.BeamExtractor("--direct_running_mode=multi_threading", num_workers=3)
    assert threads.threads is None and beam_extract._in_process(threads.options)
    with pytest.raises(ValueError, match="unknown extract.runner 'spark'.*'local', 'beam'"):
        runs.extract_function({"runner": "spark"})
    # A runner of the user's is passed through unchanged, with nothing added.
    dataflow = "--runner=DataflowRunner --project=p --region=europe-west1 --temp_location=gs://b/t"
    assert beam_extract.pipeline_options(dataflow) == dataflow.split()
    assert beam_extract.BeamExtractor(dataflow).threads is None
    assert "--direct_num_workers=5" in beam_extract.pipeline_options("--direct_num_workers=5")


@pytest.mark.slow
def test_extract_command_passes_beam_options_through(folder, tmp_path):
    """extract.py --runner=beam --beam_options=...: the options reach Beam as given (one line)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [
            sys.executable, os.path.join(root, "extract.py"), f"--images={folder}",
            f"--out={tmp_path / 'index'}", "--runner=beam", "--weights=none",
            "--config.model.backbone=mobilenet", "--config.model.alpha=0.25",
            "--config.data.image_size=32", "--beam_options=--runner=NoSuchRunner",
        ],
        capture_output=True, text=True, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES=""),
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: beam extraction into ") and "NoSuchRunner" in last, last
    assert "Traceback" not in proc.stderr


def test_beam_on_another_filesystem_equals_sequential(folder, model_file, tmp_path):
    """Images, shard stores and the output on ram:// (tf.io.gfile), the pipeline in-process.

    ram:// lives in one process, so the Fn API runner runs in memory; gs://, s3:// or hdfs://
    take the same code on Dataflow, Flink or Spark.
    """
    import tensorflow as tf

    from cbir_tf import remote
    from cbir_tf.data.folder import list_images
    from cbir_tf.store import copies

    gfile = tf.io.gfile
    src = f"ram://beam-{os.getpid()}/photos"
    for dirpath, _, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), folder).replace(os.sep, "/")
            gfile.makedirs(remote.join(src, os.path.dirname(rel)))
            gfile.copy(os.path.join(dirpath, name), remote.join(src, rel), overwrite=True)
    gfile.makedirs(remote.join(src, ".hidden"))
    gfile.copy(os.path.join(folder, "img1.jpg"), remote.join(src, ".hidden", "x.jpg"))
    rel = list_images(folder)
    assert list_images(src) == rel and len(rel) == NUM_PHOTOS + 3  # the local rules and ids

    seq_dir = str(tmp_path / "seq")
    seq = _index(_cfg(), folder, seq_dir, model_file)
    shards = f"ram://beam-{os.getpid()}/shards"
    beam = beam_extract.BeamExtractor(
        "--direct_running_mode=in_memory --direct_num_workers=1", shard_images=5, shard_dir=shards
    )
    out = str(tmp_path / "beam")
    r = _index(_cfg("beam"), src, out, model_file, beam.extract)  # extract.py --images=ram://...
    assert beam.last_metrics["shards_written"] == 3 and r.root == src
    assert r.ids == seq.ids
    desc_b, ids_b, _ = store.load_store(out)
    desc_s, ids_s, _ = store.load_store(seq_dir)
    assert ids_b == ids_s and len(ids_b) == NUM_PHOTOS
    np.testing.assert_allclose(desc_b, desc_s, atol=1e-5)
    assert _skipped(out) == _skipped(seq_dir) and len(_skipped(out)) == 3
    assert r.failed == seq.failed  # the same skip reasons as for local files
    assert gfile.listdir(shards) == []  # merged: the run's shard stores are removed
    local_runner = _index(_cfg(), src, str(tmp_path / "seq_ram"), model_file)  # no Beam
    assert local_runner.ids == seq.ids and local_runner.failed == seq.failed
    calls = []
    again = lambda *a, **k: calls.append(a) or beam.extract(*a, **k)  # noqa: E731
    assert _index(_cfg("beam"), src, out, model_file, again).ids == seq.ids
    assert calls == []  # the same files (sizes and times from gfile.stat): nothing described

    # Resuming from shard stores on ram://: a run fails on shard 1; a finished shard that lost
    # its COMPLETE marker (a copy cut short) counts as unfinished; the next run does the rest.
    model = models.load_descriptor_model(model_file)
    urls = [remote.join(src, i) for i in rel]
    mem = "--direct_running_mode=in_memory"
    first = FailOn(tmp_path / "log1", shard=1)
    failing = beam_extract.BeamExtractor(
        mem, shard_images=4, attempts=1, shard_dir=shards, fault_hook=first
    )
    with pytest.raises(beam_extract.BeamExtractionError, match=r"shards \[.*1.*\] of 3"):
        failing.extract(model, urls, ids=rel, image_size=64, sink=StoreSink(str(tmp_path / "r")))
    stores = sorted(gfile.glob(remote.join(shards, "run-*", "shard-*")))
    done = [int(u.rsplit("shard-", 1)[1][:5]) for u in stores if copies.is_complete_store(u)]
    assert 1 not in done and set(done) == set(first.calls()) - {1}
    cut = [u for u in stores if copies.is_complete_store(u)][:1]
    for u in cut:
        gfile.remove(remote.join(u, store.COMPLETE_FILE))
    second = ShardLog(tmp_path / "log2", "never")
    resumed = beam_extract.BeamExtractor(mem, shard_images=4, shard_dir=shards, fault_hook=second)
    res = resumed.extract(model, urls, ids=rel, image_size=64, sink=StoreSink(str(tmp_path / "r")))
    assert second.calls() == sorted({0, 1, 2} - set(done) | {int(u[-14:-9]) for u in cut})
    assert res.ids == ids_s and gfile.listdir(shards) == []
    np.testing.assert_allclose(store.load_store(str(tmp_path / "r"))[0], desc_s, atol=1e-5)

    # The output store itself on ram://: written locally, copied with COMPLETE last.
    url = f"ram://beam-{os.getpid()}/index"
    res = beam_extract.BeamExtractor(mem, shard_images=20).extract(
        model, urls, ids=rel, image_size=64, sink=StoreSink(url), progress=False
    )
    assert copies.is_complete_store(url) and not gfile.exists(remote.join(url, "beam-shards"))
    assert res.ids == ids_s
    assert [list(x) for x in res.skipped] == [[x["id"], x["reason"]] for x in _skipped(seq_dir)]
    np.testing.assert_allclose(res.descriptors, desc_s, atol=1e-5)


def test_a_list_of_image_paths_indexes_like_its_folder(folder, model_file, tmp_path):
    """`extract.py --images=LIST.txt`: the same ids, descriptors and skips as the folder, with
    the local runner and with Beam; a list that names nothing or a path twice is refused."""
    from cbir_tf.data.folder import list_images

    rel = list_images(folder)
    lst = tmp_path / "photos.txt"
    # Relative to the list file's folder, absolute, comments and blank lines: all accepted.
    rel_to_list = [os.path.relpath(os.path.join(folder, r), tmp_path) for r in rel[1:]]
    lst.write_text(
        f"# my photos\n{os.path.join(folder, rel[0])}\n\n" + "\n".join(rel_to_list) + "\n",
        encoding="utf-8",
    )
    seq = _index(_cfg(), folder, str(tmp_path / "from_folder"), model_file)
    listed = _index(_cfg(), str(lst), str(tmp_path / "from_list"), model_file)
    beam = beam_extract.BeamExtractor("--direct_running_mode=in_memory", shard_images=6)
    with_beam = _index(_cfg("beam"), str(lst), str(tmp_path / "beam"), model_file, beam.extract)
    desc_s, ids_s, _ = store.load_store(str(tmp_path / "from_folder"))
    for r, out in ((listed, "from_list"), (with_beam, "beam")):
        assert r.ids == seq.ids and r.failed == seq.failed and r.root == folder
        desc, ids, _ = store.load_store(str(tmp_path / out))
        assert ids == ids_s
        np.testing.assert_allclose(desc, desc_s, atol=1e-5)
        assert _skipped(str(tmp_path / out)) == _skipped(str(tmp_path / "from_folder"))
    # Every shard of a list has the list's root, so that merged shards keep the folder's ids.
    from cbir_tf.data.image_list import shard_range

    part = runs.build_index(
        _cfg(), str(lst), str(tmp_path / "part1"), model_path=model_file, progress=False,
        shard_index=1, num_shards=2,
    )  # fmt: skip
    span = shard_range(len(rel), 1, 2)
    assert part.root == folder and part.ids
    assert part.ids == [i for i in rel[span[0] : span[1]] if i in seq.ids]
    # A listed file that is missing is reported and counted, not dropped silently.
    (tmp_path / "gone.txt").write_text(f"{os.path.join(folder, seq.ids[0])}\nmissing.jpg\n")
    gone = _index(_cfg(), str(tmp_path / "gone.txt"), str(tmp_path / "gone"), model_file)
    assert len(gone.ids) == 1 and list(gone.failed) == [gone.id_of(tmp_path / "missing.jpg")]
    assert "No such file" in next(iter(gone.failed.values()))
    assert _skipped(str(tmp_path / "gone"))  # recorded in the store's skipped.json too
    (tmp_path / "empty.txt").write_text("# nothing\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt: the list names no image path"):
        runs.build_index(_cfg(), str(tmp_path / "empty.txt"), str(tmp_path / "x"))
    (tmp_path / "twice.txt").write_text(f"{rel[0]}\n{rel[1]}\n{rel[0]}\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"twice.txt:3: .* is listed twice \(line 1\)"):
        runs.build_index(_cfg(), str(tmp_path / "twice.txt"), str(tmp_path / "y"))


@pytest.mark.slow
def test_beam_workers_print_nothing_that_is_not_the_users_business(folder, tmp_path):
    """Issue 26 item 7: each local worker process printed Beam's start-up lines."""
    from cbir_tf import quiet

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    proc = subprocess.run(
        [
            sys.executable, os.path.join(root, "extract.py"), f"--images={folder}",
            f"--out={tmp_path / 'index'}", "--runner=beam", "--weights=none",
            "--config.model.backbone=mobilenet", "--config.model.alpha=0.25",
            "--config.data.image_size=32", "--config.extract.beam_workers=2",
            "--config.extract.beam_shard_images=6",
        ],
        capture_output=True, text=True, timeout=600,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES=""),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{NUM_PHOTOS} added" in proc.stderr, proc.stderr[-3000:]
    noise = [line for line in proc.stderr.splitlines() if quiet.BEAM_NOISE.search(line)]
    assert not noise, proc.stderr[-3000:]
    assert "WARNING:" not in proc.stderr and "INFO:" not in proc.stderr, proc.stderr[-3000:]
