"""TensorFlow imported without its start-up noise, for the commands and for Beam's workers."""

from __future__ import annotations

import os
import re
import sys
import tempfile

# What TensorFlow's C++ runtime prints while it loads and probes for CUDA, before its own log
# level applies: absl's pre-init banner, glog-style I/W/E lines, and the CPU-feature list.
_TF_NOISE = re.compile(
    r"^(?:[IWE]\d{4} [\d:.]+\s+\d+ \S+:\d+\]"
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called"
    r"|To enable the following instructions:)"
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
    sys.stderr.flush()
    saved = os.dup(2)
    failed = True
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices()  # the CUDA probe logs here, once per process
            failed = False
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            lines = capture.read().decode(errors="replace").splitlines(keepends=True)
            kept = lines if failed else [line for line in lines if not _TF_NOISE.match(line)]
            sys.stderr.write("".join(kept))
            sys.stderr.flush()
