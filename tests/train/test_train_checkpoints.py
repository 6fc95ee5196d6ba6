"""Checkpoints of a training run: tf.train.CheckpointManager layout, resume of version 1 workdirs,
and the config check of `Settings.from_config`.

A two-layer Dense model stands in for the training model: the checkpoints hold whatever
`model.weights` and its optimizer's variables are, so the layout and the restore rules are the
same as a backbone's, in a fraction of a second.
"""

import json
import os

import keras
import numpy as np
import pytest

from cbir_tf import config as config_lib
from cbir_tf.train import Settings, TrainConfigError, checkpoints


def _model(train_first: bool = False) -> keras.Model:
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    hidden = keras.layers.Dense(3, name="first")(inp)
    model = keras.Model(inp, keras.layers.Dense(2, name="second")(hidden))
    model.get_layer("first").trainable = train_first  # stage 1 trains the top layer only
    model.compile(optimizer=keras.optimizers.Adam(1e-2), loss="mse")
    model.optimizer.build(model.trainable_variables)
    return model


def _fit(model: keras.Model, steps: int = 3) -> None:
    x = np.random.default_rng(1).normal(size=(8, 4)).astype("float32")
    model.fit(x, np.ones((8, 2), "float32"), batch_size=8, epochs=steps, verbose=0)


def _same(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))


def test_save_restore_keeps_weights_optimizer_and_two_checkpoints(tmp_path):
    ckpt = checkpoints.Checkpoints(str(tmp_path))
    model = _model()
    state = {"next_epoch": 0}
    for epoch in (1, 2, 3):
        _fit(model)
        state = ckpt.save(dict(state, next_epoch=epoch), model, best=epoch == 2)
    assert state["last"] == "last-00003" and state["best_weights"] == "best-00002"
    assert json.load(open(ckpt.state_path))["last"] == "last-00003"
    # Two kept per manager: the one state.json names survives a crash before its update.
    kept = sorted(f for f in os.listdir(tmp_path / "checkpoints" / "last") if f.endswith(".index"))
    assert kept == ["ckpt-2.index", "ckpt-3.index"]

    resumed = _model()
    assert ckpt.restore("last-00003", resumed) is True  # same stage: optimizer state too
    assert _same(resumed.get_weights(), model.get_weights())
    assert _same(resumed.optimizer.variables, model.optimizer.variables)

    # Another stage (more trainable weights, another optimizer): the weights only.
    stage2 = _model(train_first=True)
    assert ckpt.restore("best-00002", stage2, with_optimizer=False) is False
    assert int(stage2.optimizer.iterations) == 0
    assert not _same(stage2.get_weights(), model.get_weights())  # best is epoch 2, not 3


def test_version1_checkpoint_folders_still_resume(tmp_path):
    # The layout the hand-rolled manager wrote: state.json naming `last-NNNNN/` folders that
    # hold the compiled model's Keras weights file (weights and optimizer state).
    model = _model()
    _fit(model)
    root = tmp_path / "checkpoints"
    for name in ("last-00001", "best-00001"):
        os.makedirs(root / name)
        model.save_weights(str(root / name / "model.weights.h5"))
    state = {"version": 1, "next_epoch": 1, "last": "last-00001", "best_weights": "best-00001"}
    (root / "state.json").write_text(json.dumps(state))

    ckpt = checkpoints.Checkpoints(str(tmp_path))
    resumed = _model()
    assert ckpt.restore(ckpt.load_state()["last"], resumed) is True
    assert _same(resumed.get_weights(), model.get_weights())
    assert int(resumed.optimizer.iterations) == int(model.optimizer.iterations)
    # The next epoch is saved in the new layout; the old folders go once nothing names them.
    _fit(resumed)
    ckpt.save(dict(ckpt.load_state(), next_epoch=2), resumed, best=True)
    assert sorted(os.listdir(root)) == ["best", "last", "state.json"]


def test_unknown_and_ill_typed_train_fields_are_one_clear_error():
    config = config_lib.load_config("train_head").to_dict()
    config["train"]["epoch"] = 3
    with pytest.raises(TrainConfigError, match='no field train.epoch: did you mean "epochs"'):
        Settings.from_config(config)
    config = config_lib.load_config("train_metric").to_dict()
    config["train"]["margin"] = "0.7"
    with pytest.raises(TrainConfigError, match=r"margin must be a number like 0.7, got '0.7'"):
        Settings.from_config(config)
    del config["train"]["margin"]
    with pytest.raises(TrainConfigError, match="config.train lacks margin"):
        Settings.from_config(config)


def test_the_recipes_defaults_come_from_their_config_files():
    head = Settings.from_config(config_lib.load_config("train_head"))
    metric = Settings.from_config(config_lib.load_config("train_metric"))
    assert (head.recipe, head.pooling, head.fine_tune_blocks) == ("head", "gem", 2)
    assert (metric.recipe, metric.image_size, metric.batch_size) == ("metric", 320, 35)
    assert metric.augment.crop_scale == tuple(
        config_lib.load_config("train_metric").train.crop_scale
    )
