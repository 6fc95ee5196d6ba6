"""The shipped config files (ml-collections `get_config()` files), installed with the package.

`configs/default.py` is the single source of defaults; the others start from it. The commands
find them by name from any directory: `--config=demo`, `--config=configs/demo.py` (the form
README uses) or `--config=PATH/TO/mine.py` for a file of your own (see `cbir_tf.cli`).
"""
