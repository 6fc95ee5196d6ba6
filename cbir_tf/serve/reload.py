"""Live reload: the service notices a new committed state of its index and switches to it.

A thread checks, every `interval` seconds (`search.reload_every`, 2 s; `serve.py
--reload_every`, 0 to turn it off), the commit number in the index's COMPLETE marker: one small
read, which the writer replaces last when it commits. A new number means a new committed state:
it is opened whole (`Retriever.load` with the loaded model, the same checks as at start: sizes
and headers, every checksum with `--verify`), its search structure is built, and
`SearchService.swap` serves it from the next request on, while requests under way finish on
the old one. `POST /api/reload` (from this machine only) runs the same check at once.

A state that cannot be served (a damaged file, an empty index, another model) is reported in one
log line and the old state keeps serving; that commit is not tried again. A commit that failed
before its end never shows: its marker is not there.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from cbir_tf.config import default
from cbir_tf.retriever import Retriever
from cbir_tf.serve.service import SearchService
from cbir_tf.store import files as store_lib

log = logging.getLogger(__name__)


class IndexWatcher:
    """Switches a service to each new committed state of its index.

    Args:
      service: the service (`cbir_tf.serve.service.open_service`).
      interval: seconds between checks; 0 or less: no thread (only `check` when called).
    """

    def __init__(self, service: SearchService, interval: float = default("search.reload_every")):
        self.service = service
        self.interval = float(interval)
        self.last_error: str | None = None
        self._refused: int | None = None  # a commit that failed to open: not tried again
        self._lock = threading.Lock()  # one check at a time (the thread, POST /api/reload)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def check(self) -> dict[str, Any]:
        """Serves the index's newest committed state if it is not served yet.

        Returns:
          {'commit': the commit served now, 'switched': whether it changed, 'error': why the
          newest commit is not served, or None}.
        """
        with self._lock:
            switched = self._check()
        return {
            "commit": self.service.state.commit,
            "switched": switched,
            "error": self.last_error,
        }

    def _check(self) -> bool:
        served = self.service.state
        commit = store_lib.committed_id(self.service.index_dir)
        if commit is None or commit == served.commit or commit == self._refused:
            return False
        try:
            retriever = Retriever.load(
                self.service.index_dir, model=served.retriever.model, **self.service.reopen
            )
            _require_same_model(served.retriever, retriever)
            state = self.service.swap(retriever)
        except Exception as e:  # noqa: BLE001 - whatever it is, the old state keeps serving
            self._refused = commit
            self.last_error = " ".join(f"{type(e).__name__}: {e}".split())[:500]
            log.warning(
                "index %s: commit %s is not served (%s); still serving commit %s",
                self.service.index_dir, commit, self.last_error, served.commit,
            )  # fmt: skip
            return False
        self.last_error = None
        log.info(
            "index %s: now serving commit %s (%d images; was commit %s, %d images)",
            self.service.index_dir, state.commit, len(state.ids), served.commit,
            len(served.ids),
        )  # fmt: skip
        return True

    def start(self) -> None:
        """Starts the checking thread (nothing when `interval` <= 0)."""
        if self.interval <= 0 or self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="index-reload", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stops the checking thread (waits for a check under way)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except Exception:  # noqa: BLE001 - the thread must outlive any one check
                log.exception("index %s: the reload check failed", self.service.index_dir)


def _require_same_model(served: Retriever, new: Retriever) -> None:
    """Refuses a state whose descriptors were made otherwise than the served one's: the loaded
    model would describe queries unlike its images."""
    fields = ("image_size", "scales", "ms_power", "descriptor_meta")
    differ = [f for f in fields if getattr(served, f) != getattr(new, f)]
    if served.descriptors.shape[1:] != new.descriptors.shape[1:]:
        differ.append("dimension")
    if differ:
        raise ValueError(
            f"it was made with other settings ({', '.join(differ)} differ): restart the "
            "service to serve it"
        )
