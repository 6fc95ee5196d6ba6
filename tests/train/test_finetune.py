"""Fine-tuning: both recipes learn, the saved model is the trained one, resume, error cases.

Tiny data (4 colour classes of 64 px images) and MobileNet alpha 0.25 without pretrained weights.
A randomly initialised MobileNet's batch-norm statistics (mean 0, variance 1) shrink activations
to ~1e-16 by the last layer, so every image would get the same descriptor; the `weights` fixture
calibrates those statistics on one random batch (data-dependent initialisation), which gives
distinct, learnable features without any download.
"""

import dataclasses
import importlib.util
import json
import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from cbir_tf import config as config_lib
from cbir_tf import train as finetune
from cbir_tf.data import folder
from cbir_tf.describe import extract as descriptors
from cbir_tf.describe import models
from cbir_tf.train import images as training
from cbir_tf.train import loop, losses, network
from cbir_tf.train import settings as train_settings

COLOURS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (210, 210, 40)]


def write_calibrated_weights(path):
    """MobileNet alpha 0.25 weights with batch-norm statistics set from one random batch."""
    keras.utils.set_random_seed(0)
    net = keras.applications.MobileNet(
        include_top=False, weights=None, alpha=0.25, input_shape=(None, None, 3)
    )
    for layer in net.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = 0.0  # one training-mode call sets the moving statistics
    net(np.random.default_rng(0).uniform(-1, 1, (8, 64, 64, 3)).astype("float32"), training=True)
    net.save_weights(path)
    return str(path)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "mobilenet_025_calibrated.weights.h5"
    return write_calibrated_weights(path)


def make_collection(root, per_class=8, colours=COLOURS, size=(64, 48), seed=0):
    rng = np.random.default_rng(seed)
    for c, colour in enumerate(colours):
        d = os.path.join(root, f"class{c}")
        os.makedirs(d, exist_ok=True)
        for i in range(per_class):
            noise = rng.normal(0, 45, (size[1], size[0], 3))
            pixels = np.clip(np.array(colour)[None, None] + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(d, f"{i:02d}.jpg"))
    return str(root)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_collection(tmp_path_factory.mktemp("data"))


def tiny_config(weights, recipe="head", **train):
    c = config_lib.load_config("train_head")
    c.model.backbone = "mobilenet"
    c.model.alpha = 0.25
    c.model.weights = weights
    c.model.pooling = "gem"
    c.train.recipe = recipe
    c.train.image_size = 64
    c.train.batch_size = 8
    c.train.epochs = 2
    c.train.fine_tune_blocks = 0
    c.train.val_fraction = 0.25
    c.train.num_negatives = 2
    c.train.tuples_per_epoch = 8
    c.train.pool_size = 24
    c.train.dropout = 0.0
    c.train.color_jitter = 0.0
    for k, v in train.items():
        c.train[k] = v
    return c


# --------------------------------------------------------------------------- learning


@pytest.mark.slow
def test_head_steps_lower_the_loss(weights, data_dir):
    s = finetune.Settings.from_config(tiny_config(weights, learning_rate=1e-2))
    data = finetune.load_training_data(data_dir, None, s)
    m = finetune.build_training_models(s, len(data.train.class_names))
    finetune.prepare_stage(s, m, 1)
    ds = training.classification_dataset(data.train, 64, 24, None, shuffle=False).take(1)
    x, y = next(iter(ds))
    before = m.train.evaluate(x, y, verbose=0)[0]
    frozen = [w.numpy().copy() for w in m.backbone.weights]
    m.train.fit(ds.repeat(20), verbose=0, shuffle=False)
    after = m.train.evaluate(x, y, verbose=0)[0]
    assert after < 0.8 * before, (before, after)
    # The first stage trains the head only: the backbone is untouched.
    assert all(
        np.array_equal(a, w.numpy()) for a, w in zip(frozen, m.backbone.weights, strict=True)
    )


