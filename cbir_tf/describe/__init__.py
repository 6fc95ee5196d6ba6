"""Images -> descriptors: backbones, pooling maths and layers, models, whitening, extraction.

backbones.py   keras.applications backbones cut at their feature map, and their weights
transformers.py, token_models.py   KerasHub vision transformers: registry and weights; the
               tower as a token model at any image size
catalog.py     every backbone by name, its poolings and 'auto' recipe
ops/, layers/  pooling, normalisation and token maths as pure functions, and thin Keras layers
models.py      build_descriptor_model(**cfg.model): backbone ▸ pooling ▸ whitening ▸ L2
whitening.py   PCA-whitening learned and applied (numpy)
extract.py     the per-image loop: images -> float32 [N, D] rows, into a sink
queries.py     query images described exactly as the indexed ones
"""
