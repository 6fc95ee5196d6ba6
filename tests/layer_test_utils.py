"""One check for every Keras layer of the toolkit (after keras-hub's `run_layer_test`).

`run_layer_test` verifies, for one layer class and one set of constructor arguments:
  1. config round trip: every constructor argument is in `get_config()`, `from_config` rebuilds an
     identical config, and `keras.saving.serialize/deserialize_keras_object` finds the class
     through its "cbir_tf>" registration;
  2. eager call: output shape, dtype and (optionally) values; `compute_output_shape` agrees;
  3. graph call: a `tf.function` whose input signature leaves every axis but the last unknown
     gives the eager values, and keeps working on inputs of other spatial sizes without
     retracing; the symbolic Keras output shape agrees with `compute_output_shape`;
  4. weight counts (trainable and non-trainable);
  5. serialisation round trip: a model holding the layer is saved as `.keras` and loaded with
     `safe_mode=True` (so no Lambda layer or unregistered object is involved) and gives the same
     outputs and weights;
  6. one training step: with a trainable Dense before the layer, `fit` on one batch changes that
     Dense kernel (gradients flow through the layer) and every trainable weight of the layer,
     and leaves its non-trainable weights alone.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import keras
import numpy as np
import tensorflow as tf


def _dynamic_shape(ndim: int, last: int) -> list[int | None]:
    return [None] * (ndim - 1) + [last]


def _assert_shape(actual, expected, what: str) -> None:
    actual = tuple(actual)
    expected = tuple(expected)
    assert actual == expected, f"{what}: shape {actual}, expected {expected}"


def _check_config(layer_cls, init_kwargs: dict[str, Any]) -> None:
    layer = layer_cls(**init_kwargs)
    config = layer.get_config()
    for key, value in init_kwargs.items():
        assert key in config, f"{layer_cls.__name__}.get_config() lacks argument {key!r}"
        if isinstance(value, float):
            np.testing.assert_allclose(config[key], value, err_msg=key)
        elif key != "dtype":
            assert config[key] == value, f"config[{key!r}] = {config[key]!r}, passed {value!r}"
    rebuilt = layer_cls.from_config(config)
    assert rebuilt.get_config() == config, "from_config(get_config()) changed the config"

    serialized = keras.saving.serialize_keras_object(layer)
    assert serialized["registered_name"] == f"cbir_tf>{layer_cls.__name__}", serialized
    restored = keras.saving.deserialize_keras_object(serialized, safe_mode=True)
    assert type(restored) is layer_cls
    assert restored.get_config() == config


def _make_layer(layer_cls, init_kwargs, setup_layer, input_shape):
    layer = layer_cls(**init_kwargs)
    if setup_layer is not None:
        layer.build(input_shape)
        setup_layer(layer)
    return layer


def run_layer_test(
    layer_cls: type[keras.layers.Layer],
    init_kwargs: dict[str, Any],
    input_data: np.ndarray,
    expected_output_shape: Sequence[int | None],
    tmp_path: pathlib.Path,
    *,
    expected_output_dtype: str = "float32",
    expected_num_trainable_weights: int = 0,
    expected_num_non_trainable_weights: int = 0,
    expected_output_data: np.ndarray | None = None,
    expected_dynamic_output_shape: Sequence[int | None] | None = None,
    other_input_data: Sequence[np.ndarray] = (),
    setup_layer: Callable[[keras.layers.Layer], None] | None = None,
    run_training_check: bool = True,
    jit_compile: bool = False,
    rtol: float = 1e-5,
    atol: float = 1e-6,
) -> None:
    """Runs the six checks above; raises AssertionError naming the first that fails.

    Args:
      layer_cls: the layer class under test.
      init_kwargs: constructor arguments.
      input_data: one float input batch, e.g. [B, H, W, C] or [B, D].
      expected_output_shape: output shape for `input_data`.
      tmp_path: a folder for the saved model.
      expected_output_dtype: output dtype name.
      expected_num_trainable_weights / expected_num_non_trainable_weights: after build.
      expected_output_data: reference output values for `input_data`, if known.
      expected_dynamic_output_shape: `compute_output_shape` for the input shape with every axis
        but the last unknown; defaults to the batch axis and the last axis of the output, with
        the axes between unknown.
      other_input_data: inputs of other sizes for the same traced graph function; each must give
        the eager layer's output.
      setup_layer: called on a built layer to set weights (e.g. a learned whitening) before any
        output is compared.
      run_training_check: run the training step (6).
      jit_compile: compile the training step and graph function with XLA (as Keras does on GPU).
      rtol, atol: tolerances for value comparisons.
    """
    input_data = np.asarray(input_data)
    ndim = input_data.ndim
    last = input_data.shape[-1]
    dynamic = _dynamic_shape(ndim, last)

    # 1. Config.
    _check_config(layer_cls, init_kwargs)

    # 2. Eager call and 4. weight counts.
    layer = _make_layer(layer_cls, init_kwargs, setup_layer, input_data.shape)
    output = layer(input_data)
    _assert_shape(output.shape, expected_output_shape, "eager output")
    assert keras.backend.standardize_dtype(output.dtype) == expected_output_dtype, output.dtype
    _assert_shape(
        layer.compute_output_shape(input_data.shape), expected_output_shape, "compute_output_shape"
    )
    assert len(layer.trainable_weights) == expected_num_trainable_weights, [
        w.path for w in layer.trainable_weights
    ]
    assert len(layer.non_trainable_weights) == expected_num_non_trainable_weights, [
        w.path for w in layer.non_trainable_weights
    ]
    output = np.asarray(output)
    assert np.all(np.isfinite(output)), "eager output has NaN/Inf"
    if expected_output_data is not None:
        np.testing.assert_allclose(output, expected_output_data, rtol=rtol, atol=atol)

    # 3. Graph call with unknown sizes, and symbolic shapes.
    if expected_dynamic_output_shape is None:
        expected_dynamic_output_shape = (
            [None] + [None] * (len(expected_output_shape) - 2) + [expected_output_shape[-1]]
        )
    _assert_shape(
        layer.compute_output_shape(tuple(dynamic)),
        expected_dynamic_output_shape,
        "compute_output_shape with unknown sizes",
    )
    symbolic = layer(keras.Input(batch_shape=tuple(dynamic), dtype=input_data.dtype))
    _assert_shape(symbolic.shape, expected_dynamic_output_shape, "symbolic output")

    graph_fn = tf.function(
        lambda x: layer(x),
        input_signature=[tf.TensorSpec(dynamic, tf.as_dtype(input_data.dtype))],
        jit_compile=jit_compile,
    )
    graph_out = graph_fn(input_data)
    assert keras.backend.standardize_dtype(graph_out.dtype) == expected_output_dtype
    np.testing.assert_allclose(graph_out.numpy(), output, rtol=rtol, atol=atol)
    for other in other_input_data:
        other = np.asarray(other, input_data.dtype)
        np.testing.assert_allclose(
            graph_fn(other).numpy(), np.asarray(layer(other)), rtol=rtol, atol=atol
        )
    assert graph_fn.experimental_get_tracing_count() == 1, "graph function retraced"

    # 5. Serialisation round trip through a saved .keras model, loaded in safe mode.
    inputs = keras.Input(shape=tuple(dynamic[1:]), dtype=input_data.dtype)
    model = keras.Model(inputs, _make_layer(layer_cls, init_kwargs, setup_layer, dynamic)(inputs))
    assert not any(isinstance(sub, keras.layers.Lambda) for sub in model._flatten_layers())
    path = tmp_path / f"{layer_cls.__name__.lower()}.keras"
    model.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    restored_layer = loaded.layers[-1]
    assert type(restored_layer) is layer_cls
    assert restored_layer.get_config() == model.layers[-1].get_config()
    for saved_w, loaded_w in zip(model.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(
            np.asarray(saved_w), np.asarray(loaded_w), err_msg=saved_w.path
        )
    np.testing.assert_allclose(
        np.asarray(loaded(input_data)), np.asarray(model(input_data)), rtol=rtol, atol=atol
    )

    # 6. One training step through the layer.
    if not run_training_check:
        return
    inputs = keras.Input(shape=tuple(dynamic[1:]), dtype=input_data.dtype)
    dense = keras.layers.Dense(last, name="probe")
    layer = _make_layer(layer_cls, init_kwargs, setup_layer, dynamic)
    model = keras.Model(inputs, layer(dense(inputs)))
    target = np.random.default_rng(0).normal(size=np.asarray(model(input_data)).shape)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=jit_compile)
    before_dense = np.array(dense.kernel)
    before_trainable = [np.array(w) for w in layer.trainable_weights]
    before_frozen = [np.array(w) for w in layer.non_trainable_weights]
    history = model.fit(
        input_data, target.astype(np.float32), epochs=1, batch_size=len(input_data), verbose=0
    )
    assert np.isfinite(history.history["loss"][0]), history.history
    assert not np.allclose(np.array(dense.kernel), before_dense), "no gradient through the layer"
    for w, before in zip(layer.trainable_weights, before_trainable, strict=True):
        assert not np.allclose(np.array(w), before), f"trainable weight {w.path} did not change"
        assert np.all(np.isfinite(np.array(w))), w.path
    for w, before in zip(layer.non_trainable_weights, before_frozen, strict=True):
        np.testing.assert_array_equal(np.array(w), before, err_msg=f"{w.path} changed")
