"""The search command: `python search.py --help` (code: cbir_tf/commands/search.py).

Installed with pip, the same command is `cbir-search` (or `python -m cbir_tf.commands.search`).
"""

from cbir_tf.commands import search

if __name__ == "__main__":
    search.run()
