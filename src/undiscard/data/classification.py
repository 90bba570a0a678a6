"""Data: IDX files, Fashion-MNIST with a fixed validation split, image folders.

Core functions need torch and the standard library only:

* :func:`read_idx` parses an IDX file (the MNIST / Fashion-MNIST format), plain or
  gzip-compressed.
* :func:`load_fashion_mnist` returns one split of Fashion-MNIST as uint8 images
  ``(N, 28, 28)`` and int64 labels ``(N,)``. The 60,000-image training file is cut
  into ``"train"`` (55,000) and ``"val"`` (:data:`VAL_SIZE` = 5,000) by a fixed,
  seeded permutation (:data:`VAL_SEED`, see :func:`split_indices`); ``"test"`` is the
  10,000-image test file.
* :class:`TensorImageDataset` turns such uint8 images into normalised float tensors
  ``(C, S, S)`` (with optional training augmentation), and
  :func:`fashion_mnist_tensors` does the same for a whole split at once (evaluation).

:func:`image_folder` (an ImageNet-style ``root/class_x/*.jpg`` folder with timm's
eval transform) needs torchvision and pillow (extras ``zoo`` and ``data``); timm is
used for the transform when it is importable.

Where the Fashion-MNIST files come from, in order: the ``root`` argument; else the
environment variable ``UNDISCARD_FASHION_MNIST``; else the Debian package
``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``, four ``*.gz`` IDX
files) and the download cache ``~/.cache/undiscard/fashion-mnist``. In each root
both the flat layout (``root/train-images-idx3-ubyte[.gz]``) and torchvision's
layout (``root/FashionMNIST/raw/train-images-idx3-ubyte[.gz]``) are accepted.
"""

from __future__ import annotations

import functools
import gzip
import math
import os
import struct
import sys
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from undiscard.errors import DatasetNotFoundError, InputError, UndiscardError

__all__ = [
    "read_idx",
    "split_indices",
    "load_fashion_mnist",
    "fashion_mnist_tensors",
    "TensorImageDataset",
    "image_folder",
    "unreadable_images",
    "DatasetNotFoundError",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VAL_SIZE",
    "VAL_SEED",
    "DEBIAN_FASHION_MNIST",
    "ENV_FASHION_MNIST",
]

Split = Literal["train", "val", "test"]

#: Number of training-file images held out as the validation split.
VAL_SIZE: int = 5000
#: Seed of the permutation that picks the validation images (see :func:`split_indices`).
VAL_SEED: int = 20241001

#: Where the Debian package ``dataset-fashion-mnist`` puts the IDX files.
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
#: Environment variable naming the default Fashion-MNIST root.
ENV_FASHION_MNIST = "UNDISCARD_FASHION_MNIST"
_CACHE_FASHION_MNIST = Path("~/.cache/undiscard/fashion-mnist")

#: The ten Fashion-MNIST classes, by label index.
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: Mean / std of Fashion-MNIST training pixels scaled to [0, 1].
FASHION_MNIST_MEAN: float = 0.2860
FASHION_MNIST_STD: float = 0.3530
#: The usual ImageNet normalisation (RGB, pixels in [0, 1]).
IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)


# --------------------------------------------------------------------------- IDX

# IDX type code -> (torch dtype, bytes per item). Multi-byte items are big-endian.
_IDX_DTYPES: dict[int, tuple[torch.dtype, int]] = {
    0x08: (torch.uint8, 1),
    0x09: (torch.int8, 1),
    0x0B: (torch.int16, 2),
    0x0C: (torch.int32, 4),
    0x0D: (torch.float32, 4),
    0x0E: (torch.float64, 8),
}
_GZIP_MAGIC = b"\x1f\x8b"