@pytest.mark.slow
def test_metric_steps_lower_the_loss_and_train_gem_p(weights, data_dir):
    s = finetune.Settings.from_config(tiny_config(weights, "metric", learning_rate=1e-3))
    data = finetune.load_training_data(data_dir, None, s)
    m = finetune.build_training_models(s, len(data.train.class_names))
    finetune.prepare_stage(s, m, 1)
    labels = data.train.labels
    # Fixed tuples: query, positive (same class), two negatives of the two next classes.
    rows = []
    for q in range(len(labels)):
        same = np.flatnonzero((labels == labels[q]) & (np.arange(labels.size) != q))
        negs = [np.flatnonzero(labels == (labels[q] + k) % 4)[0] for k in (1, 2)]
        rows.append([q, same[0], *negs])
    ds = training.tuple_dataset(data.train, np.array(rows), 64, len(rows), None).take(1)
    x, y = next(iter(ds))
    assert x.shape == (len(rows), 4, 64, 64, 3)
    loss = losses.TupleLoss("contrastive", 0.7)
    before = float(loss(y, m.train(x)))
    m.train.fit(ds.repeat(6), verbose=0, shuffle=False)
    after = float(loss(y, m.train(x)))
    assert after < 0.8 * before, (before, after)
    p = float(m.pool_layer.get_weights()[0][0])
    assert p != pytest.approx(3.0, abs=1e-6)
    # Batch norm stays frozen: its statistics never move.
    bn = [w for w in m.backbone.non_trainable_weights if "moving" in w.path]
    assert bn and all(not w.trainable for w in bn)


