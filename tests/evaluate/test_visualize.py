"""Result grids, precision-recall curves and their plots (cbir_tf.evaluate.plots)."""

import numpy as np
import pytest
from PIL import Image

from cbir_tf.evaluate import metrics
from cbir_tf.evaluate import plots as visualize


def _color_image(path, rgb, size=(80, 60)):
    Image.new("RGB", size, rgb).save(path)
    return str(path)


def test_precision_recall_by_hand():
    # Ranking 5 3 7 1 0 ...; positives {3, 1}, junk {7}: after removing 7 the positives sit at
    # positions 2 and 3 (1-based) -> precision 1/2 and 2/3, recall 1/2 and 1.
    ranking = np.array([5, 3, 7, 1, 0, 2, 4, 6])
    rec, prec = visualize.precision_recall(ranking, np.array([3, 1]), np.array([7]))
    np.testing.assert_allclose(rec, [0.5, 1.0])
    np.testing.assert_allclose(prec, [1 / 2, 2 / 3])
    # Without junk removal the second positive is at position 4.
    rec, prec = visualize.precision_recall(ranking, np.array([3, 1]))
    np.testing.assert_allclose(prec, [1 / 2, 2 / 4])
    rec, prec = visualize.precision_recall(ranking, np.array([], dtype=np.int64))
    assert rec.size == 0 and prec.size == 0


def test_interpolated_precision_takes_best_precision_to_the_right():
    recall = np.array([0.25, 0.5, 0.75, 1.0])
    precision = np.array([1.0, 0.4, 0.6, 0.5])
    levels = np.array([0.0, 0.25, 0.3, 0.5, 0.75, 0.9, 1.0])
    got = visualize.interpolated_precision(recall, precision, levels)
    np.testing.assert_allclose(got, [1.0, 1.0, 0.6, 0.6, 0.6, 0.5, 0.5])
    # A ranking that misses positives (only half found): precision 0 beyond recall 0.5.
    got = visualize.interpolated_precision(np.array([0.5]), np.array([1.0]), levels)
    np.testing.assert_allclose(got, [1, 1, 1, 1, 0, 0, 0])


def test_mean_pr_curve_skips_queries_without_positives():
    ranks = np.array([[0, 1, 2, 3], [3, 2, 1, 0], [0, 1, 2, 3]])
    gnd = [
        {"ok": np.array([0]), "junk": np.array([], np.int64)},  # perfect: precision 1
        {"ok": np.array([0]), "junk": np.array([1])},  # found at 3rd after junk: 1/3
        {"ok": np.array([], np.int64), "junk": np.array([], np.int64)},  # no positives
    ]
    levels = np.array([0.0, 0.5, 1.0])
    rec, prec = visualize.mean_pr_curve(ranks, gnd, levels)
    np.testing.assert_allclose(rec, levels)
    np.testing.assert_allclose(prec, [(1 + 1 / 3) / 2] * 3)
    _, prec = visualize.mean_pr_curve(ranks[2:], gnd[2:], levels)
    assert np.isnan(prec).all()
    with pytest.raises(ValueError, match="Q = 3"):
        visualize.mean_pr_curve(ranks[:2], gnd, levels)


def test_revisited_pr_curves_follow_the_protocols():
    # One query: easy {0}, hard {1}, junk {2}; ranking 1, 2, 0, 3.
    gnd_raw = [{"easy": [0], "hard": [1], "junk": [2]}]
    ranks = np.array([[1, 2, 0, 3]])
    levels = np.array([1.0])
    curves = visualize.revisited_pr_curves(ranks, gnd_raw, levels)
    # Easy: hard and junk ignored -> 0 first. Medium: 1 then (2 ignored) 0 -> both at 1, 2.
    # Hard: easy and junk ignored -> 1 first.
    assert curves["easy"][1][0] == pytest.approx(1.0)
    assert curves["medium"][1][0] == pytest.approx(1.0)
    assert curves["hard"][1][0] == pytest.approx(1.0)
    ranks = np.array([[3, 0, 2, 1]])
    curves = visualize.revisited_pr_curves(ranks, gnd_raw, levels)
    assert curves["easy"][1][0] == pytest.approx(1 / 2)  # 3, 0
    assert curves["medium"][1][0] == pytest.approx(2 / 3)  # 3, 0, (2), 1
    assert curves["hard"][1][0] == pytest.approx(1 / 2)  # 3, (0), (2), 1


