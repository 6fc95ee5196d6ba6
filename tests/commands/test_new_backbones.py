"""The new backbones through the commands and the Python API (issue 27): ConvNeXt and
EfficientNetV2 with random weights, and DINOv2 / DINOv3 / CLIP / SigLIP from tiny random
checkpoint folders written by the tests (nothing is downloaded). Each builds, describes a folder
of photos with unit-length descriptors, and evaluates; downstream (search, serve, train, export)
takes them through plain config fields.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest
from hf_checkpoints import write_dinov2, write_dinov3, write_keras_hub_preset
from photos import synthetic_photo

from cbir_tf import config
from cbir_tf.retriever import Retriever

ROOT = pathlib.Path(__file__).resolve().parents[2]
NUM_PHOTOS = 6


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    return {
        "dinov2": str(write_dinov2(root / "dinov2", registers=4)[0]),
        "dinov3": str(write_dinov3(root / "dinov3")),
        "clip": str(write_keras_hub_preset(root / "clip", "clip")),
        "siglip": str(write_keras_hub_preset(root / "siglip", "siglip")),
    }


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("photos")
    for i in range(NUM_PHOTOS):
        synthetic_photo(root / f"p{i}.jpg", i)
    return str(root)


def _weights(backbone: str, checkpoints: dict) -> str:
    return checkpoints.get(backbone, "none")


def _config(backbone: str, weights: str, image_size: int = 64):
    cfg = config.default_config()
    cfg.model.backbone = backbone
    cfg.model.weights = weights
    cfg.data.image_size = image_size
    return cfg


def _run(args, cwd=ROOT, timeout=900):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    return subprocess.run(
        [sys.executable, *map(str, args)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


NEW = ["convnext_tiny", "efficientnetv2b0", "dinov2", "dinov3", "clip", "siglip"]


@pytest.mark.slow
@pytest.mark.parametrize("backbone", NEW)
def test_python_api_indexes_and_searches_a_folder(backbone, checkpoints, photos, tmp_path):
    cfg = _config(backbone, _weights(backbone, checkpoints))
    r = Retriever.from_config(cfg, directory=tmp_path / "index")
    r.index(photos, progress=False)
    x = np.asarray(r.descriptors)
    assert x.shape[0] == NUM_PHOTOS
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    first = os.path.join(photos, "p0.jpg")
    assert r.search(first, k=1)[0].id == "p0.jpg"
    meta = json.loads((tmp_path / "index" / "meta.json").read_text())
    assert meta["backbone"] == backbone and meta["pooling"] != "auto"
    # The folder alone describes new queries (the model is rebuilt or loaded in safe mode).
    again = Retriever.load(tmp_path / "index")
    assert again.search(first, k=1)[0].id == "p0.jpg"


@pytest.mark.slow
def test_serve_opens_a_transformer_index(checkpoints, photos, tmp_path):
    from cbir_tf.serve import service as service_lib

    cfg = _config("dinov2", checkpoints["dinov2"])
    Retriever.from_config(cfg, directory=tmp_path / "index").index(photos, progress=False)
    service = service_lib.open_service(tmp_path / "index")
    data = pathlib.Path(photos, "p3.jpg").read_bytes()
    answer = service.search_image(data, k=2, rerank="none")
    assert answer["results"][0]["id"] == "p3.jpg", answer
    service.close()


@pytest.mark.slow
@pytest.mark.parametrize(
    "backbone, pooling",
    [("dinov2", "auto"), ("dinov3", "rmac"), ("siglip", "gem"), ("convnext_tiny", "auto")],
)
def test_extract_and_search_commands(backbone, pooling, checkpoints, photos, tmp_path):
    index = tmp_path / "index"
    proc = _run(
        [
            "extract.py",
            f"--images={photos}",
            f"--out={index}",
            f"--backbone={backbone}",
            f"--weights={_weights(backbone, checkpoints)}",
            "--config.data.image_size=64",
            f"--config.model.pooling={pooling}",
        ]
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    x = np.load(index / "descriptors.npy")
    np.testing.assert_allclose(np.linalg.norm(x, axis=1), 1.0, atol=1e-5)
    proc = _run(["search.py", f"--index={index}", f"--query={photos}/p2.jpg", "--k=3"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert re.search(r"^\s*1\s+\S+\s+p2\.jpg$", proc.stdout, re.M), proc.stdout


# The demo's MobileNet has alpha 0.25; the other backbones have no width multiplier.
DEMO = [
    "--config=configs/demo.py",
    "--config.model.alpha=1.0",
    "--config.data.image_size=64",
    "--config.rerank.diffusion.k=8",
]


@pytest.mark.slow
# DINOv2 and DINOv3 go through evaluate.py in the comparison below.
@pytest.mark.parametrize("backbone", ["clip", "efficientnetv2b0"])
def test_evaluate_the_demo_benchmark(backbone, checkpoints, tmp_path):
    weights = _weights(backbone, checkpoints)
    proc = _run(
        [
            "evaluate.py",
            *DEMO,
            f"--backbone={backbone}",
            f"--weights={weights}",
            f"--workdir={tmp_path}",
            f"--data_root={tmp_path / 'data'}",
        ]
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert backbone in proc.stdout.splitlines()[0], proc.stdout
    for method in ("plain", "aqe", "diffusion"):
        assert re.search(rf"^{method}\s+\d+\.\d\d", proc.stdout, re.M), proc.stdout
    stores = sorted((tmp_path / "descriptors" / "demo").glob("*/*/descriptors.npy"))
    assert [p.parent.name for p in stores] == ["db", "queries"], stores
    for store in stores:
        np.testing.assert_allclose(np.linalg.norm(np.load(store), axis=1), 1.0, atol=1e-5)
    key = stores[0].parent.parent.name
    assert key.startswith(backbone) and ("auto" not in key), key


@pytest.mark.slow
def test_compare_runs_cnns_and_transformers_side_by_side(checkpoints, tmp_path):
    # One comparison across kinds: each value brings its own weights (and MobileNet its width).
    backbones = (
        "model.backbone:mobilenet[model.alpha=0.25],"
        f"dinov2[model.weights={checkpoints['dinov2']}],"
        f"dinov3[model.weights={checkpoints['dinov3']}]"
    )
    proc = _run(
        [
            "evaluate.py",
            *DEMO,
            "--weights=none",
            f"--compare={backbones}",
            f"--workdir={tmp_path}",
            f"--data_root={tmp_path / 'data'}",
        ]
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    csv_path = tmp_path / "eval" / "demo" / "compare" / "comparison.csv"
    lines = csv_path.read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","), strict=False)) for line in lines[1:]]
    assert {r["model.backbone"] for r in rows} == {"mobilenet", "dinov2", "dinov3"}, lines[:3]
    assert not any(r["error"] for r in rows), [r["error"] for r in rows if r["error"]]
    for backbone in ("mobilenet", "dinov2", "dinov3"):
        assert re.search(rf"^{backbone}\s.*plain\s+\d+\.\d\d", proc.stdout, re.M), proc.stdout


def _labelled(root: pathlib.Path) -> pathlib.Path:
    for c in range(3):
        for i in range(4):
            synthetic_photo(root / f"class{c}" / f"{i}.jpg", 10 * c + i)
    return root


@pytest.mark.slow
def test_train_metric_recipe_trains_the_last_transformer_blocks(checkpoints, tmp_path):
    """train.py's metric recipe on a DINOv2 with --config.train.metric_blocks=1: the last
    transformer block learns, the embedding and the first block keep their weights."""
    from cbir_tf.describe import models, token_models

    work = tmp_path / "run"
    proc = _run(
        [
            "train.py",
            "--config=configs/train_metric.py",
            f"--train_dir={_labelled(tmp_path / 'l')}",
            "--backbone=dinov2",
            f"--weights={checkpoints['dinov2']}",
            f"--workdir={work}",
            "--config.train.metric_blocks=1",
            "--config.train.epochs=1",
            "--config.train.tuples_per_epoch=4",
            "--config.train.num_negatives=2",
            "--config.train.pool_size=12",
            "--config.train.image_size=56",
            "--config.train.batch_size=4",
            "--config.train.learning_rate=0.01",
            "--config.train.val_fraction=0",
            "--config.train.whitening=none",
        ]
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    trained = models.load_descriptor_model(work / "model.keras", safe_mode=True)
    start = token_models.build_transformer("dinov2", checkpoints["dinov2"]).tokens
    after = trained.get_layer("dinov2")
    for name, should_change in (
        ("patch_embedding", False),
        ("layers_0", False),
        ("layers_1", True),
    ):
        before = np.concatenate([w.ravel() for w in start.get_layer(name).get_weights()])
        now = np.concatenate([w.ravel() for w in after.get_layer(name).get_weights()])
        assert (not np.allclose(before, now)) == should_change, name
    out = trained(np.random.default_rng(0).uniform(0, 255, (1, 60, 90, 3)).astype(np.float32))
    np.testing.assert_allclose(np.linalg.norm(out.numpy()), 1.0, atol=1e-5)


@pytest.mark.slow
def test_export_command_from_the_config(checkpoints, tmp_path):
    proc = _run(
        [
            "export.py",
            "--backbone=siglip",
            f"--weights={checkpoints['siglip']}",
            f"--out={tmp_path / 'saved'}",
            "--config.data.image_size=64",
        ]
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    info = json.loads((tmp_path / "saved" / "cbir_export.json").read_text())
    assert info["dim"] == 32 and info["model"]["pooling"] == "head", info


@pytest.mark.slow
@pytest.mark.parametrize("backbone", NEW)
def test_run_benchmark_python_api(backbone, checkpoints, tmp_path):
    from cbir_tf.runs.evaluate import run_benchmark

    cfg = config.load_config("demo")
    cfg.model.backbone = backbone
    cfg.model.weights = _weights(backbone, checkpoints)
    cfg.model.alpha = 1.0
    cfg.data.image_size = 64
    cfg.data.data_root = str(tmp_path / "data")
    cfg.workdir = str(tmp_path)
    out = run_benchmark(cfg, progress=False)
    assert set(out["results"]) == {"plain", "aqe", "diffusion", "aqe+diffusion"}, out["results"]
    assert backbone in out["table"].splitlines()[0], out["table"]
    stores = sorted((tmp_path / "descriptors" / "demo").glob("*/*/descriptors.npy"))
    assert len(stores) == 2
    for store in stores:
        np.testing.assert_allclose(np.linalg.norm(np.load(store), axis=1), 1.0, atol=1e-5)
