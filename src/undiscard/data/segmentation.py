"""Segmentation data: Fashion-MNIST canvases, Cityscapes / ADE20K folders, mIoU.

Three things live here, one question each: *what are the pixels and their labels*
(data sets) and *how good is a segmentation* (:class:`SegMetrics`).

**fashion-mnist-seg** (needs torch and the Fashion-MNIST files only). A real-image,
deterministic semantic-segmentation set built here because no segmentation data can
be assumed on a machine without network access. Canvas ``i`` of a split is a black ``size x size``
image on which ``k`` (``items``, default 2-4) Fashion-MNIST items *of the same split*
are pasted (train canvases use only the 55,000 ``"train"`` items, ``"val"`` only the
5,000 ``"val"`` items, ``"test"`` only the 10,000 test-file items; drawn with
replacement). Every random choice of canvas ``i`` comes from its own generator,
``torch.Generator().manual_seed(SEG_SEED + 1_000_000 * split_code + i)``
(:func:`canvas_seed`), so a canvas does not depend on ``start`` / ``limit`` or on
what was generated before. Per item: a scale of 1x or 2x (integer, nearest-neighbour:
28 or 56 px; 2x only where it fits, i.e. ``size >= 56``), and a position drawn
uniformly among those that keep the item wholly inside the canvas (items never cross
the border; they may overlap). An item covers the pixels whose intensity is
``> SEG_THRESHOLD`` (51 of 255, i.e. 0.2); those pixels take the item's gray value and
label (Fashion-MNIST class + 1), later items on top of earlier ones (occlusion of both
image and label). Sub-threshold pixels of an item are dropped (the item is cut out at
the threshold), so **label 0 (background) exactly where the raw canvas is 0**. See
:func:`canvas_layout` (the draws) and :func:`render_canvases` (the pasting).

**Folder sets** (need pillow and numpy): :func:`cityscapes` and :func:`ade20k` read
the standard layouts and yield ``(image, target)``: ``image`` float32 ``(3, H, W)``
normalised with ImageNet mean / std, ``target`` int64 ``(H, W)`` of train ids with
:data:`IGNORE_INDEX` = 255 for pixels that no class covers.

:func:`load_segmentation` turns a spec string (``fashion-mnist-seg[:split]``,
``cityscapes:ROOT[:split]``, ``ade20k:ROOT[:split]``) into stacked evaluation tensors;
:func:`open_segmentation` into an object that reads them a batch at a time (what
``undiscard eval --task segmentation`` uses: a Cityscapes / ADE20K split is not held in memory).
"""

from __future__ import annotations

import functools
import math
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch.utils.data import Dataset

from undiscard.data.classification import FASHION_MNIST_CLASSES, IMAGENET_MEAN, IMAGENET_STD, VAL_SIZE, load_fashion_mnist
from undiscard.errors import DatasetNotFoundError, InputError, UndiscardError

__all__ = [
    "fashion_mnist_canvas",
    "canvas_layout",
    "canvas_seed",
    "render_canvases",
    "CanvasLayout",
    "CanvasSegmentation",
    "FolderSegmentation",
    "cityscapes",
    "ade20k",
    "load_segmentation",
    "open_segmentation",
    "InMemorySegmentation",
    "LazySegmentation",
    "SegMetrics",
    "SEG_MEAN",
    "SEG_STD",
    "SEG_NUM_CLASSES",
    "SEG_CLASSES",
    "SEG_SPLIT_SIZES",
    "SEG_THRESHOLD",
    "SEG_SEED",
    "SEG_DEFAULT_SIZE",
    "ITEM_SIZE",
    "IGNORE_INDEX",
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_NUM_CLASSES",
    "CITYSCAPES_LABEL_TO_TRAIN",
    "ADE20K_NUM_CLASSES",
]

#: Target value of pixels that count for no class (Cityscapes void, ADE20K "other").
IGNORE_INDEX: int = 255

# --------------------------------------------------------------- fashion-mnist-seg

#: Number of canvases in each split of fashion-mnist-seg (items drawn with replacement).
SEG_SPLIT_SIZES: dict[str, int] = {"train": 20000, "val": 2000, "test": 5000}
#: Labels: 0 background, then the ten Fashion-MNIST classes shifted by one.
SEG_CLASSES: tuple[str, ...] = ("background", *FASHION_MNIST_CLASSES)
SEG_NUM_CLASSES: int = len(SEG_CLASSES)  # 11
#: An item pixel belongs to the item when its uint8 intensity is > 51 (= 0.2 * 255).
SEG_THRESHOLD: int = 51
#: Base seed of the per-canvas generators (see :func:`canvas_seed`).
SEG_SEED: int = 20250407
#: Default canvas side (pixels).
SEG_DEFAULT_SIZE: int = 96
#: Side of a Fashion-MNIST item at scale 1.
ITEM_SIZE: int = 28
# Mean / std of the raw canvas pixels scaled to [0, 1], over ALL 20,000 train canvases at
# size=96, items=(2, 4): computed once with
#   x, _ = fashion_mnist_canvas("train", 96, normalize=False); x.mean(), x.std()
# (0.146597..., 0.293412..., in float64) and rounded to 4 digits. Other sizes / item counts have
# other statistics (more or less background); these constants are used regardless.
SEG_MEAN: float = 0.1466
SEG_STD: float = 0.2934

_SPLIT_CODE: dict[str, int] = {"train": 0, "val": 1, "test": 2}
# Items per Fashion-MNIST split (load_fashion_mnist's split sizes for the real files).
_SPLIT_ITEMS: dict[str, int] = {"train": 60000 - VAL_SIZE, "val": VAL_SIZE, "test": 10000}
_SCALES: tuple[int, ...] = (1, 2)
_CHUNK = 512  # canvases pasted per vectorised step (bounds the index tensors' memory)


