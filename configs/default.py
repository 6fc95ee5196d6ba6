"""Default recipe: EfficientNet-B1 + R-MAC on Revisited Paris6k, whitening learned on Oxford5k.

Run:
  python extract.py                      # descriptors of Paris6k (database + cropped queries)
  python evaluate.py --dataset=paris6k   # the full benchmark table (plain, alpha-QE, diffusion)

Every field can be overridden from the command line, e.g.
  python evaluate.py --config.model.backbone=vgg16 --config.rerank.diffusion.k=100
"""

import ml_collections


def _runner_fields(extract: ml_collections.ConfigDict) -> None:
    """What runs an extraction: this process, or an Apache Beam pipeline (beam_extract.py)."""
    extract.runner = "local"  # local | beam
    extract.beam_options = ""  # Beam pipeline options, passed through (e.g. --runner=...)
    extract.beam_workers = 0  # local workers when the options name no runner; 0 = cores
    extract.beam_shard_images = 256  # images per shard: the unit of work, retry and resumption
    extract.beam_attempts = 3  # tries per shard in its worker before the run fails
    # Where workers write their shard stores: "" = inside the output store (workers share the
    # driver's disk); a folder on a filesystem all workers reach (gs://...) for a cluster.
    extract.beam_shard_dir = ""


