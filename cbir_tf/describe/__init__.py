"""Images -> descriptors: backbones, pooling maths and layers, models, whitening, extraction.

backbones.py   keras.applications backbones cut at their feature map, and their weights
ops/, layers/  pooling and normalisation as pure functions, and thin Keras layers over them
models.py      build_descriptor_model(**cfg.model): backbone ▸ pooling ▸ whitening ▸ L2
whitening.py   PCA-whitening learned and applied (numpy)
extract.py     the per-image loop: images -> float32 [N, D] rows, into a sink
queries.py     query images described exactly as the indexed ones
"""
