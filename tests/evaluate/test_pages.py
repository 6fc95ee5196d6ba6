"""HTML pages (cbir_tf.evaluate.pages): self-contained, escaped, and rendered by a real headless
browser.

The browser test starts Debian's chromium itself (`/usr/bin/chromium`, installed by `.ci/run`)
and skips, saying why, where it is absent.
"""

import base64
import io
import json
import os
import shutil
import subprocess
import urllib.parse
from html import unescape
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from cbir_tf.evaluate import pages as html_pages
from cbir_tf.evaluate import plots as visualize

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--hide-scrollbars",
)


class _Refs(HTMLParser):
    """Collects src/href attributes and the page's visible text."""

    def __init__(self):
        super().__init__()
        self.srcs, self.hrefs, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.srcs.append(attrs["src"])
        if tag == "a" and "href" in attrs:
            self.hrefs.append(attrs["href"])

    def handle_data(self, data):
        self.text.append(data)


def _parse(path):
    parser = _Refs()
    with open(path, encoding="utf-8") as f:
        raw = f.read()
    parser.feed(raw)
    return parser, raw


def _assert_local_refs_exist(page, refs):
    for ref in refs:
        assert not ref.startswith(("http:", "https:", "//", "file:", "/")), ref
        if ref.startswith("data:"):
            continue
        target = os.path.join(os.path.dirname(page), urllib.parse.unquote(ref))
        assert os.path.isfile(target), f"{page} references missing {ref}"


