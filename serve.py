"""The serve command: `python serve.py --help` (code: cbir_tf/commands/serve.py).

Installed with pip, the same command is `cbir-serve` (or `python -m cbir_tf.commands.serve`).
"""

from cbir_tf.commands import serve

if __name__ == "__main__":
    serve.run()
