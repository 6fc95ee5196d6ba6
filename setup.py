"""cbir-tf: content-based image retrieval with TensorFlow/Keras."""

from setuptools import find_packages, setup

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
    packages=find_packages(include=["cbir_tf", "cbir_tf.*"]),
    install_requires=[
        "tensorflow>=2.16",
        "keras>=3.3",
        "numpy>=1.26",
        "scipy>=1.11",
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
        "faiss": ["faiss-cpu>=1.8"],
        "tfds": ["tensorflow-datasets>=4.9"],
        "tflite": ["ai-edge-litert>=2.0"],
        "dev": [
            "pytest>=8.0",
            "ruff>=0.5",
            "tensorflow-datasets>=4.9",
            "faiss-cpu>=1.8",
            "ai-edge-litert>=2.0",
        ],
    },
    license="Apache-2.0",
)