def get_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()

    c.model = ml_collections.ConfigDict()
    # A keras.applications CNN (cbir_tf.describe.backbones.BACKBONES) or a KerasHub vision
    # transformer (cbir_tf.describe.transformers.TRANSFORMERS: dinov2_small, clip_..., ...).
    c.model.backbone = "efficientnetb1"
    c.model.alpha = 1.0  # width multiplier (mobilenet / mobilenetv2 only)
    # 'imagenet' (transformers: their pretrained KerasHub preset), 'none', a .h5/.weights.h5
    # file or a .keras model; transformers: a preset / Hugging Face checkpoint folder too
    c.model.weights = "imagenet"
    c.model.weights_fallback = ""  # used when pretrained weights cannot be downloaded ('' = fail)
    # auto (the backbone's recipe: rmac for CNNs, cls for DINOv2/v3, head for CLIP/SigLIP) |
    # mac | spoc | gem | rmac; transformers also cls | cls+gem | head
    c.model.pooling = "auto"
    c.model.gem_p = 3.0
    c.model.rmac_levels = 3

    c.data = ml_collections.ConfigDict()
    c.data.dataset = "paris6k"  # paris6k | oxford5k | rparis6k | roxford5k | demo | a folder
    c.data.distractors = ""  # '' | r1m (the revisitop 1M distractors) | a folder of images
    c.data.data_root = "data"  # benchmark folders live in <data_root>/datasets/<name>/
    c.data.image_size = 1024  # longest side, pixels
    c.data.scales = (1.0,)  # multi-scale: e.g. (1.0, 0.7071067811865476, 0.5)
    c.data.ms_power = 1.0  # power of the GeM mean combining the per-scale vectors
    c.data.num_parallel_reads = 4

    c.whitening = ml_collections.ConfigDict()
    c.whitening.kind = "pca"  # pca | none
    # 'auto' = the other landmark dataset (Oxford <-> Paris), none for a benchmark folder;
    # or a dataset name, a folder (its images), 'none'
    c.whitening.dataset = "auto"
    c.whitening.dim = 0  # output dimension, 0 = keep all
    c.whitening.shrinkage = 0.0  # eigenvalue shrinkage in [0, 1] (0 = full whitening)
    c.whitening.regional = True  # R-MAC: whiten region vectors the classic way

    c.extract = ml_collections.ConfigDict()
    c.extract.out = ""  # store folder; '' = <workdir>/descriptors/<dataset>
    c.extract.shard_index = 0
    c.extract.num_shards = 1
    c.extract.flush_every = 64  # images between checkpoints of an interrupted run
    _runner_fields(c.extract)  # extract.runner: local | beam, and the Beam pipeline's fields

    c.search = search_config()

    c.rerank = ml_collections.ConfigDict()
    # Rows of the evaluation table; also 'dba', 'aqe+dba' (see cbir_tf.rerank.pipeline.METHODS).
    c.rerank.methods = ("plain", "aqe", "diffusion", "aqe+diffusion")
    # 'auto' (qe.n, dba.n, diffusion.k, kq, truncate): chosen from the collection's similarity
    # graph (cbir_tf.rerank.auto; README "Re-ranking"), once per index; on Revisited
    # Oxford/Paris, the papers' settings of `papers` below. Or a number: "5" on the command line
    # (--config.rerank.diffusion.k=5), and a string in a config file (c.rerank.diffusion.k =
    # "5"), since the field's type is that of "auto".
    c.rerank.qe = ml_collections.ConfigDict()
    c.rerank.qe.n = "auto"
    c.rerank.qe.alpha = 3.0
    c.rerank.dba = ml_collections.ConfigDict()  # database-side augmentation (alpha-weighted)
    c.rerank.dba.n = "auto"
    c.rerank.dba.alpha = 3.0
    c.rerank.diffusion = ml_collections.ConfigDict()
    c.rerank.diffusion.k = "auto"
    c.rerank.diffusion.kq = "auto"
    c.rerank.diffusion.gamma = 3.0
    c.rerank.diffusion.alpha = 0.99
    c.rerank.diffusion.max_iter = 20
    c.rerank.diffusion.tol = 1e-6
    c.rerank.diffusion.truncate = "auto"  # 0 = full graph; n > 0 = sub-graph of each query's top n
    # What 'auto' means on Revisited Oxford/Paris (and Oxford5k/Paris6k): the papers' settings
    # (Iscen et al. 2017: k=50, kq=10, the full graph; alpha-QE and DBA with n=2).
    c.rerank.papers = ml_collections.ConfigDict()
    c.rerank.papers.qe = ml_collections.ConfigDict({"n": 2})
    c.rerank.papers.dba = ml_collections.ConfigDict({"n": 2})
    c.rerank.papers.diffusion = ml_collections.ConfigDict({"k": 50, "kq": 10, "truncate": 0})

    # evaluate.py --tune: settings chosen on a benchmark's ground truth, cross-validated over
    # its queries (cbir_tf.evaluate.tune); the grid is "FIELD:v1,v2,..." items (the --compare
    # syntax): rerank fields, and whitening.dim / whitening.shrinkage where whitening is
    # learned (each value one extraction of the benchmark, cached).
    c.tune = ml_collections.ConfigDict()
    c.tune.folds = 5
    c.tune.seed = 0  # of the shuffle that splits the queries into folds
    c.tune.protocol = "medium"  # the mAP settings are chosen by: easy | medium | hard
    c.tune.grid = (
        "rerank.qe.n:0,1,2,3",
        "rerank.dba.n:0,2,5",
        "rerank.diffusion.k:1,10,20,50",
        "rerank.diffusion.kq:3,5,10",
        "whitening.dim:0,512,256",
        "whitening.shrinkage:0,0.5",
    )

    c.serve = ml_collections.ConfigDict()  # serve.py (cbir_tf.serve.lanes)
    # Uploads whose header declares more pixels than this are large: decoded apart from the
    # other requests, serve.large_decodes at a time, JPEGs at a reduced DCT scale.
    c.serve.large_image_pixels = 4096 * 4096
    c.serve.large_decodes = 1

    c.eval = ml_collections.ConfigDict()
    c.eval.kappas = (1, 5, 10)
    c.eval.num_visualize = 5  # result grids for the first queries
    c.eval.top_visualize = 10
    # With distractors, diffusion on the full graph (rerank.diffusion.truncate = 0; O(N^2) over
    # a million images) becomes truncated diffusion on each query's top n.
    c.eval.distractor_truncate = 1000

    c.train = ml_collections.ConfigDict()
    c.train.recipe = "head"  # head | metric
    c.train.image_size = 224
    c.train.batch_size = 32
    c.train.epochs = 10
    c.train.learning_rate = 1e-3
    c.train.fine_tune_blocks = 0  # second stage: unfreeze the top N blocks (0 = no second stage)
    c.train.fine_tune_epochs = 5
    c.train.fine_tune_learning_rate = 1e-5
    c.train.dense_units = 512
    c.train.dropout = 0.5
    c.train.loss = "contrastive"  # metric recipe: contrastive | triplet
    c.train.margin = 0.7
    c.train.pool_size = 2000
    c.train.num_negatives = 5
    c.train.tuples_per_epoch = 1000
    c.train.early_stopping_patience = 3
    c.train.val_fraction = 0.1  # held out for validation when no --val_dir is given (0 = none)
    c.train.cache = "auto"  # decoded images: memory | none (decode each epoch) | auto
    c.train.crop_scale = (0.35, 1.0)  # random resized crop: bounds of the kept area fraction
    c.train.crop_ratio = (3.0 / 4.0, 4.0 / 3.0)  # random resized crop: bounds of width / height
    c.train.flip = True  # random horizontal flip
    c.train.color_jitter = 0.2  # colour jitter strength in [0, 1] (0 = off)
    c.train.descriptor = "auto"  # head recipe: pooled | projected | auto (better validation mAP)
    c.train.whitening = "auto"  # metric recipe: pca | none | auto (kept if validation mAP gains)
    c.train.metric_blocks = 0  # metric recipe: top backbone blocks trained (0 = all)
    c.train.mixed_precision = "auto"  # auto (on with a fast-float16 GPU) | on | off
    c.train.strategy = "auto"  # auto (MirroredStrategy with several GPUs) | mirrored | default
    c.train.tfds_data_dir = ""  # TensorFlow Datasets folder ('' = TFDS default)
    c.train.seed = 0

    c.workdir = "runs/default"
    return c


