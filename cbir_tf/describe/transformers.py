"""Registry of vision-transformer backbones through KerasHub: DINOv2, DINOv3, CLIP and SigLIP,
and their weights.

Each entry names a KerasHub preset, the architecture (for random weights), the patch size and
the model's own image normalisation and retrieval recipe. `load_tower` gives the entry's KerasHub
image tower with its weights; `cbir_tf.describe.token_models` turns it into a model that takes
images of any size.

Weights (`model.weights`):
  * ``'imagenet'`` or ``'pretrained'``: the KerasHub preset by name, downloaded by KerasHub on
    first use (Kaggle; kept in its cache). Without network: `backbones.WeightsUnavailableError`
    in one line naming the folder to give instead.
  * a local folder (``--weights=DIR``): a KerasHub preset folder (`save_to_preset`), or a
    Hugging Face checkpoint folder (``config.json`` + ``model.safetensors``) that KerasHub
    converts (DINOv2 with or without registers, DINOv3; KerasHub has no converter for CLIP and
    SigLIP checkpoints, whose folders must be KerasHub's).
  * a KerasHub handle (``hf://facebook/dinov2-small``, ``kaggle://...``): downloaded as a preset.
  * ``'none'``: random weights drawn reproducibly from a seed (tests, speed measurements).
The family entries ``dinov2``, ``dinov3``, ``clip`` and ``siglip`` take a checkpoint of any size
from a folder or handle (the architecture is read from its ``config.json``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from typing import Any

import keras
import numpy as np

from cbir_tf.describe.backbones import WeightsFileError, WeightsUnavailableError

log = logging.getLogger(__name__)

__all__ = [
    "FAMILIES",
    "TRANSFORMERS",
    "Family",
    "KerasHubMissingError",
    "Normalize",
    "TransformerSpec",
    "fetch_preset",
    "get_transformer_spec",
    "load_tower",
    "seeded_initialize",
    "weights_kind",
]

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # SigLIP: [-1, 1]


class KerasHubMissingError(RuntimeError):
    """A transformer backbone was asked for and `keras-hub` is not installed."""


@dataclasses.dataclass(frozen=True)
class Family:
    """What the checkpoints of one model family share.

    Attributes:
      name: 'dinov2', 'dinov3', 'clip' or 'siglip'.
      hub_class: the KerasHub backbone class holding the image tower.
      hf_model_types: `model_type`s of Hugging Face checkpoints KerasHub converts to it.
      mean, std: the image normalisation the models were trained with (RGB in [0, 1]).
      pooling: the descriptor the model's paper retrieves with (`model.pooling='auto'`).
      has_head: the model has its own image embedding head (pooling 'head').
      paper: where the recipe comes from (cited in README).
    """

    name: str
    hub_class: str
    hf_model_types: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    pooling: str
    has_head: bool
    paper: str


FAMILIES = {
    f.name: f
    for f in (
        Family(
            "dinov2",
            "DINOV2Backbone",
            ("dinov2", "dinov2_with_registers"),
            IMAGENET_MEAN,
            IMAGENET_STD,
            "cls",
            False,
            "Oquab et al., DINOv2, TMLR 2024: cosine similarity of class tokens",
        ),
        Family(
            "dinov3",
            "DINOV3Backbone",
            ("dinov3_vit",),
            IMAGENET_MEAN,
            IMAGENET_STD,
            "cls",
            False,
            "Siméoni et al., DINOv3, 2025: class token, as DINOv2",
        ),
        Family(
            "clip",
            "CLIPBackbone",
            (),
            CLIP_MEAN,
            CLIP_STD,
            "head",
            True,
            "Radford et al., CLIP, ICML 2021: the projected class token (image embedding)",
        ),
        Family(
            "siglip",
            "SigLIPBackbone",
            (),
            HALF,
            HALF,
            "head",
            True,
            "Zhai et al., SigLIP, ICCV 2023: the attention-pooling head (image embedding)",
        ),
    )
}


@dataclasses.dataclass(frozen=True)
class Normalize:
    """(x / 255 - mean) / std on RGB 0..255, for numpy arrays and tensors alike."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def __call__(self, x: Any) -> Any:
        # The constants take the input's dtype (a float16 tensor under mixed precision).
        dtype = getattr(getattr(x, "dtype", None), "as_numpy_dtype", None) or np.float32
        scale = np.asarray([1.0 / (255.0 * s) for s in self.std], dtype)
        shift = np.asarray([m / s for m, s in zip(self.mean, self.std, strict=True)], dtype)
        return x * scale - shift


