"""Compatibility guard for a torchvision whose C extension does not load.

PyPI's torchvision wheels are CUDA builds. Installed next to a CPU-only torch,
their C extension (``torchvision/_C.so``) fails to load, and ``import torchvision``
(hence ``import timm``) dies with ``RuntimeError: operator torchvision::nms does not
exist``: torchvision's ``_meta_registrations.py`` registers fake kernels for
``torchvision::nms`` / ``torchvision::qnms``, which needs the operator *schemas*
that the extension would have defined.

:func:`ensure_torchvision` must run before torchvision (or timm) is imported. It
tries to load the real extension; only if that fails does it define the missing
schemas itself (schemas only, no kernels), so the import succeeds. Models and
transforms then work; torchvision's detection ops (``nms``, ``roi_align``, ...)
and image decoding stay unavailable and raise when called.

``import undiscard`` calls :func:`install_torchvision_guard`, so that ``import
undiscard, timm`` (in that order) just works: a finder on ``sys.meta_path`` runs
:func:`ensure_torchvision` the first time torchvision is looked up (``import
torchvision``, ``import timm``, ``importlib.util.find_spec("torchvision")``), lets the
regular finders import it, and stays inert from then on. Nothing is loaded at
``import undiscard`` time (no torchvision import, no extension ``dlopen``: a program
that never touches torchvision pays nothing and sees no notice), and where the real
extension loads, the guard defines nothing. Importing torchvision *before*
undiscard still fails in such an environment: call :func:`ensure_torchvision` (or
import undiscard) first.
"""

from __future__ import annotations

import glob
import importlib.abc
import importlib.util
import os
import sys
import threading
import warnings

import torch

__all__ = ["ensure_torchvision", "install_torchvision_guard", "TORCHVISION_EXTENSION_ERROR", "DEFINED_TORCHVISION_SCHEMAS"]

# Operator schemas of torchvision's C++ extension (torchvision/csrc/ops/*.cpp,
# torchvision 0.28). Every op that torchvision's Python code registers fake/meta/
# autograd kernels for, or calls through torch.ops.torchvision.
_TORCHVISION_SCHEMAS: dict[str, str] = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "roi_align": (
        "roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor"
    ),
    "_roi_align_backward": (
        "_roi_align_backward(Tensor grad, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, SymInt batch_size, SymInt channels, SymInt height, SymInt width, "
        "int sampling_ratio, bool aligned) -> Tensor"
    ),
    "ps_roi_align": (
        "ps_roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio) -> (Tensor, Tensor)"
    ),
    "_ps_roi_align_backward": (
        "_ps_roi_align_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
        "SymInt pooled_height, SymInt pooled_width, int sampling_ratio, SymInt batch_size, "
        "SymInt channels, SymInt height, SymInt width) -> Tensor"
    ),
    "roi_pool": (
        "roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width) -> (Tensor, Tensor)"
    ),
    "_roi_pool_backward": (
        "_roi_pool_backward(Tensor grad, Tensor rois, Tensor argmax, float spatial_scale, "
        "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
        "SymInt height, SymInt width) -> Tensor"
    ),
    "ps_roi_pool": (
        "ps_roi_pool(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width) -> (Tensor, Tensor)"
    ),
    "_ps_roi_pool_backward": (
        "_ps_roi_pool_backward(Tensor grad, Tensor rois, Tensor channel_mapping, float spatial_scale, "
        "SymInt pooled_height, SymInt pooled_width, SymInt batch_size, SymInt channels, "
        "SymInt height, SymInt width) -> Tensor"
    ),
    "qroi_align": (
        "qroi_align(Tensor input, Tensor rois, float input_scale, int input_zero_point, "
        "float rois_scale, int rois_zero_point, float spatial_scale, SymInt pooled_height, "
        "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor"
    ),
    "deform_conv2d": (
        "deform_conv2d(Tensor input, Tensor weight, Tensor offset, Tensor mask, Tensor bias, "
        "SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, SymInt dilation_h, "
        "SymInt dilation_w, SymInt groups, SymInt offset_groups, bool use_mask) -> Tensor"
    ),
    "_deform_conv2d_backward": (
        "_deform_conv2d_backward(Tensor grad, Tensor input, Tensor weight, Tensor offset, "
        "Tensor mask, Tensor bias, SymInt stride_h, SymInt stride_w, SymInt pad_h, SymInt pad_w, "
        "SymInt dilation_h, SymInt dilation_w, SymInt groups, SymInt offset_groups, "
        "bool use_mask) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "box_iou_rotated": "box_iou_rotated(Tensor boxes1, Tensor boxes2) -> Tensor",
}

