"""Image-space test-time augmentations that know their inverse (docs/tta.md).

An :class:`ImageTransform` maps a *normalised* image batch ``x (N, C, H, W)`` (what
the model eats) to one view ``(N, C, H', W')``. Dense transforms also move a dense
map ``d (N, K, H, W)`` the same way (:meth:`~ImageTransform.augment_dense`) and
bring a view's map ``(N, K, H', W')`` back to the input grid
(:meth:`~ImageTransform.deaugment`), with a boolean mask of the pixels the view
covers; that is what dense (segmentation) TTA averages over
(:func:`deaugment_mean`). Modelled on ``ttach.transforms``.

Transforms (each has a stable, unique ``name`` that :func:`transform_from_name`
turns back into the transform):

======================  =======================  =====  =====
class                   name                     dense  exact
======================  =======================  =====  =====
:class:`Identity`       ``identity``             yes    yes
:class:`HFlip`          ``hflip``                yes    yes
:class:`VFlip`          ``vflip``                yes    yes
:class:`Crop`           ``crop:tl:0.875``,       yes    yes
                        ``crop:3,4:24x24``
:class:`Translate`      ``translate:+4,-4``      yes    yes
:class:`Scale`          ``scale:1.25``           yes    no
:class:`Rotate`         ``rotate:+9``            no     --
:class:`ShearX`         ``shear_x:-0.09``        no     --
:class:`ShearY`         ``shear_y:+0.09``        no     --
:class:`Brightness`     ``brightness:+0.27``     yes    yes
:class:`Contrast`       ``contrast:-0.27``       yes    yes
:class:`Sharpness`      ``sharpness:+0.27``      yes    yes
:class:`Solarize`       ``solarize:0.7``         yes    yes
:class:`Posterize`      ``posterize:7``          yes    yes
:class:`AutoContrast`   ``autocontrast``         yes    yes
:class:`Equalize`       ``equalize``             yes    yes
:class:`Chain`          ``crop:tl:0.875>hflip``  all    all
======================  =======================  =====  =====

Conventions:

* ``exact`` means ``deaugment(augment_dense(d), size)`` equals ``d`` bit for bit on
  the returned mask. Photometric ops do not move pixels, so they are dense and exact
  (their dense op is the identity), as in ttach.
* Fill: pixels a view has no source for (translations, rotations, shears) are 0 in
  normalised space, i.e. the dataset's mean colour.
* Photometric ops need the normalisation (``mean``, ``std`` per channel): they
  de-normalise to [0, 1], clamp, apply the torchvision v2 op and re-normalise. At
  magnitude 0 (factor 1, 8 bits, threshold 1) they return their input unchanged.
* Geometric RandAugment ops (rotate, shear) act directly on the normalised image,
  bilinear, about the image centre (RandAugment shears about the top-left corner; a
  test-time view should keep the object in view). RandAugment's translations are
  integer :class:`Translate` views, which are dense and exact.
* Parameters are kept to 6 significant digits, so a name rebuilds the same transform.

Policies (lists with the identity first): :func:`flips`, :func:`five_crops`,
:func:`ten_crops`, :func:`scales`, :func:`augmentation_pool`, and
:func:`policy_by_name`. The RandAugment magnitude ranges (Cubuk et al. 2020, as in
``torchvision.transforms.v2.RandAugment``) are in :data:`RANDAUGMENT_RANGES`.

Example:
    >>> import torch
    >>> from undiscard.tta.transforms import HFlip, Crop
    >>> x = torch.randn(2, 3, 8, 8)
    >>> crop = Crop(1, 2, 4, 5)
    >>> crop.augment(x).shape
    torch.Size([2, 3, 4, 5])
    >>> d, mask = crop.deaugment(crop.augment_dense(x), (8, 8))
    >>> bool((d[mask.expand_as(d)] == x[mask.expand_as(x)]).all())
    True
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from undiscard.errors import InputError, UndiscardError

__all__ = [
    "ImageTransform",
    "Identity",
    "HFlip",
    "VFlip",
    "Crop",
    "Translate",
    "Scale",
    "Rotate",
    "ShearX",
    "ShearY",
    "Brightness",
    "Contrast",
    "Sharpness",
    "Solarize",
    "Posterize",
    "AutoContrast",
    "Equalize",
    "Chain",
    "RANDAUGMENT_OPS",
    "RANDAUGMENT_RANGES",
    "POLICIES",
    "CROP_POSITIONS",
    "randaugment_op",
    "flips",
    "five_crops",
    "ten_crops",
    "scales",
    "augmentation_pool",
    "policy_by_name",
    "transform_from_name",
    "transforms_by_names",
    "deaugment_mean",
]

#: The RandAugment ops of :func:`randaugment_op`, in pool order.
RANDAUGMENT_OPS: tuple[str, ...] = (
    "rotate",
    "translate_x",
    "translate_y",
    "shear_x",
    "shear_y",
    "brightness",
    "contrast",
    "sharpness",
    "solarize",
    "posterize",
    "autocontrast",
    "equalize",
)

#: Value at magnitude 10 (magnitude ``m`` in 0..10 gives ``m / 10`` of it) and whether
#: the op is signed. Translations are a fraction of the image side (150/331), rotate
#: is in degrees, shears are the shear factor, brightness/contrast/sharpness the
#: change of the enhancement factor (``1 + v``). Solarize's threshold is
#: ``1 - m / 10``, posterize keeps ``8 - round(4 m / 10)`` bits; autocontrast and
#: equalize take no magnitude.
RANDAUGMENT_RANGES: dict[str, tuple[float | None, bool]] = {
    "rotate": (30.0, True),
    "translate_x": (150.0 / 331.0, True),
    "translate_y": (150.0 / 331.0, True),
    "shear_x": (0.3, True),
    "shear_y": (0.3, True),
    "brightness": (0.9, True),
    "contrast": (0.9, True),
    "sharpness": (0.9, True),
    "solarize": (1.0, False),
    "posterize": (4.0, False),
    "autocontrast": (None, False),
    "equalize": (None, False),
}

#: Names accepted by :func:`policy_by_name`.
POLICIES: tuple[str, ...] = ("flips", "five_crops", "ten_crops", "scales", "pool")

#: Corner/centre crop positions of :meth:`Crop.at` (top-left, top-right, bottom-left,
#: bottom-right, centre).
CROP_POSITIONS: tuple[str, ...] = ("tl", "tr", "bl", "br", "c")

_NAME_FORMS = (
    "identity, hflip, vflip, crop:<tl|tr|bl|br|c>:<ratio>, crop:<top>,<left>:<h>x<w>, "
    "translate:<+dy>,<+dx>, scale:<factor>, rotate:<+deg>, shear_x:<+s>, shear_y:<+s>, "
    "brightness:<+v>, contrast:<+v>, sharpness:<+v>, solarize:<threshold>, posterize:<bits>, "
    "autocontrast, equalize, and chains of these joined by '>' (applied left to right)"
)


# ----------------------------------------------------------------- helpers

def _num(v: float) -> float:
    """``v`` kept to 6 significant digits, so that its name rebuilds the same value."""
    return float(f"{float(v):.6g}")


def _fmt(v: float, signed: bool) -> str:
    return f"{v:+g}" if signed else f"{v:g}"


def _check_size(size: Sequence[int], what: str = "size") -> tuple[int, int]:
    try:
        h, w = (int(s) for s in size)
    except (TypeError, ValueError):
        raise InputError(f"{what} must be (H, W), two positive ints; got {size!r}") from None
    if h < 1 or w < 1:
        raise InputError(f"{what} must be (H, W), two positive ints; got {tuple(size)}")
    return h, w


def _check_4d(t: torch.Tensor, what: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise InputError(f"{what} must be a 4-d tensor (N, C, H, W); got {shape}")


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _full_mask(d: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return torch.ones(1, 1, *size, dtype=torch.bool, device=d.device)


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """``out[..., i, j] = x[..., i - dy, j - dx]``, 0 where that is outside ``x``."""
    h, w = x.shape[-2:]
    out = torch.zeros_like(x)
    if abs(dy) >= h or abs(dx) >= w:
        return out
    src_y = slice(max(0, -dy), h - max(0, dy))
    dst_y = slice(max(0, dy), h - max(0, -dy))
    src_x = slice(max(0, -dx), w - max(0, dx))
    dst_x = slice(max(0, dx), w - max(0, -dx))
    out[..., dst_y, dst_x] = x[..., src_y, src_x]
    return out


def _tvf():
    """``torchvision.transforms.v2.functional``, imported behind the compat guard."""
    from undiscard import compat

    if not compat.ensure_torchvision():
        raise UndiscardError("this transform needs torchvision; pip install torchvision")
    from torchvision.transforms.v2 import functional as tvf

    return tvf


# ------------------------------------------------------------------ base

class ImageTransform:
    """One test-time view of an image batch, with its inverse on dense maps.

    Subclasses set ``name`` (unique, stable: :func:`transform_from_name` rebuilds the
    transform from it), ``exact`` and ``dense``, and override :meth:`_augment`, and
    for geometric ones :meth:`out_size`, :meth:`_augment_dense`, :meth:`_deaugment`.
    The defaults here are those of a transform that moves no pixel.
    """

    name: str = ""
    exact: bool = True
    dense: bool = True

    # -- geometry
    def out_size(self, size: tuple[int, int]) -> tuple[int, int]:
        """``(H', W')`` of the view of an ``(H, W)`` image (raises InputError if impossible)."""
        return _check_size(size)

    # -- public API (checks at the door, then the subclass op)
    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """The view of a normalised image batch: ``(N, C, H, W) -> (N, C, H', W')``."""
        _check_4d(x, f"{self.name}: the image batch")
        self.out_size(tuple(x.shape[-2:]))
        return self._augment(x)

    def augment_dense(self, d: torch.Tensor) -> torch.Tensor:
        """The same geometric op on a dense map, no photometric change: ``(N, K, H, W) -> (N, K, H', W')``."""
        self._require_dense()
        _check_4d(d, f"{self.name}: the dense map")
        self.out_size(tuple(d.shape[-2:]))
        return self._augment_dense(d)

    def deaugment(self, d: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """A view's dense map back on the input grid.

        Args:
            d: ``(N, K, H', W')``, a map on this view's grid.
            size: ``(H, W)`` of the un-augmented image.

        Returns:
            ``(N, K, H, W)`` map (0 where the view does not cover the image) and a
            ``(1, 1, H, W)`` bool mask of the covered pixels.
        """
        self._require_dense()
        size = _check_size(size)
        _check_4d(d, f"{self.name}: the dense map")
        want = self.out_size(size)
        if tuple(d.shape[-2:]) != want:
            raise InputError(
                f"{self.name}: a view of a {size[0]}x{size[1]} image is {want[0]}x{want[1]}, "
                f"but the map to de-augment is {d.shape[-2]}x{d.shape[-1]} (shape {tuple(d.shape)})"
            )
        return self._deaugment(d, size)

    # -- defaults: no pixel moves
    def _augment(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def _augment_dense(self, d: torch.Tensor) -> torch.Tensor:
        return d

    def _deaugment(self, d: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        return d, _full_mask(d, size)

    def _require_dense(self) -> None:
        if not self.dense:
            raise UndiscardError(
                f"{self.name!r} is not a dense transform (it has no inverse on dense maps); "
                "for dense TTA use flips, crops, translations, scales or photometric ops"
            )

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ImageTransform) and type(other) is type(self) and other.name == self.name

    def __hash__(self) -> int:
        return hash((type(self).__name__, self.name))


class Identity(ImageTransform):
    """The un-augmented image."""

    name = "identity"


class HFlip(ImageTransform):
    """Horizontal flip (mirror the width axis); its own inverse."""

    name = "hflip"

    def _augment(self, x):
        return x.flip(-1)

    _augment_dense = _augment

    def _deaugment(self, d, size):
        return d.flip(-1), _full_mask(d, size)


class VFlip(ImageTransform):
    """Vertical flip (mirror the height axis); its own inverse."""

    name = "vflip"

    def _augment(self, x):
        return x.flip(-2)

    _augment_dense = _augment

    def _deaugment(self, d, size):
        return d.flip(-2), _full_mask(d, size)


class Crop(ImageTransform):
    """The window ``[top, top + h) x [left, left + w)``, not resized (the model sees ``h x w``).

    De-augmenting pads the map back to ``(H, W)`` with 0 and a False mask outside the
    window. Use :meth:`Crop.at` for the named corner/centre crops of a fixed image size.

    Args:
        top, left: offsets of the window, ints >= 0.
        h, w: window size, ints >= 1. The window must lie inside the image (checked
            when an image comes).
    """

    def __init__(self, top: int, left: int, h: int, w: int, *, _name: str | None = None,
                 _size_hw: tuple[int, int] | None = None) -> None:
        if not all(_is_int(v) for v in (top, left, h, w)) or top < 0 or left < 0 or h < 1 or w < 1:
            raise InputError(
                f"Crop(top, left, h, w) takes ints with top, left >= 0 and h, w >= 1; got {(top, left, h, w)}"
            )
        self.top, self.left, self.h, self.w = top, left, h, w
        self.size_hw = _size_hw
        self.name = _name or f"crop:{top},{left}:{h}x{w}"

    @classmethod
    def at(cls, position: str, ratio: float, size_hw: tuple[int, int]) -> "Crop":
        """The ``position`` crop (one of :data:`CROP_POSITIONS`) of side ``floor(ratio * side)``.

        Named ``crop:<position>:<ratio>``; it only accepts ``size_hw`` images.
        """
        H, W = _check_size(size_hw, "size_hw")
        if position not in CROP_POSITIONS:
            raise InputError(f"crop position must be one of {CROP_POSITIONS}; got {position!r}")
        try:
            ratio = _num(ratio)
        except (TypeError, ValueError):
            raise InputError(f"crop ratio must be a number in (0, 1]; got {ratio!r}") from None
        if not 0 < ratio <= 1:
            raise InputError(f"crop ratio must be in (0, 1]; got {ratio}")
        h, w = max(1, math.floor(H * ratio)), max(1, math.floor(W * ratio))
        top = {"t": 0, "b": H - h, "c": (H - h) // 2}[position[0]]
        left = {"l": 0, "r": W - w, "c": (W - w) // 2}[position[-1]]
        return cls(top, left, h, w, _name=f"crop:{position}:{ratio:g}", _size_hw=(H, W))

    def out_size(self, size):
        H, W = _check_size(size)
        if self.size_hw is not None and (H, W) != self.size_hw:
            raise InputError(
                f"{self.name} was built for {self.size_hw[0]}x{self.size_hw[1]} images; got {H}x{W}: "
                "build the policy with this image size"
            )
        if self.top + self.h > H or self.left + self.w > W:
            raise InputError(
                f"{self.name}: rows {self.top}..{self.top + self.h - 1}, columns {self.left}..{self.left + self.w - 1} "
                f"lie outside a {H}x{W} image"
            )
        return self.h, self.w

    def _augment(self, x):
        return x[..., self.top : self.top + self.h, self.left : self.left + self.w]

    _augment_dense = _augment

    def _deaugment(self, d, size):
        out = d.new_zeros(*d.shape[:-2], *size)
        mask = torch.zeros(1, 1, *size, dtype=torch.bool, device=d.device)
        win = (..., slice(self.top, self.top + self.h), slice(self.left, self.left + self.w))
        out[win] = d
        mask[win] = True
        return out, mask


class Translate(ImageTransform):
    """Integer shift: the content moves ``dy`` pixels down and ``dx`` right (negative: up/left).

    Pixels shifted in from outside are 0 (the mean colour in normalised space); the
    de-augmented mask is False on the rows/columns the view lost. Named
    ``translate:<+dy>,<+dx>``.
    """

    def __init__(self, dy: int, dx: int) -> None:
        if not (_is_int(dy) and _is_int(dx)):
            raise InputError(f"Translate(dy, dx) takes integer pixel shifts; got {(dy, dx)!r}")
        self.dy, self.dx = dy, dx
        self.name = f"translate:{dy:+d},{dx:+d}"

    def out_size(self, size):
        H, W = _check_size(size)
        if abs(self.dy) >= H or abs(self.dx) >= W:
            raise InputError(f"{self.name} shifts a {H}x{W} image entirely out of view; use |dy| < H and |dx| < W")
        return H, W

    def _augment(self, x):
        return _shift(x, self.dy, self.dx)

    _augment_dense = _augment

    def _deaugment(self, d, size):
        mask = _shift(torch.ones(1, 1, *size, dtype=torch.bool, device=d.device), -self.dy, -self.dx)
        return _shift(d, -self.dy, -self.dx), mask


class Scale(ImageTransform):
    """Resize by ``factor`` to ``(floor(H f + 1/2), floor(W f + 1/2))``, bilinear, antialiased.

    The dense op is the same resize, and de-augmenting resizes back (bilinear,
    antialiased; mask all True). Not exact: a resize there and back smooths the map
    (on a smooth map the round trip is within a few 1e-3 of its range; see the tests).
    Named ``scale:<factor>``.
    """

    exact = False

    def __init__(self, factor: float) -> None:
        try:
            factor = _num(factor)
        except (TypeError, ValueError):
            raise InputError(f"Scale(factor) takes a positive number; got {factor!r}") from None
        if not factor > 0 or not math.isfinite(factor):
            raise InputError(f"Scale(factor) takes a positive number; got {factor}")
        self.factor = factor
        self.name = f"scale:{factor:g}"

    def out_size(self, size):
        H, W = _check_size(size)
        return max(1, math.floor(H * self.factor + 0.5)), max(1, math.floor(W * self.factor + 0.5))

    @staticmethod
    def _resize(t: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        if tuple(t.shape[-2:]) == tuple(size):
            return t
        return F.interpolate(t, size=size, mode="bilinear", align_corners=False, antialias=True)

    def _augment(self, x):
        return self._resize(x, self.out_size(tuple(x.shape[-2:])))

    _augment_dense = _augment

    def _deaugment(self, d, size):
        return self._resize(d, size), _full_mask(d, size)


# ------------------------------------------------- non-dense geometric ops

class _Affine(ImageTransform):
    """A bilinear affine warp about the image centre, fill 0 (the mean colour); not dense."""

    dense = False
    exact = False

    def _affine_args(self) -> dict:
        raise NotImplementedError

    def _augment(self, x):
        if self._noop:
            return x
        tvf = _tvf()
        return tvf.affine(
            x, **self._affine_args(), interpolation=tvf.InterpolationMode.BILINEAR, fill=0.0
        )


class Rotate(_Affine):
    """Rotation by ``degrees`` (positive: counter-clockwise) about the centre. Named ``rotate:<+deg>``."""

    def __init__(self, degrees: float) -> None:
        self.degrees = _num(degrees)
        self._noop = self.degrees == 0
        self.name = f"rotate:{_fmt(self.degrees, True)}"

    def _affine_args(self):
        return dict(angle=self.degrees, translate=[0, 0], scale=1.0, shear=[0.0, 0.0])


class ShearX(_Affine):
    """Horizontal shear ``x' = x + s y`` about the centre (``s`` = RandAugment's factor). Named ``shear_x:<+s>``."""

    def __init__(self, s: float) -> None:
        self.s = _num(s)
        self._noop = self.s == 0
        self.name = f"shear_x:{_fmt(self.s, True)}"

    def _affine_args(self):
        return dict(angle=0.0, translate=[0, 0], scale=1.0, shear=[math.degrees(math.atan(self.s)), 0.0])


class ShearY(_Affine):
    """Vertical shear ``y' = y + s x`` about the centre. Named ``shear_y:<+s>``."""

    def __init__(self, s: float) -> None:
        self.s = _num(s)
        self._noop = self.s == 0
        self.name = f"shear_y:{_fmt(self.s, True)}"

    def _affine_args(self):
        return dict(angle=0.0, translate=[0, 0], scale=1.0, shear=[0.0, math.degrees(math.atan(self.s))])