@dataclasses.dataclass(frozen=True)
class TransformerSpec:
    """One vision-transformer backbone of the registry.

    Attributes:
      name: registry key.
      family: a key of `FAMILIES`.
      preset: the KerasHub preset ('' for a family entry: weights from a folder or handle).
      architecture: keyword arguments of the KerasHub image tower (`DINOV2Backbone`,
        `DINOV3Backbone`, `CLIPVisionEncoder` + `projection_dim`, `SigLIPVisionEncoder`) for
        random weights; None for a family entry.
      hf_checkpoint: the Hugging Face checkpoint of the same weights KerasHub converts ('' if
        none), named in messages.
    """

    name: str
    family: str
    preset: str = ""
    architecture: dict | None = None
    hf_checkpoint: str = ""
    has_alpha = False
    imagenet_alphas = (1.0,)

    @property
    def family_spec(self) -> Family:
        return FAMILIES[self.family]

    @property
    def patch_size(self) -> int | None:
        """The patch side (None for a family entry: read from the checkpoint)."""
        return None if self.architecture is None else int(self.architecture["patch_size"])

    @property
    def preprocess_input(self) -> Normalize:
        """RGB float 0..255 -> the normalisation the model was trained with."""
        return Normalize(self.family_spec.mean, self.family_spec.std)

    @property
    def pooling(self) -> str:
        """The paper's retrieval descriptor (what `model.pooling='auto'` selects)."""
        return self.family_spec.pooling


def _dinov2(size: str, hidden: int, layers: int, heads: int, registers: bool, swiglu=False):
    name = f"dinov2_with_registers_{size}" if registers else f"dinov2_{size}"
    arch = dict(
        patch_size=14,
        num_layers=layers,
        hidden_dim=hidden,
        num_heads=heads,
        intermediate_dim=4 * hidden,
        num_register_tokens=4 if registers else 0,
        use_swiglu_ffn=swiglu,
        image_shape=(518, 518, 3),
        position_embedding_shape=(518, 518),
        antialias_in_interpolation=registers,
    )
    hf = f"facebook/dinov2-with-registers-{size}" if registers else f"facebook/dinov2-{size}"
    return TransformerSpec(name, "dinov2", name, arch, hf)


def _dinov3(size: str, code: str, hidden: int, layers: int, heads: int, mlp: int, gated=False):
    arch = dict(
        patch_size=16,
        num_layers=layers,
        hidden_dim=hidden,
        num_heads=heads,
        intermediate_dim=mlp,
        num_register_tokens=4,
        use_gated_mlp=gated,
        hidden_activation="silu" if gated else "gelu",
        use_key_bias=False,
        layer_norm_eps=1e-5,
        image_shape=(224, 224, 3),
        rope_theta=100.0,
    )
    preset = f"dinov3_vit_{size}_lvd1689m"
    return TransformerSpec(
        f"dinov3_{size}", "dinov3", preset, arch, f"facebook/dinov3-{code}-pretrain-lvd1689m"
    )


def _clip(name: str, patch: int, hidden: int, layers: int, heads: int, proj: int, image=224):
    arch = dict(
        patch_size=patch,
        hidden_dim=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_dim=4 * hidden,
        intermediate_activation="quick_gelu",
        image_shape=(image, image, 3),
        projection_dim=proj,
    )
    return TransformerSpec(name, "clip", name, arch)


def _siglip(name: str, patch: int, hidden: int, layers: int, heads: int, mlp: int, image: int):
    arch = dict(
        patch_size=patch,
        hidden_dim=hidden,
        num_layers=layers,
        num_heads=heads,
        intermediate_dim=mlp,
        image_shape=(image, image, 3),
    )
    return TransformerSpec(name, "siglip", name, arch)


