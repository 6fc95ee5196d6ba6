"""Registry of convolutional backbones from `keras.applications`, cut at the feature map to pool.

VGG16, ResNet50/101, MobileNet(V2), EfficientNet B0-B7, EfficientNetV2 (B0-B3, S/M/L) and
ConvNeXt (Tiny-XLarge). The vision transformers (DINOv2, DINOv3, CLIP, SigLIP through KerasHub)
have their own registry, `cbir_tf.describe.transformers`.

Each entry knows its Keras constructor, its own `preprocess_input`, the layer whose output is
pooled and its channel count. `build_backbone` returns a `keras.Model` that maps an already
*preprocessed* batch `[B, None, None, 3]` to the feature map `[B, h, w, C]`; the raw-RGB
preprocessing lives in `cbir_tf.describe.models.Preprocess`, so that the backbone alone can be
reused for fine-tuning.

Weights:
  * ``'imagenet'``: Keras downloads the official no-top file into its cache (``~/.keras/models``)
    on first use. Without network this ends, after at most `download_timeout` seconds, with one
    `WeightsUnavailableError` naming the file, its URL and the ``--weights=FILE`` option.
  * ``'none'`` (or None): random initialisation.
  * a local ``.h5`` / ``.weights.h5`` file: the weights of the include_top=False model, e.g. the
    official Keras file copied by hand onto an offline machine. A file that does not fit raises
    `WeightsFileError` naming the file, the backbone and the expected official file.
  * a ``.keras`` descriptor model is a whole model, not backbone weights: see
    `cbir_tf.describe.models.load_descriptor_model` (or `build_descriptor_model(weights=...)`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import logging
import os
import re
import socket
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import keras

from cbir_tf.describe.choices import normalize_weights

log = logging.getLogger(__name__)

__all__ = [
    "BACKBONES",
    "BackboneSpec",
    "WeightsFileError",
    "WeightsUnavailableError",
    "build_backbone",
    "fetch_imagenet_weights",
    "get_backbone_spec",
    "resolve_weights",
]

# Seconds a stalled download may wait for the server before giving up (per socket operation).
DEFAULT_DOWNLOAD_TIMEOUT_S = 60.0


class WeightsUnavailableError(RuntimeError):
    """The ImageNet weights could not be downloaded (offline machine, firewall, bad file).

    Attributes:
      backbone: registry name.
      file_name: the Keras weight file that was requested (None when unknown).
      url: where Keras downloads it from (None when unknown).
    """

    def __init__(self, message: str, backbone: str, file_name: str | None, url: str | None):
        super().__init__(message)
        self.backbone = backbone
        self.file_name = file_name
        self.url = url


class WeightsFileError(ValueError):
    """A local weights file does not exist or does not fit the requested backbone."""


def _mobilenet_channels(base: int, alpha: float) -> int:
    # keras.applications.MobileNet scales every pointwise convolution by int(filters * alpha).
    return int(base * alpha)


def _make_divisible(v: float, divisor: int = 8) -> int:
    # Same rounding as keras.applications.mobilenet_v2._make_divisible.
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


def _mobilenetv2_channels(base: int, alpha: float) -> int:
    # MobileNetV2 keeps its last 1x1 convolution at 1280 filters unless alpha > 1.
    return _make_divisible(base * alpha, 8) if alpha > 1.0 else base


def _fixed_channels(base: int, alpha: float) -> int:
    return base


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    """One backbone of the registry.

    Attributes:
      name: registry key.
      constructor: the `keras.applications` constructor.
      preprocess_input: the backbone's own `keras.applications.<module>.preprocess_input`
        (RGB float 0..255 -> what the network was trained on; identity for EfficientNet,
        whose normalisation is inside the network).
      feature_layer: name of the layer whose output is pooled; None = the last layer of the
        include_top=False network.
      channels: channels of the feature map at alpha = 1.
      imagenet_alphas: width multipliers with official ImageNet weights; (1.0,) for backbones
        without a width multiplier.
      has_alpha: whether the constructor takes `alpha`.
      channels_fn: channels as a function of (channels, alpha).
    """

    name: str
    constructor: Callable[..., keras.Model]
    preprocess_input: Callable[..., Any]
    feature_layer: str | None
    channels: int
    imagenet_alphas: tuple[float, ...] = (1.0,)
    has_alpha: bool = False
    channels_fn: Callable[[int, float], int] = _fixed_channels

    def num_channels(self, alpha: float = 1.0) -> int:
        """Channels C of the feature map for width multiplier `alpha`."""
        return self.channels_fn(self.channels, alpha)


def _registry() -> dict[str, BackboneSpec]:
    apps = keras.applications
    specs = [
        BackboneSpec(
            f"efficientnetb{i}",
            getattr(apps, f"EfficientNetB{i}"),
            apps.efficientnet.preprocess_input,
            None,  # top_activation
            channels,
        )
        for i, channels in enumerate((1280, 1280, 1408, 1536, 1792, 2048, 2304, 2560))
    ]
    # EfficientNetV2 (Tan & Le, ICML 2021) normalises inside the network, like EfficientNet.
    specs += [
        BackboneSpec(
            f"efficientnetv2{size}",
            getattr(apps, f"EfficientNetV2{size.upper()}"),
            apps.efficientnet_v2.preprocess_input,
            None,  # top_activation
            channels,
        )
        for size, channels in (
            ("b0", 1280),
            ("b1", 1280),
            ("b2", 1408),
            ("b3", 1536),
            ("s", 1280),
            ("m", 1280),
            ("l", 1280),
        )
    ]
    # ConvNeXt (Liu et al., CVPR 2022): normalisation inside the network; without its top the
    # network ends in a per-position LayerNorm of the last stage, which is what is pooled.
    specs += [
        BackboneSpec(
            f"convnext_{size}",
            getattr(apps, f"ConvNeXt{size.capitalize().replace('Xl', 'XL')}"),
            apps.convnext.preprocess_input,
            None,  # the unnamed final LayerNormalization
            channels,
        )
        for size, channels in (
            ("tiny", 768),
            ("small", 768),
            ("base", 1024),
            ("large", 1536),
            ("xlarge", 2048),
        )
    ]
    specs += [
        # The field's reference (cnnimageretrieval-pytorch) pools VGG16's last convolution
        # (ReLU included), not the max-pooled map after it.
        BackboneSpec("vgg16", apps.VGG16, apps.vgg16.preprocess_input, "block5_conv3", 512),
        BackboneSpec("resnet50", apps.ResNet50, apps.resnet.preprocess_input, None, 2048),
        BackboneSpec("resnet101", apps.ResNet101, apps.resnet.preprocess_input, None, 2048),
        BackboneSpec(
            "mobilenet",
            apps.MobileNet,
            apps.mobilenet.preprocess_input,
            None,  # conv_pw_13_relu
            1024,
            imagenet_alphas=(0.25, 0.5, 0.75, 1.0),
            has_alpha=True,
            channels_fn=_mobilenet_channels,
        ),
        BackboneSpec(
            "mobilenetv2",
            apps.MobileNetV2,
            apps.mobilenet_v2.preprocess_input,
            None,  # out_relu
            1280,
            imagenet_alphas=(0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
            has_alpha=True,
            channels_fn=_mobilenetv2_channels,
        ),
    ]
    return {s.name: s for s in specs}


BACKBONES: dict[str, BackboneSpec] = _registry()


def get_backbone_spec(name: str) -> BackboneSpec:
    """Looks up a backbone by name (case-insensitive).

    Raises:
      KeyError: unknown name; the message lists the valid names.
    """
    key = str(name).strip().lower()
    if key not in BACKBONES:
        raise KeyError(f"unknown backbone {name!r}; valid backbones: {', '.join(BACKBONES)}")
    return BACKBONES[key]


def display_name(name: str, alpha: float = 1.0) -> str:
    """The backbone as printed for users: 'mobilenet (alpha 0.25)', 'efficientnetb1'.

    The width multiplier is shown only for backbones that take one (MobileNet family); for
    the others it means nothing.
    """
    spec = get_backbone_spec(name)
    return f"{spec.name} (alpha {float(alpha):g})" if spec.has_alpha else spec.name


# keras.applications constructors fetch their weights through `file_utils.get_file` looked up in
# their own module. Swapping that reference for the duration of one constructor call lets us
# (a) learn which file and URL Keras wants, to name them when the download fails, (b) bound the
# download with a socket timeout, and (c) hand a local file to the constructor's own ImageNet
# path, so that the network is built exactly as for ImageNet weights (EfficientNet adds an
# input-rescaling layer only in that case). One lock: the swap and socket timeout are global.
_PATCH_LOCK = threading.RLock()


class _FileUtilsShim:
    """Stands in for `keras.src.utils.file_utils`; `get_file` goes to `handler(original, ...)`."""

    def __init__(self, original: Any, handler: Callable[..., str]):
        self._original = original
        self.get_file = functools.partial(handler, original.get_file)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._original, name)


@contextlib.contextmanager
def _swapped_get_file(spec: BackboneSpec, handler: Callable[..., str]) -> Iterator[bool]:
    """Routes the constructor's `get_file(fname, origin, ...)` to `handler(get_file, fname, ...)`.

    Yields False (and changes nothing) when this Keras version has no `file_utils` there.
    """
    module = sys.modules.get(spec.constructor.__module__)
    with _PATCH_LOCK:
        original = getattr(module, "file_utils", None)
        if original is None or not hasattr(original, "get_file"):
            yield False
            return
        module.file_utils = _FileUtilsShim(original, handler)
        try:
            yield True
        finally:
            module.file_utils = original


@contextlib.contextmanager
def _socket_timeout(seconds: float | None) -> Iterator[None]:
    with _PATCH_LOCK:
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(seconds)
        try:
            yield
        finally:
            socket.setdefaulttimeout(previous)


def _constructor_kwargs(spec: BackboneSpec, alpha: float) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"include_top": False, "input_shape": (None, None, 3)}
    if spec.has_alpha:
        kwargs["alpha"] = alpha
    return kwargs


def _unavailable_message(spec: BackboneSpec, alpha: float, file_name, url, cause) -> str:
    what = spec.name + (f" (alpha={alpha:g})" if spec.has_alpha else "")
    if file_name and url:
        fetch = (
            f"On a machine with network access download\n    {url}\n"
            f"copy {file_name} to this machine and pass it with --weights=/path/to/{file_name} "
            f"(Python: build_backbone(..., weights='/path/to/{file_name}')), or put it in "
            f"~/.keras/models/{file_name}, where Keras looks before downloading."
        )
    else:
        fetch = (
            "Download the official Keras ImageNet no-top weight file of this backbone on a "
            "machine with network access and pass it with --weights=/path/to/FILE.h5."
        )
    return (
        f"Could not download the ImageNet weights of {what}: {cause}.\n{fetch}\n"
        "Or use --weights=none for random weights (useful for tests only)."
    )


def _fetching_get_file(
    spec: BackboneSpec, alpha: float, cache_dir: str | None, timeout: float | None, fetched: dict
) -> Callable[..., str]:
    """A `get_file` handler that downloads with a socket timeout into `fetched['path']`."""

    def get_file(original_get_file, fname=None, origin=None, *args, **kwargs):
        if cache_dir is not None:
            kwargs["cache_dir"] = cache_dir
        try:
            with _socket_timeout(timeout):
                fetched["path"] = original_get_file(fname, origin, *args, **kwargs)
                return fetched["path"]
        except Exception as e:  # Keras wraps URLError/HTTPError in a bare Exception
            cause = f"{type(e).__name__}: {e}"
            raise WeightsUnavailableError(
                _unavailable_message(spec, alpha, fname, origin, cause), spec.name, fname, origin
            ) from None

    return get_file


def fetch_imagenet_weights(
    name: str,
    alpha: float = 1.0,
    *,
    cache_dir: str | None = None,
    download_timeout: float | None = DEFAULT_DOWNLOAD_TIMEOUT_S,
) -> None:
    """Makes sure the official no-top ImageNet file of a backbone is in the Keras cache.

    Downloads it when missing, without building the network (so a caller can learn whether
    ImageNet weights can be had before choosing a model).

    Raises:
      KeyError: unknown backbone.
      WeightsUnavailableError: the file cannot be downloaded (offline machine, firewall).
    """
    spec = get_backbone_spec(name)
    alpha = float(alpha)

    class _Fetched(Exception):
        pass

    fetch = _fetching_get_file(spec, alpha, cache_dir, download_timeout, {})

    def get_file(original_get_file, *args, **kwargs):
        fetch(original_get_file, *args, **kwargs)
        raise _Fetched  # stop before the constructor builds the network

    with _swapped_get_file(spec, get_file) as swapped, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if not swapped:  # this Keras version cannot be intercepted: a whole build fetches it
            build_backbone(
                name, "imagenet", alpha, cache_dir=cache_dir, download_timeout=download_timeout
            )
            return
        with contextlib.suppress(_Fetched):
            spec.constructor(weights="imagenet", **_constructor_kwargs(spec, alpha))


def resolve_weights(
    name: str, alpha: float, weights: Any, weights_fallback: str = ""
) -> tuple[Any, str | None]:
    """The weights to build a backbone with: `weights_fallback` when ImageNet's cannot be had.

    The demo runs everywhere this way (offline: random weights), and says so.

    Args:
      name: the backbone.
      alpha: its width multiplier.
      weights: 'imagenet', 'none' or a file.
      weights_fallback: used instead of 'imagenet' when its file cannot be downloaded
        ('' = no fallback: the build fails with `WeightsUnavailableError`).

    Returns:
      (weights to use, why the fallback was taken or None).
    """
    if str(weights).lower() != "imagenet" or not weights_fallback:
        return weights, None
    try:
        fetch_imagenet_weights(name, float(alpha))
        return weights, None
    except WeightsUnavailableError as e:
        log.warning(
            "ImageNet weights unavailable, using weights=%r instead: %s",
            weights_fallback,
            str(e).splitlines()[0],
        )
        return weights_fallback, "ImageNet weights could not be downloaded"


def _build_imagenet(
    spec: BackboneSpec, alpha: float, cache_dir: str | None, timeout: float | None
) -> keras.Model:
    fetched: dict[str, str] = {}
    get_file = _fetching_get_file(spec, alpha, cache_dir, timeout, fetched)

    kwargs = _constructor_kwargs(spec, alpha)
    with _swapped_get_file(spec, get_file) as swapped, warnings.catch_warnings():
        # MobileNets warn that an undefined input shape selects the 224 weights: intended.
        warnings.simplefilter("ignore", UserWarning)
        if swapped:
            try:
                return spec.constructor(weights="imagenet", **kwargs)
            except WeightsUnavailableError:
                raise
            except Exception as e:
                if "path" not in fetched:
                    raise
                # Keras checks no hash for some files: a cached copy cut short by an earlier
                # interrupted download only fails here.
                raise WeightsFileError(
                    f"the ImageNet weights of {spec.name} in the Keras cache, {fetched['path']}, "
                    f"could not be loaded ({type(e).__name__}: {e}); delete that file so that "
                    "Keras downloads it again, or pass a good copy with --weights=FILE"
                ) from None
        try:
            with _socket_timeout(timeout):
                return spec.constructor(weights="imagenet", **kwargs)
        except Exception as e:
            if not isinstance(e, OSError) and "URL fetch failure" not in str(e):
                raise
            cause = f"{type(e).__name__}: {e}"
            raise WeightsUnavailableError(
                _unavailable_message(spec, alpha, None, None, cause), spec.name, None, None
            ) from None


def _official_file_name(spec: BackboneSpec, alpha: float) -> str | None:
    """The name of Keras' no-top ImageNet file for this backbone (None when unknown)."""
    if alpha not in spec.imagenet_alphas:
        return None
    requested: dict[str, str] = {}

    class _Stop(Exception):
        pass

    def get_file(original_get_file, fname=None, origin=None, *args, **kwargs):
        requested["fname"] = fname
        raise _Stop

    with _swapped_get_file(spec, get_file) as swapped, warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        if not swapped:
            return None
        with contextlib.suppress(_Stop):
            spec.constructor(weights="imagenet", **_constructor_kwargs(spec, alpha))
    return requested.get("fname")


