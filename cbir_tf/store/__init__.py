"""Descriptors on disk: stores, their writer, shards, index folders and their collections.

files.py         a finished store (descriptors.npy, ids.txt, meta.json, ...): write, read, and
                 committed states (staged, sealed with checksums, renamed in; read whole)
meta.py          what a store's meta.json records; when two stores may be compared or joined
writer.py        resumable, locked writing of a running extraction (StoreSink, StoreWriter)
shards.py        shard stores joined into one         copies.py  stores on gs://, s3://, ...
index_folder.py  an image index: a store plus its manifest, model and pending batch
collection.py    the image files an index describes: ids, file stats, unreadable files
verify.py        every file of an index or store checked against its commit's checksums
"""
