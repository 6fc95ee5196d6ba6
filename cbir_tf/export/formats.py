"""Deployable descriptor models: a SavedModel with serving signatures, and TFLite files.

The SavedModel is self-contained TensorFlow (no Python of this package is needed to load it, so
TF Serving, Vertex AI, TF Hub or another language's TF runtime can serve it) and has two
signatures:

  serving_default          image_bytes: string [B] (encoded JPEG / PNG / WebP / BMP / GIF)
                           -> descriptors: float32 [B, D]
                           Each file is decoded, EXIF-oriented, made RGB and shrunk to the
                           model's image size exactly as extraction does it with PIL
                           (`cbir_tf.export.tf_image` says where TF ops can and cannot follow PIL),
                           then described at every scale of the model and combined as
                           `cbir_tf.describe.extract.extract` does.
  descriptors_from_pixels  pixels: float32 [B, H, W, 3] raw RGB 0..255, already sized
                           -> descriptors: float32 [B, D]

Both return L2-normalised (and, when the model has it, whitened) descriptors. TF Serving's REST
API decodes base64 JSON values of the string input, `{"instances": [{"b64": "<base64 file>"}]}`;
the input's `_bytes` suffix is what Vertex AI looks for to do the same.

TFLite files hold the network of the single-scale descriptor (pixels -> descriptor), in float32,
float16 weights, or dynamic-range int8 weights; every op is a TFLite built-in (the pooling
layers, R-MAC's regions computed from the feature-map size at run time, whitening, L2), so the
files run on the plain TFLite runtime without the Select TF ops (Flex) delegate. Their input is
[1, H, W, 3] with H and W chosen at run time (`resize_tensor_input`); decoding and resizing are
left to the app (the image's longest side should be the model's image size).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

from cbir_tf.config import default

log = logging.getLogger(__name__)

__all__ = [
    "FORMATS",
    "QUANTIZATIONS",
    "ExportSource",
    "check_target",
    "export",
    "export_saved_model",
    "export_tflite",
    "serving_endpoints",
    "source_from_model",
    "source_from_path",
    "run_tflite",
    "tflite_bytes",
    "tflite_interpreter",
]

FORMATS = ("saved_model", "tflite")
QUANTIZATIONS = ("float32", "float16", "int8")
SIGNATURE_INPUT = "image_bytes"
SIGNATURE_OUTPUT = "descriptors"
INFO_FILE = "cbir_export.json"


@dataclasses.dataclass
class ExportSource:
    """A descriptor model and the settings extraction used it with.

    Attributes:
      model: keras.Model, raw RGB float32 [B, H, W, 3] (0..255) -> float32 [B, D].
      image_size: longest image side fed to the network (images are only shrunk).
      scales: multi-scale factors (1.0,) for a single scale.
      ms_power: power of the generalised mean combining the scales.
      description: facts recorded beside the export (backbone, pooling, origin, ...).
    """

    model: Any
    image_size: int = default("data.image_size")
    scales: tuple[float, ...] = tuple(default("data.scales"))
    ms_power: float = default("data.ms_power")
    description: dict[str, Any] = dataclasses.field(default_factory=dict)


def source_from_path(
    path: str | os.PathLike,
    *,
    image_size: int = default("data.image_size"),
    scales: Sequence[float] = default("data.scales"),
    ms_power: float = default("data.ms_power"),
) -> ExportSource:
    """The model of a `.keras` file, or of an index folder (its `model.keras` or reference).

    Args:
      path: a `.keras` descriptor model, or an index folder written by extract.py / Retriever.
      image_size, scales, ms_power: how a `.keras` model describes images (an index folder
        records its own).

    Raises:
      FileNotFoundError: no such file or folder.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if os.path.isdir(path):
        from cbir_tf import retriever

        r = retriever.Retriever.load(path)
        return ExportSource(
            r.model,
            r.image_size,
            tuple(r.scales),
            r.ms_power,
            {"origin": "index", "path": path, **dict(r.descriptor_meta)},
        )
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} not found: pass a .keras model or an index folder")
    from cbir_tf.describe import models

    return ExportSource(
        models.load_descriptor_model(path),
        int(image_size),
        tuple(float(s) for s in scales),
        float(ms_power),
        {"origin": "keras", "path": path},
    )


