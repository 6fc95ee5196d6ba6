"""The values a request carries in its URL, parsed: `k`, `rerank`, a row number.

Each parser returns the value or raises `RequestError` with a one-line reason that quotes at
most `QUOTE_CHARS` characters of what was sent (a 5 KB parameter is not echoed back), and never
hands Python's `int` a digit string long enough to hit its conversion limit (4300 digits raise
ValueError, which would otherwise surface as a 500).
"""

from __future__ import annotations

import re

from cbir_tf.rerank import pipeline as rerank_pipeline
from cbir_tf.serve.service import MAX_K, RequestError

QUOTE_CHARS = 40
# Rows are int64 in the store: a row number has at most 19 digits.
MAX_ROW_DIGITS = 19
# ASCII digits with an optional sign: int() also takes '5_0' and other scripts' digits.
_INTEGER = re.compile(r"\s*[+-]?[0-9]{1,12}\s*")


def quote(value: str, limit: int = QUOTE_CHARS) -> str:
    """`value` for an error message: repr of at most `limit` characters, and its length."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} characters)"


def parse_k(value: str | None, default: int = 10, max_k: int = MAX_K) -> int:
    """The `k` query parameter: an integer in 1..max_k (RequestError 400 otherwise)."""
    if value is None or value == "":
        return default
    if not _INTEGER.fullmatch(value):
        raise RequestError(400, f"k must be an integer from 1 to {max_k}, got {quote(value)}")
    k = int(value)
    if not 1 <= k <= max_k:
        raise RequestError(400, f"k must be from 1 to {max_k}, got {k}")
    return k


def parse_rerank(value: str | None) -> str:
    """The `rerank` query parameter: a re-ranking method (RequestError 400 otherwise).

    'aqe+dba' typed into a URL unencoded arrives as 'aqe dba' (a '+' in a query string is a
    space): method names hold no spaces, so a space is read as the '+' it was.
    """
    if value is None or value == "":
        return rerank_pipeline.NONE
    name = value.replace(" ", "+")
    try:
        rerank_pipeline.check_method(name, "rerank")
    except ValueError:
        valid = ", ".join(rerank_pipeline.METHODS)
        raise RequestError(400, f"unknown rerank {quote(value)}; valid: {valid}") from None
    return name


def parse_row(value: str, what: str = "row") -> int:
    """A row number (query parameter `row`, or the path of /thumbnails/<row>).

    Raises:
      RequestError: 400 for anything but ASCII digits, or more digits than a row can have.
    """
    if not (value.isascii() and value.isdigit()) or len(value) > MAX_ROW_DIGITS:
        raise RequestError(
            400,
            f"{what} must be a row number (at most {MAX_ROW_DIGITS} digits), got {quote(value)}",
        )
    return int(value)