def _read_bytes(path: Path) -> bytes:
    """The file's bytes, gunzipped when it is gzip data (by content, not by name)."""
    if not path.is_file():
        raise DatasetNotFoundError(f"IDX file {path} does not exist (or is not a file)")
    raw = path.read_bytes()
    if raw[:2] != _GZIP_MAGIC:
        if path.suffix == ".gz":
            raise InputError(f"{path}: named .gz but is not gzip data (starts with {raw[:4].hex() or 'nothing'})")
        return raw
    try:
        return gzip.decompress(raw)
    except (EOFError, OSError, zlib.error) as exc:
        raise InputError(
            f"{path}: corrupt or truncated gzip data ({type(exc).__name__}: {exc}); "
            "expected a complete gzip-compressed IDX file"
        ) from None


def read_idx(path: str | os.PathLike[str]) -> torch.Tensor:
    """Read an IDX file (plain or gzip-compressed) into a tensor.

    The IDX format: a 4-byte magic number ``00 00 TT D`` (``TT`` the type code:
    ``0x08`` uint8, ``0x09`` int8, ``0x0B`` int16, ``0x0C`` int32, ``0x0D`` float32,
    ``0x0E`` float64; ``D`` the number of dimensions), then ``D`` big-endian uint32
    sizes, then the items, big-endian, row-major. gzip data is recognised by its
    content, so ``.gz`` files and their unpacked twins both work.

    Returns a tensor of shape ``(d_1, ..., d_D)`` and the file's dtype (e.g. uint8
    ``(60000, 28, 28)`` for ``train-images-idx3-ubyte``, ``(60000,)`` for the labels).

    Raises :class:`InputError` on a bad magic number, an unknown type code, or a file
    shorter or longer than its header says, naming the file and what was expected;
    :class:`DatasetNotFoundError` when the file does not exist.

    Shape:
        - output: ``(d_1, ..., d_D)``, the sizes the header gives (any rank ``D``, 0 included).
    """
    path = Path(path)
    data = _read_bytes(path)
    if len(data) < 4:
        raise InputError(f"{path}: {len(data)} bytes, too short for an IDX header (expected at least 4)")
    zero, code, ndim = struct.unpack(">HBB", data[:4])
    if zero != 0 or code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02x}" for c in _IDX_DTYPES)
        raise InputError(
            f"{path}: bad IDX magic number 0x{data[:4].hex()}; expected 0x0000TTDD with type code "
            f"TT in {{{known}}} and DD the number of dimensions. Is this an IDX file?"
        )
    dtype, itemsize = _IDX_DTYPES[code]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise InputError(
            f"{path}: truncated IDX header: {len(data)} bytes, expected {header} for {ndim} dimension sizes"
        )
    dims = struct.unpack(f">{ndim}I", data[4:header])
    count = math.prod(dims)
    expected = header + count * itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise InputError(
            f"{path}: IDX file {what}: {len(data)} bytes, expected {expected} "
            f"({header}-byte header + {count} items of {itemsize} byte(s), shape {tuple(dims)})"
        )
    if count == 0:
        return torch.empty(dims, dtype=dtype)
    flat = torch.frombuffer(bytearray(memoryview(data)[header:]), dtype=torch.uint8)
    if itemsize > 1:
        flat = flat.view(count, itemsize)
        if sys.byteorder == "little":
            flat = flat.flip(-1)  # big-endian items -> native order
        flat = flat.contiguous()
    return flat.view(dtype).view(dims)


# --------------------------------------------------------------- Fashion-MNIST

_SPLIT_FILES: dict[str, tuple[str, str]] = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# Sub-folders of a root searched for the files: flat (Debian), torchvision's raw layout.
_SUBDIRS: tuple[tuple[str, ...], ...] = ((), ("FashionMNIST", "raw"), ("raw",))