def canvas_seed(split: str, index: int) -> int:
    """Seed of canvas ``index`` of ``split``: ``SEG_SEED + 1_000_000 * code + index``.

    ``code`` is 0 / 1 / 2 for ``"train"`` / ``"val"`` / ``"test"``. No ``hash()``
    involved, so it is the same in every process and Python version.
    """
    _check_split(split)
    if not 0 <= index < 1_000_000:
        raise InputError(f"canvas index must be in 0..999999, got {index}")
    return SEG_SEED + 1_000_000 * _SPLIT_CODE[split] + int(index)


def _check_split(split: str) -> None:
    if split not in _SPLIT_CODE:
        raise InputError(f"fashion-mnist-seg split must be one of {sorted(_SPLIT_CODE)}, got {split!r}")


def _check_items(items: tuple[int, int]) -> tuple[int, int]:
    try:
        lo, hi = (int(v) for v in items)
    except (TypeError, ValueError):
        raise InputError(f"items must be a pair (min, max) of item counts, got {items!r}") from None
    if not 1 <= lo <= hi:
        raise InputError(f"items must be (min, max) with 1 <= min <= max, got {items!r}")
    return lo, hi


def _check_size(size: int) -> int:
    if int(size) != size or size < ITEM_SIZE:
        raise InputError(f"canvas size must be an integer >= {ITEM_SIZE} (one item), got {size!r}")
    return int(size)


def _check_range(split: str, start: int, limit: int | None) -> tuple[int, int]:
    """``(start, stop)`` of the canvas indices, checked against :data:`SEG_SPLIT_SIZES`."""
    total = SEG_SPLIT_SIZES[split]
    if start < 0 or (limit is not None and limit < 0):
        raise InputError(f"start and limit must be >= 0, got start={start}, limit={limit}")
    stop = total if limit is None else start + int(limit)
    if stop > total or start > total:
        raise InputError(
            f"fashion-mnist-seg:{split} has {total} canvases (SEG_SPLIT_SIZES); "
            f"start={start} + limit={limit} asks for up to index {stop - 1}. Lower start or limit."
        )
    return int(start), int(stop)


class CanvasLayout(NamedTuple):
    """The random draws of ``N`` canvases with up to ``K = items[1]`` item slots.

    ``count`` int64 ``(N,)``: items on the canvas (slots ``0..count-1`` are used, in
    pasting order). ``source`` int64 ``(N, K)``: index of each item into the split's
    items as :func:`~undiscard.data.classification.load_fashion_mnist` returns them (-1 in unused
    slots). ``scale`` int64 ``(N, K)``: 1 or 2. ``top`` / ``left`` int64 ``(N, K)``:
    the item's upper-left pixel (``0 <= top <= size - 28 * scale``).
    """

    count: torch.Tensor
    source: torch.Tensor
    scale: torch.Tensor
    top: torch.Tensor
    left: torch.Tensor


def canvas_layout(
    split: str,
    indices: Sequence[int] | torch.Tensor,
    size: int = SEG_DEFAULT_SIZE,
    items: tuple[int, int] = (2, 4),
    n_items: int | None = None,
) -> CanvasLayout:
    """The draws (item count, source items, scales, positions) of the given canvases.

    Canvas ``i`` draws ``1 + 4 * K`` float64 uniforms ``u`` (``K = items[1]``) from
    ``torch.Generator().manual_seed(canvas_seed(split, i))`` in one call and derives
    everything from them: ``k = items[0] + floor(u[0] * (items[1] - items[0] + 1))``;
    for slot ``j``: source ``floor(u * n_items)``, scale 1 or 2 (uniform among the
    scales whose ``28 * scale <= size``), ``top`` and ``left`` uniform in
    ``0..size - 28 * scale``. ``n_items``: number of items in the split (default: the
    real Fashion-MNIST split's, 55,000 / 5,000 / 10,000).

    Needs no data files; canvas ``i`` is the same whatever other indices are asked for.

    Shape:
        - indices: ``(N,)`` canvas indices (any shape: flattened).
        - output: ``count`` ``(N,)``; ``source``, ``scale``, ``top``, ``left`` ``(N, K)``
          with ``K = items[1]`` slots (all int64).

    Example:
        >>> lay = canvas_layout("test", [0, 1, 2], size=56, items=(2, 3))
        >>> lay.count.shape, lay.source.shape, bool(((lay.source >= 0).sum(1) == lay.count).all())
        (torch.Size([3]), torch.Size([3, 3]), True)
        >>> torch.equal(canvas_layout("test", [2], size=56, items=(2, 3)).source, lay.source[2:])
        True
    """
    _check_split(split)
    size = _check_size(size)
    lo, hi = _check_items(items)
    n_items = _SPLIT_ITEMS[split] if n_items is None else int(n_items)
    if n_items < 1:
        raise InputError(f"n_items must be positive, got {n_items}")
    idx = torch.as_tensor(indices, dtype=torch.int64).flatten().tolist()
    dims = 1 + 4 * hi
    if idx:
        u = torch.stack(
            [torch.rand(dims, dtype=torch.float64, generator=torch.Generator().manual_seed(canvas_seed(split, i)))
             for i in idx]
        )
    else:
        u = torch.empty(0, dims, dtype=torch.float64)
    count = lo + (u[:, 0] * (hi - lo + 1)).long().clamp(max=hi - lo)
    slots = u[:, 1:].view(-1, hi, 4)
    source = (slots[..., 0] * n_items).long().clamp(max=n_items - 1)
    allowed = torch.tensor([s for s in _SCALES if ITEM_SIZE * s <= size], dtype=torch.int64)
    scale = allowed[(slots[..., 1] * len(allowed)).long().clamp(max=len(allowed) - 1)]
    room = size - ITEM_SIZE * scale + 1  # positions that keep the item inside
    top = torch.minimum((slots[..., 2] * room).long(), room - 1)
    left = torch.minimum((slots[..., 3] * room).long(), room - 1)
    used = torch.arange(hi)[None, :] < count[:, None]
    source = torch.where(used, source, torch.full_like(source, -1))
    return CanvasLayout(count, source, scale, top, left)


