"""The extract command: `python extract.py --help` (code: cbir_tf/commands/extract.py).

Installed with pip, the same command is `cbir-extract` (or `python -m cbir_tf.commands.extract`).
"""

from cbir_tf.commands import extract

if __name__ == "__main__":
    extract.run()