def source_from_model(
    model: Mapping[str, Any],
    *,
    whitening_path: str | os.PathLike | None = None,
    image_size: int = default("data.image_size"),
    scales: Sequence[float] = default("data.scales"),
    ms_power: float = default("data.ms_power"),
) -> ExportSource:
    """The model a config's `model` block describes (backbone, weights, pooling), whitened.

    Args:
      model: `build_descriptor_model`'s keyword arguments (a config's `model` block).
      whitening_path: optional `.npz` written by `cbir_tf.describe.whitening.Whitening.save`; one
        learned on R-MAC region vectors (info `regional`) is applied to the regions.
      image_size, scales, ms_power: how the model describes images.
    """
    from cbir_tf.describe import models, whitening

    white = whitening.Whitening.load(whitening_path) if whitening_path else None
    regional = bool(white is not None and white.info.get("regional"))
    network = models.build_descriptor_model(**model, whitening=white, regional_whitening=regional)
    keys = ("backbone", "alpha", "weights", "pooling", "gem_p", "rmac_levels")
    description = {k: model.get(k) for k in keys}
    description.update(origin="config", whitening=os.fspath(whitening_path or "") or None)
    return ExportSource(
        network, int(image_size), tuple(float(s) for s in scales), float(ms_power), description
    )


def _output_dim(model) -> int:
    dim = model.output.shape[-1]
    if dim is None:
        raise ValueError(f"model {model.name} has no static descriptor dimension")
    return int(dim)


def serving_endpoints(source: ExportSource) -> dict[str, tuple[Any, list]]:
    """The SavedModel's two signatures as functions with their input signatures.

    Returns:
      {'serving_default': (fn(image_bytes string [B]), [spec]), 'descriptors_from_pixels':
      (fn(pixels float32 [B, H, W, 3]), [spec])}; each fn returns {'descriptors': float32
      [B, D]}.
    """
    import tensorflow as tf

    from cbir_tf.describe import extract as descriptors
    from cbir_tf.export import tf_image

    model, size = source.model, int(source.image_size)
    dim = _output_dim(model)
    # One image at a time, as extraction: padding images into a batch would change them.
    describe = descriptors.build_extract_function(model, source.scales, source.ms_power)
    one_out = tf.TensorSpec([dim], tf.float32)

    def from_bytes(data):
        pixels = tf_image.resize_longest(tf_image.decode_rgb(data), size)
        return describe(tf.cast(pixels, tf.float32)[tf.newaxis])[0]

    def serve(image_bytes):
        out = tf.map_fn(from_bytes, image_bytes, fn_output_signature=one_out)
        return {SIGNATURE_OUTPUT: tf.ensure_shape(out, [None, dim])}

    def from_pixels(pixels):
        out = tf.map_fn(lambda x: describe(x[tf.newaxis])[0], pixels, fn_output_signature=one_out)
        return {SIGNATURE_OUTPUT: tf.ensure_shape(out, [None, dim])}

    return {
        "serving_default": (serve, [tf.TensorSpec([None], tf.string, name=SIGNATURE_INPUT)]),
        "descriptors_from_pixels": (
            from_pixels,
            [tf.TensorSpec([None, None, None, 3], tf.float32, name="pixels")],
        ),
    }


def _write_archive(model, endpoints: dict[str, tuple[Any, list]], path: str) -> None:
    """A SavedModel of `endpoints` holding `model`'s variables (Keras' ExportArchive: plain
    TensorFlow that loads without Keras, with weights the TFLite converter can freeze)."""
    import keras

    archive = keras.export.ExportArchive()
    archive.track(model)
    for name, (fn, signature) in endpoints.items():
        archive.add_endpoint(name, fn, input_signature=signature)
    archive.write_out(path, verbose=False)


def check_target(out: str | os.PathLike) -> str:
    """The absolute path `out`, which must not exist yet (exports never overwrite).

    Raises:
      FileExistsError: `out` exists.
    """
    out = os.path.abspath(os.path.expanduser(os.fspath(out)))
    if os.path.exists(out):
        raise FileExistsError(f"{out} already exists: remove it or choose another --out")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    return out


def _info(source: ExportSource, **extra: Any) -> dict[str, Any]:
    return {
        "image_size": int(source.image_size),
        "scales": list(source.scales),
        "ms_power": float(source.ms_power),
        "dim": _output_dim(source.model),
        "model": source.description,
        **extra,
    }


