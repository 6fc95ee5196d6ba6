"""A restricted unpickler for ground-truth files: plain containers and numpy arrays, nothing else.

The benchmarks' ground truth comes as pickles (revisitop's `gnd_roxford5k.pkl`,
cnnimageretrieval's `gnd_oxford5k.pkl`), and a pickle that names a callable runs it when it is
loaded. `restricted_loads` admits dicts, lists, tuples, str, bytes, int, float, bool and None;
numpy arrays of plain numeric or string dtype are rebuilt from their validated bytes by our own
functions, so nothing numpy-side that the file names is ever called. Anything else (a pickle
naming `os.system`, `builtins.eval`, any class) is refused before it can run.

numpy + standard library only.
"""

from __future__ import annotations

import io
import math
import pickle
import re
from typing import Any

import numpy as np

__all__ = ["UnsafePickleError", "restricted_loads"]


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asked for something a ground-truth file has no business holding."""


class _Allowed:
    """What `find_class` hands out for an admitted global: a sealed wrapper of our own function.

    The pickle can call it (REDUCE) but cannot modify it: BUILD on it raises, attributes cannot
    be set, and it is not a class (NEWOBJ refuses it). So a file can neither reach the real
    numpy function nor tamper with ours for later loads.
    """

    __slots__ = ("_name", "_fn")

    def __init__(self, name: str, fn: Any):
        object.__setattr__(self, "_name", name)
        object.__setattr__(self, "_fn", fn)

    def __call__(self, *args: Any) -> Any:
        if self._fn is None:
            raise UnsafePickleError(f"{self._name} cannot be called")
        try:
            return self._fn(*args)
        except TypeError as e:  # wrong arity or argument types: not what numpy writes
            raise UnsafePickleError(
                f"{self._name} called with arguments numpy never writes ({e})"
            ) from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise UnsafePickleError(f"the pickle tried to modify {self._name}")

    def __setstate__(self, state: Any) -> None:
        raise UnsafePickleError(f"the pickle tried to modify {self._name}")

    def __reduce__(self) -> Any:
        raise TypeError("not picklable")


_NDARRAY = _Allowed("numpy.ndarray", None)  # a token: never the real class
_SIMPLE_DTYPE = re.compile(r"^(b1|[iu][1248]|f[248]|c(8|16)|[US][1-9][0-9]{0,5})$")
_MAX_ARRAY_BYTES = 1 << 30


class _DtypeStub:
    """Stands for `numpy.dtype(name)` during unpickling; only plain numeric/string dtypes."""

    def __init__(self, name: Any):
        if not isinstance(name, str) or not _SIMPLE_DTYPE.match(name):
            raise UnsafePickleError(
                f"numpy dtype {name!r} is not allowed (only bool, integer, float, complex and "
                f"fixed-size string dtypes; object and structured dtypes can hide code)"
            )
        self.name = name
        self.byteorder = "="

    def __setstate__(self, state: Any) -> None:
        # (version, byteorder, subarray, names, fields, elsize, alignment, flags): anything
        # beyond a byte order describes a structured or sub-array dtype, which we refuse.
        if not isinstance(state, tuple) or len(state) < 2:
            raise UnsafePickleError(f"malformed numpy dtype state {state!r}")
        if any(x is not None for x in state[2:5]):
            raise UnsafePickleError("structured / sub-array numpy dtypes are not allowed")
        if state[1] not in ("<", ">", "|", "="):
            raise UnsafePickleError(f"bad numpy byte order {state[1]!r}")
        self.byteorder = state[1]

    def resolve(self) -> np.dtype:
        return np.dtype(self.byteorder + self.name if self.byteorder != "|" else self.name)


def _as_bytes(data: Any) -> bytes:
    if isinstance(data, (bytes, bytearray)):
        return bytes(data)
    if isinstance(data, str):  # Python 2 pickles read with encoding='latin1'
        return data.encode("latin1")
    raise UnsafePickleError(f"numpy raw data must be bytes, got {type(data).__name__}")


def _build_array(raw: Any, dtype: Any, shape: Any, fortran: bool) -> np.ndarray:
    if not isinstance(dtype, _DtypeStub):
        raise UnsafePickleError("numpy array without an allowed dtype")
    if not isinstance(shape, tuple) or not all(
        isinstance(s, int) and not isinstance(s, bool) and 0 <= s for s in shape
    ):
        raise UnsafePickleError(f"bad numpy array shape {shape!r}")
    dt = dtype.resolve()
    data = _as_bytes(raw)
    count = math.prod(shape)
    if count * dt.itemsize != len(data) or len(data) > _MAX_ARRAY_BYTES:
        raise UnsafePickleError(
            f"numpy array data has {len(data)} bytes, not {count} x {dt.itemsize} for shape {shape}"
        )
    # frombuffer only reinterprets validated bytes; copy() detaches it from the pickle buffer.
    return np.frombuffer(data, dtype=dt).reshape(shape, order="F" if fortran else "C").copy()


class _ArrayStub:
    """Stands for the empty array `numpy.core.multiarray._reconstruct` returns; filled by BUILD."""

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise UnsafePickleError("malformed numpy array state")
        if len(state) == 5:
            state = state[1:]  # drop the version number
        shape, dtype, fortran, raw = state
        self.array = _build_array(raw, dtype, shape, bool(fortran))


def _np_reconstruct(cls: Any, shape: Any, typecode: Any) -> _ArrayStub:
    if cls is not _NDARRAY or shape != (0,) or _as_bytes(typecode) != b"b":
        raise UnsafePickleError("numpy _reconstruct called with arguments numpy never writes")
    return _ArrayStub()


def _np_scalar(dtype: Any, data: Any = None) -> Any:
    if data is None:
        raise UnsafePickleError("numpy scalar without data")
    return _build_array(data, dtype, (), False)[()]


def _np_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    if order not in ("C", "F"):
        raise UnsafePickleError(f"bad numpy array order {order!r}")
    return _build_array(
        buf, dtype, tuple(shape) if isinstance(shape, list) else shape, order == "F"
    )


def _latin1_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # Protocol 0-2 pickles of bytes objects go through _codecs.encode(str, 'latin1').
    if not isinstance(text, str) or encoding != "latin1":
        raise UnsafePickleError("_codecs.encode is only allowed for latin1 byte strings")
    return text.encode("latin1")


def _plain_bytes(*args: Any) -> bytes:
    if not args:
        return b""
    if len(args) == 1 and isinstance(args[0], (bytes, bytearray)):
        return bytes(args[0])
    if len(args) == 2 and isinstance(args[0], str) and args[1] == "latin1":
        return args[0].encode("latin1")
    raise UnsafePickleError("bytes() is only allowed without arguments or on bytes")


def _np_dtype(name: Any, align: Any = False, copy: Any = True) -> _DtypeStub:
    return _DtypeStub(name)


_NUMPY_GLOBALS: dict[tuple[str, str], _Allowed] = {
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Allowed("numpy.dtype", _np_dtype),
    **{
        (module, "_reconstruct"): _Allowed(f"{module}._reconstruct", _np_reconstruct)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    },
    **{
        (module, "scalar"): _Allowed(f"{module}.scalar", _np_scalar)
        for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    },
    **{
        (module, "_frombuffer"): _Allowed(f"{module}._frombuffer", _np_frombuffer)
        for module in ("numpy.core.numeric", "numpy._core.numeric")
    },
    ("_codecs", "encode"): _Allowed("_codecs.encode", _latin1_encode),
}

# Protocols 0-2 write an empty bytes object as a call of `bytes()`: the one builtin a plain
# container needs. Only the no-argument form (and a copy of bytes) is admitted; bytes(n) would
# let a file allocate n bytes.
_PLAIN_GLOBALS: dict[tuple[str, str], _Allowed] = {
    (module, "bytes"): _Allowed(f"{module}.bytes", _plain_bytes)
    for module in ("builtins", "__builtin__")
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits plain containers, strings and numbers; numpy arrays only through inert stand-ins.

    Every global a pickle names goes through `find_class`. Nothing of the running program is
    ever returned: numpy arrays are rebuilt by our own functions above from validated bytes
    (plain numeric and string dtypes only), so no callable chosen by the file can run.
    """

    def __init__(self, file: Any, source: str, allow_numpy: bool):
        super().__init__(file, encoding="latin1")
        self._source = source
        self._allow_numpy = allow_numpy

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _PLAIN_GLOBALS:
            return _PLAIN_GLOBALS[(module, name)]
        if self._allow_numpy and (module, name) in _NUMPY_GLOBALS:
            return _NUMPY_GLOBALS[(module, name)]
        raise UnsafePickleError(
            f"{self._source}: refusing to load: the pickle asks for {module}.{name}, and a "
            f"ground-truth file may only hold lists, dicts, strings and numbers (a pickle that "
            f"names a callable runs it when loaded). Delete the file and download it again."
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(f"{self._source}: persistent ids are not allowed in ground truth")


def _materialize(obj: Any, seen: dict[int, Any]) -> Any:
    """Replaces array stand-ins by the arrays they hold, in place for lists and dicts."""
    if isinstance(obj, _ArrayStub):
        if obj.array is None:
            raise UnsafePickleError("numpy array without data")
        return obj.array
    if isinstance(obj, _DtypeStub):
        return obj.resolve()
    if isinstance(obj, (list, dict)):
        if id(obj) in seen:
            return obj
        seen[id(obj)] = obj
        if isinstance(obj, list):
            for i, v in enumerate(obj):
                obj[i] = _materialize(v, seen)
        else:
            for k, v in obj.items():
                if isinstance(k, (_ArrayStub, _DtypeStub)):
                    raise UnsafePickleError("numpy objects cannot be dict keys")
                obj[k] = _materialize(v, seen)
        return obj
    if isinstance(obj, tuple):
        return tuple(_materialize(v, seen) for v in obj)
    if isinstance(obj, (set, frozenset)):
        return type(obj)(_materialize(v, seen) for v in obj)  # arrays are unhashable: refused
    return obj


def restricted_loads(data: bytes, *, source: str, allow_numpy: bool = True) -> Any:
    """Unpickles `data` through the restricted unpickler.

    Args:
      data: the pickle's bytes.
      source: what messages call it (the file's path).
      allow_numpy: admit numpy arrays (rebuilt through the inert stand-ins above).

    Returns:
      The unpickled object, numpy arrays materialised.

    Raises:
      UnsafePickleError: the pickle names something not admitted; the message starts with
        `source`.
      pickle.UnpicklingError, EOFError, ValueError, ...: a malformed pickle, as `pickle` raises.
    """
    try:
        obj = _RestrictedUnpickler(io.BytesIO(data), source, allow_numpy).load()
        return _materialize(obj, {})
    except UnsafePickleError as e:
        msg = str(e)
        if not msg.startswith(source):
            msg = f"{source}: refusing to load: {msg}"
        raise UnsafePickleError(msg) from None
