"""Checks of what a caller passes in, at the door: the batch, its dtype, the model's mode.

One helper per question, each raising the project's own error with what was expected,
what came and what to do (kornia's ``KORNIA_CHECK_SHAPE`` idea): the classification and
segmentation wrappers and :func:`undiscard.run_states` share them.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from undiscard.errors import InputError, ModelModeError

__all__ = ["check_batch", "check_dtype", "check_eval_mode", "model_dtype"]


def check_batch(x: object, spatial_dims: int | None = None, *, what: str = "input") -> torch.Tensor:
    """``x`` if it is a batched tensor ``(N, C, *spatial)``, else :class:`InputError`.

    Args:
        x: the batch.
        spatial_dims: the number of spatial axes the model's sites have (``None``: any,
            at least one).

    Shape:
        - x: ``(N, C, *spatial)`` with ``spatial_dims`` spatial axes (``None``: at least one).
        - output: ``x`` itself.

    Example:
        >>> check_batch(torch.zeros(2, 3, 8, 8), 2).shape
        torch.Size([2, 3, 8, 8])
    """
    want = None if spatial_dims is None else spatial_dims + 2
    axes = ("N, C, H, W" if spatial_dims == 2 else "N, C, L" if spatial_dims == 1
            else "N, C, T, H, W" if spatial_dims == 3 else "N, C, *spatial")
    if not isinstance(x, torch.Tensor):
        raise InputError(f"the {what} must be a tensor ({axes}); got {type(x).__name__}")
    if (want is not None and x.dim() != want) or x.dim() < 3:
        hint = ""
        if want is not None and x.dim() == want - 1:
            hint = " It looks unbatched: add a batch axis with x.unsqueeze(0)."
        raise InputError(f"the {what} must be a batch ({axes}); got shape {tuple(x.shape)}.{hint}")
    return x


def model_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype of the model's first floating-point parameter or buffer (``None`` if it has none)."""
    for t in model.parameters():
        if t.is_floating_point():
            return t.dtype
    for t in model.buffers():
        if t.is_floating_point():
            return t.dtype
    return None


def _autocast_on(device_type: str) -> bool:
    try:
        return torch.is_autocast_enabled(device_type)
    except (TypeError, RuntimeError):  # a device type without autocast
        return False


def check_dtype(model: nn.Module, x: torch.Tensor) -> None:
    """:class:`InputError` unless ``x`` has a dtype ``model``'s own forward accepts.

    Integer and bool images are refused (they need converting and normalising); a float
    dtype other than the parameters' is refused unless autocast is on for ``x``'s device
    (where the model's own forward casts).

    Shape:
        - x: any shape (only its dtype and device are read).

    Example:
        >>> check_dtype(nn.Conv2d(1, 1, 1), torch.zeros(1, 1, 2, 2))  # accepted: returns None
        >>> check_dtype(nn.Conv2d(1, 1, 1), torch.zeros(1, 1, 2, 2, dtype=torch.uint8))
        Traceback (most recent call last):
        ...
        undiscard.errors.InputError: the input has dtype torch.uint8, but the model computes in torch.float32: ...
    """
    want = model_dtype(model)
    if not (x.is_floating_point() or x.is_complex()):
        raise InputError(
            f"the input has dtype {x.dtype}, but the model computes in {want or 'floating point'}: convert and "
            f"normalise the images first (for example x.float() / 255, then the model's mean/std)"
        )
    if want is None or x.dtype == want or _autocast_on(x.device.type):
        return
    raise InputError(
        f"the input has dtype {x.dtype}, but the model's parameters are {want}: cast the input with "
        f"x.to({want}) (or the model with model.to({x.dtype})), or run under torch.autocast"
    )


_TRAIN_SENSITIVE = (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm,
                    nn.modules.dropout._DropoutNd, nn.AlphaDropout, nn.FeatureAlphaDropout)


def _train_sensitive(m: nn.Module) -> bool:
    """Whether ``m`` computes differently in train mode: norms with running statistics,
    dropout of any kind (timm's ``DropPath`` / ``DropBlock`` included, by name)."""
    if isinstance(m, nn.modules.instancenorm._InstanceNorm):
        return bool(m.track_running_stats)
    if isinstance(m, _TRAIN_SENSITIVE):
        return True
    if "drop" in type(m).__name__.lower():
        return True
    return any(name.startswith("running_") for name, _ in m.named_buffers(recurse=False))


def check_eval_mode(model: nn.Module, *, what: str, opt_in: str | None = None) -> None:
    """:class:`ModelModeError` if a module of ``model`` that behaves differently in
    training is in train mode.

    In train mode BatchNorm normalises with the batch's statistics (so an image's answer
    depends on its batch-mates) and updates its running buffers, and dropout is random.
    Modules that compute the same in both modes (convs, pools, activations, and the
    containers around them) are not checked.
    """
    training = [name or type(model).__name__ for name, m in model.named_modules() if m.training and _train_sensitive(m)]
    if not training:
        return
    first = ", ".join(training[:3]) + (", ..." if len(training) > 3 else "")
    alt = f", or pass {opt_in} to run it in train mode on purpose" if opt_in else ""
    raise ModelModeError(
        f"{what} needs the model in eval mode, but {len(training)} of its modules that behave differently in "
        f"training are in train mode ({first}): there BatchNorm would use the batch's statistics and update its "
        f"running buffers, and dropout would be random. Call model.eval(){alt}."
    )