def export_saved_model(source: ExportSource, out: str | os.PathLike) -> str:
    """Writes the SavedModel folder `out` (atomically: a temporary folder, then a rename).

    Returns:
      The absolute path of the SavedModel folder.

    Raises:
      FileExistsError: `out` exists already.
    """

    from cbir_tf.fileio import atomic_write_json, json_safe

    out = check_target(out)
    endpoints = serving_endpoints(source)
    tmp = f"{out}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _write_archive(source.model, endpoints, tmp)
        info = _info(source, signatures=sorted(endpoints), input=SIGNATURE_INPUT)
        atomic_write_json(os.path.join(tmp, INFO_FILE), json_safe(info, default=str))
        os.rename(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("SavedModel written to %s", out)
    return out


def tflite_bytes(model, quantization: str = "float32") -> bytes:
    """Converts the single-scale descriptor network to a TFLite flatbuffer (built-in ops only).

    Args:
      model: keras.Model, raw RGB float32 [1, H, W, 3] -> float32 [1, D].
      quantization: 'float32', 'float16' (weights stored as float16) or 'int8' (dynamic range:
        int8 weights, float activations).

    Returns:
      The flatbuffer; its input is float32 [1, H, W, 3] with H, W set at run time.

    Raises:
      ValueError: unknown quantization, or an op TFLite has no built-in kernel for.
    """
    import tensorflow as tf

    if quantization not in QUANTIZATIONS:
        raise ValueError(
            f"unknown quantization {quantization!r}; valid: {', '.join(QUANTIZATIONS)}"
        )

    def forward(pixels):
        return {SIGNATURE_OUTPUT: tf.cast(model(pixels, training=False), tf.float32)}

    signature = [tf.TensorSpec([1, None, None, 3], tf.float32, name="pixels")]
    with tempfile.TemporaryDirectory() as tmp:
        _write_archive(model, {"serving_default": (forward, signature)}, tmp)
        converter = tf.lite.TFLiteConverter.from_saved_model(tmp)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        if quantization != "float32":
            converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantization == "float16":
            converter.target_spec.supported_types = [tf.float16]
        try:
            return converter.convert()
        except Exception as e:  # the converter's error names the ops it could not lower
            raise ValueError(
                f"TFLite conversion of {model.name} failed with built-in ops only: {e}"
            ) from None


def export_tflite(
    source: ExportSource, out: str | os.PathLike, quantization: str = "float32"
) -> str:
    """Writes a `.tflite` file (atomically) and a `<out>.json` with its settings.

    Multi-scale models: the file holds the network, which an app runs once per scale (the
    JSON lists the scales and ms_power); a warning says so.

    Returns:
      The absolute path of the `.tflite` file.
    """
    from cbir_tf.fileio import atomic_write_bytes, atomic_write_json, json_safe

    out = check_target(out)
    if tuple(source.scales) != (1.0,):
        log.warning(
            "the TFLite file holds the single-scale network; run it at scales %s and combine "
            "as %s lists",
            list(source.scales),
            out + ".json",
        )
    data = tflite_bytes(source.model, quantization)
    atomic_write_bytes(out, data)
    info = _info(source, quantization=quantization, input="pixels [1, H, W, 3] RGB 0..255")
    atomic_write_json(out + ".json", json_safe(info, default=str))
    log.info("TFLite (%s) written to %s (%.1f MB)", quantization, out, len(data) / 2**20)
    return out


def tflite_interpreter(model: str | os.PathLike | bytes, num_threads: int | None = None):
    """A TFLite interpreter for an exported file (path) or flatbuffer (bytes).

    Uses LiteRT (`ai_edge_litert`, the `[tflite]` extra), TFLite's maintained runtime. Without
    it, TensorFlow's bundled `tf.lite.Interpreter` (deprecated) is used without its default
    XNNPACK delegate: in TF 2.21 that delegate fails to prepare some of these dynamic-shape
    graphs (GeM) and returned zeros for others, while LiteRT's runs them correctly.
    """
    kwargs = (
        {"model_content": model} if isinstance(model, bytes) else {"model_path": os.fspath(model)}
    )
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter  # noqa: N806
        resolver = tf.lite.experimental.OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        kwargs["experimental_op_resolver_type"] = resolver
    return Interpreter(num_threads=num_threads, **kwargs)


def run_tflite(interpreter, pixels) -> Any:
    """Runs a TFLite descriptor interpreter on one image of any size.

    Args:
      interpreter: from `tflite_interpreter` (or any TFLite interpreter) of an exported file.
      pixels: float32 [H, W, 3] or [1, H, W, 3] raw RGB.

    Returns:
      float32 [D] numpy descriptor.
    """
    import numpy as np

    x = np.asarray(pixels, np.float32)
    x = x[np.newaxis] if x.ndim == 3 else x
    inp = interpreter.get_input_details()[0]
    if tuple(inp["shape"]) != x.shape:
        interpreter.resize_tensor_input(inp["index"], x.shape, strict=False)
        interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])[0]


def export(
    source: ExportSource,
    out: str | os.PathLike,
    fmt: str = "saved_model",
    quantization: str = "float32",
) -> str:
    """`export_saved_model` or `export_tflite`, by `fmt` (what export.py calls)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    if fmt == "saved_model":
        if quantization != "float32":
            raise ValueError("--quantization applies to --format=tflite only")
        return export_saved_model(source, out)
    return export_tflite(source, out, quantization)