def _registry() -> dict[str, TransformerSpec]:
    specs = [TransformerSpec(family, family) for family in FAMILIES]
    for registers in (False, True):
        specs += [
            _dinov2("small", 384, 12, 6, registers),
            _dinov2("base", 768, 12, 12, registers),
            _dinov2("large", 1024, 24, 16, registers),
            _dinov2("giant", 1536, 40, 24, registers, swiglu=True),
        ]
    specs += [
        _dinov3("small", "vits16", 384, 12, 6, 1536),
        _dinov3("small_plus", "vits16plus", 384, 12, 6, 1536, gated=True),
        _dinov3("base", "vitb16", 768, 12, 12, 3072),
        _dinov3("large", "vitl16", 1024, 24, 16, 4096),
        _dinov3("huge_plus", "vith16plus", 1280, 32, 20, 5120, gated=True),
        _clip("clip_vit_base_patch16", 16, 768, 12, 12, 512),
        _clip("clip_vit_base_patch32", 32, 768, 12, 12, 512),
        _clip("clip_vit_large_patch14", 14, 1024, 24, 16, 768),
        _clip("clip_vit_large_patch14_336", 14, 1024, 24, 16, 768, image=336),
    ]
    for version in ("siglip", "siglip2"):
        specs += [
            _siglip(f"{version}_base_patch16_{s}", 16, 768, 12, 12, 3072, s)
            for s in (224, 256, 384, 512)
        ]
        specs += [
            _siglip(f"{version}_large_patch16_{s}", 16, 1024, 24, 16, 4096, s) for s in (256, 384)
        ]
        specs += [
            _siglip(f"{version}_so400m_patch14_{s}", 14, 1152, 27, 16, 4304, s) for s in (224, 384)
        ]
    return {s.name: s for s in specs}


TRANSFORMERS: dict[str, TransformerSpec] = _registry()


def get_transformer_spec(name: str) -> TransformerSpec:
    """Looks up a transformer backbone by name (case-insensitive).

    Raises:
      KeyError: unknown name; the message lists the valid names.
    """
    key = str(name).strip().lower()
    if key not in TRANSFORMERS:
        raise KeyError(
            f"unknown transformer backbone {name!r}; valid ones: {', '.join(TRANSFORMERS)}"
        )
    return TRANSFORMERS[key]


def _keras_hub():
    try:
        import keras_hub
    except ImportError:
        raise KerasHubMissingError(
            "the vision-transformer backbones (DINOv2, DINOv3, CLIP, SigLIP) need KerasHub: "
            "pip install 'cbir-tf[hub]' (keras-hub and safetensors)"
        ) from None
    return keras_hub


def weights_kind(weights: Any) -> str:
    """'pretrained', 'none', 'folder' or 'handle' for a transformer's `model.weights`."""
    text = "none" if weights is None else os.fspath(weights).strip()
    if text.lower() in ("imagenet", "pretrained"):
        return "pretrained"
    if text.lower() == "none":
        return "none"
    return "handle" if "://" in text else "folder"


def _offline_message(spec: TransformerSpec, cause: str) -> str:
    hub_class = spec.family_spec.hub_class
    hf = (
        f", or download the Hugging Face checkpoint {spec.hf_checkpoint} (config.json + "
        "model.safetensors)"
        if spec.hf_checkpoint
        else ""
    )
    return (
        f"could not download the KerasHub preset {spec.preset} of backbone {spec.name} ({cause}); "
        f'on a machine with network access run python -c "import keras_hub; keras_hub.models.'
        f"{hub_class}.from_preset('{spec.preset}').save_to_preset('{spec.preset}')\"{hf}, copy "
        f"the folder here and pass it with --weights=DIR (or --weights=none for random weights)"
    )


