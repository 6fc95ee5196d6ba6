"""Rankings -> Revisited Oxford/Paris metrics -> tables, files, plots and pages.

metrics.py      revisitop's mAP and mP@k
rankings.py     one method's rankings and their metrics
methods.py      every method of a benchmark; distractors.py and bounded.py at a million images
benchmark.py    a benchmark's descriptors: model, whitening, stores
precomputed.py  descriptors computed elsewhere (.mat or stores), in ground-truth order
report.py, plots.py, pages.py   results files, plots and grids, HTML pages
"""
