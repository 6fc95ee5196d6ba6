"""Nearest neighbours by inner product: exact blocked search and the saved approximate index.

exact.py   exact blocked search, full rankings, float64 refinement (numpy)
ann.py     the approximate index saved with large collections (faiss), tuned to a recall
index.py   SearchIndex: a database prepared once, searched with the backend asked for
"""