def _first_mismatch(error: Exception) -> str:
    """One short clause naming the first layer Keras could not load, from its error message.

    Keras's own messages run to kilobytes (a Keras 3 `.weights.h5` mismatch prints the target
    variable's values); users need the layer and the two shapes. Messages of an unknown form
    are cut to their first line.
    """
    text = str(error)
    # Keras 3 (.weights.h5): "... object <Conv2D name=conv1, built=True>: ... variable.shape=
    # (3, 3, 3, 8), Received: value.shape=(3, 3, 3, 32) ..."
    layer = re.search(r"object <\w+ name=([^,>]+)", text)
    shapes = re.search(r"variable\.shape=(\([^)]*\)), Received: value\.shape=(\([^)]*\))", text)
    if layer and shapes:
        return (
            f"first mismatching layer {layer.group(1)}: the backbone expects shape "
            f"{shapes.group(1)}, the file holds {shapes.group(2)}"
        )
    # Legacy .h5: "Shape mismatch in layer #0 (named conv1)for weight conv1/kernel. Weight
    # expects shape (3, 3, 3, 16). Received saved weight with shape (3, 3, 3, 8)"
    legacy = re.search(
        r"named ([^)]+)\)\s*for weight (\S+?)\. Weight expects shape (\([^)]*\))\. "
        r"Received saved weight with shape (\([^)]*\))",
        text,
    )
    if legacy:
        name, weight, expected, found = legacy.groups()
        return (
            f"first mismatching layer {name} ({weight}): the backbone expects shape {expected}, "
            f"the file holds {found}"
        )
    count = re.search(r"Model expected (\d+) layers, found (\d+) saved layers", text)
    if count:
        return f"the file holds {count.group(2)} layers with weights, the backbone {count.group(1)}"
    first = text.strip().splitlines()[0] if text.strip() else type(error).__name__
    return f"{type(error).__name__}: {first[:300].rstrip('.')}"