def render_canvases(
    images: torch.Tensor,
    labels: torch.Tensor,
    layout: CanvasLayout,
    size: int = SEG_DEFAULT_SIZE,
    threshold: int = SEG_THRESHOLD,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Paste items on black canvases: uint8 ``(N, size, size)`` image, int64 label map.

    ``images``: uint8 ``(M, 28, 28)`` items; ``labels``: ``(M,)`` classes 0..9;
    ``layout``: from :func:`canvas_layout` with sources in ``0..M-1``. Slot by slot
    (later slots on top), pixels of the item's (nearest-upscaled) square whose value is
    ``> threshold`` take the item's value and the label ``class + 1``; nothing else
    changes. Vectorised: per chunk of ``_CHUNK`` canvases, slot and scale, one masked
    scatter of the items' boxes into the flat canvases (no per-pixel or per-canvas loop).

    Shape:
        - images: uint8 ``(M, 28, 28)``; labels: ``(M,)``.
        - layout: ``N`` canvases of ``K`` slots (``source`` etc. ``(N, K)``).
        - output: uint8 canvases ``(N, size, size)`` and int64 label maps ``(N, size, size)``.

    Example:
        >>> items = torch.full((5, 28, 28), 200, dtype=torch.uint8)
        >>> x, y = render_canvases(items, torch.arange(5), canvas_layout("val", [0, 1], size=56, n_items=5), size=56)
        >>> x.shape, x.dtype, y.dtype, bool(((x > 0) == (y > 0)).all())
        (torch.Size([2, 56, 56]), torch.uint8, torch.int64, True)
    """
    if images.dim() != 3 or images.shape[-2:] != (ITEM_SIZE, ITEM_SIZE) or images.dtype != torch.uint8:
        raise InputError(
            f"images must be uint8 (M, {ITEM_SIZE}, {ITEM_SIZE}), got {images.dtype} {tuple(images.shape)}"
        )
    labels = torch.as_tensor(labels).long()
    if labels.shape != (images.shape[0],):
        raise InputError(f"labels must be ({images.shape[0]},) to match the images, got {tuple(labels.shape)}")
    size = _check_size(size)
    n, slots = layout.source.shape
    if n and int(layout.source.max()) >= images.shape[0]:
        raise InputError(f"layout uses item {int(layout.source.max())} but only {images.shape[0]} items were given")
    if n and int((layout.top + ITEM_SIZE * layout.scale).max()) > size:
        raise InputError(f"layout was drawn for a larger canvas than size={size}")
    canvas = torch.zeros(n * size * size, dtype=torch.uint8)  # flat views of (N, size, size)
    target = torch.zeros(n * size * size, dtype=torch.uint8)
    label_of = (labels + 1).to(torch.uint8)
    for c0 in range(0, n, _CHUNK):
        rows = torch.arange(c0, min(n, c0 + _CHUNK))
        for j in range(slots):
            for s in layout.scale[rows, j].unique().tolist():
                pick = rows[(layout.scale[rows, j] == s) & (layout.source[rows, j] >= 0)]
                if not pick.numel():
                    continue
                side = ITEM_SIZE * s
                src = layout.source[pick, j]
                item = images[src]  # (B, 28, 28) -> nearest upscaling by s: (B, side, side)
                item = item[:, :, None, :, None].expand(-1, ITEM_SIZE, s, ITEM_SIZE, s).reshape(-1, side, side)
                mask = item > threshold
                grid = torch.arange(side)
                box = (grid[:, None] * size + grid[None, :]).flatten()  # offsets of the box in a canvas
                base = pick * (size * size) + layout.top[pick, j] * size + layout.left[pick, j]
                where = (base[:, None] + box[None, :]).view(-1, side, side)[mask]
                canvas[where] = item[mask]
                target[where] = label_of[src][:, None, None].expand(-1, side, side)[mask]
    canvas, target = canvas.view(n, size, size), target.view(n, size, size).long()
    return canvas, target


@functools.lru_cache(maxsize=4)
def _split_items(root: str | None, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The split's Fashion-MNIST items, read once per (root, split) and process."""
    return load_fashion_mnist(root, split)  # type: ignore[arg-type]


def _items_for(root: str | os.PathLike[str] | None, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _split_items(None if root is None else str(Path(root).expanduser()), split)


def fashion_mnist_canvas(
    split: str = "test",
    size: int = SEG_DEFAULT_SIZE,
    limit: int | None = None,
    start: int = 0,
    items: tuple[int, int] = (2, 4),
    root: str | os.PathLike[str] | None = None,
    *,
    normalize: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Canvases ``start .. start + limit - 1`` of a fashion-mnist-seg split.

    Returns ``x`` float32 ``(N, 1, size, size)``: pixels / 255, then
    ``(x - SEG_MEAN) / SEG_STD`` (``normalize=False``: just pixels / 255), and ``y``
    int64 ``(N, size, size)``: 0 background, ``c + 1`` for Fashion-MNIST class ``c``
    (:data:`SEG_CLASSES`, :data:`SEG_NUM_CLASSES` = 11). ``limit=None``: up to the end
    of the split (:data:`SEG_SPLIT_SIZES`: train 20,000, val 2,000, test 5,000).
    ``root``: the Fashion-MNIST files, as in :func:`~undiscard.data.classification.load_fashion_mnist`.

    Deterministic per canvas (see the module docstring): canvas ``i`` is identical for
    any ``start`` / ``limit`` covering it. Raises :class:`InputError` for an unknown
    split, ``size < 28``, bad ``items``, or ``start + limit`` past the split's end;
    :class:`DatasetNotFoundError` when the Fashion-MNIST files are missing.

    Shape:
        - output: ``x`` float32 ``(N, 1, size, size)`` and ``y`` int64 ``(N, size, size)`` in
          ``0..10``; ``N = limit``, or up to the split's end.
    """
    _check_split(split)
    size = _check_size(size)
    items = _check_items(items)
    lo, hi = _check_range(split, start, limit)
    images, labels = _items_for(root, split)
    layout = canvas_layout(split, torch.arange(lo, hi), size, items, n_items=images.shape[0])
    canvas, y = render_canvases(images, labels, layout, size)
    x = canvas.unsqueeze(1).float()
    return (_normalize_(x) if normalize else x.div_(255.0)), y


def _normalize_(x: torch.Tensor) -> torch.Tensor:
    """Raw pixel values 0..255 -> ``(x / 255 - SEG_MEAN) / SEG_STD``, in place (two passes)."""
    return x.mul_(1.0 / (255.0 * SEG_STD)).sub_(SEG_MEAN / SEG_STD)


class CanvasSegmentation(Dataset):
    """fashion-mnist-seg as a lazy ``Dataset``: item ``i`` is canvas ``start + i``.

    Item: ``(x, y)``, ``x`` float32 ``(1, size, size)`` normalised as in
    :func:`fashion_mnist_canvas` and ``y`` int64 ``(size, size)`` (equal to that
    function's rows when ``train=False``). Each canvas is rendered on access (well
    under a millisecond), so epochs cost no memory. ``train=True`` adds one augmentation: a random
    horizontal flip (probability 0.5, torch's global RNG) of image and mask together.
    """

    def __init__(
        self,
        split: str = "train",
        size: int = SEG_DEFAULT_SIZE,
        *,
        limit: int | None = None,
        start: int = 0,
        items: tuple[int, int] = (2, 4),
        train: bool = False,
        root: str | os.PathLike[str] | None = None,
    ) -> None:
        _check_split(split)
        self.split, self.size, self.items = split, _check_size(size), _check_items(items)
        self.start, self.stop = _check_range(split, start, limit)
        self.train = bool(train)
        self.images, self.labels = _items_for(root, split)
        self.num_classes, self.ignore_index, self.classes = SEG_NUM_CLASSES, IGNORE_INDEX, SEG_CLASSES

    def __len__(self) -> int:
        return self.stop - self.start

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self)
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} canvases")
        i = self.start + (index % n)
        layout = canvas_layout(self.split, [i], self.size, self.items, n_items=self.images.shape[0])
        canvas, y = render_canvases(self.images, self.labels, layout, self.size)
        x = _normalize_(canvas.float())  # (1, S, S)
        y = y[0]
        if self.train and bool(torch.rand(()) < 0.5):
            x, y = x.flip(-1), y.flip(-1)
        return x, y


# ------------------------------------------------------------------ folder sets

#: The 19 Cityscapes evaluation classes, by train id.
CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
CITYSCAPES_NUM_CLASSES: int = len(CITYSCAPES_CLASSES)  # 19
#: Official cityscapesScripts ``labels.py``: label id -> train id (all others: 255).
CITYSCAPES_LABEL_TO_TRAIN: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
#: ADE20K (SceneParsing, ADEChallengeData2016) classes, after dropping 0 = "other".
ADE20K_NUM_CLASSES: int = 150

_CITYSCAPES_SPLITS = ("train", "val", "test")
_ADE_SPLITS = {"train": "training", "training": "training", "val": "validation", "validation": "validation"}


def _lut(mapping: Mapping[int, int]) -> torch.Tensor:
    """A 256-entry int64 lookup table: ``mapping`` where given, :data:`IGNORE_INDEX` elsewhere."""
    lut = torch.full((256,), IGNORE_INDEX, dtype=torch.int64)
    for k, v in mapping.items():
        lut[k] = v
    return lut


_CITYSCAPES_LABEL_LUT = _lut(CITYSCAPES_LABEL_TO_TRAIN)
_CITYSCAPES_TRAIN_LUT = _lut({i: i for i in range(CITYSCAPES_NUM_CLASSES)})
# MMSeg's reduce_zero_label: 0 ("other") -> 255, k -> k - 1 for k in 1..150; beyond 150: 255.
_ADE_LUT = _lut({k: k - 1 for k in range(1, ADE20K_NUM_CLASSES + 1)})


def _size_pair(size: int | Sequence[int] | None) -> tuple[int, int] | None:
    if size is None:
        return None
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or any(int(v) != v or v < 1 for v in pair):
        raise InputError(f"size must be None, a positive int or (height, width), got {size!r}")
    return int(pair[0]), int(pair[1])


class FolderSegmentation(Dataset):
    """Image / label-map file pairs as a ``Dataset`` (see :func:`cityscapes`, :func:`ade20k`).

    Item ``i``: ``(image, target)``, ``image`` float32 ``(3, H, W)`` (RGB / 255,
    normalised with ImageNet mean / std), ``target`` int64 ``(H, W)``: the label
    image's values mapped through the pair's 256-entry lookup table (train ids,
    :data:`IGNORE_INDEX` for void). ``size`` (``int`` = square, or ``(H, W)``): resize
    the image bilinearly (PIL, antialiased) and the label map nearest-neighbour first.

    Attributes: ``pairs`` (list of ``(image_path, label_path)``), ``name``,
    ``num_classes``, ``ignore_index``, ``classes`` (names, or ``None``).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[Path, Path, torch.Tensor]],
        *,
        name: str,
        num_classes: int,
        classes: tuple[str, ...] | None = None,
        size: int | Sequence[int] | None = None,
    ) -> None:
        self._pairs = list(pairs)
        self.pairs = [(img, lbl) for img, lbl, _ in self._pairs]
        self.name, self.num_classes, self.classes = name, int(num_classes), classes
        self.ignore_index = IGNORE_INDEX
        self.size = _size_pair(size)
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self._pairs)

    def image_size(self, index: int) -> tuple[int, int]:
        """``(H, W)`` of item ``index`` as returned (after ``size``), read from the header only."""
        if self.size is not None:
            return self.size
        from PIL import Image

        path = self._pairs[index][0]
        try:
            with Image.open(path) as img:
                return img.height, img.width
        except Exception as exc:
            raise _unreadable(path, exc) from None

    def _read(self, index: int):
        """The pair's PIL image (RGB) and label map, decoded; :class:`InputError` naming a file that is not."""
        from PIL import Image

        img_path, lbl_path, _ = self._pairs[index]
        try:
            with Image.open(img_path) as f:
                img = f.convert("RGB")
        except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError ... for broken files
            raise _unreadable(img_path, exc) from None
        try:
            with Image.open(lbl_path) as f:
                f.load()
                lbl = f.copy()
        except Exception as exc:
            raise _unreadable(lbl_path, exc, "label map") from None
        return img, lbl

    def unreadable(self, indices: Sequence[int]) -> list[tuple[int, str, str]]:
        """``(index, path, reason)`` of each item of ``indices`` whose image or label map cannot be decoded."""
        bad = []
        for i in indices:
            try:
                self._read(i)
            except InputError as exc:
                bad.append((i, str(exc.path), exc.reason))
        return bad

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        import numpy as np
        from PIL import Image

        img_path, lbl_path, lut = self._pairs[index]
        img, lbl = self._read(index)
        if lbl.mode not in ("L", "P"):
            raise InputError(
                f"{lbl_path}: label map has PIL mode {lbl.mode!r}; expected a single-channel 8-bit PNG "
                "(mode 'L' or 'P') holding class ids"
            )
        if img.size != lbl.size:
            raise InputError(
                f"{img_path} is {img.size[1]}x{img.size[0]} but its label map {lbl_path} is "
                f"{lbl.size[1]}x{lbl.size[0]}; expected the same size"
            )
        if self.size is not None and (img.height, img.width) != self.size:
            h, w = self.size
            img = img.resize((w, h), Image.Resampling.BILINEAR)
            lbl = lbl.resize((w, h), Image.Resampling.NEAREST)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float().div_(255.0)
        x = (x - self.mean) / self.std
        y = lut[torch.from_numpy(np.array(lbl, dtype=np.uint8)).long()]
        return x, y


#: What to do about a file that cannot be decoded, named in the error.
CORRUPT_HINT = "replace or remove it, or pass --skip-corrupt to leave such images out (with a warning naming them)"


def _unreadable(path, exc: BaseException, what: str = "image") -> InputError:
    text = str(exc).splitlines()[0] if str(exc) else ""
    reason = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
    err = InputError(f"{path}: not a readable {what} ({reason}); {CORRUPT_HINT}")
    err.path, err.reason = path, reason
    return err


def _need_pil(what: str) -> None:
    try:
        import numpy  # noqa: F401
        import PIL  # noqa: F401
    except ImportError:
        raise UndiscardError(f"{what} needs pillow and numpy: pip install 'undiscard[data]'") from None


def cityscapes(
    root: str | os.PathLike[str],
    split: str = "val",
    *,
    size: int | Sequence[int] | None = None,
) -> FolderSegmentation:
    """Cityscapes fine annotations as a :class:`FolderSegmentation` (19 classes).

    Layout: ``root/leftImg8bit/{split}/{city}/{name}_leftImg8bit.png`` with
    ``root/gtFine/{split}/{city}/{name}_gtFine_labelTrainIds.png`` (made by
    cityscapesScripts' ``createTrainIdLabelImgs``; values 0..18, others -> 255) or,
    when that file is absent, ``{name}_gtFine_labelIds.png`` mapped with the official
    label id -> train id table (:data:`CITYSCAPES_LABEL_TO_TRAIN`; every other id ->
    255). Images sorted by path. ``split``: ``"train"``, ``"val"`` or ``"test"``.

    Raises :class:`DatasetNotFoundError` when the image folder is missing or empty or an
    image has neither label file, naming the expected layout.
    """
    _need_pil("cityscapes")
    if split not in _CITYSCAPES_SPLITS:
        raise InputError(f"Cityscapes split must be one of {list(_CITYSCAPES_SPLITS)}, got {split!r}")
    base = Path(root).expanduser()
    layout = (
        f"expected {base}/leftImg8bit/{split}/<city>/<name>_leftImg8bit.png and "
        f"{base}/gtFine/{split}/<city>/<name>_gtFine_labelTrainIds.png (or _gtFine_labelIds.png)"
    )
    img_dir = base / "leftImg8bit" / split
    if not img_dir.is_dir():
        raise DatasetNotFoundError(f"Cityscapes: folder {img_dir} does not exist; {layout}")
    images = sorted(img_dir.glob("*/*_leftImg8bit.png"))
    if not images:
        raise DatasetNotFoundError(f"Cityscapes: no *_leftImg8bit.png images under {img_dir}/<city>/; {layout}")
    pairs = []
    for img in images:
        stem = img.name[: -len("_leftImg8bit.png")]
        gt = base / "gtFine" / split / img.parent.name
        train_ids, label_ids = gt / f"{stem}_gtFine_labelTrainIds.png", gt / f"{stem}_gtFine_labelIds.png"
        if train_ids.is_file():
            pairs.append((img, train_ids, _CITYSCAPES_TRAIN_LUT))
        elif label_ids.is_file():
            pairs.append((img, label_ids, _CITYSCAPES_LABEL_LUT))
        else:
            raise DatasetNotFoundError(
                f"Cityscapes: image {img} has no annotation: neither {train_ids} nor {label_ids} exists; {layout}"
            )
    return FolderSegmentation(
        pairs, name=f"cityscapes:{split}", num_classes=CITYSCAPES_NUM_CLASSES, classes=CITYSCAPES_CLASSES, size=size
    )


def ade20k(
    root: str | os.PathLike[str],
    split: str = "validation",
    *,
    size: int | Sequence[int] | None = None,
) -> FolderSegmentation:
    """ADE20K (SceneParsing ``ADEChallengeData2016``) as a :class:`FolderSegmentation`.

    Layout: ``root/images/{training,validation}/ADE_*.jpg`` with
    ``root/annotations/{training,validation}/ADE_*.png`` (same stem). Labels as
    MMSeg's ``reduce_zero_label``: 0 ("other") -> 255 (ignore), ``k`` -> ``k - 1`` for
    ``k`` in 1..150 (:data:`ADE20K_NUM_CLASSES` = 150 classes); values above 150, which
    the official files do not hold, -> 255. ``split``: ``"train"`` / ``"training"`` or
    ``"val"`` / ``"validation"``. Images sorted by name.

    Raises :class:`DatasetNotFoundError` when the image folder is missing or empty or an
    image has no annotation, naming the expected layout.
    """
    _need_pil("ade20k")
    if split not in _ADE_SPLITS:
        raise InputError(f"ADE20K split must be one of {sorted(_ADE_SPLITS)}, got {split!r}")
    folder = _ADE_SPLITS[split]
    base = Path(root).expanduser()
    layout = f"expected {base}/images/{folder}/ADE_*.jpg and {base}/annotations/{folder}/ADE_*.png"
    img_dir = base / "images" / folder
    if not img_dir.is_dir():
        raise DatasetNotFoundError(f"ADE20K: folder {img_dir} does not exist; {layout}")
    images = sorted(img_dir.glob("ADE_*.jpg"))
    if not images:
        raise DatasetNotFoundError(f"ADE20K: no ADE_*.jpg images in {img_dir}; {layout}")
    pairs = []
    for img in images:
        ann = base / "annotations" / folder / f"{img.stem}.png"
        if not ann.is_file():
            raise DatasetNotFoundError(f"ADE20K: image {img} has no annotation {ann}; {layout}")
        pairs.append((img, ann, _ADE_LUT))
    return FolderSegmentation(pairs, name=f"ade20k:{folder}", num_classes=ADE20K_NUM_CLASSES, size=size)


# ------------------------------------------------------------------ spec strings

_SPEC_FORMS = (
    "fashion-mnist-seg[:train|val|test] (default test), "
    "cityscapes:ROOT[:train|val|test] (default val), "
    "ade20k:ROOT[:training|validation] (default validation; train / val also accepted)"
)


def _root_and_split(rest: str, splits: Sequence[str], default: str, spec: str) -> tuple[str, str]:
    """``ROOT[:split]`` -> ``(root, split)``; a root may itself contain ``:``."""
    root, sep, tail = rest.rpartition(":")
    if sep and tail in splits and root:
        return root, tail
    if not rest:
        raise UndiscardError(f"segmentation spec {spec!r} names no dataset root; accepted forms: {_SPEC_FORMS}")
    return rest, default


class InMemorySegmentation:
    """Evaluation images held as tensors (fashion-mnist-seg canvases): ``batch(lo, hi)`` slices them.

    Attributes: ``x`` float ``(N, C, H, W)``, ``y`` int64 ``(N, H, W)``, ``channels``,
    ``image_size`` ``(H, W)``.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y
        self.channels, self.image_size = int(x.shape[1]), (int(x.shape[2]), int(x.shape[3]))

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batch(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``lo .. hi - 1`` (clipped to the end): ``(x, y)`` stacked."""
        return self.x[lo:hi], self.y[lo:hi]


class LazySegmentation:
    """Items ``start .. stop - 1`` of a :class:`FolderSegmentation`, read from disk when asked.

    ``batch(lo, hi)`` decodes only items ``lo .. hi - 1`` of the selection (clipped to its
    end) and stacks them, so an evaluation holds one batch of a split in memory, not the
    split. All items have the same ``image_size`` ``(H, W)`` (checked from the file headers
    by :func:`open_segmentation`). ``reads`` counts the items decoded.
    """

    def __init__(self, dataset: FolderSegmentation, start: int, stop: int, image_size: tuple[int, int],
                 indices: Sequence[int] | None = None) -> None:
        self.dataset, self.start, self.stop = dataset, int(start), int(stop)
        self.channels, self.image_size = 3, (int(image_size[0]), int(image_size[1]))
        self.reads = 0
        # the dataset items of the selection: start .. stop - 1, less those --skip-corrupt left out
        self.indices = list(range(self.start, self.stop)) if indices is None else [int(i) for i in indices]
        self.skipped: list[list[str]] = []  # [path, reason] of the items --skip-corrupt left out

    def __len__(self) -> int:
        return len(self.indices)

    def batch(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Items ``lo .. hi - 1`` of the selection: ``x`` float ``(B, 3, H, W)``, ``y`` int64 ``(B, H, W)``."""
        idx = self.indices[max(0, lo) : max(0, min(len(self), hi))]
        if not len(idx):
            h, w = self.image_size
            return torch.empty(0, 3, h, w), torch.empty(0, h, w, dtype=torch.int64)
        items = [self.dataset[i] for i in idx]
        self.reads += len(items)
        return torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items])


#: How to pass a size, named in the error about images of mixed sizes.
_SIZE_HINT = "pass a size: undiscard eval --size H[,W] (e.g. --size 512 or --size 512,1024), or size=512 / (512, 1024)"


def open_segmentation(
    spec: str,
    size: int | Sequence[int] | None = None,
    limit: int | None = None,
    start: int = 0,
    *,
    skip_corrupt: bool = False,
    log=None,
) -> tuple[InMemorySegmentation | LazySegmentation, str, int, int]:
    """A segmentation set for evaluation, one batch at a time, from a spec string.

    As :func:`load_segmentation` (same specs, ``size``, ``limit``, ``start`` and errors) but
    returns ``(data, name, num_classes, ignore_index)`` where ``data.batch(lo, hi)`` gives
    the stacked ``(x, y)`` of items ``lo .. hi - 1``: the folder sets are a
    :class:`LazySegmentation` (images decoded per batch; only the headers are read here),
    fashion-mnist-seg an :class:`InMemorySegmentation` (the canvases are rendered at once).

    A folder set's image or label map that cannot be decoded is an :class:`InputError`
    naming the file; with ``skip_corrupt`` every selected pair is decoded here first and
    the unreadable ones are left out, with a warning (``log``, default stderr) naming them
    (``data.skipped``: ``[path, reason]``).
    """
    if not isinstance(spec, str):
        raise UndiscardError(f"segmentation spec must be a string; accepted forms: {_SPEC_FORMS}")
    kind, _, rest = spec.partition(":")
    if kind == "fashion-mnist-seg":
        split = rest or "test"
        if split not in SEG_SPLIT_SIZES:
            raise UndiscardError(f"bad split {split!r} in segmentation spec {spec!r}; accepted forms: {_SPEC_FORMS}")
        if size is None:
            size = SEG_DEFAULT_SIZE
        if not isinstance(size, int):
            raise InputError(f"fashion-mnist-seg canvases are square: size must be an int, got {size!r}")
        x, y = fashion_mnist_canvas(split, size, limit=limit, start=start)
        return InMemorySegmentation(x, y), f"fashion-mnist-seg:{split}", SEG_NUM_CLASSES, IGNORE_INDEX
    if kind == "cityscapes":
        root, split = _root_and_split(rest, _CITYSCAPES_SPLITS, "val", spec)
        ds = cityscapes(root, split, size=size)
    elif kind == "ade20k":
        root, split = _root_and_split(rest, tuple(_ADE_SPLITS), "validation", spec)
        ds = ade20k(root, split, size=size)
    else:
        raise UndiscardError(f"unknown segmentation spec {spec!r}; accepted forms: {_SPEC_FORMS}")
    total = len(ds)
    stop = total if limit is None else start + int(limit)
    if start < 0 or stop < start or stop > total:
        raise InputError(
            f"{ds.name} has {total} images; start={start}, limit={limit} is out of range. Lower start or limit."
        )
    indices = list(range(start, stop))
    skipped: list[list[str]] = []
    if skip_corrupt:
        bad = ds.unreadable(indices)
        if bad:
            drop = {i for i, _, _ in bad}
            indices = [i for i in indices if i not in drop]
            skipped = [[p, why] for _, p, why in bad]
            warn = log or (lambda m: print(m, file=sys.stderr))
            warn(f"warning: --skip-corrupt: skipped {len(bad)} unreadable image{'s' if len(bad) > 1 else ''} of "
                 f"{ds.name} (evaluating {len(indices)}): " + "; ".join(f"{p} ({why})" for _, p, why in bad))
    shapes = {ds.image_size(i) for i in indices}
    if len(shapes) > 1:
        raise InputError(
            f"{ds.name}: the selected images have {len(shapes)} different sizes "
            f"(e.g. {sorted(shapes)[:3]}) and cannot be stacked; {_SIZE_HINT}"
        )
    image_size = next(iter(shapes)) if shapes else (ds.size or (0, 0))
    data = LazySegmentation(ds, start, stop, image_size, indices)
    data.skipped = skipped
    return data, ds.name, ds.num_classes, IGNORE_INDEX


def load_segmentation(
    spec: str,
    size: int | Sequence[int] | None = None,
    limit: int | None = None,
    start: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, str, int, int]:
    """A segmentation set as evaluation tensors, from a spec string.

    ``spec``: ``fashion-mnist-seg[:split]`` (``size=None``: :data:`SEG_DEFAULT_SIZE`;
    an int side), ``cityscapes:ROOT[:split]`` or ``ade20k:ROOT[:split]`` (``size``:
    ``None`` keeps the files' size and then needs all selected images to have the same
    one; an int resizes to a square, ``(H, W)`` to that). Items ``start .. start +
    limit - 1`` (``limit=None``: to the end).

    Returns ``(x, y, name, num_classes, ignore_index)``: ``x`` float ``(N, C, H, W)``
    (C = 1 for fashion-mnist-seg, 3 for the folder sets), ``y`` int64 ``(N, H, W)``,
    ``name`` e.g. ``"fashion-mnist-seg:test"``, ``ignore_index`` = 255. The whole
    selection is in memory: for a large split use :func:`open_segmentation`, which reads
    a batch at a time.

    Raises :class:`UndiscardError` for a spec of no accepted form (listing them),
    :class:`InputError` for a range past the end or images of mixed sizes with
    ``size=None`` (suggesting a ``size``).

    Shape:
        - output: ``x`` float32 ``(N, C, H, W)`` and ``y`` int64 ``(N, H, W)`` (values in
          ``0..num_classes-1`` or ``ignore_index``).
    """
    data, name, k, ignore = open_segmentation(spec, size, limit, start)
    x, y = data.batch(0, len(data))
    return x, y, name, k, ignore


# ------------------------------------------------------------------------ metrics

class SegMetrics:
    """Confusion-matrix segmentation metrics: mIoU, pixel accuracy, per-class IoU.

    ``confusion[t, p]`` counts pixels of target class ``t`` predicted as ``p``
    (int64 ``(num_classes, num_classes)``, on the CPU). Pixels whose target is
    ``ignore_index`` are not counted. Per-class IoU = ``TP / (TP + FP + FN)``;
    :meth:`miou` averages it over the classes *present*, i.e. that occur in the target
    or the prediction of the counted pixels (``TP + FP + FN > 0``), as MMSeg does (it
    skips classes whose union is empty). A class never seen does not drag the mean to 0.

    Example::

        m = SegMetrics(3)
        m.update(torch.tensor([[[0, 1], [2, 2]]]), torch.tensor([[[0, 1], [2, 255]]]))
        m.miou()  # 1.0
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
        if int(num_classes) != num_classes or num_classes < 1:
            raise InputError(f"num_classes must be a positive int, got {num_classes!r}")
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        if 0 <= self.ignore_index < self.num_classes:
            raise InputError(f"ignore_index {ignore_index} is a class id (num_classes={num_classes}); use e.g. 255")
        self.confusion = torch.zeros(self.num_classes, self.num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> SegMetrics:
        """Count ``pred`` against ``target``: integer tensors of one shape, e.g. ``(N, H, W)``.

        ``pred`` values must be in ``0..num_classes-1``; ``target`` values too, or
        ``ignore_index``. Returns ``self``.
        """
        if pred.shape != target.shape:
            raise InputError(
                f"pred and target must have the same shape (N, H, W), got {tuple(pred.shape)} and {tuple(target.shape)}"
            )
        if pred.is_floating_point() or target.is_floating_point():
            raise InputError(
                f"pred and target must be integer class ids (e.g. logits.argmax(1)), got {pred.dtype} / {target.dtype}"
            )
        k = self.num_classes
        t, p = target.flatten().long(), pred.flatten().long()
        keep = t != self.ignore_index
        t, p = t[keep], p[keep]
        if t.numel():
            if int(t.min()) < 0 or int(t.max()) >= k:
                raise InputError(f"target has values outside 0..{k - 1} that are not ignore_index={self.ignore_index}")
            if int(p.min()) < 0 or int(p.max()) >= k:
                raise InputError(f"pred has values outside 0..{k - 1} (num_classes={k})")
            self.confusion += torch.bincount(t * k + p, minlength=k * k).view(k, k).cpu()
        return self

    def per_class_iou(self) -> torch.Tensor:
        """float64 ``(num_classes,)``: IoU of each class; NaN for classes never present."""
        c = self.confusion.double()
        tp = c.diagonal()
        union = c.sum(0) + c.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))

    def miou(self) -> float:
        """Mean IoU over the classes present in target or prediction (NaN when none)."""
        iou = self.per_class_iou()
        present = ~iou.isnan()
        return float(iou[present].mean()) if bool(present.any()) else math.nan

    def pixel_accuracy(self) -> float:
        """Correct / counted (non-ignored) pixels (NaN when none were counted)."""
        total = int(self.confusion.sum())
        return int(self.confusion.trace()) / total if total else math.nan

    def state(self) -> dict[str, Any]:
        """A JSON-serialisable snapshot: ``num_classes``, ``ignore_index``, ``confusion`` (lists)."""
        return {
            "num_classes": self.num_classes,
            "ignore_index": self.ignore_index,
            "confusion": self.confusion.tolist(),
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> SegMetrics:
        """Rebuild from :meth:`state` (e.g. to resume a run)."""
        try:
            m = cls(int(state["num_classes"]), int(state["ignore_index"]))
            conf = torch.as_tensor(state["confusion"], dtype=torch.int64)
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(
                f"not a SegMetrics state ({type(exc).__name__}: {exc}); expected keys num_classes, "
                "ignore_index, confusion"
            ) from None
        if conf.shape != m.confusion.shape or bool((conf < 0).any()):
            raise InputError(
                f"state confusion must be non-negative {tuple(m.confusion.shape)}, got shape {tuple(conf.shape)}"
            )
        m.confusion = conf.clone()
        return m

    def merge(self, other: SegMetrics) -> SegMetrics:
        """Add ``other``'s counts (same ``num_classes`` and ``ignore_index``); returns ``self``."""
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise InputError(
                f"cannot merge SegMetrics(num_classes={other.num_classes}, ignore_index={other.ignore_index}) "
                f"into SegMetrics(num_classes={self.num_classes}, ignore_index={self.ignore_index})"
            )
        self.confusion += other.confusion
        return self

    def __repr__(self) -> str:
        return (
            f"SegMetrics(num_classes={self.num_classes}, ignore_index={self.ignore_index}, "
            f"pixels={int(self.confusion.sum())}, miou={self.miou():.4f})"
        )