def split_indices(n: int, val_size: int = VAL_SIZE, seed: int = VAL_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Deterministic train / validation indices of a training file of ``n`` items.

    ``perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))``; the
    first ``val_size`` entries, sorted, are the validation indices, the rest, sorted,
    the training indices. With the defaults (``n=60000``, :data:`VAL_SIZE` = 5000,
    :data:`VAL_SEED` = 20241001) this is the fixed Fashion-MNIST ``"val"`` split.

    Returns ``(train_idx, val_idx)``: int64 tensors of shape ``(n - val_size,)`` and
    ``(val_size,)``, disjoint, together covering ``range(n)`` once.

    Shape:
        - output: ``(n - val_size,)`` and ``(val_size,)``, each sorted.

    Example:
        >>> train, val = split_indices(10, 3, seed=0)
        >>> train.shape, val.shape, sorted(train.tolist() + val.tolist()) == list(range(10))
        (torch.Size([7]), torch.Size([3]), True)
    """
    if not 0 < val_size < n:
        raise InputError(f"val_size must be in 1..n-1 (n={n}), got {val_size}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def _default_roots() -> list[Path]:
    env = os.environ.get(ENV_FASHION_MNIST)
    if env:
        return [Path(env).expanduser()]
    return [DEBIAN_FASHION_MNIST, _CACHE_FASHION_MNIST.expanduser()]


def _find_pair(roots: Sequence[Path], stems: tuple[str, str]) -> tuple[Path, Path] | None:
    """The first (images, labels) file pair found in a root's flat or torchvision layout."""
    for root in roots:
        for sub in _SUBDIRS:
            folder = root.joinpath(*sub)
            found = []
            for stem in stems:
                hit = next((folder / n for n in (stem, stem + ".gz") if (folder / n).is_file()), None)
                found.append(hit)
            if all(found):
                return found[0], found[1]
    return None


def _searched(roots: Sequence[Path]) -> str:
    return ", ".join(str(root.joinpath(*sub)) for root in roots for sub in _SUBDIRS)


def _download_fashion_mnist(root: Path) -> None:
    """Fetch the four raw files into ``root/FashionMNIST/raw`` with torchvision."""
    from undiscard.compat import ensure_torchvision

    if not ensure_torchvision():
        raise UndiscardError(
            "download=True needs torchvision (pip install 'undiscard[zoo]'); "
            "or install the Debian package: apt-get install dataset-fashion-mnist"
        )
    from torchvision.datasets import FashionMNIST

    try:
        root.mkdir(parents=True, exist_ok=True)
        FashionMNIST(str(root), train=True, download=True)
    except Exception as exc:  # network, permissions, checksum: all end the same way
        raise UndiscardError(
            f"downloading Fashion-MNIST into {root} failed ({type(exc).__name__}: {exc}). "
            "Install the Debian package instead (apt-get install dataset-fashion-mnist) "
            f"or put the IDX files in a folder and pass it as root / ${ENV_FASHION_MNIST}"
        ) from exc