def _build_from_file(spec: BackboneSpec, alpha: float, path: str) -> keras.Model:
    if path.lower().endswith(".keras"):
        raise WeightsFileError(
            f"{path} is a saved descriptor model (.keras), not backbone weights: load it with "
            "cbir_tf.describe.models.load_descriptor_model (extract.py --model / config "
            "model.weights)."
        )
    if not os.path.isfile(path):
        raise WeightsFileError(f"weights file {path} not found (backbone {spec.name})")

    def get_file(original_get_file, fname=None, origin=None, *args, **kwargs):
        return path

    kwargs = _constructor_kwargs(spec, alpha)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            if alpha in spec.imagenet_alphas:
                # Through the constructor's ImageNet path: same network as with downloaded
                # ImageNet weights, loaded by Keras' own call.
                with _swapped_get_file(spec, get_file) as swapped:
                    if swapped:
                        return spec.constructor(weights="imagenet", **kwargs)
            model = spec.constructor(weights=None, **kwargs)
            model.load_weights(path)
            return model
    except Exception as e:
        official = _official_file_name(spec, alpha)
        what = spec.name + (f" (alpha={alpha:g})" if spec.has_alpha else "")
        hint = (
            f" The official Keras ImageNet file for this backbone is {official}."
            if official
            else ""
        )
        raise WeightsFileError(
            f"weights file {path} does not fit backbone {what} with include_top=False: "
            f"{_first_mismatch(e)}. The file must hold the weights of "
            f"keras.applications.{spec.constructor.__name__}(include_top=False"
            f"{f', alpha={alpha:g}' if spec.has_alpha else ''}) (a 'no top' file, not the "
            f"classifier's).{hint}"
        ) from None


