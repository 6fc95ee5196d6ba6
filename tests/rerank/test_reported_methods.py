"""Every reported method is the method it names: rankings equal the papers' maths, to the last rank.

On arcs of unit vectors where plain search, α-QE, diffusion, α-QE + diffusion, DBA and
α-QE + DBA all rank differently, each path that reports a method (`evaluation.rank_method` /
`evaluate_methods`, `Retriever.search`, `search.py`) is compared with `reference_rerank`,
written independently in dense numpy. A path that silently skips a step, or returns another
method's ranking, fails here.
"""

import io
import itertools
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from reference_rerank import arcs, method_scores, ranks_from_scores

from cbir_tf.evaluate import methods as evaluation
from cbir_tf.evaluate import metrics

ROOT = pathlib.Path(__file__).resolve().parents[2]
QE = {"n": 2, "alpha": 3.0}
# Solved to convergence, so that the exact dense solve of the reference is the same function.
DIFFUSION = {"k": 5, "kq": 4, "gamma": 3.0, "alpha": 0.8, "max_iter": 1000, "tol": 1e-12,
             "truncate": 0}  # fmt: skip
DBA = {"n": 3, "alpha": 3.0}
RERANK = {"qe": QE, "dba": DBA, "diffusion": DIFFUSION}
# The default table's methods and the database-side ones.
METHODS = evaluation.METHODS + ("dba", "aqe+dba")
# The Retriever's and search.py's word for no re-ranking is 'none'.
RETRIEVER_NAMES = {"plain": "none", "aqe": "aqe", "diffusion": "diffusion",
                   "aqe+diffusion": "aqe+diffusion", "dba": "dba",
                   "aqe+dba": "aqe+dba"}  # fmt: skip


def _reference_ranks(method, queries, database):
    return ranks_from_scores(method_scores(method, queries, database, QE, DIFFUSION, DBA))


def test_the_data_tells_every_pair_of_methods_apart():
    x, q = arcs()
    ranks = {m: _reference_ranks(m, q, x) for m in METHODS}
    for a, b in itertools.combinations(METHODS, 2):
        assert (ranks[a] != ranks[b]).any(), (a, b)


@pytest.mark.parametrize("method", METHODS)
def test_rank_method_is_the_papers_method(method):
    x, q = arcs()
    ranks, info = evaluation.rank_method(method, q, x, RERANK)
    np.testing.assert_array_equal(ranks, _reference_ranks(method, q, x))
    assert ("diffusion" in info) == ("diffusion" in method)


