"""The commands: extract, evaluate, search, train, serve, export.

Each module defines its flags and a `run()` that parses them and runs the command; the
top-level scripts (`python extract.py ...`), `python -m cbir_tf.commands.extract ...` and the
installed console scripts (`cbir-extract ...`, see setup.py) all call it. Import one command
module per process: each defines absl flags, some with the same names as the others'.
"""