def load_fashion_mnist(
    root: str | os.PathLike[str] | None = None,
    split: Split = "train",
    *,
    download: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One split of Fashion-MNIST: uint8 images ``(N, 28, 28)``, int64 labels ``(N,)``.

    ``split``: ``"train"`` (N = 55,000: the training file without the validation
    images), ``"val"`` (N = :data:`VAL_SIZE` = 5,000, fixed by
    :func:`split_indices` with seed :data:`VAL_SEED` = 20241001; sorted indices into
    the training file), or ``"test"`` (N = 10,000, the test file).

    ``root``: a folder holding ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (each plain or ``.gz``),
    flat or in torchvision's ``FashionMNIST/raw`` sub-folder. ``None``: the
    ``UNDISCARD_FASHION_MNIST`` environment variable, else the Debian package's folder
    ``/usr/share/datasets/fashion-mnist`` and the download cache
    ``~/.cache/undiscard/fashion-mnist``.

    ``download=True``: when the files are missing, fetch them with
    ``torchvision.datasets.FashionMNIST(root, download=True)`` (into ``root``, or the
    environment variable's folder, or the cache folder) and read the raw files.

    Raises :class:`DatasetNotFoundError` (an :class:`UndiscardError`) when the files
    are missing and ``download`` is false, saying where it looked and how to get them;
    :class:`InputError` for a bad split name or malformed files.

    Shape:
        - output: uint8 images ``(N, 28, 28)`` and int64 labels ``(N,)`` in ``0..9``,
          ``N`` = 55,000 / 5,000 / 10,000 for ``"train"`` / ``"val"`` / ``"test"`` with the real files.
    """
    if split not in ("train", "val", "test"):
        raise InputError(f"split must be 'train', 'val' or 'test', got {split!r}")
    stems = _SPLIT_FILES["test" if split == "test" else "train"]
    roots = [Path(root).expanduser()] if root is not None else _default_roots()
    pair = _find_pair(roots, stems)
    if pair is None and download:
        target = roots[0] if root is not None or os.environ.get(ENV_FASHION_MNIST) else roots[-1]
        _download_fashion_mnist(target)
        pair = _find_pair([target], stems)
        if pair is None:
            raise UndiscardError(
                f"torchvision's download into {target} did not leave {stems[0]}[.gz] and "
                f"{stems[1]}[.gz] in {_searched([target])}"
            )
    if pair is None:
        raise DatasetNotFoundError(
            f"Fashion-MNIST {split!r} files not found: looked for {stems[0]}[.gz] and {stems[1]}[.gz] "
            f"in {_searched(roots)}. Either install the Debian package "
            f"(apt-get install dataset-fashion-mnist, files in {DEBIAN_FASHION_MNIST}), or pass "
            "download=True (CLI: --download) to fetch them with torchvision; or point root / "
            f"${ENV_FASHION_MNIST} at a folder holding them."
        )
    images, labels = read_idx(pair[0]), read_idx(pair[1])
    if images.dim() != 3 or labels.dim() != 1 or images.shape[0] != labels.shape[0]:
        raise InputError(
            f"{pair[0]} / {pair[1]}: expected images (N, H, W) and labels (N,), "
            f"got {tuple(images.shape)} and {tuple(labels.shape)}"
        )
    if images.dtype != torch.uint8 or labels.dtype != torch.uint8:
        raise InputError(f"{pair[0]} / {pair[1]}: expected uint8 IDX files, got {images.dtype} / {labels.dtype}")
    labels = labels.long()
    if split == "test":
        return images, labels
    train_idx, val_idx = split_indices(images.shape[0], VAL_SIZE, VAL_SEED)
    idx = train_idx if split == "train" else val_idx
    return images[idx], labels[idx]


# ----------------------------------------------------------------- tensors

def _per_channel(value: float | Sequence[float], chans: int, name: str) -> torch.Tensor:
    """``value`` as a float32 ``(chans, 1, 1)`` tensor (a scalar or 1-vector is repeated)."""
    t = torch.as_tensor(value, dtype=torch.float32).flatten()
    if t.numel() == 1:
        t = t.expand(chans)
    elif t.numel() != chans:
        raise InputError(f"{name} has {t.numel()} values; expected 1 or in_chans={chans}")
    return t.reshape(chans, 1, 1).clone()


def _check_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``(N, H, W)`` or ``(N, 1, H, W)`` -> ``(N, 1, H, W)``."""
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] != 1:
        raise InputError(f"images must be (N, H, W) or (N, 1, H, W) grayscale, got shape {tuple(images.shape)}")
    if images.dtype != torch.uint8:
        raise InputError(f"images must be uint8 (pixels 0..255), got {images.dtype}")
    return images


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    """Float ``(B, C, H, W)`` -> ``(B, C, size, size)``, bilinear (no-op at that size)."""
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=False)


