"""Plain-text reports: aligned tables that need nothing but the standard library."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["table", "fmt_shape"]


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """An aligned text table with a rule under the header.

    >>> print(table(["a", "bb"], [[1, 2], [333, 4]]))
    a    bb
    ---  --
    1    2
    333  4
    """
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def fmt_shape(t: Sequence[int]) -> str:
    """``(4, 4)`` -> ``"4x4"``.

    >>> fmt_shape((7, 7))
    '7x7'
    """
    return "x".join(str(v) for v in t)
