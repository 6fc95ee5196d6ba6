"""Per-epoch figures of a training run: TensorBoard events and a plain `history.csv`."""

from __future__ import annotations

import os
from typing import Any

import tensorflow as tf

from cbir_tf import fileio


class EpochLogs:
    """Per-epoch figures for TensorBoard (`logs/`) and as a plain table (`logs/history.csv`).

    TensorBoard event files need the `tensorboard` package (tf.summary's implementation); without
    it only the CSV is written, with a note saying how to get the TensorBoard logs.

    Args:
      logs_dir: the folder (created).
      say: prints a progress line.
    """

    def __init__(self, logs_dir: str, say):
        self.dir = logs_dir
        os.makedirs(logs_dir, exist_ok=True)
        try:
            import tensorboard  # noqa: F401  (tf.summary's writer lives there)

            self.writer = tf.summary.create_file_writer(logs_dir)
        except ImportError:
            self.writer = None
            say(f"  (no TensorBoard logs: pip install tensorboard; figures go to {self.csv_path})")

    @property
    def csv_path(self) -> str:
        return os.path.join(self.dir, "history.csv")

    def write(self, record: dict[str, Any], history: list[dict[str, Any]]) -> None:
        """Logs one epoch's `record` and rewrites the CSV of the whole `history`."""
        if self.writer is not None:
            with self.writer.as_default():
                for key, value in record.items():
                    if key != "epoch" and isinstance(value, (int, float)):
                        tf.summary.scalar(key, value, step=int(record["epoch"]))
            self.writer.flush()
        keys: list[str] = []
        for row in history:
            keys += [k for k in row if k not in keys]
        lines = [",".join(keys)]
        lines += [
            ",".join("" if row.get(k) is None else f"{row[k]}" for k in keys) for row in history
        ]
        fileio.atomic_write_text(self.csv_path, "\n".join(lines) + "\n")