def _torch_augment(x: torch.Tensor, size: int, scale: tuple[float, float], translate: float) -> torch.Tensor:
    """Fallback augmentation without torchvision: ``(C, H, W)`` -> ``(C, size, size)``."""
    _, h, w = x.shape
    area = h * w * float(torch.empty(()).uniform_(*scale))
    side_h = max(1, min(h, round(math.sqrt(area * h / w))))
    side_w = max(1, min(w, round(math.sqrt(area * w / h))))
    top = int(torch.randint(0, h - side_h + 1, ()))
    left = int(torch.randint(0, w - side_w + 1, ()))
    x = resize(x[None, :, top : top + side_h, left : left + side_w], size)[0]
    max_shift = int(round(translate * size))
    dy, dx = (int(v) for v in torch.randint(-max_shift, max_shift + 1, (2,)))
    shifted = torch.zeros_like(x)
    ys, yd = (slice(0, size - dy), slice(dy, size)) if dy >= 0 else (slice(-dy, size), slice(0, size + dy))
    xs, xd = (slice(0, size - dx), slice(dx, size)) if dx >= 0 else (slice(-dx, size), slice(0, size + dx))
    shifted[:, yd, xd] = x[:, ys, xs]
    if bool(torch.rand(()) < 0.5):
        shifted = shifted.flip(-1)
    return shifted


class TensorImageDataset(Dataset):
    """uint8 grayscale images + labels -> normalised float images ``(C, S, S)``.

    ``images``: uint8 ``(N, H, W)`` (or ``(N, 1, H, W)``); ``labels``: ``(N,)``
    integers. Item ``i`` is ``(x, label)``: ``x`` float32 ``(in_chans, size, size)``,
    pixels scaled to [0, 1], resized bilinearly (``antialias=False``), the gray channel
    repeated ``in_chans`` times, then ``(x - mean) / std`` (``mean`` / ``std``: a
    scalar or one value per channel; defaults: Fashion-MNIST's 0.2860 / 0.3530);
    ``label`` a Python int. ``size=None`` keeps the images' own size (square images).

    ``train=True`` adds augmentation before normalising: a random-resized crop
    (area scale 0.7-1.0, aspect 3/4-4/3) to ``size``, a random translation of up to
    ``translate`` (default 10%) of the side, zero-filled (the background), and a random
    horizontal flip. It uses ``torchvision.transforms.v2`` when torchvision imports,
    else an equivalent torch-only fallback. Randomness comes from torch's global RNG
    (per-worker seeding is the DataLoader's).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        size: int | None = None,
        in_chans: int = 1,
        mean: float | Sequence[float] = FASHION_MNIST_MEAN,
        std: float | Sequence[float] = FASHION_MNIST_STD,
        train: bool = False,
        scale: tuple[float, float] = (0.7, 1.0),
        translate: float = 0.1,
    ) -> None:
        self.images = _check_images(images)
        self.labels = torch.as_tensor(labels).long()
        if self.labels.shape != (self.images.shape[0],):
            raise InputError(
                f"labels must be ({self.images.shape[0]},) to match the images, got {tuple(self.labels.shape)}"
            )
        h, w = self.images.shape[-2:]
        if size is None:
            if h != w:
                raise InputError(f"images are {h}x{w}, not square: pass size=")
            size = int(h)
        if size < 1 or in_chans < 1:
            raise InputError(f"size and in_chans must be positive, got size={size}, in_chans={in_chans}")
        self.size, self.in_chans, self.train = int(size), int(in_chans), bool(train)
        self.scale, self.translate = (float(scale[0]), float(scale[1])), float(translate)
        self.mean = _per_channel(mean, self.in_chans, "mean")
        self.std = _per_channel(std, self.in_chans, "std")
        if bool((self.std <= 0).any()):
            raise InputError(f"std must be positive, got {self.std.flatten().tolist()}")
        self._augment: Callable[[torch.Tensor], torch.Tensor] | None = None
        if self.train:
            self._augment = self._build_augment()

    def _build_augment(self) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """torchvision.transforms.v2 pipeline, or ``None`` to use :func:`_torch_augment`."""
        from undiscard.compat import ensure_torchvision

        try:
            if not ensure_torchvision():
                return None
            from torchvision.transforms import v2
        except Exception:  # a broken torchvision: the fallback does the same job
            return None
        return v2.Compose(
            [
                v2.RandomResizedCrop(self.size, scale=self.scale, antialias=True),
                v2.RandomAffine(degrees=0.0, translate=(self.translate, self.translate), fill=0.0),
                v2.RandomHorizontalFlip(),
            ]
        )

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index].float().div_(255.0)  # (1, H, W)
        if self.train:
            if self._augment is not None:
                x = self._augment(x)
            else:
                x = _torch_augment(x, self.size, self.scale, self.translate)
        else:
            x = resize(x[None], self.size)[0]
        x = x.expand(self.in_chans, -1, -1)
        return (x - self.mean) / self.std, int(self.labels[index])


def fashion_mnist_tensors(
    split: Split,
    size: int,
    in_chans: int = 1,
    root: str | os.PathLike[str] | None = None,
    *,
    mean: float | Sequence[float] = FASHION_MNIST_MEAN,
    std: float | Sequence[float] = FASHION_MNIST_STD,
    chunk: int = 2048,
    download: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A whole Fashion-MNIST split as model input, for evaluation (no augmentation).

    Returns ``x`` float32 ``(N, in_chans, size, size)`` and ``y`` int64 ``(N,)``:
    the same values as :class:`TensorImageDataset` with ``train=False`` item by item,
    computed ``chunk`` images at a time. ``root`` / ``download`` as in
    :func:`load_fashion_mnist`.

    When ``mean`` and ``std`` are the same for every channel, the ``in_chans``
    channels of ``x`` are an expanded view of one computed channel (no extra memory:
    ``10000 x 3 x 224 x 224`` floats would be 6 GB, this is 2 GB); such a tensor is
    fine as model input (slice it into batches) but must not be written in place:
    call ``.contiguous()`` first if you need to.

    Shape:
        - output: ``x`` float32 ``(N, in_chans, size, size)`` and ``y`` int64 ``(N,)``, ``N``
          the split's size (:func:`load_fashion_mnist`).
    """
    images, labels = load_fashion_mnist(root, split, download=download)
    images = _check_images(images)
    if size < 1 or in_chans < 1 or chunk < 1:
        raise InputError(f"size, in_chans and chunk must be positive, got {size}, {in_chans}, {chunk}")
    mean_t = _per_channel(mean, in_chans, "mean")
    std_t = _per_channel(std, in_chans, "std")
    shared = bool((mean_t == mean_t[0]).all() and (std_t == std_t[0]).all())
    n = images.shape[0]
    out = torch.empty(n, 1 if shared else in_chans, size, size)
    m, s = (mean_t[:1], std_t[:1]) if shared else (mean_t, std_t)
    for start in range(0, n, chunk):
        x = resize(images[start : start + chunk].float().div_(255.0), size)
        out[start : start + chunk] = (x - m) / s
    if shared:
        out = out.expand(n, in_chans, size, size)
    return out, labels