def test_pr_area_agrees_with_map_ordering():
    # A better ranking has a higher curve and a higher mAP: the plot tells the table's story.
    rng = np.random.default_rng(0)
    n, q = 60, 5
    gnd_raw = [
        {"easy": list(rng.choice(n, 4, replace=False)), "hard": [], "junk": []} for _ in range(q)
    ]
    good = np.stack([np.r_[g["easy"], np.setdiff1d(np.arange(n), g["easy"])] for g in gnd_raw])
    bad = np.stack([rng.permutation(n) for _ in range(q)])
    area, map_ = {}, {}
    for name, ranks in (("good", good), ("bad", bad)):
        _, prec = visualize.revisited_pr_curves(ranks, gnd_raw)["easy"]
        area[name] = prec.mean()
        map_[name] = metrics.evaluate_revisited(ranks, gnd_raw)["easy"]["map"]
    assert area["good"] == pytest.approx(1.0) and map_["good"] == pytest.approx(1.0)
    assert area["bad"] < 0.5 and map_["bad"] < 0.5


def test_result_grid_writes_png_with_coloured_borders(tmp_path):
    q = _color_image(tmp_path / "q.png", (200, 200, 40))
    results = [_color_image(tmp_path / f"r{i}.png", (40, 40, 200 - 40 * i)) for i in range(4)]
    out = visualize.result_grid(
        q,
        results,
        [0.9, 0.8, 0.7, 0.6],
        labels=["positive", "negative", "ignored", None],
        out_path=tmp_path / "grid.png",
        titles=["a", "b<script>", "c", "d"],
        columns=4,
    )
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert img.shape[1] > img.shape[0] > 50
    colours = {tuple(c) for c in img.reshape(-1, 3)[::7].tolist()}

    def near(rgb):
        return any(sum(abs(a - b) for a, b in zip(c, rgb, strict=True)) < 30 for c in colours)

    assert near((0x2C, 0xA0, 0x2C))  # positive border
    assert near((0xD6, 0x27, 0x28))  # negative border
    assert near((0x9E, 0x9E, 0x9E))  # ignored border
    assert near((200, 200, 40))  # the query's pixels