def test_leave_one_out_map_hand_worked_and_chunked():
    d = np.array([[1, 0], [0.6, 0.8], [0.8, 0.6], [0, 1]], np.float32)
    # Query 0 ranks 2, 1, 3 (itself is junk): its positive 1 is second, AP = (0 + 1/2) / 2.
    # Query 1 ranks 2, 3, 0: positive third, AP = (0 + 1/3) / 2.
    m, aps = finetune.leave_one_out_map(d, np.array([0, 0, 1, 1]))
    np.testing.assert_allclose(aps, [1 / 4, 1 / 6, 1 / 6, 1 / 4])
    assert m == pytest.approx(5 / 24)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(40, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    labels = rng.integers(0, 5, 40)
    labels[0] = 7  # a class of one image: no positive, AP NaN, left out of the mean
    whole = finetune.leave_one_out_map(x, labels)
    chunked = finetune.leave_one_out_map(x, labels, max_pairs=40 * 3)
    np.testing.assert_array_equal(whole[1], chunked[1])
    assert np.isnan(whole[1][0]) and whole[0] == pytest.approx(np.nanmean(whole[1]))


def test_backbone_blocks_and_trainable_top_blocks(weights):
    net = models.build_descriptor_model("mobilenet", weights=weights, alpha=0.25, pooling="gem")
    backbone = net.get_layer("mobilenet")
    blocks = finetune.backbone_blocks(backbone)
    assert len(blocks) == 14  # stem + 13 depthwise-separable blocks
    assert [layer.name for layer in blocks[-1]][:2] == ["conv_dw_13", "conv_dw_13_bn"]
    assert any(layer.name == "conv_pad_12" for layer in blocks[-2])
    n = finetune.set_trainable_blocks(backbone, 2)
    names = sorted(w.path for w in backbone.trainable_weights)
    assert n == 4 and all(("_12" in p or "_13" in p) and "bn" not in p for p in names), names
    assert finetune.set_trainable_blocks(backbone, 0) == 0
    assert finetune.set_trainable_blocks(backbone, -1) == 27  # stem + 13 dw + 13 pw kernels


def test_block_grouping_of_other_naming_schemes():
    inp = keras.Input((8, 8, 3))
    x = inp
    for name in [
        "stem_conv",
        "stem_bn",
        "block1a_conv",
        "block1a_bn",
        "block1b_conv",
        "top_conv",
        "top_bn",
    ]:
        x = (
            keras.layers.Conv2D(3, 1, name=name)(x)
            if "conv" in name
            else keras.layers.BatchNormalization(name=name)(x)
        )
    blocks = finetune.backbone_blocks(keras.Model(inp, x))
    assert [[layer.name for layer in b] for b in blocks] == [
        ["stem_conv", "stem_bn"],
        ["block1a_conv", "block1a_bn"],
        ["block1b_conv"],
        ["top_conv", "top_bn"],
    ]


def test_transformer_blocks_and_trainable_top_blocks(tmp_path):
    """A DINOv2's blocks: the patch embedding, then each transformer layer, the final
    LayerNorm joining the last one (it reads its output); CLIP's pre-norm stays with the stem."""
    from hf_checkpoints import write_dinov2, write_keras_hub_preset

    folder = write_dinov2(tmp_path / "dinov2", registers=4)[0]
    net = models.build_descriptor_model("dinov2", folder, pooling="gem")
    backbone = net.get_layer("dinov2")
    blocks = [[layer.name for layer in b] for b in finetune.backbone_blocks(backbone)]
    assert blocks == [["patch_embedding"], ["layers_0"], ["layers_1", "layernorm"]]
    finetune.set_trainable_blocks(backbone, 1)
    trained = [layer.name for layer in backbone.layers if layer.trainable_weights]
    assert trained == ["layers_1", "layernorm"], trained
    clip = models.build_descriptor_model(
        "clip", write_keras_hub_preset(tmp_path / "clip", "clip"), pooling="cls"
    ).get_layer("clip")
    # KerasHub names CLIP's layers after its encoder: clip_vision_encoder[_N]_...
    blocks = [
        [re.sub(r"^clip_vision_encoder(_\d+)?_", "", layer.name) for layer in b]
        for b in finetune.backbone_blocks(clip)
    ]
    assert blocks == [
        ["patch_embedding", "pre_layer_norm"],
        ["encoder_block_0"],
        ["encoder_block_1", "layer_norm"],
    ], blocks


@pytest.mark.slow
def test_convnext_blocks():
    backbone = models.build_descriptor_model("convnext_tiny", "none").get_layer("convnext_tiny")
    blocks = finetune.backbone_blocks(backbone)
    names = [layer.name for layer in blocks[-1]]
    assert names[0] == "convnext_tiny_stage_3_block_2_depthwise_conv", names
    assert isinstance(blocks[-1][-1], keras.layers.LayerNormalization)  # the final norm
    assert len(blocks) == 1 + 18 + 3  # prestem and stem, 3 + 3 + 9 + 3 blocks, 3 downsamplings


# --------------------------------------------------------------------------- end to end

BROKEN = "class1/broken.jpg"


@pytest.fixture(scope="module")
def e2e_data(tmp_path_factory):
    root = make_collection(tmp_path_factory.mktemp("e2e"))
    with open(os.path.join(root, BROKEN), "wb") as f:
        f.write(b"\xff\xd8\xff\xe0 truncated")
    return root


def head_config(weights):
    return tiny_config(weights, epochs=2, fine_tune_blocks=1, fine_tune_epochs=1)


def metric_config(weights):
    return tiny_config(weights, "metric", epochs=2, whitening="pca", learning_rate=1e-3)


@pytest.fixture(scope="module")
def head_run(weights, e2e_data, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("head") / "run")
    return finetune.train(head_config(weights), e2e_data, workdir, progress=False), workdir


@pytest.fixture(scope="module")
def metric_run(weights, e2e_data, tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("metric") / "run")
    return finetune.train(metric_config(weights), e2e_data, workdir, progress=False), workdir


def _val_images(config, data_dir):
    s = finetune.Settings.from_config(config)
    return finetune.load_training_data(data_dir, None, s).val


@pytest.mark.slow
def test_head_recipe_end_to_end_model_is_the_trained_one(weights, e2e_data, head_run, tmp_path):
    result, workdir = head_run
    assert [h["stage"] for h in result.history] == [1, 1, 2]
    assert result.descriptor in ("pooled", "projected")
    info = json.load(open(os.path.join(workdir, "model.json")))
    assert info["backbone"] == "mobilenet" and info["descriptor"] == result.descriptor
    # The unreadable image is skipped, counted and reported.
    broken = os.path.join(e2e_data, BROKEN)
    assert [p for p, _ in result.skipped] == [broken]
    assert info["skipped_images"][0][0] == broken
    assert info["num_train_images"] + info["num_val_images"] == 32
    logs = os.path.join(workdir, "logs")
    assert open(os.path.join(logs, "history.csv")).read().count("\n") == 4  # header + 3 epochs
    if importlib.util.find_spec("tensorboard"):
        assert any(f.startswith("events.out.tfevents") for f in os.listdir(logs))

    loaded = models.load_descriptor_model(result.model_path, safe_mode=True)
    assert not any(isinstance(layer, keras.layers.Lambda) for layer in loaded.layers)
    names = [layer.name for layer in loaded.layers]
    assert ("projection" in names) == (result.descriptor == "projected")
    # The saved model reproduces the best epoch's validation mAP.
    val = _val_images(head_config(weights), e2e_data)
    desc = finetune.describe(loaded, val, image_size=64)
    np.testing.assert_allclose(np.linalg.norm(desc, axis=1), 1.0, rtol=1e-5)
    assert finetune.leave_one_out_map(desc, val.labels)[0] == pytest.approx(result.best_val_map)

    # save -> load (safe_mode) -> extract: identical descriptors.
    paths, _, _ = folder.list_labelled(e2e_data)
    paths = [p for p in paths if not p.endswith("broken.jpg")][:6]
    first = descriptors.extract(loaded, paths, image_size=64, progress=False).descriptors
    loaded.save(tmp_path / "again.keras")
    again = models.load_descriptor_model(tmp_path / "again.keras", safe_mode=True)
    second = descriptors.extract(again, paths, image_size=64, progress=False).descriptors
    np.testing.assert_array_equal(first, second)


@pytest.mark.slow
def test_finished_run_is_not_trained_again(weights, e2e_data, head_run):
    result, workdir = head_run
    again = finetune.train(head_config(weights), e2e_data, workdir, progress=False)
    assert again.history == result.history and again.train_seconds == 0.0
    assert again.model_path == result.model_path


@pytest.mark.slow
def test_checkpoint_of_another_backbone_is_refused(weights, e2e_data, head_run):
    _, workdir = head_run
    other = head_config(weights)
    other.model.backbone = "mobilenetv2"
    other.model.alpha = 0.35
    with pytest.raises(
        finetune.CheckpointMismatchError,
        match=r"backbone: checkpoint 'mobilenet', this run 'mobilenetv2'; alpha",
    ):
        finetune.train(other, e2e_data, workdir, progress=False)
    with pytest.raises(finetune.CheckpointMismatchError, match="recipe: checkpoint 'head'"):
        finetune.train(metric_config(weights), e2e_data, workdir, progress=False)


@pytest.mark.slow
def test_metric_recipe_end_to_end_with_whitening(weights, e2e_data, metric_run):
    result, _ = metric_run
    assert result.descriptor == "whitened"
    assert all("gem_p" in h for h in result.history)
    loaded = models.load_descriptor_model(result.model_path, safe_mode=True)
    assert loaded.get_layer("whitening").output_dim == 256
    assert os.path.isfile(os.path.join(os.path.dirname(result.model_path), "whitening.npz"))
    val = _val_images(metric_config(weights), e2e_data)
    desc = finetune.describe(loaded, val, image_size=64)
    assert finetune.leave_one_out_map(desc, val.labels)[0] == pytest.approx(result.best_val_map)


@pytest.mark.slow
def test_metric_training_raises_validation_map_on_a_learnable_problem(weights, data_dir, tmp_path):
    # Noisy colour classes: the calibrated random MobileNet gives 0.454; two metric epochs 0.688.
    config = tiny_config(weights, "metric", epochs=2, whitening="none", learning_rate=1e-3)
    result = finetune.train(config, data_dir, str(tmp_path / "run"), progress=False)
    assert result.off_the_shelf_val_map < 0.5
    assert result.best_val_map >= result.off_the_shelf_val_map + 0.15, result.history


@pytest.mark.parametrize("in_memory", [True, False])
def test_eval_batches_pair_each_image_with_its_own_position(in_memory, tmp_path):
    # Each image is one flat colour (its index), in three shapes: batches are grouped by shape,
    # so positions leave the input order, and each must still point at its own pixels.
    shapes = [(30, 40), (40, 30), (20, 20)]
    images, paths = [], []
    for i in range(11):
        h, w = shapes[i % 3]
        images.append(np.full((h, w, 3), 10 * i, np.uint8))
        paths.append(str(tmp_path / f"{i}.png"))
        Image.fromarray(images[-1]).save(paths[-1])
    data = training.TrainingImages(
        ids=paths, labels=np.arange(11) % 2, class_names=["a", "b"], load_size=64,
        images=images if in_memory else None, paths=None if in_memory else paths,
    )  # fmt: skip
    indices = np.array([7, 2, 9, 0, 4, 10, 5])
    seen = []
    for positions, batch in training.eval_batches(data, indices, image_size=20, batch_size=2):
        batch = np.asarray(batch)
        assert len(positions) == len(batch) <= 2
        for pos, pixels in zip(positions, batch, strict=True):
            i = indices[pos]
            np.testing.assert_allclose(pixels, 10.0 * i, atol=1e-3)
            assert max(pixels.shape[:2]) == 20
            assert pixels.shape[0] / pixels.shape[1] == pytest.approx(
                shapes[i % 3][0] / shapes[i % 3][1]
            )
        seen += list(positions)
    assert sorted(seen) == list(range(len(indices)))


@pytest.mark.slow
def test_resume_after_interruption_matches_uninterrupted_run(
    weights, e2e_data, metric_run, tmp_path, capsys, monkeypatch
):
    full, _ = metric_run
    real = loop.epoch_dataset

    def interrupted(s, m, data, epoch, say):
        if epoch == 1:
            raise KeyboardInterrupt
        return real(s, m, data, epoch, say)

    monkeypatch.setattr(loop, "epoch_dataset", interrupted)
    with pytest.raises(KeyboardInterrupt):
        finetune.train(metric_config(weights), e2e_data, str(tmp_path / "cut"), progress=False)
    state = json.load(open(tmp_path / "cut" / "checkpoints" / "state.json"))
    assert state["next_epoch"] == 1 and not state["finished"]
    assert not os.path.exists(tmp_path / "cut" / "model.keras")
    monkeypatch.setattr(loop, "epoch_dataset", real)

    resumed = finetune.train(metric_config(weights), e2e_data, str(tmp_path / "cut"))
    assert "resumed from last-00001 (epoch 1, optimizer state restored)" in capsys.readouterr().out
    assert [h["epoch"] for h in resumed.history] == [0, 1]
    for a, b in zip(full.history, resumed.history, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["gem_p"] == pytest.approx(b["gem_p"], rel=1e-5)
    paths, _, _ = folder.list_labelled(e2e_data)
    paths = [p for p in paths if not p.endswith("broken.jpg")][:4]
    got = [
        descriptors.extract(
            models.load_descriptor_model(r.model_path), paths, image_size=64, progress=False
        ).descriptors
        for r in (full, resumed)
    ]
    np.testing.assert_allclose(got[0], got[1], atol=1e-4)


# --------------------------------------------------------------------------- errors


def test_one_class_is_refused(weights, tmp_path):
    root = make_collection(tmp_path / "one", colours=COLOURS[:1])
    with pytest.raises(folder.CollectionError, match="at least 2 classes"):
        finetune.train(tiny_config(weights), root, str(tmp_path / "run"), progress=False)


def test_single_image_class_is_refused_by_the_metric_recipe(weights, tmp_path):
    root = make_collection(tmp_path / "d", per_class=4)
    for f in os.listdir(os.path.join(root, "class3"))[1:]:
        os.remove(os.path.join(root, "class3", f))
    with pytest.raises(folder.CollectionError, match=r"class3 \(1\)"):
        finetune.train(tiny_config(weights, "metric"), root, str(tmp_path / "r"), progress=False)


@pytest.mark.slow
def test_tfds_source_with_held_out_split(weights, tmp_path):
    tfds = pytest.importorskip("tensorflow_datasets")
    config = tiny_config(weights, val_fraction=0.5)
    s = finetune.Settings.from_config(config)
    with tfds.testing.mock_data(num_examples=12, data_dir=str(tmp_path)):
        data = finetune.load_training_data("tfds:beans", None, s, tfds_data_dir=str(tmp_path))
    assert data.train.class_names == ["angular_leaf_spot", "bean_rust", "healthy"]
    assert len(data.train) + len(data.val) == 12
    assert data.val_source == "0.5 of tfds:beans"


def test_settings_reject_unknown_names(weights):
    config = tiny_config(weights)
    config.train.recipe = "arcface"
    with pytest.raises(ValueError, match="valid recipes: head, metric"):
        finetune.Settings.from_config(config)
    config = tiny_config(weights)
    config.model.backbone = "alexnet"
    with pytest.raises(KeyError, match="valid backbones"):
        finetune.Settings.from_config(config)


def test_config_files_define_the_training_fields():
    from cbir_tf import config as config_lib

    for c in (config_lib.load_config("train_head"), config_lib.load_config("train_metric")):
        # Every training setting can be overridden from the command line (--config.train.X).
        read_elsewhere = set(train_settings._ELSEWHERE) | {"augment"}  # model, whitening blocks
        assert {"backbone", "pooling", "whitening_dim"} <= read_elsewhere
        settings = {f.name for f in dataclasses.fields(finetune.Settings)} - read_elsewhere
        assert settings <= set(c.train), settings - set(c.train)
        assert set(config_lib.default_config().train) <= set(c.train)
        finetune.Settings.from_config(c)  # valid as shipped
    assert config_lib.load_config("train_metric").train.recipe == "metric"


@pytest.mark.slow
def test_mirrored_strategy_and_mixed_precision_run(weights, data_dir, tmp_path):
    # What several GPUs switch on automatically, forced here on the CPU (one replica).
    config = tiny_config(weights, "metric", epochs=1, strategy="mirrored", mixed_precision="on")
    s = finetune.Settings.from_config(config)
    with network.precision_and_strategy(s) as strategy:
        assert isinstance(strategy, tf.distribute.MirroredStrategy)
        with strategy.scope():
            m = finetune.build_training_models(s, 4)
        assert m.backbone.compute_dtype == "float16"
    assert keras.config.dtype_policy().name == "float32"  # restored afterwards
    assert m.descriptor(tf.zeros([1, 64, 64, 3])).dtype == tf.float32

    result = finetune.train(config, data_dir, str(tmp_path / "run"), progress=False)
    loaded = models.load_descriptor_model(result.model_path, safe_mode=True)
    assert loaded.get_layer("mobilenet").compute_dtype == "float32"  # saved for any machine
    out = loaded(np.full((2, 64, 48, 3), 128.0, np.float32)).numpy()
    assert out.dtype == np.float32 and np.allclose(np.linalg.norm(out, axis=1), 1.0, atol=1e-4)
