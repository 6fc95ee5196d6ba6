"""cbir_tf.rerank.auto: the 'auto' settings, chosen from the collection's similarity graph."""

import numpy as np
import pytest

from cbir_tf.rerank import auto


def _unit(v):
    return (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)


def _collection(groups, per_group, loners, dim=64, spread=0.25, seed=0):
    """`groups` tight groups of `per_group` views (each group's share of the images is
    groups * per_group / N) among `loners` images of a diffuse cloud."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=dim)
    views = []
    for _ in range(groups):
        c = centre + rng.normal(size=dim)
        views.append(c + spread * rng.normal(size=(per_group, dim)))
    cloud = centre + rng.normal(size=(loners, dim))
    return _unit(np.concatenate(views + [cloud]))


def test_significant_neighbours_stand_out_from_the_noise_line():
    # Similarities falling with log r (noise) have no significant neighbour; two that jump
    # above the line by more than its slope b are the significant ones.
    r = np.arange(1, 51)
    noise = 0.9 - 0.01 * np.log(r)
    views = noise.copy()
    views[:2] += [0.05, 0.03]  # 5 and 3 slopes above the line
    views[2] += 0.005  # half a slope: not significant
    counts = auto.significant_counts(np.stack([noise, views]), 10, 50)
    np.testing.assert_array_equal(counts, [0, 2])


def test_a_collection_of_view_groups_gets_diffusion_and_a_diffuse_one_does_not():
    grouped = auto.collection_stats(_collection(groups=60, per_group=5, loners=400))
    diffuse = auto.collection_stats(_collection(groups=0, per_group=0, loners=700))
    assert grouped["share"] >= auto.GROUPS_SHARE > diffuse["share"]
    on = auto.auto_values(grouped)
    assert on["diffusion"]["k"] == 700 // 40 and on["diffusion"]["kq"] == 1 + grouped["typical"]
    assert on["qe"]["n"] == 1 and on["dba"]["n"] == auto.DBA_N
    off = auto.auto_values(diffuse)
    assert off["diffusion"]["k"] == 1 and off["qe"]["n"] == 0 and off["dba"]["n"] == auto.DBA_N
    assert on["diffusion"]["truncate"] == off["diffusion"]["truncate"] == 0
    # A handful of images: too few to tell groups from noise, whatever the share.
    few = auto.collection_stats(_collection(groups=12, per_group=5, loners=30))
    assert few["share"] >= auto.GROUPS_SHARE and few["images"] <= auto.MIN_GROUPED_IMAGES
    assert auto.auto_values(few)["diffusion"]["k"] == 1 and auto.auto_values(few)["qe"]["n"] == 0


def test_stats_are_deterministic_sampled_and_sized():
    x = _collection(groups=40, per_group=5, loners=300)
    first = auto.collection_stats(x, sample=100)
    assert first == auto.collection_stats(x.copy(), sample=100)
    assert first["sampled"] == 100 and first["images"] == len(x)
    assert first["noise_ranks"] == [10, 50]
    assert auto.noise_ranks(27) == (4, 13) and auto.noise_ranks(7) is None
    tiny = auto.collection_stats(x[:7])
    assert tiny["noise_ranks"] is None and auto.auto_values(tiny)["diffusion"]["k"] == 1
    assert auto.auto_values({"images": 3, "share": 0.0})["dba"]["n"] == 2
    big = auto.auto_values({"images": 10**6, "share": 0.5, "typical": 2}, graph_min_rows=200_000)
    assert big["diffusion"] == {"k": 50, "kq": 3, "truncate": 1000}


def test_the_saved_entry_is_valid_for_its_rows_only():
    x = _collection(groups=10, per_group=5, loners=100)
    ids = [f"img{i}" for i in range(len(x))]
    entry = auto.collection_entry(x, ids)
    assert auto.entry_matches(entry, ids)
    assert not auto.entry_matches(entry, ids[:-1])
    assert not auto.entry_matches(entry, ids[1:] + ids[:1])
    assert not auto.entry_matches(None, ids)
    assert entry["values"] == auto.auto_values(entry["stats"])


@pytest.mark.parametrize("n", [1, 2, 8])
def test_tiny_collections_resolve(n):
    values = auto.auto_values(auto.collection_stats(_unit(np.eye(16)[:n] + 0.1)))
    assert values["diffusion"]["k"] == 1 and values["dba"]["n"] == min(auto.DBA_N, n - 1)


class _ShortLists:
    """An index answering like an approximate one that found too few candidates for some
    queries: their lists end in -inf scores and id -1."""

    def __init__(self, database, short_rows):
        from cbir_tf.search.index import SearchIndex

        self._exact = SearchIndex(database, validate=False)
        self.database, self.ntotal = database, len(database)
        self._short = set(short_rows)

    def search(self, queries, k, validate=False):
        sims, ids = self._exact.search(queries, k, validate=False)
        for row, q in enumerate(queries):
            if int(np.argmax(self.database @ q)) in self._short:
                sims[row, k // 2 :], ids[row, k // 2 :] = -np.inf, -1
        return sims, ids


def test_images_with_short_approximate_lists_are_left_out_of_the_counts():
    x = _collection(groups=40, per_group=5, loners=300)
    exact = auto.collection_stats(x)
    with np.errstate(all="raise"):  # no NaN from the padding reaches the noise line
        stats = auto.collection_stats(x, index=_ShortLists(x, short_rows=range(0, len(x), 4)))
    assert stats["sampled"] == len(x) - len(range(0, len(x), 4))
    assert abs(stats["share"] - exact["share"]) < 0.1