def _read_folder_config(spec: TransformerSpec, folder: str) -> dict:
    """The folder's config.json, checked against the entry's family (one-line errors)."""
    family = spec.family_spec
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise WeightsFileError(
            f"weights folder {folder} not found (backbone {spec.name}: give a KerasHub preset "
            "folder or a Hugging Face checkpoint folder with --weights=DIR)"
        )
    if not os.path.isfile(path):
        raise WeightsFileError(
            f"{folder} has no config.json: backbone {spec.name} takes a KerasHub preset folder "
            "(save_to_preset) or a Hugging Face checkpoint folder (config.json + model.safetensors)"
        )
    try:
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise WeightsFileError(f"{path} is not a readable JSON file ({e})") from None
    if "model_type" in config:
        if config["model_type"] not in family.hf_model_types:
            convertible = ", ".join(
                f"{t} ({f.name})" for f in FAMILIES.values() for t in f.hf_model_types
            )
            raise WeightsFileError(
                f"{folder} holds a Hugging Face {config['model_type']!r} checkpoint, which "
                f"KerasHub does not convert to a {family.name} backbone ({spec.name}); it converts "
                f"{convertible}; for {family.name} give a KerasHub preset folder (save_to_preset)"
            )
    else:
        found = str(config.get("registered_name") or config.get("class_name") or "?")
        if found.split(">")[-1] != family.hub_class:
            raise WeightsFileError(
                f"{folder} holds a KerasHub {found}, not a {family.hub_class} "
                f"(backbone {spec.name})"
            )
    return config


def _from_preset(spec: TransformerSpec, source: str, kind: str, load_weights: bool = True):
    hub_class = getattr(_keras_hub().models, spec.family_spec.hub_class)
    try:
        return hub_class.from_preset(source, load_weights=load_weights)
    except (WeightsFileError, WeightsUnavailableError, KerasHubMissingError):
        raise
    except Exception as e:
        cause = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e) else ''}"
        if kind == "folder":
            raise WeightsFileError(
                f"KerasHub could not load {source} as a {spec.family_spec.hub_class} "
                f"(backbone {spec.name}): {cause}"
            ) from None
        if kind == "pretrained":
            raise WeightsUnavailableError(
                _offline_message(spec, cause), spec.name, spec.preset, None
            ) from None
        raise WeightsUnavailableError(
            f"could not load the KerasHub preset {source} (backbone {spec.name}): {cause}; "
            "download it on a machine with network access and pass its folder with --weights=DIR",
            spec.name,
            source,
            None,
        ) from None


def fetch_preset(name: str) -> None:
    """Makes sure a transformer's pretrained preset can be had (config fetched into KerasHub's
    cache) without loading its weights.

    Raises:
      WeightsUnavailableError: it cannot be downloaded (offline machine); one line naming the
        folder to give instead.
    """
    spec = get_transformer_spec(name)
    if not spec.preset:
        raise WeightsFileError(_family_needs_folder(spec))
    _from_preset(spec, spec.preset, "pretrained", load_weights=False)


def _family_needs_folder(spec: TransformerSpec) -> str:
    sized = [s.name for s in TRANSFORMERS.values() if s.family == spec.family and s.preset]
    return (
        f"backbone {spec.name} is any {spec.family} checkpoint: give its folder with "
        f"--weights=DIR (or a KerasHub handle such as hf://...), or pick a sized entry: "
        f"{', '.join(sized)}"
    )


def _random_tower(spec: TransformerSpec, seed: int) -> tuple[Any, Any]:
    """The KerasHub image tower of the entry's architecture with seeded random weights, and
    CLIP's projection (None for the others)."""
    hub = _keras_hub()
    if spec.architecture is None:
        raise WeightsFileError(_family_needs_folder(spec))
    arch = dict(spec.architecture)
    projection = None
    if spec.family in ("dinov2", "dinov3"):
        tower = getattr(hub.models, spec.family_spec.hub_class)(**arch)
    elif spec.family == "clip":
        projection_dim = arch.pop("projection_dim")
        tower = hub.models.CLIPVisionEncoder(**arch)
        projection = keras.layers.Dense(projection_dim, use_bias=False, name="vision_projection")
        projection.build((None, arch["hidden_dim"]))
        seeded_initialize(projection, seed)
    else:
        tower = hub.models.SigLIPVisionEncoder(**arch)
    seeded_initialize(tower, seed)
    return tower, projection


