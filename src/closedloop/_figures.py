"""Two small definitions behind the report's figures, shared by the store (which computes them
in SQL or in Python) and the learning layer (which presents them): failure-message groups and
nearest-rank percentiles."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from closedloop._errors import ConfigError

MAX_GROUP_CHARS = 500
"""A message group longer than this is cut (and ends with "…")."""
# A token (between spaces and punctuation) holding a digit: an id, a size, a count, a version.
# Matched only from a token's start, possessively, so each token is scanned once.
_VARIABLE = re.compile(r"""(?<![^\s,;:()\[\]{}'"=<>])[^\s,;:()\[\]{}'"=<>\d]*+\d"""
                       r"""[^\s,;:()\[\]{}'"=<>]*+""")


def message_group(message: str) -> str:
    """The group of a failure message: tokens holding a digit become ``<*>``.

    Whitespace is collapsed and the result capped, so messages that differ only in ids,
    instance types, sizes or line numbers fall in one group.
    """
    grouped = " ".join(_VARIABLE.sub("<*>", message).split())
    return grouped if len(grouped) <= MAX_GROUP_CHARS else grouped[:MAX_GROUP_CHARS] + "…"


def percentile(sorted_values: Sequence[float], p: float) -> float | None:
    """The nearest-rank ``p``-th percentile (0 < p ≤ 100) of already sorted values.

    The smallest value with at least ``p`` % of the values at or below it: the value at
    1-based rank :func:`nearest_rank` ``(p, n)``. ``None`` for no values.
    """
    if not 0 < p <= 100:
        raise ConfigError(f"percentile must be in (0, 100], got {p!r}")
    if not sorted_values:
        return None
    return float(sorted_values[nearest_rank(p, len(sorted_values)) - 1])


def nearest_rank(p: float, n: int) -> int:
    """The 1-based rank of the nearest-rank ``p``-th percentile among ``n`` > 0 values."""
    return max(math.ceil(p / 100.0 * n), 1)