def _photo(path, rgb, size=(64, 48)):
    img = Image.new("RGB", size, rgb)
    img.paste((255 - rgb[0], 80, 160), (8, 8, size[0] // 2, size[1] // 2))
    img.save(path)
    return str(path)


def _fake_results(kappas=(1, 5, 10)):
    def m(v):
        return {
            "map": v,
            "aps": np.array([v, v]),
            "mpr": np.array([v + 0.01 * j for j in range(len(kappas))]),
            "prs": np.zeros((2, len(kappas))),
        }

    return {
        "plain": {
            "revisited": {"easy": m(0.8123), "medium": m(0.6), "hard": m(0.35)},
            "original": None,
        },
        "aqe<b>": {
            "revisited": {"easy": m(0.85), "medium": m(0.65), "hard": m(0.4)},
            "original": None,
        },
    }


# -- pages on disk ----------------------------------------------------------------------------


def test_search_page_escapes_text_and_references_existing_thumbnails(tmp_path):
    photos = tmp_path / "photos dir"
    photos.mkdir()
    q = _photo(photos / "query #1.png", (200, 30, 30))
    results = [
        {"rank": i + 1, "id": f"<img src=x onerror=alert({i})>", "score": 0.9 - 0.1 * i,
         "path": _photo(photos / f"r{i}.png", (30, 60 * i, 90))}
        for i in range(3)
    ]  # fmt: skip
    results.append({"rank": 4, "id": "gone.jpg", "score": 0.1, "path": str(photos / "gone.jpg")})
    page = html_pages.search_page(
        tmp_path / "out" / "page.html", q, results, meta={"index": "a & b"},
        labels=["positive", "negative", "ignored", None],
    )  # fmt: skip
    parsed, raw = _parse(page)
    assert "<img src=x" not in raw and "&lt;img src=x onerror=alert(0)&gt;" in raw
    assert "a &amp; b" in raw
    assert len(parsed.srcs) == 4  # query + 3 readable results; the missing one is a placeholder
    _assert_local_refs_exist(page, parsed.srcs)
    _assert_local_refs_exist(page, [h for h in parsed.hrefs])
    assert "gone.jpg (unreadable)" in "".join(parsed.text)
    assert 'class="positive"' in raw and 'class="negative"' in raw


def test_embedded_pages_need_no_other_file(tmp_path):
    q = _photo(tmp_path / "q.png", (10, 200, 10))
    r = _photo(tmp_path / "r.png", (10, 10, 200))
    out = tmp_path / "out"
    page = html_pages.search_page(
        out / "p.html", q, [{"rank": 1, "id": "r", "score": 1.0, "path": r}], embed=True
    )
    parsed, _ = _parse(page)
    assert parsed.srcs and all(s.startswith("data:image/") for s in parsed.srcs)
    assert os.listdir(out) == ["p.html"]
    data = base64.b64decode(parsed.srcs[0].split(",", 1)[1])
    assert Image.open(io.BytesIO(data)).size == (64, 48)


def test_write_search_report_pages_grids_and_index(tmp_path):
    photos = tmp_path / "photos"
    (photos / "a").mkdir(parents=True)
    (photos / "b").mkdir()
    db = [_photo(photos / f"db{i}.png", (40 * i, 90, 90)) for i in range(3)]
    # Two queries with the same file name in different folders, and one named like the index.
    queries = [
        _photo(photos / "a" / "x.png", (200, 0, 0)),
        _photo(photos / "b" / "x.png", (0, 200, 0)),
        _photo(photos / "index.png", (0, 0, 200)),
    ]
    res = [{"rank": i + 1, "id": f"db{i}", "score": 1 - i / 10, "path": db[i]} for i in range(3)]
    written = html_pages.write_search_report(tmp_path / "out", [(q, res) for q in queries])
    names = sorted(os.path.basename(p) for p in written["pages"])
    assert names == ["index_.html", "x.html", "x_1.html"]
    assert len(written["grids"]) == 3 and all(os.path.isfile(g) for g in written["grids"])
    parsed, _ = _parse(written["index"])
    assert sorted(set(parsed.hrefs)) == names
    _assert_local_refs_exist(written["index"], parsed.srcs + parsed.hrefs)
    for page in written["pages"]:
        parsed, _ = _parse(page)
        _assert_local_refs_exist(page, parsed.srcs + parsed.hrefs)
        assert any(s.endswith(".png") for s in parsed.srcs)  # the grid is on the page
    single = html_pages.write_search_report(tmp_path / "one", [(queries[0], res)])
    assert single["index"] is None and len(single["pages"]) == 1


def _report(tmp_path, embed=False):
    """An evaluation report with a PR plot (outside the report folder) and result grids."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    gnd_raw = [{"easy": [0, 1], "hard": [2], "junk": [3]}, {"easy": [4], "hard": [5], "junk": []}]
    db = [_photo(tmp_path / f"db{i}.png", (30 * i, 120, 200 - 20 * i)) for i in range(8)]
    qs = [_photo(tmp_path / f"q{i}.png", (220, 40 * i, 40)) for i in range(2)]
    rankings = {
        "plain": np.array([[0, 3, 2, 1, 4, 5, 6, 7], [7, 6, 5, 4, 3, 2, 1, 0]]),
        "aqe<b>": np.array([[0, 1, 2, 3, 4, 5, 6, 7], [4, 5, 0, 1, 2, 3, 6, 7]]),
    }
    figs = visualize.evaluation_figures(tmp_path / "figs", rankings, gnd_raw, qs, db, top=4)
    out = tmp_path / "report"
    results_json = out / "results.json"
    out.mkdir()
    results_json.write_text("{}")
    page = html_pages.evaluation_report(
        out,
        _fake_results(),
        kappas=(1, 5, 10),
        pr_plots={"revisited protocols": figs["pr_plots"]["all"]},
        grids=figs["grids"],
        meta={"dataset": "demo", "backbone": "mobilenet <0.25>"},
        links={"results (JSON)": results_json},
        embed=embed,
    )
    return page


def test_evaluation_report_is_self_contained_and_shows_the_table(tmp_path):
    page = _report(tmp_path)
    parsed, raw = _parse(page)
    text = " ".join(parsed.text)
    assert "81.23" in text and "60.00" in text and "35.00" in text  # mAP E / M / H in %
    assert "82.23" in text  # mP@5 E = 0.8123 + 0.01
    assert "aqe&lt;b&gt;" in raw and "mobilenet &lt;0.25&gt;" in raw
    assert len(parsed.srcs) == 1 + 4  # PR plot + 2 queries x 2 methods
    _assert_local_refs_exist(page, parsed.srcs + parsed.hrefs)
    # Images from outside the report folder were copied in: the folder stands alone.
    for src in parsed.srcs:
        assert not urllib.parse.unquote(src).startswith("..")
    assert "results.json" in parsed.hrefs
    embedded = _report(tmp_path / "e", embed=True)
    parsed, _ = _parse(embedded)
    assert all(s.startswith("data:image/png;base64,") for s in parsed.srcs)


# -- headless browser ---------------------------------------------------------------------------


def _chromium():
    for candidate in ("/usr/bin/chromium", shutil.which("chromium")):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip(
        "Debian's chromium is not installed (apt-get install chromium); the HTML report is "
        "still checked on disk by the other tests of this file"
    )


def _run_chromium(binary, profile, *args, timeout=90):
    cmd = [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args]
    proc = subprocess.run(cmd, capture_output=True, timeout=timeout, text=True)
    assert proc.returncode == 0, f"chromium failed ({proc.returncode}): {proc.stderr[-2000:]}"
    return proc.stdout


_PROBE = """
<script>
window.addEventListener("load", function () {
  var imgs = Array.prototype.slice.call(document.images);
  var broken = imgs.filter(function (i) { return !i.complete || i.naturalWidth === 0; })
                   .map(function (i) { return i.getAttribute("src").slice(0, 120); });
  var rows = document.querySelectorAll("table.results tr").length;
  var out = document.createElement("pre");
  out.id = "probe";
  out.textContent = JSON.stringify({images: imgs.length, broken: broken, rows: rows,
    widths: imgs.map(function (i) { return i.naturalWidth; })});
  document.body.appendChild(out);
});
</script>
"""


@pytest.mark.slow
def test_report_renders_in_headless_chromium(tmp_path):
    binary = _chromium()
    page = _report(tmp_path)
    # The probe runs in a copy beside the report (same relative links): the report itself
    # carries no script.
    with open(page, encoding="utf-8") as f:
        raw = f.read()
    probe = os.path.join(os.path.dirname(page), "probe.html")
    with open(probe, "w", encoding="utf-8") as f:
        f.write(raw.replace("</body>", _PROBE + "</body>"))
    # A broken reference must be caught by the probe: check on a page with one.
    bad = os.path.join(os.path.dirname(page), "bad.html")
    with open(bad, "w", encoding="utf-8") as f:
        f.write(raw.replace("</body>", '<img src="missing.png">' + _PROBE + "</body>"))

    def probe_result(path):
        dom = _run_chromium(
            binary, tmp_path / "profile", "--virtual-time-budget=10000", "--dump-dom",
            "file://" + urllib.parse.quote(path),
        )  # fmt: skip
        start = dom.index('<pre id="probe">') + len('<pre id="probe">')
        return json.loads(unescape(dom[start : dom.index("</pre>", start)]))

    result = probe_result(probe)
    assert result["images"] == 5, result
    assert result["broken"] == [], f"broken images in the report: {result['broken']}"
    assert min(result["widths"]) > 50
    assert result["rows"] == 3  # header + 2 methods
    assert probe_result(bad)["broken"] == ["missing.png"]

    shot = tmp_path / "shot.png"
    _run_chromium(
        binary, tmp_path / "profile", "--window-size=1280,1600", f"--screenshot={shot}",
        "file://" + urllib.parse.quote(page),
    )  # fmt: skip
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float64)
    assert pixels.shape[:2] == (1600, 1280)
    assert pixels.std() > 20, "the screenshot is (nearly) blank"
    # The result grids' coloured borders and the plots' lines are on screen, not only text.
    saturated = (pixels.max(axis=2) - pixels.min(axis=2)) > 80
    assert saturated.mean() > 0.01
