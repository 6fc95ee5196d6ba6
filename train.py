"""The train command: `python train.py --help` (code: cbir_tf/commands/train.py).

Installed with pip, the same command is `cbir-train` (or `python -m cbir_tf.commands.train`).
"""

from cbir_tf.commands import train

if __name__ == "__main__":
    train.run()
