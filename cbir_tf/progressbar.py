"""Progress: a tqdm bar on a terminal, a plain line every few seconds in a log file or a pipe.

A tqdm bar redraws itself with carriage returns. Written to a file or a pipe (a job's log,
`| tee run.log`), every redraw stays: a 1720-image extraction left ~1,200 of them joined by
`\\r` on one line of its log. `progress_bar` gives tqdm's bar where it is drawn (a terminal, a
notebook) and elsewhere a `LineProgress`, which takes the same calls and prints

    descriptors -> index/pending: 640/1720 images (37%), 21.3 images/s, 0:30 elapsed, ETA 0:51

as a line of its own every `INTERVAL_S` seconds, and once more when it closes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

__all__ = ["INTERVAL_S", "LineProgress", "progress_bar"]

INTERVAL_S = 5.0  # seconds between two progress lines in a file or a pipe


def progress_bar(
    iterable: Iterable[Any] | None = None,
    *,
    disable: bool = False,
    file: TextIO | None = None,
    interval: float = INTERVAL_S,
    **kwargs: Any,
) -> Any:
    """A progress bar over `iterable` (or updated by hand), drawn only where it can be.

    Args:
      iterable: items to yield while counting them (None: call `update(n)`).
      disable: show nothing (the bar's calls still work).
      file: where to write (default sys.stderr).
      interval: seconds between two lines when `file` is not a terminal.
      **kwargs: tqdm's: total, initial, desc, unit, unit_scale, unit_divisor, leave, ...

    Returns:
      A `tqdm.auto.tqdm` on a terminal or in a notebook, else a `LineProgress`.
    """
    from tqdm.auto import tqdm

    stream = sys.stderr if file is None else file
    if disable or _draws_bars(stream):
        return tqdm(iterable, disable=disable, file=file, **kwargs)
    return LineProgress(iterable, file=stream, interval=interval, **kwargs)


def _draws_bars(stream: Any) -> bool:
    """Whether a bar redrawn in place shows as a bar: a terminal, or a Jupyter notebook."""
    if "ipykernel" in sys.modules:
        return True
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class LineProgress:
    """tqdm's calls (update, set_postfix, close, iteration, `with`), as plain timed lines.

    Args:
      iterable: items to yield while counting them.
      file: the stream the lines go to.
      interval: seconds between two lines.
      total, initial, desc, unit, unit_scale, unit_divisor: as tqdm's.
      **ignored: tqdm's display options (leave, smoothing, dynamic_ncols, ...).
    """

    def __init__(
        self,
        iterable: Iterable[Any] | None = None,
        *,
        file: TextIO,
        interval: float = INTERVAL_S,
        total: float | None = None,
        initial: float = 0,
        desc: str = "",
        unit: str = "it",
        unit_scale: bool = False,
        unit_divisor: int = 1000,
        **ignored: Any,
    ):
        self.iterable = iterable
        self.file = file
        self.interval = float(interval)
        self.total = total if total is not None or iterable is None else _length(iterable)
        self.n = self.initial = initial
        self.desc, self.unit = desc, unit
        self.unit_scale, self.unit_divisor = unit_scale, unit_divisor
        self.postfix: dict[str, Any] = {}
        self.start = self.last = time.monotonic()
        self.closed = False
        self._shown: float | None = None  # the count the last line showed

    def __iter__(self) -> Iterator[Any]:
        try:
            for item in self.iterable:
                yield item
                self.update(1)
        finally:
            self.close()

    def __enter__(self) -> LineProgress:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def update(self, n: float = 1) -> None:
        """Counts `n` more; prints a line when `interval` seconds passed since the last."""
        self.n += n
        now = time.monotonic()
        if now - self.last >= self.interval:
            self.last = now
            self._print(now)

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True,
                    **kwargs: Any) -> None:  # fmt: skip
        """Values shown after the counts, e.g. skipped=3."""
        self.postfix.update(ordered_dict or {}, **kwargs)

    def close(self) -> None:
        """Prints the final line (once; not again when the last line showed the same count)."""
        if not self.closed:
            self.closed = True
            if self._shown != self.n:
                self._print(time.monotonic())

    def line(self, now: float | None = None) -> str:
        """The progress as one line: 'desc: n/total unit (p%), rate, elapsed, ETA'."""
        elapsed = (time.monotonic() if now is None else now) - self.start
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else 0.0
        count = self._amount(self.n)
        if self.total:
            count += f"/{self._amount(self.total)} {self.unit} ({100 * self.n / self.total:.0f}%)"
        else:
            count += f" {self.unit}"
        parts = [count, f"{self._amount(rate)} {self.unit}/s", f"{_clock(elapsed)} elapsed"]
        if self.total and rate > 0 and self.n < self.total:
            parts.append(f"ETA {_clock((self.total - self.n) / rate)}")
        parts += [f"{k}={v}" for k, v in self.postfix.items()]
        return (f"{self.desc}: " if self.desc else "") + ", ".join(parts)

    def _print(self, now: float) -> None:
        self._shown = self.n
        try:
            self.file.write(self.line(now) + "\n")
            self.file.flush()
        except (OSError, ValueError):  # a closed or broken stream: progress is not worth a crash
            pass

    def _amount(self, value: float) -> str:
        if self.unit_scale:
            for prefix in ("", "k", "M", "G", "T"):
                if abs(value) < self.unit_divisor or prefix == "T":
                    return f"{value:.1f}{prefix}" if prefix else f"{value:.0f}"
                value /= self.unit_divisor
        return (
            f"{value:.2f}"
            if isinstance(value, float) and not value.is_integer()
            else f"{value:.0f}"
        )


def _length(iterable: Iterable[Any]) -> int | None:
    try:
        return len(iterable)  # type: ignore[arg-type]
    except TypeError:
        return None


def _clock(seconds: float) -> str:
    """'0:51', '1:02:03'."""
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
