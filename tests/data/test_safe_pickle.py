"""The restricted unpickler: hostile pickles are refused before they run; arrays load exactly."""

from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest

from cbir_tf.data import revisited
from cbir_tf.data.ground_truth import load_ground_truth
from cbir_tf.data.safe_pickle import UnsafePickleError


class _Evil:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _malicious_pickles(target):
    cmd = f"touch {target}"
    return {
        "os.system-proto0": f"cos\nsystem\n(S'{cmd}'\ntR.".encode(),
        "posix.system-proto2": pickle.dumps(_Evil(os.system, cmd), protocol=2),
        "os.system-proto4": pickle.dumps(_Evil(os.system, cmd), protocol=4),
        "eval-proto5": pickle.dumps(_Evil(eval, f"__import__('os').system({cmd!r})"), protocol=5),
        "exec-nested-in-gnd": pickle.dumps(
            {
                "imlist": ["a"],
                "qimlist": [],
                "gnd": [],
                "x": [_Evil(exec, f"open({str(target)!r}, 'w')")],
            }
        ),
        "getattr": b"c__builtin__\ngetattr\n(c__builtin__\nopen\nS'write'\ntR.",
        "class-instance": pickle.dumps(
            {"imlist": [], "qimlist": [], "gnd": [], "obj": revisited.RemoteFile("a", "b")}
        ),
        "shutil.rmtree-proto0": pickle.dumps(_Evil(shutil.rmtree, str(target)), protocol=0),
    }


@pytest.mark.parametrize("case", sorted(_malicious_pickles("x")))
def test_malicious_pickle_is_refused_without_running(tmp_path, case):
    target = tmp_path / "pwned"
    data = _malicious_pickles(target)[case]
    path = tmp_path / "gnd_evil.pkl"
    path.write_bytes(data)
    with pytest.raises(UnsafePickleError) as exc:
        load_ground_truth(path)
    msg = str(exc.value)
    assert str(path) in msg and "refusing to load" in msg
    assert not target.exists(), "the pickle's payload ran"


def test_the_crafted_pickle_really_is_malicious(tmp_path):
    """Guards the test above: unrestricted, the payload does run."""
    target = tmp_path / "pwned"
    pickle.loads(_malicious_pickles(target)["os.system-proto0"])
    assert target.exists()


def test_refusal_names_the_callable(tmp_path):
    path = tmp_path / "g.pkl"
    path.write_bytes(b"cos\nsystem\n(S'true'\ntR.")
    with pytest.raises(UnsafePickleError, match=r"asks for os\.system"):
        load_ground_truth(path)
    path.write_bytes(pickle.dumps(_Evil(print, "x"), protocol=4))
    with pytest.raises(UnsafePickleError, match=r"asks for builtins\.print"):
        load_ground_truth(path)


@pytest.mark.parametrize("protocol", range(6))
def test_numpy_arrays_load_exactly(tmp_path, protocol):
    """cnnimageretrieval-era files may hold numpy arrays: rebuilt from bytes, nothing called."""
    gnd = {
        "imlist": np.array(["a", "b", "c", "d"]),
        "qimlist": ["q0"],
        "gnd": [
            {
                "ok": np.array([0, 2], dtype=np.int64),
                "good": np.array([3], dtype=">i4"),
                "junk": np.array([], dtype=np.int32),
                "bbx": np.array([1.5, 2.0, 30.0, 40.25]),
                "f": np.asfortranarray(np.arange(6, dtype=np.uint8).reshape(2, 3)),
                "s": np.float32(2.5),
                "e": b"",
                "b": b"\x00\xff",
            }
        ],
    }
    path = tmp_path / "g.pkl"
    path.write_bytes(pickle.dumps(gnd, protocol=protocol))
    cfg = load_ground_truth(path, kind="original")
    g = cfg["gnd"][0]
    assert cfg["imlist"].tolist() == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(g["ok"], [0, 2])
    assert g["ok"].dtype == np.int64 and g["good"].dtype == np.dtype(">i4")
    np.testing.assert_array_equal(g["good"], [3])
    assert g["junk"].shape == (0,)
    np.testing.assert_array_equal(g["f"], np.arange(6).reshape(2, 3))
    assert g["s"] == np.float32(2.5) and isinstance(g["s"], np.float32)
    assert (g["e"], g["b"]) == (b"", b"\x00\xff")


@pytest.mark.parametrize(
    "value, match",
    [
        (np.array([1, "a"], dtype=object), "dtype 'O"),
        (np.zeros(2, dtype=[("a", "<i4")]), "dtype 'V"),
        (np.zeros(2, dtype="datetime64[s]"), "dtype 'M8"),
    ],
)
def test_unsafe_numpy_dtypes_are_refused(tmp_path, value, match):
    path = tmp_path / "g.pkl"
    path.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": [], "gnd": [], "v": value}))
    with pytest.raises(UnsafePickleError, match=match) as exc:
        load_ground_truth(path)
    assert str(exc.value).startswith(f"{path}: refusing to load")


def test_admitted_globals_cannot_be_misused_or_tampered_with(tmp_path):
    path = tmp_path / "g.pkl"
    cases = {
        # BUILD on the stand-in of numpy.dtype would modify it for later loads.
        b"\x80\x02cnumpy\ndtype\n}b.": "tried to modify",
        # _reconstruct with arguments numpy never writes.
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\nX\x01\x00\x00\x00a\x85R.": "never writes",
        b"\x80\x02cnumpy.core.multiarray\n_reconstruct\nX\x01\x00\x00\x00aK\x00\x85C\x01b\x87R.": (
            "never writes"
        ),
        # numpy.ndarray itself is an inert token, not the class.
        b"\x80\x02cnumpy\nndarray\n)R.": "cannot be called",
        # bytes(n) would allocate n bytes.
        b"\x80\x02c__builtin__\nbytes\nJ\x00\x00\x00\x40\x85R.": "only allowed",
        # _codecs.encode with another codec.
        b"\x80\x02c_codecs\nencode\nX\x01\x00\x00\x00aX\x05\x00\x00\x00rot13\x86R.": "latin1",
    }
    for data, match in cases.items():
        path.write_bytes(data)
        with pytest.raises(UnsafePickleError, match=match):
            load_ground_truth(path, validate=False)
    # Nothing was tampered with: numpy arrays still load.
    path.write_bytes(pickle.dumps({"imlist": ["a"], "qimlist": [], "gnd": [], "v": np.ones(3)}))
    np.testing.assert_array_equal(load_ground_truth(path)["v"], np.ones(3))


def test_numpy_can_be_disallowed(tmp_path):
    path = tmp_path / "g.pkl"
    path.write_bytes(pickle.dumps({"imlist": np.array(["a"]), "qimlist": [], "gnd": []}))
    with pytest.raises(UnsafePickleError, match="numpy"):
        load_ground_truth(path, allow_numpy=False)
