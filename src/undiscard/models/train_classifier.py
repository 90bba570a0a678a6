"""Training the project's own backbones on Fashion-MNIST (the model zoo).

Standard supervised training, no offset tricks: the backbone never sees a non-default
state while it learns. The recipe (``undiscard train-backbone``; ``scripts/train_zoo.sh``
trains every zoo model) is seeded and written into the checkpoint's metadata:

* data: the Fashion-MNIST train split minus the fixed 5k validation images
  (:func:`undiscard.data.classification.split_indices`), upsampled to ``size`` x ``size`` (default 128,
  so the last feature map of a stride-32 network is 4x4), gray channel repeated
  ``in_chans`` times; augmentation: random-resized crop (area 0.7-1), translation up to
  10%, horizontal flip (:class:`undiscard.data.classification.TensorImageDataset`);
* optimiser: AdamW (lr, weight decay 0.05), linear warm-up over the first 5% of steps,
  then cosine to 0; label smoothing 0.1; batch 128;
* the checkpoint: safetensors (float16 with ``--half``), metadata ``undiscard.arch`` etc.
  so :func:`undiscard.models.classifiers.load_model` rebuilds it, plus the recipe and the
  validation accuracy.

Interrupt it at any time: a resume file (``OUT.resume.safetensors``, model + optimiser +
RNG state as tensors, the rest as JSON metadata, nothing that is unpickled; written every
``--save-every`` steps and on Ctrl-C) lets the same command carry on where it stopped.
A completed ``OUT`` of the same recipe is not retrained; one of another recipe is refused
(``fresh=True`` / ``--fresh`` deletes it, its summary and any resume file first). The
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

from undiscard.errors import FileTrustError, UndiscardError
from undiscard.statefile import load_state, save_state

__all__ = ["Recipe", "train_backbone"]

#: What ``OUT.resume.safetensors`` holds (:func:`undiscard.statefile.save_state`).
RESUME_KIND = "undiscard.train-resume/2"


def load_resume(path: Path, recipe: dict) -> dict:
    """The training state saved at ``path``; refused if written by another recipe."""
    ck = load_state(path, RESUME_KIND, what="training resume file", hint="delete it (or add --fresh) to start over")
    if ck.get("recipe") != recipe:
        raise UndiscardError(f"{path} was written by another recipe ({ck.get('recipe')}); delete it (or add --fresh) "
                             "or rerun with that recipe")
    return ck


def prepare_output(out: Path, resume_path: Path, recipe: dict, fresh: bool, log, replace: bool = False) -> dict | None:
    """Before training into ``out``: ``fresh`` deletes what an earlier run left; a
    pickled resume file (``OUT.resume.pt``) is refused; a completed ``out`` of the same recipe gives its summary (nothing
    to train: returned), one of another recipe is refused unless ``replace`` (it then stays in place, usable, until
    the new model is written over it)."""
    legacy = out.with_name(out.name + ".resume.pt")
    summary = out.with_suffix(".json")
    if fresh:
        for f in (resume_path, legacy, out, summary):
            if f.exists():
                f.unlink()
                log(f"--fresh: deleted {f}")
    if legacy.exists():
        raise FileTrustError(f"{legacy}: training resume file in a pickle format; it is not "
                             "loaded (unpickling a file can run code) and cannot be resumed: add --fresh to delete it "
                             "and start over")
    if resume_path.exists() or not out.exists():
        return None
    redo = ("add --replace to train the new recipe over it (it stays usable until then), --fresh to delete it first, "
            "or choose another --out")
    try:
        from safetensors import safe_open

        with safe_open(str(out), "pt") as fh:
            meta = dict(fh.metadata() or {})
        saved = json.loads(meta["undiscard.recipe"])
    except Exception:
        raise UndiscardError(f"{out} exists and is not a checkpoint written by this trainer; {redo}") from None
    if saved != recipe and replace:
        log(f"{out} was trained with another recipe; --replace: training the new one (the old file stays until the "
            "new one is written over it)")
        return None
    if saved != recipe:
        diff = "; ".join(f"{k}: saved {saved.get(k)!r}, now {recipe.get(k)!r}"
                         for k in dict.fromkeys([*saved, *recipe]) if saved.get(k) != recipe.get(k))
        raise UndiscardError(f"{out} was trained with another recipe ({diff}); {redo}")
    log(f"{out} is complete (trained with the same recipe): nothing to train; add --fresh to train it again")
    try:
        return json.loads(summary.read_text())
    except (OSError, ValueError):
        return {"recipe": recipe, "out": str(out)}


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
    augment: str = "crop"
    offset_augment: float = 0.0


def _lr_at(step: int, total: int, recipe: Recipe) -> float:
    warm = max(1, int(recipe.warmup * total))
    if step < warm:
        return recipe.lr * (step + 1) / warm
    t = (step - warm) / max(1, total - warm)
    return recipe.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


AUGMENTS = ("crop", "shift")


def shift_augment(images: torch.Tensor, size: int, in_chans: int, gen: torch.Generator,
                  max_shift: int = 3) -> torch.Tensor:
    """A batch of uint8 ``(B, H, W)`` images -> augmented model input ``(B, in_chans, size, size)``.

    Each image is translated by a random whole number of its own pixels in
    ``[-max_shift, max_shift]`` per axis (zero background shifted in) and flipped
    horizontally with probability 1/2, then resized and normalised exactly as the
    evaluation images are (:func:`undiscard.data.classification.fashion_mnist_tensors`). All draws come
    from ``gen``, so a step's batch is a function of the seed and the step (resumable).
    """
    from undiscard.data.classification import FASHION_MNIST_MEAN, FASHION_MNIST_STD, resize

    b, h, w = images.shape
    x = images.float().div_(255.0)
    padded = torch.nn.functional.pad(x, (max_shift, max_shift, max_shift, max_shift))
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen)
    flip = torch.rand(b, generator=gen) < 0.5
    rows = (dy[:, None] + torch.arange(h))[:, :, None]
    cols = (dx[:, None] + torch.arange(w))[:, None, :]
    out = padded[torch.arange(b)[:, None, None], rows, cols]
    out = torch.where(flip[:, None, None], out.flip(-1), out)
    out = resize(out[:, None], size)
    out = (out - FASHION_MNIST_MEAN) / FASHION_MNIST_STD
    return out.expand(b, in_chans, size, size).contiguous()


def random_states(sites, batch: int, p: float, gen: torch.Generator) -> torch.Tensor:
    """``(batch, L)`` states for offset-augmented training: each sample, with probability
    ``p``, gets a state drawn uniformly from the whole space of the searchable sites (the
    default state included); the others get the default state."""
    cols = [torch.randint(0, site.num_offsets, (batch,), generator=gen) for site in sites.searchable_sites]
    states = torch.stack(cols, 1) if cols else torch.zeros(batch, 0, dtype=torch.long)
    keep = torch.rand(batch, generator=gen) < p
    return torch.where(keep[:, None], states, torch.zeros_like(states))


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
    fresh: bool = False,
    replace: bool = False,
    channels_last: bool = True,
    log=print,
) -> dict:
    """Train ``recipe.arch`` on Fashion-MNIST and write ``out`` (.safetensors). Returns the summary.

    An ``out`` already trained with ``recipe`` is not trained again (its summary is
    returned); one trained with another recipe is refused unless ``fresh``.
    ``channels_last`` runs the convolutions in NHWC memory layout (faster on CPU; the
    weights are the same up to float rounding).
    """
    from undiscard.data.classification import TensorImageDataset, fashion_mnist_tensors, load_fashion_mnist
    from undiscard.models.classifiers import load_model, save_checkpoint

    out = Path(out)
    if out.suffix != ".safetensors":
        raise UndiscardError(f"the output must be a .safetensors path, got {str(out)!r}")
    if recipe.epochs <= 0 or recipe.batch_size < 1 or recipe.lr <= 0:
        raise UndiscardError(f"epochs, batch size and lr must be positive: {recipe}")
    if recipe.augment not in AUGMENTS:
        raise UndiscardError(f"augment must be one of {', '.join(AUGMENTS)}; got {recipe.augment!r}")
    if not 0.0 <= recipe.offset_augment <= 1.0:
        raise UndiscardError(f"--offset-augment is a probability in [0, 1]; got {recipe.offset_augment}")
    resume_path = out.with_name(out.name + ".resume.safetensors")
    done = prepare_output(out, resume_path, asdict(recipe), fresh, log, replace=replace)
    if done is not None:
        return done
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(recipe.seed)
    loaded = load_model(recipe.arch, num_classes=10, in_chans=recipe.in_chans)
    model = loaded.model
    images, labels = load_fashion_mnist(root, "train")
    ds = TensorImageDataset(images, labels, size=recipe.size, in_chans=recipe.in_chans, train=True)
    n = len(ds)
    sites = None
    if recipe.offset_augment > 0:
        from undiscard.sites.discover import find_sites

        sites = find_sites(model.eval(), torch.zeros(1, recipe.in_chans, recipe.size, recipe.size))
        if not sites.searchable:
            raise UndiscardError(f"{recipe.arch} has no searchable sites at {recipe.size} px: nothing to "
                                 "offset-augment")
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    steps_per_epoch = n // recipe.batch_size
    total = max(1, int(round(recipe.epochs * steps_per_epoch)))
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 else decay).append(p)
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=recipe.lr,
    )
    step, losses, train_seconds = 0, [], 0.0
    if resume_path.exists():
        ck = load_resume(resume_path, asdict(recipe))
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        step, losses = ck["step"], ck["losses"]
        train_seconds = float(ck.get("seconds", 0.0))
        torch.set_rng_state(ck["rng"])
        log(f"resuming {out} at step {step}/{total}")

    def save_resume() -> None:
        save_state({"recipe": asdict(recipe), "model": model.state_dict(), "opt": opt.state_dict(), "step": step,
                    "losses": losses, "rng": torch.get_rng_state(),
                    "seconds": train_seconds + time.perf_counter() - t0}, resume_path, RESUME_KIND)

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
                idx = perm[b * recipe.batch_size : (b + 1) * recipe.batch_size]
                gen = torch.Generator().manual_seed(recipe.seed * 1_000_003 + step)
                if recipe.augment == "shift":
                    x = shift_augment(images[idx], recipe.size, recipe.in_chans, gen)
                    y = labels[idx]
                else:
                    items = [ds[i] for i in idx.tolist()]
                    x = torch.stack([it[0] for it in items])
                    y = torch.tensor([it[1] for it in items])
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                for g in opt.param_groups:
                    g["lr"] = _lr_at(step, total, recipe)
                if sites is not None:
                    from undiscard.run.engine import run_states

                    states = random_states(sites, x.shape[0], recipe.offset_augment, gen)
                    logits = run_states(model, x, states, sites, allow_train=True)
                else:
                    logits = model(x)
                loss = crit(logits, y)
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
    model = model.to(memory_format=torch.contiguous_format)
    xv, yv = fashion_mnist_tensors("val", recipe.size, recipe.in_chans, root)
    val_acc = evaluate_accuracy(model, xv, yv)
    summary = {"recipe": asdict(recipe), "steps": total, "val_top1": val_acc, "final_loss": losses[-1],
               "train_seconds": round(train_seconds + time.perf_counter() - t0, 1)}
    meta = {"undiscard.recipe": json.dumps(asdict(recipe)), "undiscard.val_top1": f"{val_acc:.4f}",
            "undiscard.dataset": "fashion-mnist"}
    save_checkpoint(model, out, arch=recipe.arch, num_classes=10, in_chans=recipe.in_chans,
                    input_size=(recipe.in_chans, recipe.size, recipe.size), extra_metadata=meta, half=half)
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    resume_path.unlink(missing_ok=True)
    log(f"wrote {out}: val top-1 {val_acc:.4f}")
    return summary
