"""Data: benchmarks and image collections on disk, and the pixels read from them.

Benchmarks (numpy + PIL + standard library):
  revisited.py     the registry of benchmarks; BenchmarkDataset, one benchmark in place
  ground_truth.py  read and check ground-truth pickles (through safe_pickle.py)
  safe_pickle.py   the restricted unpickler: plain containers and numpy arrays, nothing else
  prepare.py       prepare_dataset: download, extract, place, check, mark COMPLETE
  download.py      resumable, sha256-checked downloads; the COMPLETE marker
  archive.py       safe tar / zip extraction
  synthetic.py     the generated 'demo' benchmark
Images:
  decode.py        one file to upright RGB pixels (formats, bombs, EXIF, colour, crop, resize)
  pipeline.py      many files: decoded ahead in threads, or a tf.data pipeline
  folder.py        own collections: folders of images, labelled by sub-folder
Training data: training.py, tuples.py.
"""
