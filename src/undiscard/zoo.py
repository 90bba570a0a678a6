"""Training the project's own backbones on Fashion-MNIST (the model zoo).

Standard supervised training, no offset tricks: the backbone never sees a non-default
state while it learns. The recipe (``undiscard train-backbone``; ``scripts/train_zoo.sh``
trains every zoo model) is seeded and written into the checkpoint's metadata:

* data: the Fashion-MNIST train split minus the fixed 5k validation images
  (:func:`undiscard.data.split_indices`), upsampled to ``size`` x ``size`` (default 128,
  so the last feature map of a stride-32 network is 4x4), gray channel repeated
  ``in_chans`` times; augmentation: random-resized crop (area 0.7-1), translation up to
  10%, horizontal flip (:class:`undiscard.data.TensorImageDataset`);
* optimiser: AdamW (lr, weight decay 0.05), linear warm-up over the first 5% of steps,
  then cosine to 0; label smoothing 0.1; batch 128;
* the checkpoint: safetensors (float16 with ``--half``), metadata ``undiscard.arch`` etc.
  so :func:`undiscard.models.load_model` rebuilds it, plus the recipe and the
  validation accuracy.

Interrupt it at any time: a resume file (``OUT.resume.pt``, model + optimiser + RNG
state, written every ``--save-every`` steps and on Ctrl-C) lets the same command
carry on where it stopped.
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

from undiscard.errors import UndiscardError

__all__ = ["Recipe", "train_backbone"]


@dataclass
class Recipe:
    arch: str
    size: int = 128
    in_chans: int = 1
    epochs: float = 1.0
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    warmup: float = 0.05
    seed: int = 0


def _lr_at(step: int, total: int, recipe: Recipe) -> float:
    warm = max(1, int(recipe.warmup * total))
    if step < warm:
        return recipe.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return recipe.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256) -> float:
    model.eval()
    correct = 0
    for s in range(0, x.shape[0], batch_size):
        correct += int((model(x[s : s + batch_size]).argmax(1) == y[s : s + batch_size]).sum())
    return correct / max(1, x.shape[0])


def train_backbone(
    recipe: Recipe,
    out: str | os.PathLike,
    *,
    root: str | None = None,
    half: bool = True,
    save_every: int = 50,
    log=print,
) -> dict:
    """Train ``recipe.arch`` on Fashion-MNIST and write ``out`` (.safetensors). Returns the summary."""
    from undiscard.data import TensorImageDataset, fashion_mnist_tensors, load_fashion_mnist
    from undiscard.models import load_model, save_checkpoint

    out = Path(out)
    if out.suffix != ".safetensors":
        raise UndiscardError(f"the output must be a .safetensors path, got {str(out)!r}")
    if recipe.epochs <= 0 or recipe.batch_size < 1 or recipe.lr <= 0:
        raise UndiscardError(f"epochs, batch size and lr must be positive: {recipe}")
    out.parent.mkdir(parents=True, exist_ok=True)
    resume_path = out.with_name(out.name + ".resume.pt")
    torch.manual_seed(recipe.seed)
    loaded = load_model(recipe.arch, num_classes=10, in_chans=recipe.in_chans)
    model = loaded.model
    images, labels = load_fashion_mnist(root, "train")
    ds = TensorImageDataset(images, labels, size=recipe.size, in_chans=recipe.in_chans, train=True)
    n = len(ds)
    steps_per_epoch = n // recipe.batch_size
    total = max(1, int(round(recipe.epochs * steps_per_epoch)))
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
    )
    step, losses = 0, []
    if resume_path.exists():
        ck = torch.load(resume_path, weights_only=False)
        if ck["recipe"] != asdict(recipe):
            raise UndiscardError(
                f"{resume_path} was written by another recipe ({ck['recipe']}); delete it or rerun with that recipe"
            )
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, losses = ck["step"], ck["losses"]
        torch.set_rng_state(ck["rng"])
        log(f"resuming {out} at step {step}/{total}")

    def save_resume() -> None:
        tmp = resume_path.with_suffix(".tmp")
        torch.save(
            {"recipe": asdict(recipe), "model": model.state_dict(), "opt": opt.state_dict(), "step": step,
             "losses": losses, "rng": torch.get_rng_state()},
            tmp,
        )
        os.replace(tmp, resume_path)

    crit = nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing)
    t0 = time.perf_counter()
    try:
        while step < total:
            # one permutation per epoch, drawn from a generator seeded by (seed, epoch): resumable
            epoch = step // steps_per_epoch
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(recipe.seed * 1000 + epoch))
            model.train()
            for b in range(step % steps_per_epoch, steps_per_epoch):
                if step >= total:
                    break
                idx = perm[b * recipe.batch_size : (b + 1) * recipe.batch_size].tolist()
                items = [ds[i] for i in idx]
                x = torch.stack([it[0] for it in items])
                y = torch.tensor([it[1] for it in items])
                for g in opt.param_groups:
                    g["lr"] = _lr_at(step, total, recipe)
                loss = crit(model(x), y)
                if not torch.isfinite(loss):
                    raise UndiscardError(f"loss became {float(loss)} at step {step}; lower --lr")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                losses.append(loss.item())
                if step % 20 == 0 or step == total:
                    log(f"{recipe.arch} step {step}/{total} loss {sum(losses[-20:]) / len(losses[-20:]):.4f} "
                        f"({time.perf_counter() - t0:.0f} s)")
                if step % save_every == 0:
                    save_resume()
    except KeyboardInterrupt:
        save_resume()
        raise UndiscardError(f"interrupted at step {step}/{total}; run the same command again to resume") from None
    save_resume()
    xv, yv = fashion_mnist_tensors("val", recipe.size, recipe.in_chans, root)
    val_acc = evaluate_accuracy(model, xv, yv)
    summary = {"recipe": asdict(recipe), "steps": total, "val_top1": val_acc, "final_loss": losses[-1]}
    meta = {"undiscard.recipe": json.dumps(asdict(recipe)), "undiscard.val_top1": f"{val_acc:.4f}",
            "undiscard.dataset": "fashion-mnist"}
    save_checkpoint(model, out, arch=recipe.arch, num_classes=10, in_chans=recipe.in_chans,
                    input_size=(recipe.in_chans, recipe.size, recipe.size), extra_metadata=meta, half=half)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    resume_path.unlink(missing_ok=True)
    log(f"wrote {out}: val top-1 {val_acc:.4f}")
    return summary
