"""Data: benchmarks and image collections on disk, and the pixels read from them.

Benchmarks (numpy + PIL + standard library):
  revisited.py     the registry of benchmarks; BenchmarkDataset, one benchmark in place
  ground_truth.py  read and check ground truths: pickles (through safe_pickle.py), gnd.json
  own.py           own benchmark folders (--dataset=FOLDER)
  prepare.py       prepare_dataset: download, extract, place, check, mark COMPLETE
  download.py      resumable, sha256-checked downloads; the COMPLETE marker
  archive.py       safe tar / zip extraction
  distractors.py   the R1M distractors, or a folder of images, as distractors
  synthetic.py     the generated 'demo' benchmark
Collections and images:
  folder.py        folders of images, list files, labelled sub-folders
  image_list.py    image ids, and contiguous shards of a list
  decode.py        one file to upright RGB pixels (formats, bombs, EXIF, colour, crop, resize)
  pipeline.py      many files: decoded ahead in threads, or a tf.data pipeline
"""
