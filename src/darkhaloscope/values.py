"""The one parser of list values on the command line: the workflow passes a config list to `dhs` as one
comma-joined argument (``rules/common.smk`` ``flag``), and every command reads it back here."""

from __future__ import annotations

import math

from darkhaloscope.errors import DHSError


def _number(v) -> float:
    return math.inf if isinstance(v, str) and v.strip().lower() in (".inf", "+.inf") else float(v)  # YAML's spelling


def parse_floats(text, name: str, count: int | None = None, allow_inf_last: bool = False) -> list[float]:
    """``'a,b,...'`` (or a sequence of numbers) -> finite floats; with ``allow_inf_last`` the last may be
    +inf (an open top bin edge); with ``count`` exactly that many. A one-line DHSError naming ``name``."""
    if isinstance(text, str):
        items = [v for v in text.split(",") if v.strip()]
    else:
        try:
            items = list(text)
        except TypeError:
            items = [text]
    try:
        values = [_number(v) for v in items]
    except (TypeError, ValueError):
        raise DHSError(f"{name} '{text}' is not a comma-separated list of numbers") from None
    if count is not None and len(values) != count:
        raise DHSError(f"{name} '{text}' is not {count} comma-separated numbers")
    body = values[:-1] if allow_inf_last and values and values[-1] == math.inf else values
    if not values or not all(math.isfinite(v) for v in body):
        raise DHSError(f"{name} '{text}' must list finite numbers")
    return values
