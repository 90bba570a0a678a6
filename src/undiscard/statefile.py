"""Files undiscard writes for itself, in formats that cannot carry code.

Resume state, caches and training checkpoints (an evaluation's ``OUT.partial.safetensors``,
the aggregator's feature cache, the trainers' ``OUT.resume.safetensors``) are nested
dicts / lists of JSON values and tensors. :func:`save_state` writes one as a safetensors
file: the tensors as its tensors, the rest as JSON in its metadata (tensors replaced by
references). :func:`load_state` reads it back exactly (tuples, non-string dict keys,
``inf`` / ``nan`` floats and shared tensors included). Nothing is unpickled: a file that
is a pickle (what ``torch.save`` writes, such as a ``.pt`` state file) is
refused with a message naming it, never loaded.

:func:`check_output_path` tells, before any computation, whether a path can be written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from undiscard.errors import FileTrustError, UndiscardError

__all__ = ["check_output_path", "load_state", "looks_like_pickle", "save_state", "save_safetensors_atomic", "write_json_atomic",
           "write_text_atomic"]

_META_FORMAT = "undiscard.format"
_META_STATE = "undiscard.state"


# ---------------------------------------------------------------- encoding


class _Tensors:
    """The tensors of a state being written: each stored once, none sharing memory with another."""

    def __init__(self) -> None:
        self.tensors: dict[str, torch.Tensor] = {}
        self._names: dict[tuple, str] = {}
        self._storages: set[int] = set()

    def add(self, t: torch.Tensor) -> str:
        t = t.detach().cpu()
        if not t.numel():
            name = f"t{len(self.tensors)}"
            self.tensors[name] = t.contiguous()
            return name
        ptr = t.untyped_storage().data_ptr()
        key = (ptr, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in self._names:  # the same tensor twice (tied weights): stored once
            return self._names[key]
        # safetensors refuses tensors that share memory, and a view stores its storage's bytes
        if ptr in self._storages or not t.is_contiguous() or t.storage_offset() or \
                t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.contiguous().clone()
        name = f"t{len(self.tensors)}"
        self.tensors[name] = t
        self._names[key] = name
        self._storages.add(t.untyped_storage().data_ptr())
        return name


def _encode(obj: Any, store: _Tensors) -> Any:
    if isinstance(obj, torch.Tensor):
        return {"__tensor__": store.add(obj)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, store) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, store) for v in obj]
    if isinstance(obj, dict):
        plain = all(isinstance(k, str) for k in obj) and not any(k.startswith("__") and k.endswith("__") for k in obj)
        if plain:
            return {k: _encode(v, store) for k, v in obj.items()}
        for k in obj:
            if not (k is None or isinstance(k, (bool, int, float, str))):
                raise TypeError(f"cannot store a dict key of type {type(k).__name__}")  # internal: a caller bug
        return {"__items__": [[k, _encode(v, store)] for k, v in obj.items()]}
    raise TypeError(f"cannot store a {type(obj).__name__} in a state file (tensors and JSON values only)")  # internal


def _decode(obj: Any, get) -> Any:
    if isinstance(obj, list):
        return [_decode(v, get) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return get(obj["__tensor__"])
        if "__tuple__" in obj:
            return tuple(_decode(v, get) for v in obj["__tuple__"])
        if "__items__" in obj:
            return {k: _decode(v, get) for k, v in obj["__items__"]}
        return {k: _decode(v, get) for k, v in obj.items()}
    return obj


# ---------------------------------------------------------------- files


def _safetensors():
    """``(safe_open, save_file)``; a clear error when safetensors is missing."""
    try:
        from safetensors import safe_open
        from safetensors.torch import save_file
    except ImportError as exc:
        raise UndiscardError(f"saved state (resume files, caches) is stored as safetensors, which is not installed "
                             f"({exc}); install it with: pip install 'undiscard[zoo]' (or pip install safetensors)") from exc
    return safe_open, save_file


def looks_like_pickle(path: str | os.PathLike) -> bool:
    """True when ``path`` starts like a pickle or a ``torch.save`` zip archive (never loaded here)."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    # a safetensors file: an 8-byte little-endian header length, then the JSON header ('{')
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") <= size - 8:
        return False
    return (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")) or head[:4] == b"PK\x03\x04"


def write_text_atomic(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` to ``path`` through a ``.tmp`` file and ``os.replace``: a reader (or an
    interrupted run) never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json_atomic(obj: Any, path: str | os.PathLike, indent: int = 2) -> Path:
    """:func:`write_text_atomic` of ``obj`` as JSON, with a final newline."""
    return write_text_atomic(json.dumps(obj, indent=indent) + "\n", path)


def save_safetensors_atomic(tensors: dict, path: str | os.PathLike, metadata: dict[str, str],
                            tmp_name: str | None = None) -> Path:
    """``safetensors.torch.save_file`` through a temporary file (``tmp_name`` beside ``path``, default
    ``NAME.tmp``) and ``os.replace``."""
    _, save_file = _safetensors()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(tmp_name or path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return path


def save_state(obj: dict, path: str | os.PathLike, kind: str) -> Path:
    """Write ``obj`` (tensors and JSON values) to ``path`` atomically (a ``.tmp`` file, then ``os.replace``).

    ``kind`` names what the file holds (e.g. ``"undiscard.eval-partial/3"``);
    :func:`load_state` refuses a file of another kind.
    """
    store = _Tensors()
    state = _encode(obj, store)
    meta = {_META_FORMAT: kind, _META_STATE: json.dumps(state, allow_nan=True)}
    return save_safetensors_atomic(store.tensors, path, meta)


def load_state(path: str | os.PathLike, kind: str, *, what: str = "saved state", hint: str = "") -> dict:
    """The state :func:`save_state` wrote to ``path`` as ``kind``.

    Raises :class:`FileTrustError` for a pickle (it is not loaded) and
    :class:`UndiscardError` for any other file that is not such a state, each naming
    ``path``, ``what`` it should be and ending with ``hint`` (what to do instead).
    """
    safe_open, _ = _safetensors()
    path = Path(path)
    tail = f"; {hint}" if hint else ""
    if looks_like_pickle(path):
        raise FileTrustError(
            f"{path}: {what} in a pickle format (what torch.save writes), which is never "
            f"loaded: unpickling can run code{tail}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            if meta.get(_META_FORMAT) != kind:
                found = meta.get(_META_FORMAT)
                raise UndiscardError(f"{path}: not {what} of this version of undiscard (format "
                                     f"{found!r}, expected {kind!r}){tail}")
            state = json.loads(meta[_META_STATE])
            names = set(f.keys())

            def get(name: str) -> torch.Tensor:
                if name not in names:
                    raise UndiscardError(f"{path}: {what} refers to a tensor {name!r} it does not hold{tail}")
                return f.get_tensor(name)

            return _decode(state, get)
    except UndiscardError:
        raise
    except Exception as exc:  # a torn or foreign file: atomic writes do not leave one, but a copy can
        raise UndiscardError(f"{path}: unreadable {what} ({type(exc).__name__}: {exc}){tail}") from exc


# ---------------------------------------------------------------- output paths


def check_output_path(path: str | os.PathLike | None, flag: str, *, folder: bool = False) -> None:
    """Raise :class:`UndiscardError` (one line) when ``path`` cannot be written.

    Checked without writing anything: no component of the path above it may be a file,
    the nearest existing folder must be writable, and ``path`` itself must not be a
    folder (``folder=True``: it must not be a file). ``flag`` names the option in the
    message (e.g. ``"--json"``).
    """
    if path is None or str(path) == "":
        return
    p = Path(os.path.expanduser(str(path)))
    head = f"{flag} {path}: cannot write there"
    if p.exists():
        if folder and not p.is_dir():
            raise UndiscardError(f"{head}: it is a file, not a folder")
        if not folder and p.is_dir():
            raise UndiscardError(f"{head}: it is a folder; name a file")
        if not folder and not os.access(p, os.W_OK):
            raise UndiscardError(f"{head}: the file is not writable (permission denied)")
        if folder and not os.access(p, os.W_OK | os.X_OK):
            raise UndiscardError(f"{head}: the folder is not writable (permission denied)")
    parent = p if folder and p.exists() else p.parent
    cur = parent.absolute()
    while not cur.exists():
        if cur.is_symlink():  # a dangling link
            raise UndiscardError(f"{head}: {cur} is a broken symbolic link")
        cur = cur.parent
    if not cur.is_dir():
        raise UndiscardError(f"{head}: {cur} is a file, not a folder")
    if not os.access(cur, os.W_OK | os.X_OK):
        raise UndiscardError(f"{head}: the folder {cur} is not writable (permission denied)")
