"""Descriptor extraction as an Apache Beam pipeline: the same stores, from a laptop to a cluster.

`BeamExtractor.extract` is a drop-in for `cbir_tf.describe.extract.extract` (same arguments, same
`ExtractionResult`): the images are cut into shards of `shard_images` contiguous images, and

    shards not finished yet ─► Reshuffle ─► ExtractShard (per worker: the model loaded once in
    setup(); per shard: `descriptors.extract` into the shard's own store) ─┬► done shards
                                                                          └► dead letters
    then `cbir_tf.store.shards.merge_shards` joins the shard stores into `store_dir`.

Each shard is today's extraction, unchanged: the same loader (`cbir_tf.data.pipeline`: EXIF
orientation, crops, resizing, skip rules and reasons), the same compiled per-image function, the
same resumable, atomically written store (`cbir_tf.store.writer`). Images keep their own size,
so the model runs one image at a time, as in the sequential path: Beam's `RunInference` batches
tensors of one shape, and padding images to a common size would change their descriptors.

Images that cannot be read go to the `skipped` output (a dead letter per image, counted by the
`images_skipped` metric) and, durably, to their shard store's skipped.json, which the merge
joins into the final skipped.json in input order, exactly as the sequential path writes it.

Resuming and retrying: a finished shard store is never recomputed (the driver leaves it out of
the pipeline, a re-executed bundle finds it complete and just reads it), and an interrupted one
resumes from its saved chunks, so the work is idempotent. A shard that fails is tried again in
its worker (`attempts`); runners that retry failed bundles (Dataflow does) retry on top
of that. The local Fn API runner does not retry bundles: a worker that dies fails the run, and
running the same command again resumes it.

Locally the pipeline runs on Beam's Fn API runner with worker processes
(`--runner=FnApiRunner --direct_running_mode=multi_processing --direct_num_workers=N`), pinned
explicitly: Beam's DirectRunner first tries the Prism runner, a binary it downloads at run time.
Worker processes load the model the driver saved, as a cluster's workers do, so a local run
tries the path a cluster runs; each pays ~10 s to start Python, Beam and TensorFlow.
`--direct_running_mode=multi_threading` runs the workers as threads of the driver instead,
sharing its model as is (TensorFlow and the image decoder release the GIL): nothing starts.
Paths may be local or on any filesystem tf.io.gfile reads (gs://, s3://, hdfs://; see
`cbir_tf.remote`). Local paths use the plain file API, with the shard stores inside the output
store (workers share the driver's disk). With `shard_dir` on another filesystem (what workers
on a cluster need), each worker writes its shard store on its own disk with today's code, then
copies the finished files there, the COMPLETE marker last; the driver takes a shard as finished
from that marker, copies the finished stores to a local temporary folder and merges them. Images
on another filesystem are read as bytes through tf.io.gfile into the same decoder (same skip
rules and reasons). An output store on another filesystem is written locally, then copied.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import shlex
import shutil
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.metrics.metric import Metrics, MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from cbir_tf import config as config_lib
from cbir_tf import quiet, remote
from cbir_tf.data.image_list import shard_range
from cbir_tf.describe import extract as descriptors
from cbir_tf.store import copies
from cbir_tf.store.files import DescriptorStore
from cbir_tf.store.shards import merge_shards
from cbir_tf.store.writer import StoreSink

log = logging.getLogger(__name__)

SHARDS_DIR = "beam-shards"  # inside the store folder; removed once the merge is complete
MODEL_FILE = "model.keras"  # the driver's model, which every worker loads once
_NAMESPACE = "cbir_tf"
# The driver's models, by run, for worker threads in its own process (the local runner).
_SHARED_MODELS: dict[str, Any] = {}


class BeamExtractionError(RuntimeError):
    """The pipeline failed; the shards it finished are kept (run the same command to resume)."""


def pipeline_options(beam_options: str | Sequence[str] = "", num_workers: int = 0) -> list[str]:
    """The pipeline's command-line options: the user's, passed through, plus local defaults.

    Without a `--runner`, the Fn API runner with `num_workers` worker processes is used (never
    Beam's default DirectRunner, which fetches the Prism binary from the internet).

    Args:
      beam_options: Beam options as one shell-quoted string or a list, e.g.
        "--runner=DataflowRunner --project=P --region=R --temp_location=gs://B/tmp".
      num_workers: local workers (threads, or processes); 0 = the usable cores.

    Returns:
      The option list given to `PipelineOptions`.
    """
    opts = shlex.split(beam_options) if isinstance(beam_options, str) else list(beam_options)
    names = {o.split("=", 1)[0] for o in opts if o.startswith("--")}
    if "--runner" not in names:
        opts.append("--runner=FnApiRunner")
        if "--direct_running_mode" not in names:
            opts.append("--direct_running_mode=multi_processing")
        if "--direct_num_workers" not in names:
            opts.append(f"--direct_num_workers={int(num_workers) or _usable_cores()}")
        if "--default_sdk_harness_log_level" not in names and not log.isEnabledFor(logging.DEBUG):
            # Local workers print on this terminal: their start and shut-down lines are noise.
            opts.append("--default_sdk_harness_log_level=WARNING")
    return opts


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _in_process(options: Sequence[str]) -> bool:
    """Whether the workers are threads of this process (the Fn API runner, not in processes)."""
    opts = dict(o.split("=", 1) for o in options if o.startswith("--") and "=" in o)
    return opts.get("--runner", "").lower() == "fnapirunner" and opts.get(
        "--direct_running_mode", "in_memory"
    ) in ("in_memory", "multi_threading")


def _local_threads(options: Sequence[str]) -> int | None:
    """TensorFlow threads per worker when local workers share this machine's cores, else None."""
    opts = dict(o.split("=", 1) for o in options if o.startswith("--") and "=" in o)
    if opts.get("--runner", "").lower() not in ("fnapirunner", "directrunner"):
        return None
    if opts.get("--direct_running_mode") != "multi_processing":
        return None
    return max(1, _usable_cores() // max(1, int(opts.get("--direct_num_workers", "1") or 1)))


def _local_runner(options: PipelineOptions) -> Any:
    """The Fn API runner for `--runner=FnApiRunner`, handing the options to its workers.

    Built as Beam's DirectRunner builds it (which Beam does not do for the runner by name), so
    that options such as --default_sdk_harness_log_level reach the worker processes. None for
    other runners: Beam makes them from the options.
    """
    from apache_beam.options.pipeline_options import StandardOptions

    if str(options.view_as(StandardOptions).runner).lower() not in ("fnapirunner",):
        return None
    from apache_beam.portability.api import beam_provision_api_pb2
    from apache_beam.runners.portability.fn_api_runner import fn_runner
    from apache_beam.runners.portability.portable_runner import JobServiceHandle

    encoded = JobServiceHandle.encode_pipeline_options(options.get_all_options())
    info = beam_provision_api_pb2.ProvisionInfo(pipeline_options=encoded)
    return fn_runner.FnApiRunner(provision_info=fn_runner.ExtendedProvisionInfo(info))


def _is_complete(store: str) -> bool:
    """Whether the shard store at `store` (local or not) is finished."""
    return copies.is_complete_store(store) if remote.is_remote(store) else (
        DescriptorStore(store).is_complete
    )  # fmt: skip


def _run_key(ids: Sequence[str], settings: dict[str, Any], count: int) -> str:
    """A run's name in a shared shard folder: the same command resumes, another cannot mix in."""
    text = json.dumps([list(ids), settings, count], sort_keys=True, default=str)
    return "run-" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class ExtractShard(beam.DoFn):
    """Describes one shard per element into its own store; the model is loaded once per worker.

    Elements are dicts {'index', 'num_shards', 'total', 'items', 'ids', 'bboxes', 'store'}.
    Main output: (shard index, images computed, images skipped); tagged output 'skipped':
    (id, reason) of each image that could not be read (the dead letters).

    A shard that fails is tried again in place, up to `attempts` times, resuming its store: the
    local runner fails the whole job on a failed bundle, where Dataflow, Flink or Spark would
    retry it (and get the same idempotent work).

    Args:
      model_path: the `.keras` descriptor model every worker loads in `setup`.
      settings: keyword arguments of `descriptors.extract` common to all shards (image_size,
        scales, ms_power, meta, antialias), and the shard stores' `flush_every`.
      attempts: tries per shard.
      threads: TensorFlow's intra-op threads per worker (None: TensorFlow's default, all the
        machine's cores); local workers share one machine, each takes its part of the cores.
      fault_hook: called as fault_hook(shard index, stage) at stage 'start' and 'written' (the
        shard store is complete); tests raise from it to play a failing worker. None in use.
      model_key: the driver's model in `_SHARED_MODELS`, used as is by workers that run as
        threads of the driver's process (`model_path` is then None: nothing saved or loaded).
    """

    def __init__(
        self,
        model_path: str,
        settings: dict[str, Any],
        attempts: int,
        threads=None,
        fault_hook=None,
        model_key: str | None = None,
    ):
        self.model_path = model_path
        self.model_key = model_key
        self.settings = settings
        self.attempts = int(attempts)
        self.threads = threads
        self.fault_hook = fault_hook
        self.verbose = log.isEnabledFor(logging.DEBUG)  # the driver's, carried to the workers
        self.model = None
        self.counters = {
            name: Metrics.counter(_NAMESPACE, name)
            for name in ("images_computed", "images_skipped", "shards_written", "shard_retries")
        }

    def setup(self) -> None:
        if self.model_key in _SHARED_MODELS:
            # A worker thread of the driver's process: its model, loaded and traced already.
            self.model = _SHARED_MODELS[self.model_key]
            return
        quiet.import_tensorflow(self.verbose)  # without its start-up lines, as the commands do
        import tensorflow as tf

        from cbir_tf.describe import models

        if not self.verbose:
            # A local worker's harness logs its start and shut-down at INFO on the terminal.
            logging.getLogger().setLevel(logging.WARNING)
        if self.threads:
            try:
                tf.config.threading.set_intra_op_parallelism_threads(int(self.threads))
            except RuntimeError:  # TensorFlow already started in this process (a new DoFn)
                pass
        if remote.is_remote(self.model_path):
            with tempfile.TemporaryDirectory(prefix="cbir-model-") as tmp:
                local = os.path.join(tmp, MODEL_FILE)
                tf.io.gfile.copy(self.model_path, local)
                self.model = models.load_descriptor_model(local)
        else:
            self.model = models.load_descriptor_model(self.model_path)

    def process(self, shard: dict[str, Any]):
        computed = 0
        for attempt in range(1, self.attempts + 1):
            try:
                res = self._describe(shard, "start")
                computed += res.num_computed
                self._describe(shard, "written", res)
                break
            except Exception as e:
                if attempt == self.attempts:
                    raise
                self.counters["shard_retries"].inc()
                log.warning("shard %d failed (%s: %s); trying again (%d of %d)", shard["index"],
                            type(e).__name__, e, attempt + 1, self.attempts)  # fmt: skip
        self.counters["images_computed"].inc(computed)
        self.counters["images_skipped"].inc(len(res.skipped))
        self.counters["shards_written"].inc()
        for image_id, reason in res.skipped:
            yield beam.pvalue.TaggedOutput("skipped", (image_id, reason))
        yield shard["index"], computed, len(res.skipped)

    def _describe(self, shard: dict[str, Any], stage: str, res: Any = None) -> Any:
        """The shard's `descriptors.extract` (stage 'start'), or the hook after it ('written')."""
        if self.fault_hook is not None:
            self.fault_hook(shard["index"], stage)
        if stage != "start":
            return res
        settings = dict(self.settings)
        flush_every = settings.pop("flush_every")
        args = dict(
            ids=shard["ids"], bboxes=shard["bboxes"], shard_index=shard["index"],
            num_shards=shard["num_shards"], total_images=shard["total"], progress=False,
            **settings,
        )  # fmt: skip
        store = shard["store"]
        if not remote.is_remote(store):
            sink = StoreSink(store, flush_every)
            return descriptors.extract(self.model, shard["items"], sink=sink, **args)
        # Written on this worker's disk (atomic renames), then copied, COMPLETE last; a store
        # finished before (a retried bundle) is copied back and read, not computed again.
        with tempfile.TemporaryDirectory(prefix="cbir-shard-") as tmp:
            local = os.path.join(tmp, "store")
            done = copies.is_complete_store(store)
            if done:
                copies.download_store(store, local)
            sink = StoreSink(local, flush_every)
            res = descriptors.extract(self.model, shard["items"], sink=sink, **args)
            if not done:
                copies.upload_store(local, store)
            res.descriptors = None  # a map of the temporary file: only the counts are used
        return res


def _last_line(e: BaseException) -> str:
    """The gist of a pipeline error: runners wrap the worker's traceback into the message."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return lines[-1] if lines else type(e).__name__


def _log_dead_letter(item: tuple[str, str]) -> None:
    log.info("skipped %s: %s", *item)


def _extract_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """`descriptors.extract`'s keyword arguments (its defaults where not given) for the shards."""
    params = inspect.signature(descriptors.extract).parameters
    own = {"sink", "progress", "total_images"}  # set per call, or per shard by `_fill`
    names = {n for n, p in params.items() if p.kind is p.KEYWORD_ONLY} - own
    unknown = set(options) - names
    if unknown:
        raise TypeError(f"BeamExtractor.extract got unexpected arguments {sorted(unknown)}")
    return {**{n: params[n].default for n in names}, **options}


class BeamExtractor:
    """Runs `descriptors.extract` as a Beam pipeline (see the module docstring).

    Args (None: the `extract` block of configs/default.py):
      beam_options: pipeline options passed through to Beam (see `pipeline_options`).
      shard_images: images per shard: the unit of work, of retry and of resumption.
      attempts: tries per shard in a worker before the run fails.
      num_workers: local workers when `beam_options` names no runner; 0 = the cores.
      shard_dir: where workers write the shard stores: "" = inside the output store (workers
        share the driver's disk), or a folder every worker reaches (gs://bucket/tmp/shards).
      fault_hook: see `ExtractShard` (tests only).
    """

    def __init__(
        self,
        beam_options: str | Sequence[str] | None = None,
        *,
        shard_images: int | None = None,
        attempts: int | None = None,
        num_workers: int | None = None,
        shard_dir: str | None = None,
        fault_hook: Callable | None = None,
    ):
        d = config_lib.defaults("extract")
        beam_options = d["beam_options"] if beam_options is None else beam_options
        shard_images = d["beam_shard_images"] if shard_images is None else shard_images
        attempts = d["beam_attempts"] if attempts is None else attempts
        num_workers = d["beam_workers"] if num_workers is None else num_workers
        shard_dir = d["beam_shard_dir"] if shard_dir is None else shard_dir
        if int(shard_images) < 1:
            raise ValueError(f"shard_images must be >= 1, got {shard_images}")
        if int(attempts) < 1:
            raise ValueError(f"attempts must be >= 1, got {attempts}")
        self.options = pipeline_options(beam_options, num_workers)
        self.threads = _local_threads(self.options)
        self.shard_images = int(shard_images)
        self.attempts = int(attempts)
        self.shard_dir = str(shard_dir or "")
        self.fault_hook = fault_hook
        self.last_metrics: dict[str, int] = {}

    def extract(
        self,
        model: Any,
        paths: Sequence[Any],
        *,
        sink: StoreSink | None = None,
        progress: bool = True,
        **options: Any,
    ) -> Any:
        """`descriptors.extract`'s contract, computed by the Beam pipeline.

        The arguments are those of `cbir_tf.describe.extract.extract` (`options`: its keyword
        arguments but `total_images`; image paths only: decoded arrays are not sent to
        workers). The pipeline writes stores: `sink` is a `StoreSink`, or None for stores in a
        temporary folder and the descriptors returned in memory.

        Raises:
          BeamExtractionError: the pipeline failed (finished shards are kept: run again to
            resume).
          TypeError: a sink other than a store's.
        """
        common = _extract_options(options)
        if sink is None:
            with tempfile.TemporaryDirectory(prefix="cbir-beam-") as tmp:
                res = self._extract(model, paths, StoreSink(tmp), progress, common)
                res.descriptors = np.array(res.descriptors)  # off the store about to vanish
                return res
        if not isinstance(sink, StoreSink):
            raise TypeError(f"the Beam runner writes stores: give a StoreSink, not {sink!r}")
        return self._extract(model, paths, sink, progress, common)

    def _extract(self, model: Any, paths, sink: StoreSink, progress: bool, common: dict) -> Any:
        """`extract` into the store `sink.path` (local, or on another filesystem)."""
        if remote.is_remote(sink.path):
            return self._extract_to_remote(model, paths, sink, progress, common)
        if int(common["num_shards"]) != 1:
            raise ValueError(
                "the Beam runner splits the work into shards itself: drop --shard_index and "
                "--num_shards (or use --runner=local for a shard made by hand)"
            )
        store_dir = os.path.abspath(sink.path)
        start = time.perf_counter()
        self.last_metrics = {}
        if not DescriptorStore(store_dir).is_complete:
            self._fill(model, list(paths), store_dir, dict(common, flush_every=sink.flush_every))
        res = descriptors.extract(model, paths, sink=StoreSink(store_dir), progress=False, **common)
        # The store was filled by the workers: report their work, not this read-back.
        res.num_computed = self.last_metrics.get("images_computed", 0)
        done = res.num_computed + self.last_metrics.get("images_skipped", 0)
        res.num_resumed = len(res.ids) + len(res.skipped) - done
        res.seconds = time.perf_counter() - start
        res.images_per_second = done / res.seconds if res.seconds > 0 else 0.0
        if progress:
            print(
                f"beam: {res.num_computed} images described, {len(res.skipped)} skipped, "
                f"{res.num_resumed} already done, in {res.seconds:.1f} s -> {store_dir}"
            )
        return res

    def _extract_to_remote(self, model, paths, sink: StoreSink, progress: bool, common) -> Any:
        """`extract` into a store on another filesystem: written locally, copied COMPLETE last.

        The descriptors are returned in memory (the local copy is temporary).
        """
        url = sink.path
        shards = self.shard_dir or remote.join(url, SHARDS_DIR)
        with tempfile.TemporaryDirectory(prefix="cbir-beam-") as tmp:
            local = StoreSink(os.path.join(tmp, "store"), sink.flush_every)
            if copies.is_complete_store(url):
                copies.download_store(url, local.path)
                res = descriptors.extract(model, paths, sink=local, progress=False, **common)
            else:
                saved, self.shard_dir = self.shard_dir, shards
                try:
                    res = self._extract(model, paths, local, progress, common)
                finally:
                    self.shard_dir = saved
                copies.upload_store(local.path, url)
                if not saved:  # the default shard folder, inside the output store
                    remote.remove_tree(shards)
            res.descriptors = np.array(res.descriptors)  # off the store about to vanish
        return res

    def _fill(self, model: Any, paths: list[Any], store_dir: str, common: dict) -> None:
        """Runs the pipeline until every shard store is complete, then merges them."""
        if any(descriptors.is_array(p) for p in paths):
            raise TypeError("the Beam runner extracts image files: pass paths, not arrays")
        items, ids, bboxes, _ = descriptors.shard_inputs(
            paths, common["ids"], common["bboxes"], common["shard_index"], common["num_shards"]
        )
        settings = {
            "image_size": common["image_size"],
            "scales": tuple(common["scales"]),
            "ms_power": float(common["ms_power"]),
            "meta": dict(common["meta"] or {}),
            "flush_every": int(common["flush_every"]),
            "antialias": bool(common["antialias"]),
        }
        count = max(1, math.ceil(len(items) / self.shard_images))
        runner = dict(o.split("=", 1) for o in self.options if "=" in o).get("--runner", "")
        if runner.lower() not in ("fnapirunner", "directrunner") and not (
            remote.is_remote(self.shard_dir) or remote.is_remote(store_dir)
        ):
            log.warning(
                "%s workers write their shard stores under %s: they must share that folder with "
                "this machine (NFS, a mounted bucket); else set extract.beam_shard_dir to a "
                "folder they all reach (gs://...)", runner, self.shard_dir or store_dir,
            )  # fmt: skip
        if remote.is_remote(self.shard_dir):
            work = remote.join(self.shard_dir, _run_key(ids, settings, count))
        else:
            work = os.path.join(os.path.abspath(self.shard_dir or store_dir), SHARDS_DIR)
        elements = self._shards(items, ids, bboxes, work, count)
        todo = [e for e in elements if not _is_complete(e["store"])]
        log.info("beam: %d of %d shards to describe", len(todo), len(elements))
        if todo:
            try:
                self._run(todo, model, work, settings)
            except Exception as e:
                left = [x["index"] for x in elements if not _is_complete(x["store"])]
                raise BeamExtractionError(
                    f"beam extraction into {store_dir} failed, shards {left} of {len(elements)} "
                    f"unfinished ({_last_line(e)}); finished shards are kept: run the same "
                    "command again to resume"
                ) from e
        self._merge([e["store"] for e in elements], store_dir, work)

    @staticmethod
    def _model_file(model: Any, work: str) -> str:
        """The model saved where the workers load it from (once per run folder)."""
        from cbir_tf.describe import models

        path = (remote.join if remote.is_remote(work) else os.path.join)(work, MODEL_FILE)
        if not remote.is_remote(work):
            if not os.path.isfile(path):
                models.save_descriptor_model(model, path)
            return path
        import tensorflow as tf

        if not tf.io.gfile.exists(path):
            with tempfile.TemporaryDirectory(prefix="cbir-model-") as tmp:
                local = models.save_descriptor_model(model, os.path.join(tmp, MODEL_FILE))
                tf.io.gfile.makedirs(work)
                tf.io.gfile.copy(local, path + ".partial", overwrite=True)
                tf.io.gfile.rename(path + ".partial", path, overwrite=True)
        return path

    @staticmethod
    def _merge(stores: list[str], store_dir: str, work: str) -> None:
        """`merge_shards` into `store_dir`; shard stores on another filesystem copied here first."""
        if not remote.is_remote(work):
            merge_shards(stores, store_dir, overwrite=True)
            shutil.rmtree(work, ignore_errors=True)
            return
        with tempfile.TemporaryDirectory(prefix="cbir-merge-") as tmp:
            local = [os.path.join(tmp, s.rstrip("/").rsplit("/", 1)[-1]) for s in stores]
            for url, path in zip(stores, local, strict=True):
                copies.download_store(url, path)
            merge_shards(local, store_dir, overwrite=True)
        remote.remove_tree(work)

    def _shards(self, items, ids, bboxes, work: str, count: int) -> list[dict[str, Any]]:
        """One element per shard of `shard_images` contiguous images (`shard_range`)."""
        n = len(items)
        join = remote.join if remote.is_remote(work) else os.path.join
        out = []
        for i in range(count):
            lo, hi = shard_range(n, i, count)
            out.append(
                {
                    "index": i,
                    "num_shards": count,
                    "total": n,
                    "items": [os.fspath(p) for p in items[lo:hi]],
                    "ids": list(ids[lo:hi]),
                    "bboxes": None if bboxes is None else list(bboxes[lo:hi]),
                    "store": join(work, f"shard-{i:05d}-of-{count:05d}"),
                }
            )
        return out

    def _run(self, todo: list[dict[str, Any]], model: Any, work: str, settings: dict) -> None:
        """One pipeline run over the `todo` shard elements; keeps its counters.

        Worker threads of this process use `model` itself; other workers load it from the run's
        folder (saved there once).
        """
        key = model_path = None
        if _in_process(self.options):
            key = f"{os.getpid()}-{id(model)}-{time.monotonic_ns()}"
            _SHARED_MODELS[key] = model
        else:
            model_path = self._model_file(model, work)
        # Beam logs at INFO while it builds the pipeline, and relays every worker's lines (start,
        # shut-down, each skipped image); the summary says what matters, --verbose shows all.
        beam_log = logging.getLogger("apache_beam")
        level = beam_log.level
        if not log.isEnabledFor(logging.DEBUG):
            # Local workers' warnings are on the terminal already, from their own stderr.
            beam_log.setLevel(logging.ERROR)
        try:
            options = PipelineOptions(self.options)
            fn = ExtractShard(
                model_path, settings, self.attempts, self.threads, self.fault_hook, key
            )
            p = beam.Pipeline(runner=_local_runner(options), options=options)
            out = (
                p
                | "Shards" >> beam.Create(todo, reshuffle=False)
                | "Redistribute" >> beam.Reshuffle()
                | "Extract" >> beam.ParDo(fn).with_outputs("skipped", main="done")
            )
            _ = out.skipped | "DeadLetters" >> beam.Map(_log_dead_letter)
            # Each local worker process prints Beam's start-up lines on this terminal.
            with quiet.filtered_stderr(
                quiet.BEAM_NOISE, enabled=not log.isEnabledFor(logging.DEBUG)
            ):
                result = p.run()
                result.wait_until_finish()
        finally:
            beam_log.setLevel(level)
            _SHARED_MODELS.pop(key, None)
        counters = result.metrics().query(MetricsFilter().with_namespace(_NAMESPACE))["counters"]
        for c in counters:
            name = c.key.metric.name
            self.last_metrics[name] = self.last_metrics.get(name, 0) + int(c.committed or 0)