def _leaf_layers(model: keras.Model) -> Iterator[keras.layers.Layer]:
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            yield from _leaf_layers(layer)
        else:
            yield layer


def _seeded_initialize(model: keras.Model, seed: int) -> None:
    """Re-draws every random kernel from its own Keras initializer, seeded by `seed` + layer.

    Keras draws random weights from a process-global generator, so every build is another
    network: an interrupted extraction would resume with a different network, and a whitening
    learned in one run would not fit the next. Each kernel is drawn again from the layer's own
    initializer (same distribution as Keras', so random networks keep Keras' semantics) with a
    seed derived from `seed` and the layer's name, independent of the order of layers. Layers
    inside nested models (ConvNeXt's stem and downsampling blocks are `Sequential`s) are drawn
    too.
    """
    for layer in _leaf_layers(model):
        for weight in layer.weights:
            name = weight.path.rsplit("/", 1)[-1]
            if not name.endswith("kernel"):
                continue
            init = getattr(layer, f"{name}_initializer", None)
            if init is None and isinstance(layer, keras.layers.DepthwiseConv2D):
                init = getattr(layer, "depthwise_initializer", None)
            if init is None:
                continue
            config = keras.initializers.serialize(keras.initializers.get(init))
            digest = hashlib.sha256(f"{seed}/{layer.name}/{name}".encode()).digest()
            config["config"]["seed"] = int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
            seeded = keras.initializers.deserialize(config)
            weight.assign(seeded(tuple(weight.shape), dtype=weight.dtype))


