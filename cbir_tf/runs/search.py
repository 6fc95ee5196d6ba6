"""What `search.py` runs: query an index with an image or a folder, print tables, write pages."""

from __future__ import annotations

import os
import sys
from typing import Any

from cbir_tf.retriever import Retriever, SearchResult, check_k, format_results


def run_search(
    index_dir: str | os.PathLike,
    query: str | os.PathLike,
    *,
    k: int = 10,
    rerank: str = "none",
    out: str | os.PathLike | None = None,
    model: str | os.PathLike | None = None,
    root: str | os.PathLike | None = None,
    recursive: bool = True,
    embed: bool = False,
    stream: Any = None,
    exact: bool = False,
    full_check: bool = False,
    rerank_settings: Any = None,
) -> list[tuple[str, list[SearchResult]]]:
    """What `search.py` runs: searches an index, prints ranked tables, writes HTML and PNGs.

    Args:
      index_dir: an index folder (extract.py --images, or `Retriever.save`).
      query: an image file, or a folder of query images (one result page per image).
      k: results per query.
      rerank: a method of `pipeline.METHODS` ('none', 'aqe', 'diffusion', ...).
      out: folder for `<query>.html` pages, `<query>.png` grids (and `index.html` for several
        queries); None writes nothing.
      model: a `.keras` model replacing the one the index names.
      root: the collection root, when the images moved since indexing.
      recursive: scan sub-folders of a query folder.
      embed: embed images in the pages as base64.
      stream: where tables are printed (default sys.stdout).
      exact: exact search even when the index folder holds an approximate index.
      full_check: compare every file of the index with its commit's SHA-256 first.
      rerank_settings: a config's `rerank` block (e.g. of an `evaluate.py --tune` config) in
        place of the index's saved settings; None keeps them.

    Returns:
      [(query path, results)] in query order.
    """
    from cbir_tf.data.folder import list_images

    check_k(k)
    stream = sys.stdout if stream is None else stream
    query = os.path.expanduser(os.fspath(query))
    if os.path.isdir(query):
        queries = [os.path.join(query, *p.split("/")) for p in list_images(query, recursive)]
        if not queries:
            raise ValueError(f"no images found in the query folder {query}")
    elif os.path.isfile(query):
        queries = [query]
    else:
        raise FileNotFoundError(f"query {query} does not exist")
    kwargs: dict[str, Any] = {"backend": "exact"} if exact else {}
    if rerank_settings is not None:
        kwargs["rerank"] = rerank_settings
    retriever = Retriever.load(index_dir, model=model, root=root, full_check=full_check, **kwargs)
    all_results = retriever.search_batch(queries, k=k, rerank=rerank)
    approximate = retriever.approximate_index()
    if approximate is not None:
        # How far the approximate index may differ from exact search, measured when built.
        stream.write(approximate.describe() + "\n\n")
    pairs = list(zip(queries, all_results, strict=True))
    for q, results in pairs:
        stream.write(format_results(results, title=f"query: {q}") + "\n")
    # Which committed state answered: an index updated meanwhile answers from one state only.
    stream.write(
        f"index {retriever.directory}: {len(retriever)} images (commit {retriever.commit})\n"
    )
    if out:
        from cbir_tf.evaluate import pages as html_pages

        meta = {
            "index": os.path.abspath(os.fspath(index_dir)),
            "images indexed": len(retriever),
            "k": k,
            "rerank": rerank,
        }
        written = html_pages.write_search_report(out, pairs, meta=meta, embed=embed)
        main_page = written["index"] or written["pages"][0]
        stream.write(f"results page: {main_page}\n")
    return pairs