def _loaded_tower(spec: TransformerSpec, weights: Any) -> tuple[Any, Any]:
    """The image tower (and CLIP's projection) of a preset, folder or handle."""
    kind = weights_kind(weights)
    if kind == "pretrained":
        if not spec.preset:
            raise WeightsFileError(_family_needs_folder(spec))
        source = spec.preset
    else:
        source = os.path.expanduser(os.fspath(weights).strip())
        if kind == "folder":
            source = os.path.abspath(source)
            _read_folder_config(spec, source)
    model = _from_preset(spec, source, kind)
    if spec.family == "clip":
        return model.vision_encoder, model.vision_projection
    if spec.family == "siglip":
        return model.vision_encoder, None
    return model, None


def _check_architecture(spec: TransformerSpec, tower: Any, weights: Any) -> None:
    """A checkpoint of another size than the entry's is refused (its descriptors would be
    recorded under the wrong name)."""
    if spec.architecture is None:
        return
    found = {k: int(getattr(tower, k)) for k in ("patch_size", "hidden_dim", "num_layers")}
    wanted = {k: int(spec.architecture[k]) for k in found}
    if found == wanted:
        return
    matching = [
        s.name
        for s in TRANSFORMERS.values()
        if s.family == spec.family
        and s.architecture
        and all(int(s.architecture[k]) == v for k, v in found.items())
    ]
    hint = f"; it fits {', '.join(matching)}" if matching else ""
    raise WeightsFileError(
        f"{weights} holds a {spec.family} checkpoint with {found}, not {spec.name}'s {wanted}"
        f"{hint}; or use --backbone={spec.family}, which takes a checkpoint of any size"
    )


# Variables drawn at random by a ViT's initialisers; everything else (biases, norms, layer
# scales, position ids) starts from constants and needs no seed.
_RANDOM_VARIABLES = (
    "kernel",
    "cls_token",
    "class_embedding",
    "register_tokens",
    "probe",
    "position_embeddings",
    "embeddings",
    "mask_token",
)


def seeded_initialize(model: Any, seed: int) -> None:
    """Draws a transformer's random variables again, seeded by `seed` and each variable's path.

    Truncated normal, standard deviation 0.02 (the ViT initialisation): two processes building
    the same random backbone get the same network, so an interrupted extraction resumes with
    the network it started with.
    """
    for variable in model.weights:
        name = variable.path.rsplit("/", 1)[-1]
        if name not in _RANDOM_VARIABLES or "float" not in str(variable.dtype):
            continue
        digest = hashlib.sha256(f"{seed}/{variable.path}".encode()).digest()
        init = keras.initializers.TruncatedNormal(
            stddev=0.02, seed=int.from_bytes(digest[:4], "little") & 0x7FFFFFFF
        )
        variable.assign(init(tuple(variable.shape), dtype=variable.dtype))


def load_tower(
    name: str, weights: Any = "pretrained", *, seed: int = 0
) -> tuple[TransformerSpec, Any, Any]:
    """The entry's KerasHub image tower with its weights, and CLIP's projection.

    Args:
      name: registry name (`TRANSFORMERS`).
      weights: 'imagenet' / 'pretrained' (the KerasHub preset), 'none' (random, from `seed`),
        a local preset or Hugging Face checkpoint folder, or a KerasHub handle ('hf://...').
      seed: seed of the random weights.

    Returns:
      (spec, tower, projection): the KerasHub `DINOV2Backbone`, `DINOV3Backbone`,
      `CLIPVisionEncoder` or `SigLIPVisionEncoder`; CLIP's image projection (`Dense`), else None.

    Raises:
      KeyError: unknown name.
      KerasHubMissingError: keras-hub is not installed.
      WeightsUnavailableError: the preset cannot be downloaded (one line naming the folder to
        give with --weights=DIR).
      WeightsFileError: a folder that is missing, of another family or size, or unreadable.
    """
    spec = get_transformer_spec(name)
    if weights_kind(weights) == "none":
        tower, projection = _random_tower(spec, seed)
    else:
        tower, projection = _loaded_tower(spec, weights)
        _check_architecture(spec, tower, weights)
    return spec, tower, projection