def _is_grouped_depthwise(layer: keras.layers.Layer) -> bool:
    return type(layer) is keras.layers.Conv2D and layer.groups > 1 and layer.groups == layer.filters


def _depthwise_convolutions(model: keras.Model) -> keras.Model:
    """`model` with its depthwise convolutions written as grouped `Conv2D`s (ConvNeXt's 7 x 7)
    rebuilt as `DepthwiseConv2D`s: the same maths and weights, but TensorFlow runs a grouped
    convolution through XLA on CPU, 26 times slower than its depthwise kernel (4x for the whole
    ConvNeXt-Tiny at 224 px). Other models are returned as they are."""
    if not any(_is_grouped_depthwise(layer) for layer in model.layers):
        return model

    def clone(layer):
        if not _is_grouped_depthwise(layer):
            return layer.__class__.from_config(layer.get_config())
        return keras.layers.DepthwiseConv2D(
            layer.kernel_size,
            strides=layer.strides,
            padding=layer.padding,
            use_bias=layer.use_bias,
            name=layer.name,
            dtype=layer.dtype_policy,
        )

    rebuilt = keras.models.clone_model(model, clone_function=clone)
    layers = {layer.name: layer for layer in rebuilt.layers}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            continue
        weights = layer.get_weights()
        if _is_grouped_depthwise(layer):  # [kh, kw, 1, C] -> [kh, kw, C, 1]
            weights[0] = weights[0].reshape(*weights[0].shape[:2], -1, 1)
        layers[layer.name].set_weights(weights)
    return rebuilt