# ----------------------------------------------------------------- image folders

#: What to do about an image that cannot be decoded, named in the error.
CORRUPT_HINT = "replace or remove it, or pass --skip-corrupt to leave such images out (with a warning naming them)"


def _decode_error(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _decode(path: str, mode: str) -> object:
    from PIL import Image

    with open(path, "rb") as f:
        img = Image.open(f)
        return img.convert(mode)


def _pil_loader(path: str, mode: str) -> object:
    """The image at ``path`` decoded and converted to ``mode``; :class:`InputError` naming the file if it cannot be."""
    try:
        return _decode(path, mode)
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError ... for broken files
        raise InputError(f"{path}: not a readable image ({_decode_error(exc)}); {CORRUPT_HINT}") from None


def unreadable_images(paths: Sequence[str | os.PathLike[str]], mode: str = "RGB") -> list[tuple[str, str]]:
    """``(path, reason)`` of each of ``paths`` that PIL cannot fully decode (as ``mode``), in order."""
    bad = []
    for p in paths:
        try:
            _decode(str(p), mode)
        except Exception as exc:
            bad.append((str(p), _decode_error(exc)))
    return bad


def image_folder(
    root: str | os.PathLike[str],
    *,
    input_size: tuple[int, int, int] = (3, 224, 224),
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    crop_pct: float = 0.875,
    interpolation: str = "bicubic",
) -> Dataset:
    """An ImageNet-style folder (``root/<class>/<image>``) with timm's eval transform.

    Returns a ``torchvision.datasets.ImageFolder``: item ``i`` is ``(x, class_index)``,
    ``x`` float32 ``input_size`` = ``(C, H, W)``; classes are the sub-folder names,
    sorted (``dataset.classes``, ``dataset.class_to_idx``). Images are decoded by PIL
    and converted to RGB (``C == 3``) or grayscale (``C == 1``).

    The transform: resize the shorter side to ``floor(size / crop_pct)``
    (``interpolation``), center-crop to ``(H, W)``, scale to [0, 1], normalise with
    ``mean`` / ``std``. It is ``timm.data.create_transform(input_size,
    is_training=False, ...)`` when timm imports, else the same built from
    torchvision transforms.

    Needs torchvision and pillow. Raises :class:`DatasetNotFoundError` when ``root``
    is not a folder, :class:`InputError` when it has no class sub-folders or no image
    files in them.
    """
    from undiscard.compat import ensure_torchvision

    path = Path(root).expanduser()
    if not path.is_dir():
        raise DatasetNotFoundError(f"image folder {path} does not exist (or is not a folder)")
    if not any(p.is_dir() for p in path.iterdir()):
        raise InputError(
            f"image folder {path} has no class sub-folders; expected the layout {path}/<class>/<image>.jpg"
        )
    if len(input_size) != 3 or input_size[0] not in (1, 3):
        raise InputError(f"input_size must be (C, H, W) with C 1 or 3, got {tuple(input_size)}")
    chans, height, width = (int(v) for v in input_size)
    if len(mean) not in (1, chans) or len(std) not in (1, chans):
        raise InputError(f"mean / std need 1 or {chans} values, got {len(mean)} / {len(std)}")
    if not 0 < crop_pct <= 1:
        raise InputError(f"crop_pct must be in (0, 1], got {crop_pct}")
    if not ensure_torchvision():
        raise UndiscardError("image_folder needs torchvision: pip install 'undiscard[zoo,data]'")
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise UndiscardError("image_folder needs pillow: pip install 'undiscard[data]'") from None
    from torchvision.datasets import ImageFolder

    transform = _eval_transform((chans, height, width), tuple(mean), tuple(std), crop_pct, interpolation)
    loader = functools.partial(_pil_loader, mode="RGB" if chans == 3 else "L")
    try:
        return ImageFolder(str(path), transform=transform, loader=loader)
    except FileNotFoundError as exc:
        raise InputError(f"image folder {path}: {exc}") from None


def _eval_transform(
    input_size: tuple[int, int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    crop_pct: float,
    interpolation: str,
) -> Callable[[object], torch.Tensor]:
    """timm's eval transform, or its torchvision equivalent when timm is missing."""
    try:
        from timm.data import create_transform
    except ImportError:
        create_transform = None
    if create_transform is not None:
        return create_transform(
            input_size, is_training=False, crop_pct=crop_pct, interpolation=interpolation, mean=mean, std=std
        )
    from torchvision import transforms as T

    modes = {
        "bicubic": T.InterpolationMode.BICUBIC,
        "bilinear": T.InterpolationMode.BILINEAR,
        "nearest": T.InterpolationMode.NEAREST,
    }
    if interpolation not in modes:
        raise InputError(f"interpolation must be one of {sorted(modes)}, got {interpolation!r}")
    _, h, w = input_size
    resize: int | tuple[int, int] = math.floor(h / crop_pct)  # shorter side, as timm does
    if h != w:
        resize = (math.floor(h / crop_pct), math.floor(w / crop_pct))
    return T.Compose(
        [
            T.Resize(resize, interpolation=modes[interpolation]),
            T.CenterCrop((h, w)),
            T.ToTensor(),
            T.Normalize(mean, std),
        ]
    )
