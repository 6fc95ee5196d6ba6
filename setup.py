"""cbir-tf: content-based image retrieval with TensorFlow/Keras."""

from setuptools import find_packages, setup

# The HTTP search service (serve.py): an ASGI app, its server, and multipart uploads.
SERVE = ["starlette>=0.40", "uvicorn>=0.30", "python-multipart>=0.0.18", "threadpoolctl>=3.1"]
# TensorFlow Datasets imports importlib_resources (dataset_builder.py) without declaring it for
# Python >= 3.9, and newer etils no longer bring it: a `tfds:` source fails without it.
TFDS = ["tensorflow-datasets>=4.9", "importlib-resources>=5.0"]
TFLITE = ["ai-edge-litert>=2.0"]
# Extraction as an Apache Beam pipeline (extract.py --runner=beam; docs/scale-out.md). Beam
# bounds some shared dependencies (protobuf, pillow, pyarrow) itself: pip resolves them beside
# TensorFlow's, and CI proves the result by installing .[dev] afresh and running the tests. No
# version is pinned here; add a bound only with the reason it is needed.
BEAM = ["apache-beam>=2.60"]
# Vision-transformer backbones (DINOv2, DINOv3, CLIP, SigLIP): KerasHub's models and presets, and
# safetensors for the Hugging Face checkpoint folders KerasHub converts. keras-hub 0.32 needs
# keras >= 3.15 and pulls tensorflow-text 2.21 beside TensorFlow 2.21.
HUB = ["keras-hub>=0.23", "safetensors>=0.4"]

setup(
    name="cbir-tf",
    version="0.1.0",
    description=(
        "Content-based image retrieval with TensorFlow/Keras: global CNN descriptors "
        "(MAC, SPoC, GeM, R-MAC), whitening, query expansion, diffusion and the "
        "Revisited Oxford/Paris evaluation."
    ),
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # configs/ (the get_config() files, at the top of a checkout) is installed as cbir_tf/configs/,
    # where `cbir_tf.config.config_dir` finds it from any directory.
    packages=[*find_packages(include=["cbir_tf", "cbir_tf.*"]), "cbir_tf.configs"],
    package_dir={"cbir_tf.configs": "configs"},
    package_data={"cbir_tf.serve": ["page.html"]},
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.3",
        "numpy>=1.26",
        "scipy>=1.11",
        # The approximate index of large collections (cbir_tf.search.ann); faiss-gpu may replace it.
        "faiss-cpu>=1.8",
        "scikit-learn>=1.3",
        "pandas>=2.0",
        "absl-py>=2.0",
        "ml-collections>=0.1.1",
        "tqdm>=4.66",
        "pillow>=10.0",
        "h5py>=3.10",
        "matplotlib>=3.8",
        "tensorboard>=2.16",
    ],
    extras_require={
        "faiss": [],  # faiss-cpu is a regular dependency now; the extra is kept for old commands
        "tfds": TFDS,
        "serve": SERVE,
        # TFLite's interpreter for exported models (export.py --format=tflite checks them).
        "tflite": TFLITE,
        "beam": BEAM,
        "hub": HUB,
        "dev": [
            "pytest>=8.0",
            "ruff>=0.5",
            *TFDS,
            *SERVE,
            "selenium>=4.10",
            *TFLITE,
            *BEAM,
            *HUB,
        ],
    },
    # The commands, runnable from any directory once installed (the scripts beside setup.py
    # are the same commands for a checkout: python extract.py ...).
    entry_points={
        "console_scripts": [
            f"cbir-{name} = cbir_tf.commands.{name}:run"
            for name in ("extract", "evaluate", "search", "train", "serve", "export")
        ]
    },
    license="Apache-2.0",
)