def build_backbone(
    name: str,
    weights: str | os.PathLike | None = "imagenet",
    alpha: float = 1.0,
    *,
    cache_dir: str | None = None,
    download_timeout: float | None = DEFAULT_DOWNLOAD_TIMEOUT_S,
    seed: int = 0,
) -> keras.Model:
    """Builds a backbone cut at its feature layer.

    Random weights ('none') are drawn reproducibly from `seed` (see `_seeded_initialize`), so
    two processes building the same backbone get the same network: an interrupted extraction
    resumes with the network it started with, and a whitening learned in one run fits the next.

    Args:
      name: registry name (see `BACKBONES`).
      weights: 'imagenet', 'none' / None, or a local `.h5` / `.weights.h5` file.
      alpha: width multiplier (mobilenet, mobilenetv2 only; must be 1.0 for the others).
      cache_dir: Keras cache folder for downloads (default `~/.keras`).
      download_timeout: seconds a stalled download may wait for the server.
      seed: seed of the random weights when `weights` is 'none'.

    Returns:
      A `keras.Model` named `name` mapping preprocessed float32 [B, None, None, 3] to the feature
      map float32 [B, h, w, C], C = `get_backbone_spec(name).num_channels(alpha)`.

    Raises:
      KeyError: unknown backbone.
      ValueError: alpha given for a backbone without width multiplier, or no ImageNet weights for
        this alpha.
      WeightsUnavailableError: 'imagenet' weights cannot be downloaded.
      WeightsFileError: missing or mismatched local file, or a `.keras` model given.
    """
    spec = get_backbone_spec(name)
    alpha = float(alpha)
    if not spec.has_alpha and alpha != 1.0:
        with_alpha = [s.name for s in BACKBONES.values() if s.has_alpha]
        raise ValueError(
            f"alpha={alpha:g} applies only to {' and '.join(with_alpha)}, not {spec.name}"
        )
    if alpha <= 0:
        raise ValueError(f"alpha must be positive, got {alpha:g}")
    mode = normalize_weights(weights)
    if mode == "imagenet":
        if alpha not in spec.imagenet_alphas:
            raise ValueError(
                f"{spec.name} has ImageNet weights only for alpha in "
                f"{', '.join(f'{a:g}' for a in spec.imagenet_alphas)}; got alpha={alpha:g}"
            )
        base = _build_imagenet(spec, alpha, cache_dir, download_timeout)
    elif mode == "none":
        base = spec.constructor(weights=None, **_constructor_kwargs(spec, alpha))
        _seeded_initialize(base, seed)
    else:
        base = _build_from_file(spec, alpha, mode)
    base = _depthwise_convolutions(base)

    output = base.get_layer(spec.feature_layer).output if spec.feature_layer else base.output
    model = keras.Model(base.input, output, name=spec.name)
    channels = model.output.shape[-1]
    if channels != spec.num_channels(alpha):
        # Guards the registry against a Keras version that changed a network.
        raise RuntimeError(
            f"{spec.name} (alpha={alpha:g}) gives {channels} channels, the registry says "
            f"{spec.num_channels(alpha)}"
        )
    return model
