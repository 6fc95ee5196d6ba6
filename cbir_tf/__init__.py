"""cbir-tf: content-based image retrieval with TensorFlow/Keras.

Heavy modules (TensorFlow) are imported lazily, so `import cbir_tf` and the numpy-only parts
(metrics, search, re-ranking) stay fast.
"""

__version__ = "0.1.0"
