"""Training the project's two segmentation models on fashion-mnist-seg (``undiscard train-segmenter``).

Standard supervised training, no offset tricks: the network never sees a non-default
state while it learns. The recipe (:class:`SegRecipe`) is seeded and stored in the
checkpoint's metadata and in a JSON sidecar beside it:

* data: :class:`undiscard.data.segmentation.CanvasSegmentation` ``("train", 96, train=True)`` --
  20,000 canvases of 2-4 Fashion-MNIST items, random horizontal flip; batches drawn
  from one seeded permutation per epoch;
* loss: pixel cross-entropy at input resolution (logits upsampled bilinearly, as at
  test time) with ``ignore_index`` 255;
* optimiser: AdamW (weight decay 0.01), linear warm-up over the first 5% of steps, then
  cosine to 0; batch 32; a fixed number of steps sized to finish in about ten minutes
  on two CPU cores (``deeplabv3-tiny`` 3000, ``segformer-tiny`` 2400);
* the checkpoint: float16 safetensors (:func:`undiscard.models.segmenters.save_segmenter`), and
  ``OUT.json`` with the recipe, steps, wall time and the mIoU / pixel accuracy on the
  first ``val_images`` canvases of fashion-mnist-seg:val.

Interrupt it at any time: a resume file (``OUT.resume.safetensors``: model, optimiser, RNG
state, step, elapsed time, as tensors plus JSON metadata, nothing unpickled; written every
``save_every`` steps and on Ctrl-C) lets the same command carry on where it stopped;
another recipe refuses to resume it. A completed ``OUT`` of the same recipe is not
retrained; one of another recipe is refused (``--fresh`` deletes it first). The
``OUT.resume.pt`` pickles of older versions are refused, never loaded.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from undiscard.errors import UndiscardError

__all__ = ["ARCH_DEFAULTS", "SegRecipe", "evaluate_segmenter", "train_segmenter"]

#: Per-architecture defaults of the shipped checkpoints (steps sized for ~10 min on 2 CPU cores).
ARCH_DEFAULTS: dict[str, dict] = {
    "deeplabv3-tiny": {"steps": 3000, "lr": 3e-3},
    "segformer-tiny": {"steps": 2400, "lr": 2e-3},
}


@dataclass
class SegRecipe:
    arch: str
    size: int = 96
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.01
    warmup: float = 0.05
    seed: int = 0
    val_images: int = 500

    @classmethod
    def for_arch(cls, arch: str, **overrides) -> SegRecipe:
        """The shipped recipe of ``arch`` with ``overrides`` (``None`` values keep the default)."""
        if arch not in ARCH_DEFAULTS:
            raise UndiscardError(f"train-segmenter trains {sorted(ARCH_DEFAULTS)}; got {arch!r}")
        kw = {**ARCH_DEFAULTS[arch], **{k: v for k, v in overrides.items() if v is not None}}
        return cls(arch=arch, **kw)


def _lr_at(step: int, recipe: SegRecipe) -> float:
    warm = max(1, int(recipe.warmup * recipe.steps))
    if step < warm:
        return recipe.lr * (step + 1) / warm
    t = (step - warm) / max(1, recipe.steps - warm)
    return recipe.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


@torch.no_grad()
def evaluate_segmenter(model: nn.Module, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                       ignore_index: int = 255, batch_size: int = 64) -> dict:
    """mIoU and pixel accuracy of the plain model on ``x`` ``(N, C, H, W)``, ``y`` ``(N, H, W)``.

    Returns ``{"miou", "pixel_accuracy"}`` in percent (:class:`~undiscard.data.segmentation.SegMetrics`),
    the model run ``batch_size`` images at a time and put in eval mode.

    Shape:
        - x: ``(N, C, H, W)``; the model's logits ``(N, K, h, w)`` (upsampled to ``(H, W)``).
        - y: ``(N, H, W)`` integer class ids in ``0..num_classes-1`` or ``ignore_index``.

    Example:
        >>> r = evaluate_segmenter(nn.Conv2d(1, 3, 1), torch.zeros(2, 1, 4, 4), torch.zeros(2, 4, 4, dtype=torch.long), 3)
        >>> sorted(r)
        ['miou', 'pixel_accuracy']
    """
    from undiscard.data.segmentation import SegMetrics
    from undiscard.method.segment import dense_logits

    model.eval()
    m = SegMetrics(num_classes, ignore_index)
    for s in range(0, x.shape[0], batch_size):
        m.update(dense_logits(model, x[s : s + batch_size]).argmax(1), y[s : s + batch_size])
    return {"miou": 100.0 * m.miou(), "pixel_accuracy": 100.0 * m.pixel_accuracy()}


def train_segmenter(recipe: SegRecipe, out: str | os.PathLike, *, root: str | None = None, half: bool = True,
                    save_every: int = 100, fresh: bool = False, log=print) -> dict:
    """Train ``recipe.arch`` on fashion-mnist-seg and write ``out`` (.safetensors) + ``out.json``.

    An ``out`` already trained with ``recipe`` is not trained again (its summary is
    returned); one trained with another recipe is refused unless ``fresh``.
    """
    from undiscard.data.segmentation import IGNORE_INDEX, SEG_NUM_CLASSES, CanvasSegmentation, fashion_mnist_canvas
    from undiscard.method.segment import dense_forward, upsample_logits
    from undiscard.models.segmenters import build_segmenter, parameter_count, save_segmenter
    from undiscard.statefile import save_state
    from undiscard.models.train_classifier import RESUME_KIND, load_resume, prepare_output

    out = Path(out)
    if out.suffix != ".safetensors":
        raise UndiscardError(f"the output must be a .safetensors path, got {str(out)!r}")
    if recipe.steps < 1 or recipe.batch_size < 1 or recipe.lr <= 0:
        raise UndiscardError(f"steps, batch size and lr must be positive: {recipe}")
    resume_path = out.with_name(out.name + ".resume.safetensors")
    done = prepare_output(out, resume_path, asdict(recipe), fresh, log)
    if done is not None:
        return done
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    model = build_segmenter(recipe.arch, SEG_NUM_CLASSES, 1)
    forward = dense_forward(model)
    ds = CanvasSegmentation("train", recipe.size, train=True, root=root)
    n = len(ds)
    per_epoch = n // recipe.batch_size
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr)
    step, losses, elapsed = 0, [], 0.0
    if resume_path.exists():
        ck = load_resume(resume_path, asdict(recipe))
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, losses, elapsed = ck["step"], ck["losses"], ck["elapsed"]
        torch.set_rng_state(ck["rng"])
        log(f"resuming {out} at step {step}/{recipe.steps}")
    t0 = time.perf_counter() - elapsed

    def save_resume() -> None:
        save_state({"recipe": asdict(recipe), "model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                    "losses": losses, "rng": torch.get_rng_state(), "elapsed": time.perf_counter() - t0},
                   resume_path, RESUME_KIND)

    try:
        model.train()
        while step < recipe.steps:
            # one permutation per epoch from a generator seeded by (seed, epoch): resumable mid-epoch
            epoch, b = divmod(step, per_epoch)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(recipe.seed * 1000 + epoch))
            items = [ds[i] for i in perm[b * recipe.batch_size : (b + 1) * recipe.batch_size].tolist()]
            x, y = torch.stack([it[0] for it in items]), torch.stack([it[1] for it in items])
            for g in opt.param_groups:
                g["lr"] = _lr_at(step, recipe)
            logits = upsample_logits(forward(x), x.shape[-2:])
            loss = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)
            if not torch.isfinite(loss):
                raise UndiscardError(f"loss became {float(loss)} at step {step}; lower --lr")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            losses.append(loss.item())
            if step % 50 == 0 or step == recipe.steps:
                log(f"{recipe.arch} step {step}/{recipe.steps} loss {sum(losses[-50:]) / len(losses[-50:]):.4f} "
                    f"({time.perf_counter() - t0:.0f} s)")
            if step % save_every == 0:
                save_resume()
    except KeyboardInterrupt:
        save_resume()
        raise UndiscardError(f"interrupted at step {step}/{recipe.steps}; run the same command again to resume") from None
    train_s = time.perf_counter() - t0
    save_resume()
    xv, yv = fashion_mnist_canvas("val", recipe.size, limit=recipe.val_images, root=root)
    val = evaluate_segmenter(model, xv, yv, SEG_NUM_CLASSES, IGNORE_INDEX)
    summary = {
        "recipe": asdict(recipe),
        "arch": f"seg:{recipe.arch}",
        "parameters": parameter_count(model),
        "steps": recipe.steps,
        "train_seconds": round(train_s, 1),
        "threads": torch.get_num_threads(),
        "final_loss": sum(losses[-50:]) / len(losses[-50:]),
        "val": {"data": f"fashion-mnist-seg:val[0:{recipe.val_images}]", **val},
        "torch": torch.__version__,
    }
    meta = {"undiscard.recipe": json.dumps(asdict(recipe)), "undiscard.val_miou": f"{val['miou']:.2f}",
            "undiscard.dataset": "fashion-mnist-seg"}
    save_segmenter(model, out, arch=f"seg:{recipe.arch}", num_classes=SEG_NUM_CLASSES, in_chans=1,
                   input_size=(1, recipe.size, recipe.size), extra_metadata=meta, half=half)
    summary["file_bytes"] = out.stat().st_size
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    resume_path.unlink(missing_ok=True)
    log(f"wrote {out} ({summary['file_bytes']} bytes): val mIoU {val['miou']:.2f}, pixel accuracy "
        f"{val['pixel_accuracy']:.2f} after {train_s:.0f} s")
    return summary
