"""The approximate index's memory plan (cbir_tf.search.ann_plan): every byte a query touches is
counted against `search.ann.bytes_per_vector`, and the budget picks the codes."""

import os

import numpy as np
import pytest

from cbir_tf.search import ann, ann_plan


def _plan(n, d, budget, kind="auto", min_rows=1000):
    return ann_plan.plan(n, d, kind=kind, min_rows=min_rows, budget=budget)


def test_the_default_budget_holds_sq8_rescoring_codes_at_1m_x_512():
    s = ann.AnnSettings.from_config({})
    p = s.plan(1_000_000, 512)
    # 64 bytes of fast-scan codes, the 8-byte id, 512 bytes of SQ8 codes and the centroids'
    # share: within 600, where the first version counted 77 bytes and read the float store.
    assert p["factory"] == f"IVF{p['nlist']}_HNSW32,PQ128x4fs,Refine(SQ8)"
    assert p["estimate"]["rescoring"] == pytest.approx(512, abs=0.1)
    assert 580 < p["estimate"]["total"] <= s.bytes_per_vector == 600
    assert s.plan(150_000, 512)["kind"] == "flat"  # below min_rows


@pytest.mark.parametrize(
    ("budget", "rescoring", "codes"),
    [(600, "SQ8", "PQ128x4fs"), (560, "SQ8", "PQ64x4fs"), (450, "SQ6", "PQ64x4fs"),
     (300, "SQ4", "PQ64x4fs"), (200, "", "PQ256x4fs"), (80, "", "PQ128x4fs"), (30, "", "PQ32x4fs")],
)  # fmt: skip
def test_the_budget_picks_the_best_codes_that_fit(budget, rescoring, codes):
    p = _plan(1_000_000, 512, budget)
    assert p["rescoring"] == rescoring and f",{codes}" in p["factory"]
    assert p["estimate"]["total"] <= budget


def test_no_fit_falls_back_to_exact_search_or_is_refused_in_one_line():
    # auto: exact search, saying why and what would fit.
    p = _plan(1_000_000, 512, 12)
    assert p["kind"] == "flat"
    assert (
        "bytes_per_vector=12 leaves no room" in p["fallback"] and "smallest takes" in p["fallback"]
    )
    small = _plan(179, 256, 600, min_rows=100)  # issue 24 item 6: 179 images, min_rows=100
    assert small["kind"] == "flat" and "179 rows are too few" in small["fallback"]
    # 'ivfpq' asked for: refused, one line.
    with pytest.raises(ValueError, match=r"^search.ann.bytes_per_vector=12 leaves no room[^\n]*$"):
        _plan(1_000_000, 512, 12, kind="ivfpq")
    with pytest.raises(ValueError, match="179 rows are too few"):
        _plan(179, 256, 600, kind="ivfpq")
    with pytest.raises(ValueError, match="unknown search.ann field"):
        ann.AnnSettings.from_config({"nprobe": 3})


def test_the_estimate_is_what_the_built_index_holds(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8000, 64)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    for budget in (100, 40):
        settings = ann.AnnSettings.from_config(
            {"min_rows": 1000, "bytes_per_vector": budget, "tune_queries": 50}
        )
        built = ann.build(x, settings)
        estimate = settings.plan(*x.shape)["estimate"]
        mem = built.meta["memory"]
        assert mem["total"] <= budget and mem["budget"] == budget
        assert mem["index"] == pytest.approx(estimate["index"], abs=1.5)
        assert mem["rescoring"] == pytest.approx(estimate["rescoring"], abs=0.1)
        ann.save(built, str(tmp_path), {})
        on_disk = os.path.getsize(tmp_path / ann.INDEX_FILE) / len(x)
        assert on_disk == pytest.approx(mem["total"], abs=0.5)  # the file is the memory mapped
    assert built.meta["rescoring"] == "" and mem["rescoring"] == 0  # 40 bytes: codes alone
