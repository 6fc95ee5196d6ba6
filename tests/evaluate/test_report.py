"""Tables and result files of cbir_tf.evaluate.report."""

import csv
import json

import numpy as np

from cbir_tf.evaluate import report


def _metrics(m, mpr, aps):
    return {"map": m, "aps": np.array(aps), "mpr": np.array(mpr), "prs": np.zeros((len(aps), 3))}


def _results(original=True):
    rev = {
        "easy": _metrics(0.81234, [1.0, 0.9, 0.85], [0.8, 0.82468]),
        "medium": _metrics(0.65, [0.95, 0.8, 0.7], [0.6, 0.7]),
        "hard": _metrics(0.3, [0.5, 0.4, 0.35], [np.nan, 0.3]),
    }
    res = {"plain": {"revisited": rev, "original": _metrics(0.7, [1, 1, 1], [0.7, 0.7])}}
    if not original:
        res["plain"]["original"] = None
    return res


def test_table_rows_are_percentages_with_two_decimals():
    rows = report.table_rows(_results(), (1, 5, 10))
    assert rows[0]["mAP E"] == 81.23
    assert rows[0]["mAP M"] == 65.0
    assert rows[0]["mP@5 H"] == 40.0
    assert rows[0]["mAP original"] == 70.0


def test_table_has_no_original_column_without_original_ground_truth():
    rows = report.table_rows(_results(original=False), (1, 5, 10))
    assert "mAP original" not in rows[0]


def test_format_table_lists_every_method_and_header():
    res = _results()
    res["diffusion"] = res["plain"]
    text = report.format_table(res, (1, 5, 10), title="rparis6k")
    lines = text.splitlines()
    assert lines[0] == "rparis6k"
    assert "mAP E" in lines[1] and "mP@10 H" in lines[1]
    assert lines[3].startswith("plain") and "81.23" in lines[3]
    assert lines[4].startswith("diffusion")


def test_write_results_json_and_csv_agree(tmp_path):
    paths = report.write_results(tmp_path, _results(), (1, 5, 10), extra={"dataset": "x"})
    payload = json.loads(open(paths["json"]).read())
    assert payload["dataset"] == "x"
    assert payload["methods"]["plain"]["revisited"]["hard"]["ap_per_query"] == [None, 30.0]
    with open(paths["csv"]) as f:
        rows = list(csv.DictReader(f))
    assert float(rows[0]["mAP E"]) == payload["table"][0]["mAP E"] == 81.23