def search_config() -> ml_collections.ConfigDict:
    """The `search` block: exact or approximate nearest-neighbour search (`cbir_tf.search`)."""
    s = ml_collections.ConfigDict()
    # auto: an index folder's saved approximate index when it has one (else exact search), and
    # the approximate diffusion graph from ann.graph_min_rows rows; exact: always exact (the
    # way to force it); ann: an approximate index (built in memory when none is saved); faiss:
    # an in-memory faiss index (exact 'Flat').
    s.backend = "auto"  # auto | exact | ann | faiss
    s.block_size = 65536
    # An index read while a writer commits (cbir_tf.store.files.read_committed): seconds a
    # reader waits for the commit's renames; the service's check for a new commit, seconds.
    s.commit_wait = 30.0
    s.reload_every = 2.0
    s.ann = ml_collections.ConfigDict()  # the approximate index (cbir_tf.search.ann)
    s.ann.min_rows = 200_000  # extract.py --images / Retriever build one from this size
    s.ann.kind = "auto"  # auto (flat below min_rows, else ivfpq if one fits) | flat | ivfpq
    # Memory per row, everything an approximate query touches: coarse codes, ids, the share of
    # the centroids, and the re-scoring codes (SQ8: one byte per dimension); the float store
    # is not read by approximate queries (cbir_tf/search/ann_plan.py)
    s.ann.bytes_per_vector = 600
    s.ann.target_recall = 0.95  # nprobe is tuned at build time to reach it ...
    s.ann.recall_margin = 0.005  # ... or, out of reach, the cheapest within this of the best ...
    s.ann.recall_k = 10  # ... as recall@recall_k ...
    s.ann.tune_queries = 1000  # ... on this many held-out rows of the collection
    s.ann.train_size = 65536  # rows sampled to train (at least 32 per inverted list)
    s.ann.refine = 32  # candidates per result re-scored from the re-scoring codes (k * refine)
    s.ann.stale_share = 0.2  # propose a rebuild past this share of rows added since
    s.ann.graph_min_rows = 200_000  # approximate diffusion kNN graph from this size
    s.ann.graph_probes = 8  # lists each row's neighbours are searched in (graph)
    s.ann.seed = 0
    return s
