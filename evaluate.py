"""The evaluate command: `python evaluate.py --help` (code: cbir_tf/commands/evaluate.py).

Installed with pip, the same command is `cbir-evaluate` (or `python -m cbir_tf.commands.evaluate`).
"""

from cbir_tf.commands import evaluate

if __name__ == "__main__":
    evaluate.run()
