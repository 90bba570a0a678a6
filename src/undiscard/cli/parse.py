"""Option values of the command line: what the text after a flag means, and the outputs a command may write."""

from __future__ import annotations

from undiscard.errors import UndiscardError

__all__ = ["parse_searchable", "csv", "parse_size", "check_outputs"]


def parse_searchable(text: str):
    if text in ("inner", "main", "all"):
        return text
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UndiscardError(f"--searchable takes 'inner', 'main', 'all' or site indices like 1,2,3; got {text!r}") from None


def check_outputs(*items) -> None:
    """Refuse, before any computation, an output that cannot be written: ``(flag, path[, folder])`` items."""
    from undiscard.statefile import check_output_path

    for flag, path, *folder in items:
        check_output_path(path, flag, folder=bool(folder and folder[0]))


def csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def parse_size(text: str) -> list[int]:
    """``--size``: ``"512"`` -> ``[512, 512]``, ``"512,1024"`` -> ``[512, 1024]`` (height, width)."""
    parts = [v.strip() for v in str(text).split(",")]
    try:
        vals = [int(v) for v in parts]
    except ValueError:
        vals = []
    if len(vals) not in (1, 2) or min(vals) < 1:
        raise UndiscardError(f"--size takes H or H,W (positive pixel counts, e.g. 512 or 512,1024); got {text!r}")
    return vals * 2 if len(vals) == 1 else vals
