"""Deployable descriptor models: SavedModel and TFLite (formats.py); decoding in TF ops
(tf_image.py)."""
