"""The export command: `python export.py --help` (code: cbir_tf/commands/export.py).

Installed with pip, the same command is `cbir-export` (or `python -m cbir_tf.commands.export`).
"""

from cbir_tf.commands import export

if __name__ == "__main__":
    export.run()
