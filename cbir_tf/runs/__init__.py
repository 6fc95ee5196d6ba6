"""The run layer: a config in, library calls out; what the commands run.

  extract.py   a benchmark's stores, an own folder's index, merging shards (extract.py)
  evaluate.py  the benchmark table, results files and report (evaluate.py)
  search.py    an index queried with images, tables and pages (search.py)

Only this layer and the commands read a whole config; the library takes keyword arguments.
"""
