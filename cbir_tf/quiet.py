"""Output that is not the user's business, kept off the terminal unless asked for.

* TensorFlow's start-up lines (oneDNN, "Could not find cuda drivers", "failed call to cuInit",
  ...): `import_tensorflow` for the commands and Beam's workers, and `hide_tensorflow_start_up`,
  installed by `import cbir_tf`, for a program of the user's that imports TensorFlow through
  the library. `TF_CPP_MIN_LOG_LEVEL=0` (TensorFlow asked to say everything) turns it off.
* Apache Beam's lines per local worker process ("apitools not found", "Discarding unparseable
  args", "No semi_persistent_directory found", ...): `filtered_stderr(BEAM_NOISE)` around the
  pipeline, whose worker processes write to this process's standard error.
"""

from __future__ import annotations

import contextlib
import importlib.abc
import importlib.util
import os
import re
import sys
import tempfile
import threading
from collections.abc import Iterator
from typing import Any

# What TensorFlow's C++ runtime prints while it loads and probes for CUDA, before its own log
# level applies: absl's pre-init banner, glog-style I/W/E lines, and the CPU-feature list.
TF_NOISE = re.compile(
    r"^(?:[IWE]\d{4} [\d:.]+\s+\d+ \S+:\d+\]"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|To enable the following instructions:)"
)
# What Beam's local worker processes (and its import) print that says nothing about the run:
# optional Google Cloud clients absent, the harness starting, options meant for another runner.
BEAM_NOISE = re.compile(
    r"apitools not found"
    r"|No module named google\.cloud\.bigquery_storage"
    r"|Logging handler created\."
    r"|No semi_persistent_directory found"
    r"|Discarding unparseable args"
)


def import_tensorflow(verbose: bool = False) -> None:
    """Imports TensorFlow and lets it probe the devices, without its start-up noise.

    TensorFlow prints ~7 lines per start (oneDNN, "Could not find cuda drivers", "failed call
    to cuInit", ...) whatever TF_CPP_MIN_LOG_LEVEL says, some from C++ straight to file
    descriptor 2. Non-verbose runs capture that descriptor during the import and the device
    probe and print back only lines that are not such noise; if the import fails, everything.
    With `verbose`, nothing is hidden.
    """
    if verbose or "tensorflow" in sys.modules:
        import tensorflow  # noqa: F401

        return
    with _without_start_up_lines():
        import tensorflow as tf

        tf.config.list_physical_devices()  # the CUDA probe logs here, once per process


@contextlib.contextmanager
def _without_start_up_lines() -> Iterator[None]:
    """Captures file descriptor 2 in the block; prints back what is not `TF_NOISE` (all of it
    when the block fails)."""
    sys.stderr.flush()
    saved = os.dup(2)
    failed = True
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            yield
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode(errors="replace").splitlines(keepends=True)
            kept = lines if failed else [line for line in lines if not TF_NOISE.match(line)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


class _QuietLoader(importlib.abc.Loader):
    """TensorFlow's own loader, run without the start-up lines, followed by the device probe."""

    def __init__(self, loader: Any):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        with _without_start_up_lines():
            self.loader.exec_module(module)
            with contextlib.suppress(Exception):  # a failing probe fails later, loudly
                module.config.list_physical_devices()

    def __getattr__(self, name: str) -> Any:  # get_source, is_package, ... of the real loader
        return getattr(self.loader, name)


class _QuietTensorFlowFinder(importlib.abc.MetaPathFinder):
    """Finds `tensorflow`, the first time anything imports it, with a `_QuietLoader`."""

    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self)  # once: the other finders find the real module
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def hide_tensorflow_start_up() -> None:
    """Makes the process's first `import tensorflow` hide TensorFlow's start-up lines.

    Nothing happens when TensorFlow is imported already, when the hook is in place, or when
    TF_CPP_MIN_LOG_LEVEL=0 asks TensorFlow to say everything.
    """
    if "tensorflow" in sys.modules or os.environ.get("TF_CPP_MIN_LOG_LEVEL") == "0":
        return
    if not any(isinstance(f, _QuietTensorFlowFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietTensorFlowFinder())


@contextlib.contextmanager
def filtered_stderr(noise: re.Pattern[str], enabled: bool = True) -> Iterator[None]:
    """Drops the lines matching `noise` from what is written to file descriptor 2 in the block.

    Everything written to the descriptor passes through a pipe read by a thread that forwards
    the other lines at once: this process's Python and C++ output, and that of the processes
    it starts meanwhile (they inherit the descriptor), such as Beam's local workers.

    Args:
      noise: lines to drop (searched anywhere in the line).
      enabled: False runs the block unfiltered (--verbose).
    """
    if not enabled:
        yield
        return
    sys.stderr.flush()
    saved = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    # The thread writes to its own copy of the descriptor: a child process still holding the
    # pipe after the block keeps it forwarding, without outliving the descriptor it writes to.
    pump = threading.Thread(target=_forward, args=(read_end, os.dup(saved), noise), daemon=True)
    pump.start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # the pipe ends once no process of the block holds it open
        os.close(saved)
        pump.join(timeout=10)


def _forward(read_end: int, out: int, noise: re.Pattern[str]) -> None:
    """Copies lines from `read_end` to `out` until end of file, leaving out `noise`; closes
    both."""
    pending = b""
    with os.fdopen(read_end, "rb", buffering=0) as pipe, os.fdopen(out, "wb", buffering=0) as f:
        while chunk := pipe.read(65536):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            kept = [
                line + b"\n" for line in lines if not noise.search(line.decode(errors="replace"))
            ]
            # A progress bar redraws with '\r' and no newline: pass it on as it comes.
            cut = pending.rfind(b"\r") + 1
            kept.append(pending[:cut])
            pending = pending[cut:]
            with contextlib.suppress(OSError):
                f.write(b"".join(kept))
        if pending and not noise.search(pending.decode(errors="replace")):
            with contextlib.suppress(OSError):
                f.write(pending)