# ------------------------------------------------------- photometric ops

class _Photometric(ImageTransform):
    """De-normalise to [0, 1] (clamped), apply ``_op``, re-normalise. Moves no pixel: dense, exact.

    Args:
        mean, std: the per-channel normalisation of the model's inputs.
    """

    #: channel counts the torchvision op accepts (None: any)
    channels: tuple[int, ...] | None = None
    _noop = False

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        try:
            mean = tuple(float(m) for m in mean)
            std = tuple(float(s) for s in std)
        except (TypeError, ValueError):
            raise InputError(f"mean and std must be sequences of floats; got {mean!r}, {std!r}") from None
        if len(mean) != len(std) or not mean:
            raise InputError(f"mean and std need one value per channel, as many of each; got {mean}, {std}")
        if not all(s > 0 for s in std):
            raise InputError(f"std must be positive; got {std}")
        self.mean, self.std = mean, std

    def _op(self, u: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _augment(self, x):
        c = x.shape[1]
        if c != len(self.mean):
            raise InputError(
                f"{self.name} was built for {len(self.mean)}-channel images (mean {self.mean}); got {c} channels"
            )
        if self.channels is not None and c not in self.channels:
            raise InputError(
                f"{self.name} works on images with {' or '.join(map(str, self.channels))} channels; got {c}"
            )
        if not x.is_floating_point():
            raise InputError(f"{self.name} takes a float (normalised) image batch; got {x.dtype}")
        if self._noop:
            return x
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        u = (x * std + mean).clamp(0, 1)
        return ((self._op(u).to(x.dtype) - mean) / std).contiguous()


class _Enhance(_Photometric):
    """An enhancement with factor ``1 + delta`` (``delta`` in [-1, inf))."""

    _kind = ""

    def __init__(self, delta: float, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(mean, std)
        self.delta = _num(delta)
        if not self.delta >= -1 or not math.isfinite(self.delta):
            raise InputError(f"{self._kind} change must be >= -1 (factor 1 + delta >= 0); got {delta}")
        self._noop = self.delta == 0
        self.name = f"{self._kind}:{_fmt(self.delta, True)}"


class Brightness(_Enhance):
    """``u * (1 + delta)``, clamped to [0, 1] (``torchvision`` ``adjust_brightness``)."""

    _kind = "brightness"

    def _op(self, u):
        return _tvf().adjust_brightness(u, 1.0 + self.delta)


class Contrast(_Enhance):
    """Blend with the mean grey level by ``1 + delta`` (``adjust_contrast``; 1 or 3 channels)."""

    _kind = "contrast"
    channels = (1, 3)

    def _op(self, u):
        return _tvf().adjust_contrast(u, 1.0 + self.delta)


class Sharpness(_Enhance):
    """Blend with a smoothed image by ``1 + delta`` (``adjust_sharpness``; 1 or 3 channels)."""

    _kind = "sharpness"
    channels = (1, 3)

    def _op(self, u):
        return _tvf().adjust_sharpness(u, 1.0 + self.delta)


class Solarize(_Photometric):
    """Invert pixels ``>= threshold`` (``solarize``); threshold >= 1 is the identity. Named ``solarize:<t>``."""

    def __init__(self, threshold: float, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(mean, std)
        self.threshold = _num(threshold)
        if not 0 <= self.threshold or not math.isfinite(self.threshold):
            raise InputError(f"solarize threshold must be >= 0; got {threshold}")
        self._noop = self.threshold >= 1  # torchvision would still invert pure white at 1.0
        self.name = f"solarize:{_fmt(self.threshold, False)}"

    def _op(self, u):
        return _tvf().solarize(u, self.threshold)


class Posterize(_Photometric):
    """Keep ``bits`` (1..8) bits per channel, through uint8 (``posterize``). 8 is the identity."""

    def __init__(self, bits: int, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__(mean, std)
        if not _is_int(bits) or not 1 <= bits <= 8:
            raise InputError(f"posterize bits must be an int in 1..8; got {bits!r}")
        self.bits = bits
        self._noop = bits == 8
        self.name = f"posterize:{bits}"

    def _op(self, u):
        q = (u * 255).round().to(torch.uint8)
        return _tvf().posterize(q, self.bits).to(u.dtype) / 255


class AutoContrast(_Photometric):
    """Stretch each channel to [0, 1] (``autocontrast``; 1 or 3 channels)."""

    name = "autocontrast"
    channels = (1, 3)

    def _op(self, u):
        return _tvf().autocontrast(u)


class Equalize(_Photometric):
    """Histogram equalisation per channel, through uint8 (``equalize``)."""

    name = "equalize"

    def _op(self, u):
        q = (u * 255).round().to(torch.uint8)
        return _tvf().equalize(q).to(u.dtype) / 255


# ---------------------------------------------------------------- chain

class Chain(ImageTransform):
    """Transforms applied left to right (``Chain(crop, HFlip())`` flips the crop).

    Named by its parts joined with ``>``; dense / exact when all parts are. De-augments
    right to left, carrying the coverage mask through every inverse; for inexact parts
    the map is divided by the resampled coverage (normalised interpolation), so
    uncovered pixels do not darken the border.
    """

    def __init__(self, *transforms: ImageTransform) -> None:
        parts: list[ImageTransform] = []
        for t in transforms:
            if not isinstance(t, ImageTransform):
                raise InputError(f"Chain takes ImageTransform objects; got {type(t).__name__}")
            parts.extend(t.transforms if isinstance(t, Chain) else [t])
        if not parts:
            raise InputError("Chain needs at least one transform")
        self.transforms = tuple(parts)
        self.name = ">".join(t.name for t in parts)
        self.dense = all(t.dense for t in parts)
        self.exact = self.dense and all(t.exact for t in parts)

    def _sizes(self, size) -> list[tuple[int, int]]:
        sizes = [_check_size(size)]
        for t in self.transforms:
            sizes.append(t.out_size(sizes[-1]))
        return sizes

    def out_size(self, size):
        return self._sizes(size)[-1]

    def _augment(self, x):
        for t in self.transforms:
            x = t._augment(x)
        return x

    def _augment_dense(self, d):
        for t in self.transforms:
            d = t._augment_dense(d)
        return d

    def _deaugment(self, d, size):
        sizes = self._sizes(size)
        cover = torch.ones(1, 1, *sizes[-1], dtype=d.dtype, device=d.device)
        valid = None
        for t, s in zip(reversed(self.transforms), reversed(sizes[:-1])):
            d, own = t._deaugment(d, s)
            cover, _ = t._deaugment(cover, s)
            valid = own & (cover > 0.5)
            if not t.exact:  # resampled: renormalise by the resampled coverage
                d = d / torch.where(valid, cover, torch.ones_like(cover))
                cover = valid.to(d.dtype)
            d = torch.where(valid, d, torch.zeros_like(d))
        return d, valid


# ------------------------------------------------------------- builders

def randaugment_op(
    op: str,
    magnitude: float,
    size_hw: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    sign: int = 1,
) -> ImageTransform:
    """The RandAugment op ``op`` at ``magnitude`` in 0..10 (see :data:`RANDAUGMENT_RANGES`).

    ``sign`` (+1 or -1) flips signed ops; it is ignored by unsigned ones. Translations
    become integer :class:`Translate` views of ``round(150/331 * side * m / 10)`` pixels.
    """
    if op not in RANDAUGMENT_RANGES:
        raise InputError(f"unknown RandAugment op {op!r}; valid: {', '.join(RANDAUGMENT_OPS)}")
    try:
        m = float(magnitude)
    except (TypeError, ValueError):
        raise InputError(f"magnitude must be a number in 0..10; got {magnitude!r}") from None
    if not 0 <= m <= 10:
        raise InputError(f"magnitude must be in 0..10; got {magnitude}")
    if sign not in (1, -1):
        raise InputError(f"sign must be +1 or -1; got {sign!r}")
    H, W = _check_size(size_hw, "size_hw")
    top, signed = RANDAUGMENT_RANGES[op]
    v = (top or 0.0) * m / 10 * (sign if signed else 1)
    if op == "rotate":
        return Rotate(v)
    if op == "shear_x":
        return ShearX(v)
    if op == "shear_y":
        return ShearY(v)
    if op == "translate_x":
        return Translate(0, int(round(v * W)))
    if op == "translate_y":
        return Translate(int(round(v * H)), 0)
    if op == "brightness":
        return Brightness(v, mean, std)
    if op == "contrast":
        return Contrast(v, mean, std)
    if op == "sharpness":
        return Sharpness(v, mean, std)
    if op == "solarize":
        return Solarize(1.0 - m / 10, mean, std)
    if op == "posterize":
        return Posterize(8 - int(round(4 * m / 10)), mean, std)
    if op == "autocontrast":
        return AutoContrast(mean, std)
    return Equalize(mean, std)


def flips() -> list[ImageTransform]:
    """``[identity, hflip]``."""
    return [Identity(), HFlip()]


def five_crops(size_hw: tuple[int, int], ratio: float = 0.875) -> list[ImageTransform]:
    """``[identity, crop tl, tr, bl, br, c]``, crops of side ``floor(ratio * side)``, not resized."""
    return [Identity()] + [Crop.at(p, ratio, size_hw) for p in CROP_POSITIONS]


def ten_crops(size_hw: tuple[int, int], ratio: float = 0.875) -> list[ImageTransform]:
    """:func:`five_crops` then their horizontal flips: ``[identity, 5 crops, hflip, 5 crop>hflip]`` (12)."""
    five = five_crops(size_hw, ratio)
    return five + [HFlip()] + [Chain(c, HFlip()) for c in five[1:]]


def scales(factors: Sequence[float] = (0.75, 1.25)) -> list[ImageTransform]:
    """``[identity, scale:f..., hflip, scale:f>hflip...]``."""
    s = [Scale(f) for f in factors]
    return [Identity(), *s, HFlip(), *(Chain(t, HFlip()) for t in s)]


def _full_pool(size_hw, mean, std, magnitudes=(3, 6), crop_ratio=0.875, seed=0) -> list[ImageTransform]:
    """Every candidate of :func:`augmentation_pool`, in order."""
    probe = Brightness(0.0, mean, std)  # validates mean/std
    c = len(probe.mean)
    pool: list[ImageTransform] = [Identity(), HFlip(), *(Crop.at(p, crop_ratio, size_hw) for p in CROP_POSITIONS)]
    head = len(pool)
    seen = {t.name for t in pool}
    for i, m in enumerate(magnitudes):
        ops = [o for o in RANDAUGMENT_OPS if o not in ("autocontrast", "equalize")]
        if i == 0:
            ops += ["autocontrast", "equalize"]
        for op in ops:
            if op in ("contrast", "sharpness", "autocontrast") and c not in (1, 3):
                continue
            for sign in (1, -1) if RANDAUGMENT_RANGES[op][1] else (1,):
                t = randaugment_op(op, m, size_hw, mean, std, sign)
                if t.name in seen or t.name in ("translate:+0,+0",) or getattr(t, "_noop", False):
                    continue
                seen.add(t.name)
                pool.append(t)
    if seed:
        g = torch.Generator().manual_seed(int(seed))
        tail = pool[head:]
        pool = pool[:head] + [tail[int(j)] for j in torch.randperm(len(tail), generator=g)]
    return pool


def augmentation_pool(
    size_hw: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    n: int = 20,
    seed: int = 0,
    *,
    magnitudes: tuple[float, ...] = (3, 6),
    crop_ratio: float = 0.875,
) -> list[ImageTransform]:
    """The fixed, ordered candidate pool of the learned image-space methods (GPS, AugTTA, ClassTTA).

    Order: identity, hflip, the five crops (``crop_ratio``), then for each magnitude in
    ``magnitudes`` every op of :data:`RANDAUGMENT_OPS` (signed ops ``+`` then ``-``),
    autocontrast and equalize once, after the first magnitude. Ops that come out as
    a no-op (a 0-pixel translation) or repeat an earlier name are skipped; contrast,
    sharpness and autocontrast are left out for images with other than 1 or 3
    channels. 45 candidates for 1- or 3-channel images of side >= 8; the first ``n``
    are returned. ``seed=0`` is the canonical order; another seed permutes the
    RandAugment part (after the crops) deterministically.

    Raises:
        InputError: ``n`` < 1 or more than the candidates available.
    """
    size_hw = _check_size(size_hw, "size_hw")
    pool = _full_pool(size_hw, mean, std, magnitudes, crop_ratio, seed)
    c = len(mean)
    if not _is_int(n) or n < 1 or n > len(pool):
        raise InputError(
            f"the augmentation pool for {size_hw[0]}x{size_hw[1]} images with {c} channels has {len(pool)} "
            f"candidates; n must be an int in 1..{len(pool)}, got {n!r}"
        )
    return pool[:n]


def policy_by_name(
    name: str,
    size_hw: tuple[int, int],
    mean: Sequence[float],
    std: Sequence[float],
    n: int | None = None,
) -> list[ImageTransform]:
    """The policy ``name`` (one of :data:`POLICIES`), truncated to its first ``n`` (pool: 20 by default)."""
    if name == "pool":
        return augmentation_pool(size_hw, mean, std, n=20 if n is None else n)
    builders = {
        "flips": flips,
        "five_crops": lambda: five_crops(size_hw),
        "ten_crops": lambda: ten_crops(size_hw),
        "scales": scales,
    }
    if name not in builders:
        raise InputError(f"unknown TTA policy {name!r}; valid: {', '.join(POLICIES)}")
    out = builders[name]()
    if n is not None:
        if not _is_int(n) or not 1 <= n <= len(out):
            raise InputError(f"policy {name!r} has {len(out)} augmentations; n must be in 1..{len(out)}, got {n!r}")
        out = out[:n]
    return out


_FLOAT = r"[+-]?(?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?"
_SIGNED = r"[+-](?:\d+\.?\d*|\.\d+)(?:e[+-]?\d+)?"


def _parse_one(name: str, size_hw, mean, std) -> ImageTransform | None:
    simple = {"identity": Identity, "hflip": HFlip, "vflip": VFlip}
    if name in simple:
        return simple[name]()
    if name == "autocontrast":
        return AutoContrast(mean, std)
    if name == "equalize":
        return Equalize(mean, std)
    if m := re.fullmatch(rf"crop:(tl|tr|bl|br|c):({_FLOAT})", name):
        return Crop.at(m[1], float(m[2]), size_hw)
    if m := re.fullmatch(r"crop:(\d+),(\d+):(\d+)x(\d+)", name):
        return Crop(*(int(g) for g in m.groups()))
    if m := re.fullmatch(r"translate:([+-]\d+),([+-]\d+)", name):
        return Translate(int(m[1]), int(m[2]))
    if m := re.fullmatch(rf"scale:({_FLOAT})", name):
        return Scale(float(m[1]))
    if m := re.fullmatch(rf"(rotate|shear_x|shear_y):({_SIGNED})", name):
        return {"rotate": Rotate, "shear_x": ShearX, "shear_y": ShearY}[m[1]](float(m[2]))
    if m := re.fullmatch(rf"(brightness|contrast|sharpness):({_SIGNED})", name):
        return {"brightness": Brightness, "contrast": Contrast, "sharpness": Sharpness}[m[1]](float(m[2]), mean, std)
    if m := re.fullmatch(rf"solarize:({_FLOAT})", name):
        return Solarize(float(m[1]), mean, std)
    if m := re.fullmatch(r"posterize:(\d+)", name):
        return Posterize(int(m[1]), mean, std)
    return None


def transform_from_name(
    name: str, size_hw: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> ImageTransform:
    """Rebuild a transform from its ``name`` (the inverse of ``.name``; chains join parts with ``>``).

    Raises:
        InputError: an unknown or non-canonical name (the message lists the valid forms).
    """
    if not isinstance(name, str):
        raise InputError(f"a transform name must be a str; got {type(name).__name__}")
    parts = []
    for part in name.split(">"):
        t = _parse_one(part, size_hw, mean, std)
        if t is None:
            try:
                pool = ", ".join(t.name for t in _full_pool(_check_size(size_hw, "size_hw"), mean, std))
            except InputError:
                pool = "(unavailable: bad size_hw, mean or std)"
            raise InputError(
                f"unknown augmentation name {part!r} (in {name!r}); valid names: {_NAME_FORMS}. "
                f"The pool for {size_hw} is: {pool}"
            )
        parts.append(t)
    t = parts[0] if len(parts) == 1 else Chain(*parts)
    if t.name != name:
        raise InputError(f"augmentation name {name!r} is not in canonical form; write {t.name!r}")
    return t


def transforms_by_names(
    names: Sequence[str], size_hw: tuple[int, int], mean: Sequence[float], std: Sequence[float]
) -> list[ImageTransform]:
    """The transforms named ``names``, in order (e.g. to rebuild a saved aggregator's list)."""
    if isinstance(names, str):
        raise InputError(f"names must be a list of augmentation names, not one string ({names!r})")
    return [transform_from_name(n, size_hw, mean, std) for n in names]


def deaugment_mean(
    views: Sequence[torch.Tensor], transforms: Sequence[ImageTransform], size: tuple[int, int]
) -> torch.Tensor:
    """Dense TTA: the mean over the views that cover each pixel.

    Args:
        views: one ``(N, K, H'_a, W'_a)`` map per transform (the model's output on
            ``transforms[a].augment(x)``, at the view's resolution).
        transforms: the dense transforms the views came from.
        size: ``(H, W)`` of the un-augmented image.

    Returns:
        ``(N, K, H, W)``; 0 where no view covers a pixel.

    Shape:
        - views: one ``(N, K, H'_a, W'_a)`` tensor per transform.
        - size: ``(H, W)``.
        - output: ``(N, K, H, W)``.

    Example:
        >>> d = torch.arange(4.0).reshape(1, 1, 2, 2)
        >>> ts = [Identity(), HFlip()]
        >>> torch.equal(deaugment_mean([t.augment_dense(d) for t in ts], ts, (2, 2)), d)
        True
    """
    if len(views) != len(transforms) or not views:
        raise InputError(f"one view per transform is needed; got {len(views)} views and {len(transforms)} transforms")
    not_dense = [t.name for t in transforms if not t.dense]
    if not_dense:
        raise UndiscardError(f"dense TTA needs dense transforms; these are not: {not_dense}")
    acc = cnt = None
    for v, t in zip(views, transforms):
        d, m = t.deaugment(v, size)
        d = torch.where(m, d, torch.zeros_like(d))
        acc = d if acc is None else acc + d
        cnt = m.to(d.dtype) if cnt is None else cnt + m.to(d.dtype)
    return acc / cnt.clamp_min(1)
