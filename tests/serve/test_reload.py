"""Live reload (issue 28 items 1 and 4): the service notices each new commit of its index and
serves it between requests; every answer comes from exactly one committed state, which it
names; a state that fails its checks, or a commit that failed, leaves the old one serving;
states replaced are freed."""

from __future__ import annotations

import gc
import http.client
import json
import logging
import os
import random
import shutil
import subprocess
import sys
import threading
import weakref

import anyio
import pytest
from live_server import start, stop
from photos import synthetic_photo

from cbir_tf.retriever import Retriever
from cbir_tf.serve import client

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BASE, EXTRA = 6, 3


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Photos (BASE indexed, EXTRA to add) and a small model saved as .keras."""
    import keras

    from cbir_tf.describe import models
    from cbir_tf.describe.layers import GeM, L2Normalization

    base = tmp_path_factory.mktemp("reload")
    for i in range(BASE):
        synthetic_photo(base / "photos" / f"p{i}.jpg", i)
    for i in range(EXTRA):
        synthetic_photo(base / "photos" / f"extra{i}.jpg", 100 + i)
    keras.utils.set_random_seed(4)
    inp = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(
        keras.layers.Rescaling(1 / 127.5, offset=-1)(inp)
    )
    model = keras.Model(inp, L2Normalization()(GeM()(x)))
    path = models.save_descriptor_model(model, base / "m.keras", {"image_size": 64})
    return {"photos": base / "photos", "model": path}


@pytest.fixture
def index(made, tmp_path):
    """A fresh index of the BASE photos, and a writer attached to it (another Retriever)."""
    writer = Retriever.from_model(made["model"], image_size=64, directory=tmp_path / "index")
    writer.index([str(made["photos"] / f"p{i}.jpg") for i in range(BASE)], progress=False)
    return tmp_path / "index", writer


def _state(index: dict) -> dict:
    """The committed state an answer names (the rest says what searched: exact or approximate)."""
    return {k: index[k] for k in ("images", "commit")}


def _service(index_dir):
    from cbir_tf.serve.reload import IndexWatcher
    from cbir_tf.serve.service import open_service

    service = open_service(index_dir)
    return service, IndexWatcher(service, interval=0)


def test_a_new_commit_is_served_after_the_check(made, index):
    index_dir, writer = index
    service, watcher = _service(index_dir)
    first = service.info()
    assert first["commit"] == 1 and first["images"] == BASE
    assert watcher.check() == {"commit": 1, "switched": False, "error": None}
    writer.index([str(made["photos"] / "extra0.jpg")], progress=False)
    assert service.info()["commit"] == 1  # nothing changes until the check
    assert watcher.check() == {"commit": 2, "switched": True, "error": None}
    info = service.info()
    assert info["commit"] == 2 and info["images"] == BASE + 1
    data = (made["photos"] / "extra0.jpg").read_bytes()
    answer = service.search_image(data, 3, "none")
    assert answer["results"][0]["id"] == "extra0.jpg" and answer["results"][0]["score"] > 0.999
    assert _state(answer["index"]) == {"images": BASE + 1, "commit": 2}


def test_a_request_under_way_finishes_on_its_own_state(made, index, monkeypatch):
    from cbir_tf.serve import service as service_lib

    index_dir, writer = index
    service, watcher = _service(index_dir)
    old_ids = list(service.state.ids)
    real = service_lib.ServedState.search
    inside, release, first = threading.Event(), threading.Event(), [True]

    def held(self, *args):
        if first[0]:  # the request below: held inside its search until the swap is done
            first[0] = False
            inside.set()
            assert release.wait(60)
        return real(self, *args)

    monkeypatch.setattr(service_lib.ServedState, "search", held)
    answers = []
    request = threading.Thread(target=lambda: answers.append(service.search_row(4, 3, "none")))
    request.start()
    assert inside.wait(60)
    # A commit that moves rows: p0 removed, every later row shifts by one.
    writer.remove([str(made["photos"] / "p0.jpg")])
    assert watcher.check()["switched"]
    release.set()
    request.join(60)
    (answer,) = answers
    assert _state(answer["index"]) == {"images": BASE, "commit": 1}
    assert answer["query"] == {"row": 4, "id": old_ids[4]}
    assert all(old_ids[r["row"]] == r["id"] for r in answer["results"])  # one state's rows+ids
    assert answer["results"][0]["id"] == old_ids[4]
    # The next request is served by the new state; a result's link still finds its image.
    now = service.search_row(4, 3, "none", image_id=old_ids[4])
    assert _state(now["index"]) == {"images": BASE - 1, "commit": 2}
    assert now["query"] == {"row": 3, "id": old_ids[4]}
    assert service.thumbnail(4, "small", old_ids[4]) == service.thumbnail(3, "small")
    with pytest.raises(service_lib.RequestError, match="no longer indexed"):
        service.thumbnail(0, "small", old_ids[0])


def test_a_damaged_or_failed_commit_leaves_the_old_state_serving(made, index, caplog, monkeypatch):
    from cbir_tf.store import index_folder

    index_dir, writer = index
    service, watcher = _service(index_dir)
    # A commit that fails on its way (here: a write error) never shows: nothing to switch to.
    real = index_folder.write_index
    monkeypatch.setattr(index_folder, "write_index", lambda *a, **k: (_ for _ in ()).throw(
        OSError("write error")))  # fmt: skip
    with pytest.raises(OSError, match="write error"):
        writer.index([str(made["photos"] / "extra0.jpg")], progress=False)
    monkeypatch.setattr(index_folder, "write_index", real)
    assert watcher.check()["switched"] is False and service.info()["commit"] == 1
    # A commit whose files fail their checks once written: refused in one line, not retried.
    writer.index([str(made["photos"] / "extra0.jpg")], progress=False)
    ids_file = index_dir / "ids.txt"
    good = ids_file.read_bytes()
    ids_file.write_bytes(good[:-4])
    with caplog.at_level(logging.WARNING, logger="cbir_tf.serve.reload"):
        result = watcher.check()
        assert watcher.check()["switched"] is False
    assert result["switched"] is False and result["commit"] == 1
    assert "ids.txt has" in result["error"]
    (line,) = [r.getMessage() for r in caplog.records if r.name == "cbir_tf.serve.reload"]
    assert line.startswith(f"index {index_dir}: commit 2 is not served (StoreCorruptError: ")
    assert line.endswith("; still serving commit 1") and "\n" not in line
    answer = service.search_row(0, 2, "none")
    assert _state(answer["index"]) == {"images": BASE, "commit": 1}
    ids_file.write_bytes(good)
    writer.index([str(made["photos"] / "extra1.jpg")], progress=False)
    assert watcher.check() == {"commit": 3, "switched": True, "error": None}


def test_states_replaced_are_freed(made, index):
    index_dir, writer = index
    service, watcher = _service(index_dir)
    replaced = []
    for k in range(6):
        replaced.append(weakref.ref(service.state.retriever))
        extra = str(made["photos"] / f"extra{(k // 2) % EXTRA}.jpg")
        writer.index([extra], progress=False) if k % 2 == 0 else writer.remove([extra])
        assert watcher.check()["switched"]
        service.search_row(0, 2, "aqe")  # builds structures on the new state
    gc.collect()
    assert [ref() is None for ref in replaced] == [True] * 6
    assert service.info()["commit"] == 7


def test_reload_route_is_for_this_machine_only(index):
    from starlette.requests import Request

    from cbir_tf.serve import app as serve_app
    from cbir_tf.serve.reload import IndexWatcher

    service, _ = _service(index[0])
    watcher = IndexWatcher(service, interval=0)

    async def off_loop(fn, *args):
        return fn(*args)

    route = serve_app.reload_route(watcher, off_loop)

    def call(host):
        scope = {"type": "http", "method": "POST", "path": "/api/reload", "headers": [],
                 "query_string": b"", "client": (host, 5000)}  # fmt: skip
        response = anyio.run(route, Request(scope))
        return response.status_code, json.loads(response.body)

    assert call("127.0.0.1") == (200, {"commit": 1, "switched": False, "error": None})
    status, body = call("192.0.2.7")
    assert status == 403 and "only accepted from this machine" in body["error"]


@pytest.mark.slow
def test_every_answer_comes_from_one_committed_state_while_commits_land(made, index, tmp_path):
    """HTTP clients against the served index while a writer process commits in a loop."""
    from cbir_tf.serve import app as serve_app

    index_dir, _ = index
    service, _ = _service(index_dir)
    server, thread, port = start(serve_app.create_app(service, threads=4, reload_every=0.05))
    wlog = tmp_path / "writer.jsonl"
    writer = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "commit_race.py"), "writer",
         str(index_dir), str(made["photos"]), str(wlog), "16", "0.02"],
        env=dict(os.environ, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="3"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    answers, failures = [], []
    photos = {f"p{i}.jpg": (made["photos"] / f"p{i}.jpg").read_bytes() for i in range(BASE)}

    def client_loop(seed):
        rng = random.Random(seed)
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        while writer.poll() is None:
            name = rng.choice(sorted(photos))
            if rng.random() < 0.5:
                status, answer = client.search(conn, photos[name], k=4)
            else:
                status, data, _ = client.request(
                    conn, "POST", f"/api/search?row={rng.randrange(BASE)}&k=4"
                )
                answer = json.loads(data)
            (answers if status == 200 else failures).append((name, answer))
        conn.close()

    clients = [threading.Thread(target=client_loop, args=(k,)) for k in range(4)]
    for c in clients:
        c.start()
    out, _ = writer.communicate(timeout=600)
    for c in clients:
        c.join(120)
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    status, data, _ = client.request(conn, "POST", "/api/reload")
    final = json.loads(data)
    status_index, info, _ = client.request(conn, "GET", "/api/index")
    conn.close()
    stop(server, thread)
    assert writer.returncode == 0, out
    assert failures == []
    committed = {e["commit"]: e["id_list"] for e in
                 (json.loads(line) for line in wlog.read_text().splitlines())}  # fmt: skip
    assert len(committed) == 17
    seen = set()
    for name, answer in answers:
        commit = answer["index"]["commit"]
        ids = committed[commit]  # a state the writer committed ...
        seen.add(commit)
        assert answer["index"]["images"] == len(ids), answer
        for r in answer["results"]:  # ... and rows, ids and scores all of that one state
            assert ids[r["row"]] == r["id"], (commit, answer)
        if "row" in answer["query"]:
            assert ids[answer["query"]["row"]] == answer["query"]["id"]
            assert answer["results"][0]["id"] == answer["query"]["id"]
        else:
            assert answer["results"][0]["id"] == name and answer["results"][0]["score"] > 0.999
    assert len(answers) > 50 and len(seen) >= 4, (len(answers), sorted(seen))
    assert final["commit"] == max(committed) and json.loads(info)["commit"] == max(committed)
    shutil.rmtree(index_dir)