def test_evaluate_methods_reports_each_methods_own_ranking_and_metrics():
    x, q = arcs()
    labels = np.repeat(np.arange(len(q)), len(x) // len(q))
    gnd = [{"easy": np.flatnonzero(labels == g)[:6], "hard": np.flatnonzero(labels == g)[6:],
            "junk": np.array([], int)} for g in range(len(q))]  # fmt: skip
    results, rankings = evaluation.evaluate_methods(q, x, gnd, methods=METHODS, rerank_cfg=RERANK)
    for method in METHODS:
        expected = _reference_ranks(method, q, x)
        np.testing.assert_array_equal(rankings[method], expected)
        medium = [{"ok": np.concatenate([g["easy"], g["hard"]]), "junk": g["junk"]} for g in gnd]
        m_ap = metrics.compute_map(expected, medium, kappas=(1, 5, 10))[0]
        assert results[method]["revisited"]["medium"]["map"] == pytest.approx(m_ap, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Retriever and search.py: images whose descriptors are the arcs
# ---------------------------------------------------------------------------------------------


def _encode(vectors, folder, prefix):
    """One 2 x 2 PNG per vector: components in the first channels, 127.5 * (v + 1)."""
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i, v in enumerate(vectors):
        slots = np.full(12, 127.5)
        slots[: len(v)] = 127.5 * (v + 1.0)
        pixels = np.clip(np.round(slots), 0, 255).astype(np.uint8).reshape(2, 2, 3)
        names.append(f"{prefix}{i:02d}.png")
        Image.fromarray(pixels).save(folder / names[-1])
    return names


def _decoder(dim):
    """Keras model: a 2 x 2 image -> its encoded vector, L2-normalised (unit, exactly)."""
    import keras

    from cbir_tf.describe.models import unit_normalization

    kernel = np.zeros((2, 2, 3, dim), np.float32)
    for d in range(dim):
        kernel[d // 6, (d // 3) % 2, d % 3, d] = 1.0
    inp = keras.Input((None, None, 3))
    x = keras.layers.Rescaling(1 / 127.5, offset=-1)(inp)
    x = keras.layers.Conv2D(dim, 2, use_bias=False, name="decode")(x)
    x = keras.layers.GlobalMaxPooling2D()(x)
    model = keras.Model(inp, unit_normalization("l2")(x))
    model.get_layer("decode").set_weights([kernel])
    return model


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    from cbir_tf.retriever import Retriever

    x, q = arcs()
    root = tmp_path_factory.mktemp("arcs")
    _encode(x, root / "db", "x")
    queries = [str(root / "queries" / n) for n in _encode(q, root / "queries", "q")]
    r = Retriever(_decoder(x.shape[1]), image_size=2, rerank=RERANK)
    r.index(str(root / "db"), progress=False)
    assert len(r) == len(x)
    r.save(str(root / "index"))
    return r, queries, str(root / "index")


def _expected(r, queries, method):
    """Reference ids and scores of every indexed image, on the Retriever's own descriptors."""
    db = np.asarray(r.descriptors)
    scores = method_scores(method, r.describe(queries), db, QE, DIFFUSION, DBA)
    ranks = ranks_from_scores(scores)
    return [[r.ids[j] for j in row] for row in ranks], np.take_along_axis(scores, ranks, 1)


def test_retriever_descriptors_are_the_encoded_arcs(index):
    r, _, _ = index
    x, _ = arcs()
    rows = [int(i[1:3]) for i in r.ids]
    np.testing.assert_allclose(np.asarray(r.descriptors), x[rows], atol=0.02)


@pytest.mark.parametrize("method", METHODS)
def test_retriever_search_is_the_papers_method(index, method):
    r, queries, _ = index
    ids, scores = _expected(r, queries, method)
    hits = r.search_batch(queries, k=len(r), rerank=RETRIEVER_NAMES[method])
    assert [[h.id for h in row] for row in hits] == ids
    np.testing.assert_allclose([[h.score for h in row] for row in hits], scores, rtol=1e-5,
                               atol=1e-6)  # fmt: skip
    single = r.search(queries[0], k=len(r), rerank=RETRIEVER_NAMES[method])
    assert [h.id for h in single] == ids[0]


@pytest.mark.parametrize("method", METHODS)
def test_search_runner_is_the_papers_method(index, method):
    from cbir_tf.runs.search import run_search

    r, queries, folder = index
    ids, _ = _expected(r, queries, method)
    pairs = run_search(folder, os.path.dirname(queries[0]), k=len(r),
                       rerank=RETRIEVER_NAMES[method], stream=io.StringIO())  # fmt: skip
    assert [q for q, _ in pairs] == queries
    assert [[h.id for h in hits] for _, hits in pairs] == ids


@pytest.mark.slow
def test_search_command_passes_its_rerank_flag(index):
    r, queries, folder = index
    ids, _ = _expected(r, queries[:1], "aqe+diffusion")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "search.py", f"--index={folder}", f"--query={queries[0]}",
         f"--k={len(r)}", "--rerank=aqe+diffusion"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    printed = [row[2] for row in rows if len(row) >= 3 and row[0].isdigit()]
    assert printed == ids[0]


@pytest.mark.slow
def test_search_command_takes_a_configs_rerank_block(index, tmp_path):
    # search.py --config=FILE (e.g. evaluate.py --tune's tuned.py): its rerank block, not the
    # index's saved one, ranks; the reference with the file's settings gives the same ids.
    from cbir_tf import config as config_lib

    r, queries, folder = index
    cfg = config_lib.default_config()
    values = {"rerank.diffusion.k": 3, "rerank.diffusion.kq": 2, "rerank.qe.n": 1}
    for field, value in {**values, "rerank.diffusion.gamma": 3.0, "rerank.diffusion.alpha": 0.8,
                         "rerank.diffusion.max_iter": 1000, "rerank.diffusion.tol": 1e-12,
                         "rerank.diffusion.truncate": 0}.items():  # fmt: skip
        config_lib.set_field(cfg, field, value)
    path = tmp_path / "tuned.py"
    path.write_text(config_lib.config_file_text(config_lib.differences(cfg), "A test's."))
    diffusion = {**DIFFUSION, "k": 3, "kq": 2}
    scores = method_scores("aqe+diffusion", r.describe(queries[:1]), np.asarray(r.descriptors),
                           {**QE, "n": 1}, diffusion, DBA)  # fmt: skip
    ids = [r.ids[j] for j in ranks_from_scores(scores)[0]]
    assert ids != _expected(r, queries[:1], "aqe+diffusion")[0][0]  # the file changes the ranking
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [sys.executable, "search.py", f"--index={folder}", f"--query={queries[0]}",
         f"--k={len(r)}", "--rerank=aqe+diffusion", f"--config={path}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines()]
    assert [row[2] for row in rows if len(row) >= 3 and row[0].isdigit()] == ids


def test_rows_with_auto_settings_are_the_papers_methods_with_the_settings_they_report():
    # A collection with groups (so that 'auto' turns α-QE and diffusion on): every row equals
    # the reference run with the settings its info reports.
    rng = np.random.default_rng(5)
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    centres = rng.normal(size=(24, 32))
    x = unit(np.concatenate([np.repeat(centres, 5, 0) + 0.35 * rng.normal(size=(120, 32)),
                             rng.normal(size=(60, 32))])).astype(np.float32)  # fmt: skip
    q = unit(centres[:8] + 0.35 * rng.normal(size=(8, 32))).astype(np.float32)
    gnd = [{"easy": list(range(5 * g, 5 * g + 5)), "hard": [], "junk": []} for g in range(8)]
    block = {"diffusion": {"alpha": 0.8, "max_iter": 1000, "tol": 1e-12}}  # the rest 'auto'
    results, rankings = evaluation.evaluate_methods(q, x, gnd, methods=METHODS, rerank_cfg=block)
    used = results["aqe+diffusion"]["info"]["settings"]
    assert used["qe"]["n"] >= 1 and used["diffusion"]["k"] > 1  # the rule found the groups
    assert results["plain"]["info"]["auto"]["source"] == "collection"
    for method in METHODS:
        s = results[method]["info"]["settings"]
        qe, dba = s.get("qe", QE), s.get("dba", DBA)
        diff = s.get("diffusion", DIFFUSION)
        expected = ranks_from_scores(method_scores(method, q, x, qe, diff, dba))
        np.testing.assert_array_equal(rankings[method], expected, err_msg=method)