def test_result_grid_accepts_arrays_and_survives_unreadable_results(tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    q = np.full((30, 50, 3), 128, np.uint8)
    out = visualize.result_grid(
        q, [np.zeros((20, 20), np.uint8), str(broken)], [1.0, 0.5], out_path=tmp_path / "g.png"
    )
    assert Image.open(out).size[0] > 0


def test_result_grid_rejects_mismatched_inputs(tmp_path):
    q = np.zeros((8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match="scores"):
        visualize.result_grid(q, [q, q], [1.0], out_path=tmp_path / "g.png")
    with pytest.raises(ValueError, match="unknown label"):
        visualize.result_grid(q, [q], [1.0], labels=["good"], out_path=tmp_path / "g.png")
    with pytest.raises(ValueError, match="out_path"):
        visualize.result_grid(q, [q], [1.0])
    assert not (tmp_path / "g.png").exists()


def test_load_thumbnail_orientation_and_modes(tmp_path):
    # EXIF orientation 6 (rotate 90 CW): a stored 40x20 image is shown 20 wide, 40 high.
    img = Image.new("RGB", (40, 20), (10, 20, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    img.save(tmp_path / "rot.jpg", exif=exif.tobytes())
    assert visualize.load_thumbnail(tmp_path / "rot.jpg", 100).shape == (40, 20, 3)
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    thumb = visualize.load_thumbnail(rgba, 100)
    assert thumb.shape == (10, 10, 3) and (thumb == 255).all()  # transparent -> white
    big = np.zeros((500, 1000, 3), np.uint8)
    assert visualize.load_thumbnail(big, 100).shape == (50, 100, 3)


def test_pr_curve_plot_and_evaluation_figures(tmp_path):
    gnd_raw = [
        {"easy": [0, 1], "hard": [2], "junk": [3]},
        {"easy": [4], "hard": [5, 6], "junk": []},
    ]
    n = 8
    rankings = {
        "plain": np.array([[0, 3, 2, 1, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0]]),
        "aqe": np.array([[0, 1, 2, 3, 4, 5, 6, 7], [4, 5, 6, 0, 1, 2, 3, 7]]),
    }
    db = [_color_image(tmp_path / f"db{i}.png", (30 * i, 100, 100)) for i in range(n)]
    qs = [np.full((40, 40, 3), 60 * i, np.uint8) for i in range(2)]
    figs = visualize.evaluation_figures(
        tmp_path / "figs", rankings, gnd_raw, qs, db, num_queries=2, top=4,
        database_names=[f"db{i}" for i in range(n)],
    )  # fmt: skip
    assert Image.open(figs["pr_plots"]["all"]).size[0] > 300
    assert len(figs["grids"]) == 4
    for g in figs["grids"]:
        assert Image.open(g["path"]).format == "PNG"
    assert [g["method"] for g in figs["grids"]] == ["plain", "plain", "aqe", "aqe"]
    # Query boxes: the grid shows the crop (a green right half), not the red left half.
    half = Image.new("RGB", (80, 40), (255, 0, 0))
    half.paste((0, 255, 0), (40, 0, 80, 40))
    half.save(tmp_path / "half.png")
    figs = visualize.evaluation_figures(
        tmp_path / "crop", {"plain": rankings["plain"]}, gnd_raw, [str(tmp_path / "half.png")],
        [_color_image(tmp_path / "grey.png", (90, 90, 90))] * n, num_queries=1, top=2,
        query_bboxes=[(40, 0, 80, 40)],
    )  # fmt: skip
    pixels = np.asarray(Image.open(figs["grids"][0]["path"]).convert("RGB")).astype(int)
    r, g, b = pixels[..., 0], pixels[..., 1], pixels[..., 2]
    assert ((g > 200) & (r < 60) & (b < 60)).sum() > 100
    assert ((r > 200) & (g < 60) & (b < 60)).sum() == 0
    single = visualize.pr_curve_plot(
        {"plain": (np.linspace(0, 1, 5), np.linspace(1, 0, 5))}, tmp_path / "one.png", title="x"
    )
    assert Image.open(single).size[0] > 100


def test_a_protocol_without_positives_is_said_not_drawn_empty():
    # Issue 26 item 11: no query has a Hard positive (an own gnd.json without "hard" images).
    gnd_raw = [{"easy": [0, 1], "hard": [], "junk": []}, {"easy": [2], "hard": [], "junk": [3]}]
    ranks = np.array([[0, 2, 1, 3], [3, 2, 1, 0]])
    curves = {p: {"plain": c} for p, c in visualize.revisited_pr_curves(ranks, gnd_raw).items()}
    assert np.isnan(curves["hard"]["plain"][1]).all()
    fig = visualize.pr_curve_figure(curves)
    easy, medium, hard = fig.axes
    for ax in (easy, medium):
        assert len(ax.lines) == 1 and not ax.texts
    assert hard.get_title() == "Hard" and not hard.lines and not hard.axison
    assert [t.get_text() for t in hard.texts] == ["no query has Hard positives:\nnothing to plot"]
