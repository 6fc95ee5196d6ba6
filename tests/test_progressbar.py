"""Progress in a log file or a pipe: plain lines every few seconds, no `\\r` (issue 26 item 8)."""

from __future__ import annotations

import io

import numpy as np

from cbir_tf import progressbar


class _Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_a_file_gets_a_plain_line_every_interval_and_one_at_the_end(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(progressbar.time, "monotonic", clock)
    out = io.StringIO()
    bar = progressbar.progress_bar(total=1720, desc="descriptors", unit="img", file=out)
    assert isinstance(bar, progressbar.LineProgress)
    for _ in range(1720):
        clock.now += 0.0625  # 16 images a second: 107.5 s in all
        bar.update(1)
        if bar.n == 700:
            bar.set_postfix(skipped=2, refresh=False)
    bar.close()
    bar.close()  # once
    lines = out.getvalue().splitlines(keepends=True)
    assert "\r" not in out.getvalue() and all(line.endswith("\n") for line in lines)
    assert len(lines) == 107 // 5 + 1  # one every 5 s, and the last
    assert lines[0] == "descriptors: 80/1720 img (5%), 16 img/s, 0:05 elapsed, ETA 1:42\n"
    assert lines[-1] == "descriptors: 1720/1720 img (100%), 16 img/s, 1:47 elapsed, skipped=2\n"


def test_iterables_bytes_and_unknown_totals(monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(progressbar.time, "monotonic", clock)
    out = io.StringIO()
    seen = []
    for item in progressbar.progress_bar(range(3), desc="regions", unit="img", file=out):
        clock.now += 2
        seen.append(item)
    assert (
        seen == [0, 1, 2]
        and out.getvalue() == "regions: 3/3 img (100%), 0.50 img/s, 0:06 elapsed\n"
    )
    out = io.StringIO()
    with progressbar.progress_bar(
        total=None, initial=2048, unit="B", unit_scale=True, unit_divisor=1024, file=out
    ) as bar:
        clock.now += 1
        bar.update(3 * 1024 * 1024)
    assert out.getvalue() == "3.0M B, 3.0M B/s, 0:01 elapsed\n"


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_tqdms_bar_and_disabled_bars_print_nothing():
    from tqdm import tqdm

    term = _Terminal()
    bar = progressbar.progress_bar(total=3, desc="x", file=term)
    assert isinstance(bar, tqdm) and not isinstance(bar, progressbar.LineProgress)
    bar.update(3)
    bar.close()
    assert "\r" in term.getvalue()
    quiet = io.StringIO()
    with progressbar.progress_bar(total=3, disable=True, file=quiet) as bar:
        bar.update(3)
    assert quiet.getvalue() == ""


def test_extraction_logged_to_a_file_writes_lines(capsys):
    import keras

    from cbir_tf.describe.extract import extract
    from cbir_tf.describe.layers import GeM, L2Normalization

    inp = keras.Input((None, None, 3))
    model = keras.Model(inp, L2Normalization()(GeM()(keras.layers.Conv2D(4, 3)(inp))))
    images = [np.full((24, 32, 3), 20 * i, np.uint8) for i in range(6)]
    capsys.readouterr()
    extract(model, images, progress=True)  # stderr is pytest's capture: not a terminal
    err = capsys.readouterr().err
    assert "\r" not in err, err
    assert "descriptors: 6/6 img (100%)" in err, err