#: Why torchvision's C extension could not be loaded (``None``: it loaded, or the
#: guard has not run, or torchvision is not installed).
TORCHVISION_EXTENSION_ERROR: str | None = None

#: Names of the ``torchvision::`` operator schemas this module defined itself
#: (empty when the real extension loaded).
DEFINED_TORCHVISION_SCHEMAS: tuple[str, ...] = ()

_lock = threading.Lock()
_running = threading.local()  # .active: this thread is inside ensure_torchvision
_done = False
_result = False
_lib: torch.library.Library | None = None  # kept alive: dropping it would undefine the schemas


def _torchvision_dir() -> str | None:
    """The installed torchvision package directory, found without importing it."""
    try:
        spec = importlib.util.find_spec("torchvision")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _find_op_schema(name: str) -> bool:
    """True when an operator ``torchvision::name`` has a schema registered."""
    try:
        return torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "") is not None
    except RuntimeError:
        return False


def ensure_torchvision() -> bool:
    """Make ``import torchvision`` (and ``import timm``) work; call before importing them.

    Returns ``True`` when torchvision is installed (and can now be imported),
    ``False`` when it is not installed. Idempotent and safe to call from several
    threads.
    """
    if sys.modules.get("torchvision") is not None:  # imported (None: its import is blocked)
        return True
    if _done:
        return _result
    with _lock:
        if _done:
            return _result
        # the find_spec("torchvision") below passes through the import-time finder, which must
        # let it through (the lock is not re-entrant, and the finder must stay on sys.meta_path)
        _running.active = True
        try:
            return _ensure_locked()
        finally:
            _running.active = False


def _ensure_locked() -> bool:
    global _done, _result, _lib, TORCHVISION_EXTENSION_ERROR, DEFINED_TORCHVISION_SCHEMAS

    pkg_dir = _torchvision_dir()
    if pkg_dir is None:
        _done, _result = True, False
        return False

    candidates = sorted(glob.glob(os.path.join(pkg_dir, "_C*.so")) + glob.glob(os.path.join(pkg_dir, "_C*.pyd")))
    error: str | None = None
    if not candidates:
        error = f"no _C extension file in {pkg_dir}"
    else:
        try:
            torch.ops.load_library(candidates[0])
        except (OSError, ImportError, RuntimeError) as exc:
            error = f"{type(exc).__name__}: {exc}"
            cause = exc.__cause__ or exc.__context__
            if cause is not None:  # e.g. "libc10_cuda.so: cannot open shared object file"
                error += f" ({type(cause).__name__}: {cause})"

    if error is not None:
        missing = [name for name in _TORCHVISION_SCHEMAS if not _find_op_schema(name)]
        if missing:
            lib = torch.library.Library("torchvision", "DEF")  # noqa: TOR901
            for name in missing:
                lib.define(_TORCHVISION_SCHEMAS[name])
            _lib = lib
        DEFINED_TORCHVISION_SCHEMAS = tuple(missing)
        TORCHVISION_EXTENSION_ERROR = error
        warnings.warn(
            "torchvision's C extension did not load "
            f"({error.splitlines()[0][:300]}); probably a CUDA torchvision next to a CPU torch. "
            "Its detection ops (nms, roi_align, ...) and image decoding are unavailable; "
            "models and transforms work.",
            RuntimeWarning,
            stacklevel=3,
        )
    _done, _result = True, True
    return True


class _TorchvisionGuardFinder(importlib.abc.MetaPathFinder):
    """Runs :func:`ensure_torchvision` just before torchvision is first looked up.

    It finds nothing itself (``find_spec`` returns ``None``), so the regular finders import
    torchvision. Once the guard has run it stays inert on ``sys.meta_path`` (one string
    comparison per import): removing itself, from inside ``find_spec`` or from the guard it
    calls, would make importlib, which iterates the live list, skip the next finder. The
    guard's own ``find_spec("torchvision")`` comes back here and is let through (``_running``).
    Errors of the guard propagate: they are never swallowed.
    """

    def find_spec(self, fullname, path=None, target=None):  # noqa: D102 - importlib protocol
        if fullname == "torchvision" and not _done and not getattr(_running, "active", False):
            ensure_torchvision()
        return None


_finder: _TorchvisionGuardFinder | None = None


def install_torchvision_guard() -> None:
    """Arrange for :func:`ensure_torchvision` to run before torchvision is first imported.

    Cheap (no import, no library load); idempotent; a no-op when torchvision is already
    imported or the guard has already run. Called by ``import undiscard``.
    """
    global _finder
    with _lock:
        if _done or _finder is not None or "torchvision" in sys.modules:
            return
        _finder = _TorchvisionGuardFinder()
        sys.meta_path.insert(0, _finder)  # before the path finders that would import torchvision
