"""One configuration against the plain model, on the same images.

:func:`paired_report` gives what a claim needs: both top-1s, the gain with its
paired-bootstrap 95% interval and the exact McNemar test, NLL and ECE raw and after
temperature scaling (each predictor's temperature fitted on its own validation logits).

:func:`consistency` is the shift-stability metric of Zhang (2019, "Making convolutional
networks shift-invariant again"): each image is shifted twice, by two random offsets of
up to ``max_shift`` pixels per axis, and the metric is the fraction of images whose
predicted class is the same for both. The shifted image is the original translated
with its border pixels replicated into the uncovered band (for a centred object on a
plain background, the background), the same two offsets for every predictor compared.
The offsets of an image come from a generator seeded by its values
(:func:`undiscard.method.search.image_seeds`): the metric depends on the images alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from undiscard.errors import InputError
from undiscard.method.search import image_seeds
from undiscard.evaluation.stats import calibration, compare

__all__ = ["predict", "shift_images", "shift_offsets", "consistency", "paired_report"]


@torch.no_grad()
def predict(fn: Callable[[torch.Tensor], torch.Tensor], x, batch: int = 256,
            progress: Callable[[int], None] | None = None) -> torch.Tensor:
    """``fn`` over ``x`` a batch at a time -> logits ``(N, K)`` (float32, CPU).

    Shape:
        - x: ``(N, ...)``, a tensor or anything sliceable into batches.
        - fn: a batch ``(n, ...)`` -> ``(n, K)``.
        - output: ``(N, K)`` float32 on the CPU (a ``(0,)`` tensor when ``N = 0``).

    Example:
        >>> predict(lambda xb: 2 * xb, torch.ones(5, 3), batch=2).shape
        torch.Size([5, 3])
    """
    out = []
    for s in range(0, x.shape[0], batch):
        xb = x[s : s + batch]
        out.append(fn(xb).detach().float().cpu())
        if progress is not None:
            progress(xb.shape[0])
    return torch.cat(out) if out else torch.zeros(0)


def shift_images(x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor) -> torch.Tensor:
    """Translate image ``i`` of ``x (N, C, H, W)`` by ``(dy[i], dx[i])`` pixels (positive: down /
    right), replicating the border into the uncovered band.

    Shape:
        - x: ``(N, C, H, W)``.
        - dy, dx: ``(N,)`` integers, ``|shift| < min(H, W)``.
        - output: ``(N, C, H, W)``.

    Example:
        >>> x = torch.arange(9.0).reshape(1, 1, 3, 3)
        >>> shift_images(x, torch.tensor([0]), torch.tensor([1]))[0, 0].tolist()
        [[0.0, 0.0, 1.0], [3.0, 3.0, 4.0], [6.0, 6.0, 7.0]]
    """
    if x.dim() != 4:
        raise InputError(f"shift_images takes (N, C, H, W) images; got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    m = int(max(dy.abs().max(), dx.abs().max())) if n else 0
    if m == 0:
        return x.clone()
    if m >= min(h, w):
        raise InputError(f"a shift of {m} pixels is not smaller than the {h}x{w} image")
    padded = F.pad(x, (m, m, m, m), mode="replicate")
    rows = (m - dy[:, None] + torch.arange(h))[:, None, :, None]
    cols = (m - dx[:, None] + torch.arange(w))[:, None, None, :]
    b = torch.arange(n)[:, None, None, None]
    c = torch.arange(x.shape[1])[None, :, None, None]
    return padded[b, c, rows, cols]


def shift_offsets(x: torch.Tensor, max_shift: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Two random offsets per image, ``(dy1, dx1, dy2, dx2)``, each in ``[-max_shift, max_shift]``.

    The draws of an image come from a generator seeded by its values
    (:func:`~undiscard.method.search.image_seeds`) and ``seed``.

    Shape:
        - x: ``(N, ...)``.
        - output: four int64 ``(N,)`` tensors.

    Example:
        >>> dy1, dx1, dy2, dx2 = shift_offsets(torch.zeros(3, 1, 4, 4), 2)
        >>> dy1.shape, bool((torch.stack([dy1, dx1, dy2, dx2]).abs() <= 2).all())
        (torch.Size([3]), True)
    """
    seeds = image_seeds(x, seed)
    draws = torch.stack([torch.randint(-max_shift, max_shift + 1, (4,),
                                       generator=torch.Generator().manual_seed(s % (1 << 63))) for s in seeds]) \
        if seeds else torch.zeros(0, 4, dtype=torch.long)
    return tuple(draws[:, k] for k in range(4))


@torch.no_grad()
def consistency(fns: dict[str, Callable[[torch.Tensor], torch.Tensor]], x, max_shift: int, *, batch: int = 128,
                seed: int = 0, progress: Callable[[int], None] | None = None) -> dict[str, torch.Tensor]:
    """Per predictor, ``(N,)`` booleans: same predicted class under both random shifts of each image.

    Shape:
        - x: ``(N, C, H, W)``, a tensor or anything sliceable into such batches.
        - fns: each maps ``(n, C, H, W)`` images to ``(n, K)`` logits.
        - output: ``{name: (N,) bool}``.
    """
    if max_shift < 1:
        raise InputError(f"--consistency takes the largest shift in pixels, at least 1; got {max_shift}")
    same: dict[str, list[torch.Tensor]] = {k: [] for k in fns}
    for s in range(0, x.shape[0], batch):
        xb = x[s : s + batch]
        dy1, dx1, dy2, dx2 = shift_offsets(xb, max_shift, seed)
        a, b = shift_images(xb, dy1, dx1), shift_images(xb, dy2, dx2)
        for name, fn in fns.items():
            same[name].append(fn(a).argmax(1) == fn(b).argmax(1))
        if progress is not None:
            progress(xb.shape[0])
    return {k: torch.cat(v) for k, v in same.items()}


def paired_report(ours: torch.Tensor, plain: torch.Tensor, y: torch.Tensor, *, val_ours: torch.Tensor | None = None,
                  val_plain: torch.Tensor | None = None, val_y: torch.Tensor | None = None, seed: int = 0) -> dict:
    """Top-1 of both, gain with interval and McNemar, and calibration (raw and temperature-scaled).

    Shape:
        - ours, plain: ``(N, K)`` logits of the same images; y: ``(N,)`` int64 labels.
        - val_ours, val_plain: ``(N_val, K)`` validation logits; val_y: ``(N_val,)``.
        - output: a dict (top-1s in points, :func:`~undiscard.evaluation.stats.compare`'s keys,
          and each predictor's :func:`~undiscard.evaluation.stats.calibration`).
    """
    c_ours, c_plain = ours.argmax(1) == y, plain.argmax(1) == y
    return {
        "images": int(y.numel()),
        "plain_top1": 100 * float(c_plain.double().mean()),
        "top1": 100 * float(c_ours.double().mean()),
        **compare(c_ours, c_plain, seed=seed),
        "plain_calibration": calibration(plain, y, val_plain, val_y),
        "calibration": calibration(ours, y, val_ours, val_y),
    }
