"""Pooling ops against the reference implementation's numbers and limit cases."""

import json

import numpy as np
import pytest
import tensorflow as tf

from cbir_tf.describe.ops import pooling
from cbir_tf.describe.ops.normalization import l2_normalize

DYNAMIC_MAP = tf.TensorSpec([None, None, None, None], tf.float32)


@pytest.fixture(scope="module")
def golden_regions(golden_dir):
    with open(golden_dir / "rmac_regions.json") as f:
        return json.load(f)["regions"]


@pytest.fixture(scope="module")
def golden_vectors(golden_dir):
    with np.load(golden_dir / "pooling_cirtorch.npz", allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def _shapes(golden_vectors):
    return sorted(k[len("fmap_") :] for k in golden_vectors if k.startswith("fmap_"))


def _numpy_rmac_vectors(x, levels=3):
    """Independent reference: slice every box of `rmac_regions` and take its max."""
    boxes = pooling.rmac_regions(x.shape[1], x.shape[2], levels)
    vectors = [x[:, top : top + h, left : left + w].max(axis=(1, 2)) for top, left, h, w in boxes]
    return np.stack(vectors, axis=1)


def test_golden_regions_exact(golden_regions):
    assert len(golden_regions) >= 10
    regions_tf = tf.function(pooling.rmac_regions_tf)
    for key, boxes in golden_regions.items():
        h, w = map(int, key.split("x"))
        assert pooling.rmac_regions(h, w).tolist() == boxes, key
        assert regions_tf(tf.constant(h), tf.constant(w)).numpy().tolist() == boxes, key
        assert pooling.num_rmac_regions(h, w) == len(boxes), key


def test_small_maps_keep_reference_duplicates(golden_regions):
    # The reference samples level 2 and 3 of a 2x2 map on overlapping 1x1 cells; R-MAC sums them
    # all, so the duplicates change the vector and must be kept.
    boxes = pooling.rmac_regions(2, 2)
    assert boxes.tolist() == golden_regions["2x2"]
    assert len(boxes) == 15
    assert len({tuple(b) for b in boxes.tolist()}) == 5
    # A 1x1 map: the whole map and one level-1 region (levels 2-3 have side 0 and are skipped).
    assert pooling.rmac_regions(1, 1).tolist() == [[0, 0, 1, 1], [0, 0, 1, 1]]


def test_graph_regions_equal_numpy_regions_on_many_shapes():
    regions_tf = tf.function(
        pooling.rmac_regions_tf, input_signature=[tf.TensorSpec([], tf.int32)] * 2
    )
    for h in range(1, 41):
        for w in range(1, 41):
            expected = pooling.rmac_regions(h, w)
            got = regions_tf(h, w).numpy()
            assert np.array_equal(got, expected), (h, w, got.tolist(), expected.tolist())
            # Every box lies inside the map and has positive side.
            assert np.all(expected[:, :2] >= 0) and np.all(expected[:, 2:] >= 1)
            assert np.all(expected[:, 0] + expected[:, 2] <= h)
            assert np.all(expected[:, 1] + expected[:, 3] <= w)


def test_regions_other_levels_and_overlap():
    for levels in (1, 2, 4):
        for h, w in [(5, 9), (13, 13), (40, 7)]:
            np.testing.assert_array_equal(
                pooling.rmac_regions_tf(h, w, levels, 0.5).numpy(),
                pooling.rmac_regions(h, w, levels, 0.5),
            )
    # One level on a square map: the whole map twice (global MAC + the single level-1 region).
    assert pooling.rmac_regions(6, 6, levels=1).tolist() == [[0, 0, 6, 6]] * 2


@pytest.mark.parametrize("name", ["mac", "spoc", "gem3", "rmac"])
def test_golden_vectors(golden_vectors, name):
    ops = {
        "mac": pooling.mac,
        "spoc": pooling.spoc,
        "gem3": lambda x: pooling.gem(x, p=3.0, eps=1e-6),
        "rmac": lambda x: pooling.rmac(x, levels=3, overlap=0.4, eps=1e-6),
    }
    op = ops[name]
    graph_op = tf.function(op, input_signature=[DYNAMIC_MAP])
    shapes = _shapes(golden_vectors)
    assert len(shapes) >= 10 and "1x1" in shapes
    for shape in shapes:
        x = golden_vectors[f"fmap_{shape}"]
        expected = golden_vectors[f"{name}_{shape}"]
        np.testing.assert_allclose(op(x).numpy()[0], expected, rtol=1e-5, err_msg=shape)
        np.testing.assert_allclose(graph_op(x).numpy()[0], expected, rtol=1e-5, err_msg=shape)
    assert graph_op.experimental_get_tracing_count() == 1


def test_region_vectors_match_box_slicing_static_and_dynamic():
    rng = np.random.default_rng(1)
    graph = tf.function(pooling.rmac_region_vectors, input_signature=[DYNAMIC_MAP])
    for h, w in [(1, 1), (1, 9), (2, 2), (3, 50), (11, 4), (17, 23), (32, 43)]:
        x = rng.random((2, h, w, 5), dtype=np.float32)
        expected = _numpy_rmac_vectors(x)
        static = pooling.rmac_region_vectors(x)
        assert static.shape == expected.shape
        np.testing.assert_array_equal(static.numpy(), expected)
        np.testing.assert_array_equal(graph(x).numpy(), expected)
        rmac = pooling.rmac(x).numpy()
        norms = np.linalg.norm(expected, axis=-1, keepdims=True) + 1e-6
        np.testing.assert_allclose(rmac, (expected / norms).sum(axis=1), rtol=1e-5)
    assert graph.experimental_get_tracing_count() == 1


def test_gem_p1_is_spoc_and_large_p_tends_to_mac():
    rng = np.random.default_rng(2)
    # Values up to 100: the plain formula would overflow float32 at p = 200 (100^200).
    x = (rng.random((3, 6, 9, 7)) * 100).astype(np.float32)
    np.testing.assert_allclose(pooling.gem(x, p=1.0).numpy(), pooling.spoc(x).numpy(), rtol=1e-5)
    mac = pooling.mac(x).numpy()
    errors = []
    for p in (3.0, 20.0, 200.0, 2000.0):
        y = pooling.gem(x, p=p).numpy()
        assert np.all(np.isfinite(y)) and np.all(y <= mac * (1 + 1e-6))
        errors.append(np.max((mac - y) / mac))
    assert all(a > b for a, b in zip(errors, errors[1:], strict=False)), errors
    assert errors[-1] < 3e-3  # (1/54)^(1/2000) ~ 0.998: within 0.2 % of MAC
    # A tensor p of shape [1] (the layer's weight) gives the same as a Python float.
    np.testing.assert_allclose(
        pooling.gem(x, p=tf.constant([3.0])).numpy(), pooling.gem(x, p=3.0).numpy(), rtol=1e-6
    )


def test_gem_matches_plain_formula_and_its_gradients():
    rng = np.random.default_rng(3)
    x = tf.constant(rng.random((2, 4, 5, 3), dtype=np.float32) * 5)
    p = tf.Variable([2.5])
    with tf.GradientTape(persistent=True) as tape:
        tape.watch(x)
        ours = pooling.gem(x, p=p)
        plain = tf.reduce_mean(tf.maximum(x, 1e-6) ** p, axis=[1, 2]) ** (1.0 / p)
    np.testing.assert_allclose(ours.numpy(), plain.numpy(), rtol=1e-5)
    np.testing.assert_allclose(
        tape.gradient(ours, x).numpy(), tape.gradient(plain, x).numpy(), rtol=1e-4, atol=1e-7
    )
    np.testing.assert_allclose(
        tape.gradient(ours, p).numpy(), tape.gradient(plain, p).numpy(), rtol=1e-4
    )


def test_one_by_one_map_works_for_every_pooling():
    x = np.array([[[[3.0, 0.0, 4.0]]]], np.float32)  # [1, 1, 1, 3], norm 5
    for op in (pooling.mac, pooling.spoc, lambda t: pooling.gem(t, p=3.0)):
        np.testing.assert_allclose(op(x).numpy(), [[3.0, 1e-6, 4.0]], atol=2e-6)
    # Whole map + one level-1 region, each L2-normalised: 2 * x / (5 + eps).
    np.testing.assert_allclose(
        pooling.rmac(x).numpy(), 2 * x[0, 0] / (5 + 1e-6), rtol=1e-6, atol=1e-7
    )
    assert pooling.rmac_region_vectors(x).shape == (1, 2, 3)


def test_elongated_and_dynamic_shapes_in_graph_mode():
    graph = tf.function(pooling.rmac, input_signature=[tf.TensorSpec([None, None, None, 4])])
    rng = np.random.default_rng(4)
    for h, w in [(1, 200), (200, 1), (2, 97), (64, 3)]:
        x = rng.random((1, h, w, 4), dtype=np.float32)
        np.testing.assert_allclose(graph(x).numpy(), pooling.rmac(x).numpy(), rtol=1e-6)
    assert graph.experimental_get_tracing_count() == 1


def test_rmac_under_xla_with_unknown_sizes():
    # Keras compiles fit/predict with XLA on GPUs by default: the region maths must resolve to
    # compile-time constants from the input shape.
    graph = tf.function(
        pooling.rmac, input_signature=[tf.TensorSpec([None, None, None, 8])], jit_compile=True
    )
    rng = np.random.default_rng(5)
    for h, w in [(7, 10), (1, 1)]:
        x = rng.random((2, h, w, 8), dtype=np.float32)
        np.testing.assert_allclose(graph(x).numpy(), pooling.rmac(x).numpy(), rtol=1e-5)


def test_gradients_are_finite_on_zero_maps():
    # ReLU maps can be all zero in a region (or everywhere); the L2 step must not give NaN.
    x = tf.zeros([1, 5, 6, 4])
    for op in (pooling.rmac, pooling.gem, pooling.mac, pooling.spoc):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.reduce_sum(op(x))
        grad = tape.gradient(y, x)
        assert np.all(np.isfinite(grad.numpy())), op
    np.testing.assert_array_equal(l2_normalize(tf.zeros([2, 3])).numpy(), np.zeros([2, 3]))


def test_clamped_normalisation_gives_unit_vectors_whatever_the_scale():
    x = np.random.default_rng(7).normal(size=(3, 16)).astype(np.float32)
    for scale in (1e-9, 1e-7, 1.0, 1e4):
        y = l2_normalize(x * scale, clamp=True, eps=1e-12).numpy()
        np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, rtol=1e-6)
    # The reference's norm + eps (kept for R-MAC regions) lets eps dominate tiny vectors.
    assert np.linalg.norm(l2_normalize(x * 1e-8).numpy(), axis=1).max() < 0.1
    np.testing.assert_array_equal(l2_normalize(tf.zeros([2, 3]), clamp=True), np.zeros([2, 3]))


def test_half_precision_inputs_stay_finite():
    rng = np.random.default_rng(6)
    x = (rng.random((1, 9, 12, 64)) * 60).astype(np.float32)
    for op in (pooling.rmac, pooling.gem, pooling.spoc, lambda t: l2_normalize(pooling.mac(t))):
        y16 = op(tf.constant(x, tf.float16))
        assert y16.dtype == tf.float16
        assert np.all(np.isfinite(y16.numpy())), op
        np.testing.assert_allclose(
            y16.numpy().astype(np.float32), op(x).numpy(), rtol=5e-3, atol=1e-3
        )


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        pooling.rmac(np.zeros((3, 4, 5), np.float32))
    with pytest.raises(ValueError, match="at least 1x1"):
        pooling.rmac_regions(0, 4)
