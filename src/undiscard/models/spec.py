"""What both model loaders share: model-name errors, optional imports, checkpoint metadata.

:mod:`~undiscard.models.classifiers` and :mod:`~undiscard.models.segmenters` read names like
``timm:resnet50`` or a ``.safetensors`` path; the helpers here give their errors one wording.
"""

from __future__ import annotations

import difflib
from pathlib import Path

from undiscard.errors import UndiscardError, UnknownModelError

__all__ = ["META_ARCH", "META_NUM_CLASSES", "META_IN_CHANS", "META_INPUT_SIZE", "close_matches", "unknown_name",
           "is_download_error", "import_timm", "import_torchvision", "parse_input_size", "parse_int"]

#: Keys of the metadata a checkpoint written by this package carries.
META_ARCH = "undiscard.arch"
META_NUM_CLASSES = "undiscard.num_classes"
META_IN_CHANS = "undiscard.in_chans"
META_INPUT_SIZE = "undiscard.input_size"


def close_matches(name: str, names: list[str]) -> list[str]:
    matches = difflib.get_close_matches(name, names, n=5, cutoff=0.6)
    if not matches:  # fall back to substring hits, e.g. "resnet" -> resnet18, ...
        matches = [n for n in names if name.lower() in n.lower()][:5]
    return matches


def unknown_name(zoo: str, name: str, names: list[str], how_to_list: str) -> UnknownModelError:
    matches = close_matches(name, names)
    hint = f" Did you mean: {', '.join(f'{zoo}:{m}' for m in matches)}?" if matches else ""
    return UnknownModelError(f"{zoo} has no model named {name!r}.{hint} List the names with {how_to_list}.")


def is_download_error(exc: BaseException) -> bool:
    """True when ``exc`` (or what caused it) looks like a failed weight download."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, (OSError, ConnectionError, TimeoutError)):
            return True
        module = type(cur).__module__ or ""
        if module.split(".")[0] in {"huggingface_hub", "httpx", "httpx2", "httpcore", "requests", "urllib3"}:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


def import_timm():
    from undiscard.compat import ensure_torchvision

    ensure_torchvision()
    try:
        import timm
    except ImportError as exc:
        raise UndiscardError(
            f"timm is not installed ({exc}); install it with: pip install 'undiscard[zoo]'"
        ) from exc
    return timm


def import_torchvision():
    from undiscard.compat import ensure_torchvision

    ensure_torchvision()
    try:
        import torchvision
    except ImportError as exc:
        raise UndiscardError(
            f"torchvision is not installed ({exc}); install it with: pip install 'undiscard[zoo]'"
        ) from exc
    return torchvision


def parse_input_size(text: str, path: Path) -> tuple[int, int, int]:
    try:
        c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise UndiscardError(
            f"{path}: metadata {META_INPUT_SIZE}={text!r} is not 'C,H,W' (three integers, e.g. '3,224,224')"
        ) from None
    return c, h, w


def parse_int(meta: dict[str, str], key: str, path: Path) -> int | None:
    if key not in meta:
        return None
    try:
        return int(meta[key])
    except ValueError:
        raise UndiscardError(f"{path}: metadata {key}={meta[key]!r} is not an integer") from None
