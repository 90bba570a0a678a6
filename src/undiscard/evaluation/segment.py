"""``undiscard eval --task segmentation``: mIoU, pixel accuracy and cost of the method vs the plain model.

Per batch: the plain model's logits at input resolution, then ONE search per criterion
at the largest budget; every smaller budget is read off the same search (a smaller
budget's states are the first states of a larger one's, :func:`undiscard.method.search.greedy_search`),
aggregated with each ``--aggregate`` and scored per image and class by true positives,
false positives and false negatives (:func:`per_image_stats`; ``ignore_index`` pixels not
counted): their totals give mIoU over the classes present and pixel accuracy (the same
numbers as :class:`undiscard.data.segmentation.SegMetrics`' confusion matrix), and resampling the
images a paired bootstrap 95% interval of each configuration's mIoU gain over the plain
model. The images are read a batch at a time (:func:`undiscard.data.segmentation.open_segmentation`:
a Cityscapes / ADE20K split is never held in memory). The cost is measured separately, side by side in
the same process: on ``--timing-images`` images, the plain forward and the full method
(search + aggregation, nothing shared between budgets) at each budget, median of
``--repeats``, reported as ms/image and as a ratio to the plain forward.

Resuming: with ``--json OUT`` the per-image counts (int32 ``(N, 3, K)`` per configuration)
are saved atomically after every batch (``OUT.partial.safetensors``: tensors plus JSON
metadata, nothing unpickled, :mod:`undiscard.statefile`); rerunning the same command
resumes where it stopped. State saved with other arguments, or by an older version in
another format (the ``OUT.partial.pt`` pickles are never loaded), is refused (``--fresh``
deletes it and starts over); it is deleted once the JSON is written. A completed ``OUT``
is not recomputed: with the same arguments its saved results are returned (and printed);
other arguments are refused unless ``--fresh``, which deletes it first.

Budgets: without ``--budget`` the command evaluates B = 1, 4, 10 (:data:`DEFAULT_BUDGETS`)
and drops, with a note, those above the model's search space; an explicit ``--budget``
above it is an error.

The figure (``--plot OUT.png``): the first few evaluated images (not picked), their
ground truth, the plain model's prediction and the aggregated prediction at the largest
budget side by side, and mIoU vs budget.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from undiscard.evaluation.report import table
from undiscard.evaluation.runio import config_diff, median_time, progress
from undiscard.statefile import write_text_atomic
from undiscard.errors import UndiscardError

__all__ = ["DEFAULT_BUDGETS", "SegEvalConfig", "bootstrap_gain", "format_seg_table", "per_image_stats", "plot_segmentation", "run_seg_eval",
           "summarize_stats"]

FIGURE_IMAGES = 4
#: Budgets evaluated when ``--budget`` is not given (those above the search space are dropped).
DEFAULT_BUDGETS: tuple[int, ...] = (1, 4, 10)
#: Format of the partial file: 1 = per-image (K, K) confusion matrices, 2 = per-image (3, K) TP / FP / FN
#: (both pickles, ``OUT.partial.pt``: never loaded); 3 = version 2's fields in ``OUT.partial.safetensors``.
PARTIAL_VERSION = 3
PARTIAL_KIND = f"undiscard.seg-eval-partial/{PARTIAL_VERSION}"


@dataclass
class SegEvalConfig:
    model: str
    data: str = "fashion-mnist-seg:test"
    size: list[int] | None = None  # [H, W] the images are resized to (labels nearest); None: the data's own
    budgets: list[int] = field(default_factory=lambda: [1, 4, 10])
    criteria: list[str] = field(default_factory=lambda: ["entropy"])
    aggregates: list[str] = field(default_factory=lambda: ["mean", "entropy"])
    searchable: Any = "inner"
    limit: int | None = None
    start: int = 0
    batch_size: int = 32
    max_batch: int = 64
    engine: str = "trie"
    width: int | None = 1
    seed: int = 0
    timing_images: int = 16
    repeats: int = 3
    threads: int = 0
    skip_corrupt: bool = False  # a folder set's unreadable images are left out (with a warning) instead of an error


def _fixed_weights(spec: str) -> bool:
    """Specs whose class count is fixed by their weights (a checkpoint, a transformers model)."""
    p = Path(os.path.expanduser(spec))
    return spec.startswith("transformers:") or p.is_file() or p.is_dir()


def _data_size(spec: str, data: str, loaded, size: list[int] | None = None):
    if data.partition(":")[0] == "fashion-mnist-seg":
        if size is not None:
            if size[0] != size[1]:
                raise UndiscardError(f"fashion-mnist-seg canvases are square: --size takes one side; got {size[0]},{size[1]}")
            return int(size[0])
        # a checkpoint trained on canvases says its size; anything else gets the default canvas
        return int(loaded.input_size[1]) if loaded is not None and _fixed_weights(spec) else None
    # folder sets: --size, or the files' own size (all selected images must then share it)
    return None if size is None else (int(size[0]), int(size[1]))


class _Batches:
    """The evaluation images, a batch at a time (gray images repeated to 3 channels if asked)."""

    def __init__(self, data, repeat_gray: bool = False) -> None:
        self.data, self.repeat_gray = data, repeat_gray

    def __len__(self) -> int:
        return len(self.data)

    def batch(self, lo: int, hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.data.batch(lo, hi)
        if self.repeat_gray:
            x = x.expand(-1, 3, -1, -1).contiguous()
        return x, y


def load_model_and_data(cfg: SegEvalConfig, log=print):
    """The model (sized to the data for random-weight builds) and the data, read per batch.

    Returns ``(loaded, data, name, K, ignore, notes)``; ``data.batch(lo, hi)`` gives the
    stacked ``(x, y)`` of images ``lo .. hi - 1`` (decoded from disk for the folder sets).
    """
    from undiscard.data.segmentation import open_segmentation
    from undiscard.models.segmenters import load_segmenter

    notes: list[str] = []
    loaded = load_segmenter(cfg.model) if _fixed_weights(cfg.model) else None
    data, name, k, ignore = open_segmentation(cfg.data, _data_size(cfg.model, cfg.data, loaded, cfg.size),
                                              cfg.limit, cfg.start, skip_corrupt=cfg.skip_corrupt, log=log)
    if loaded is None:  # random weights, drawn from cfg.seed: a resumed run continues with the same model
        c = None if cfg.model.startswith("torchvision:") else int(data.channels)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            loaded = load_segmenter(cfg.model, num_classes=k, in_chans=c)
        notes.append(f"random weights drawn with seed {cfg.seed}")
    if loaded.num_classes != k:
        raise UndiscardError(f"{cfg.model} predicts {loaded.num_classes} classes but {name} has {k}: evaluate a model "
                             f"trained on this data set")
    want_c = int(loaded.input_size[0])
    repeat = False
    if data.channels != want_c:
        if data.channels == 1 and want_c == 3:
            repeat = True
            notes.append("gray images repeated to 3 channels for this model")
        else:
            raise UndiscardError(f"{cfg.model} takes {want_c}-channel images; {name} has {data.channels}")
    return loaded, _Batches(data, repeat), name, k, ignore, notes


# ---------------------------------------------------------------- the evaluation

def _saved_state(cfg: SegEvalConfig, out_path: Path | None, config: dict, fresh: bool, figure, log
                 ) -> tuple[dict, dict | None]:
    """``(state to resume from, completed result or None)``: the saved files of an earlier run
    are read (or refused, or deleted with ``fresh``) before the model and the data are loaded."""
    from undiscard.evaluation.classify import completed_result
    from undiscard.statefile import check_output_path, load_state

    state: dict[str, Any] = {"version": PARTIAL_VERSION, "config": config, "batches": 0, "done": 0, "stats": {}}
    if out_path is None:
        return state, None
    partial = out_path.with_suffix(".partial.safetensors")
    legacy = out_path.with_suffix(".partial.pt")  # older versions' pickle
    check_output_path(out_path, "--json")
    if fresh:
        for f in (partial, legacy, out_path):
            if f.exists():
                f.unlink()
                log(f"--fresh: deleted {f}")
    done = completed_result(out_path, config, task="segmentation", command="undiscard eval --task segmentation",
                            defaults={"skip_corrupt": False})
    if done is not None:
        log(f"{out_path} is complete (saved by a run with the same arguments): its results, nothing recomputed; "
            "add --fresh to recompute them")
        if figure is not None:  # the figure is not saved: drawn again from the first images
            loaded, data, *_ = load_model_and_data(cfg, log)
            xs, ys = data.batch(0, FIGURE_IMAGES)
            plot_segmentation(done, figure_samples(loaded.model, xs, ys, done, _wrap_options(cfg)), figure)
        return state, done
    if legacy.exists():
        raise UndiscardError(f"{legacy}: partial evaluation in a pickle format; it is not "
                             "loaded (unpickling a file can run code) and cannot be resumed: add --fresh to delete "
                             "it and start over")
    if partial.exists():
        prev = load_state(partial, PARTIAL_KIND, what="partial segmentation evaluation",
                          hint="add --fresh to delete it and start over")
        if prev.get("config") != config:
            raise UndiscardError(f"{partial}: partial evaluation saved with other arguments "
                                 f"({config_diff(prev.get('config') or {}, config)}); rerun with the same arguments "
                                 "to resume it, or add --fresh to delete it and start over")
        state = prev
    return state, None


def _wrap_options(cfg: SegEvalConfig) -> dict:
    """The :func:`~undiscard.method.segment.wrap_segmentation` options every wrapper of the run shares."""
    return dict(searchable=cfg.searchable, max_batch=cfg.max_batch, engine=cfg.engine, seed=cfg.seed, width=cfg.width)


def _budgets(cfg: SegEvalConfig, sites, default_budgets: bool, notes: list[str], log) -> list[int]:
    """The budgets to evaluate: defaults above the search space are dropped (with a note), asked-for ones refused."""
    budgets = list(cfg.budgets)
    if default_budgets:
        dropped = [b for b in budgets if b > sites.space_size]
        budgets = [b for b in budgets if b <= sites.space_size]
        if dropped:
            note = (f"default budget{'s' if len(dropped) > 1 else ''} {','.join(map(str, dropped))} dropped: above the "
                    f"search space of {sites.space_size} states; evaluating B = {','.join(map(str, budgets))}")
            log(f"note: {note}")
            notes.append(note)
    bmax = max(budgets)
    if bmax > sites.space_size:
        raise UndiscardError(f"budget {bmax} exceeds the search space of {sites.space_size} states (searchable sites "
                             f"{list(sites.searchable)}); lower --budget or use --searchable main/all")
    return budgets


def _count_images(cfg: SegEvalConfig, model, data, wrapped: dict, unaligned: dict, budgets: list[int], k: int,
                  ignore: int, state: dict, partial: Path | None, desc: str) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Per configuration, the per-image TP / FP / FN per class (int32 ``(n, 3, K)``), batch by batch,
    saving ``state`` to ``partial`` after each batch; and the engines the searches ran on."""
    from undiscard.method.segment import dense_logits
    from undiscard.statefile import save_state

    n = len(data)
    # the totals give mIoU and pixel accuracy; resampling the images, the bootstrap interval of each
    # configuration's gain over the plain model
    stats: dict[str, list[torch.Tensor]] = {key: [v] for key, v in state["stats"].items()}

    def count(key: str, pred: torch.Tensor, target: torch.Tensor) -> None:
        stats.setdefault(key, []).append(per_image_stats(pred, target, k, ignore))

    engines: set[str] = set(state.get("engines", []))
    bs = cfg.batch_size
    bar = progress(n, desc)
    bar.update(state["done"])
    with torch.no_grad(), contextlib.closing(bar):  # closed on an error too: its line ends
        for s in range(state["batches"] * bs, n, bs):
            xb, yb = data.batch(s, s + bs)
            count("plain", dense_logits(model, xb).argmax(1), yb)
            for c, w in wrapped.items():
                found = w.search(xb)
                engines.add(w.last_engine)
                for b in budgets:
                    for a in cfg.aggregates:
                        count(f"{c}|{a}|{b}", w.combine(found, b, a).argmax(1), yb)
            for c, w in unaligned.items():
                found = w.search(xb)
                for b in budgets:
                    if b > 1:
                        for a in cfg.aggregates:
                            count(f"{c}|{a}|{b}|skips-unaligned", w.combine(found, b, a).argmax(1), yb)
            state["batches"] += 1
            state["done"] += len(yb)
            if partial is not None:
                state["stats"] = {key: torch.cat(v) for key, v in stats.items()}
                state["engines"] = sorted(engines)
                save_state(state, partial, PARTIAL_KIND)
            bar.update(len(yb))
    return {key: torch.cat(v) for key, v in stats.items()}, engines


def _timing(cfg: SegEvalConfig, model, xt: torch.Tensor, budgets: list[int]) -> tuple[float, dict[str, float]]:
    """Seconds per batch ``xt`` of the plain model and of every configuration, side by side in this process."""
    from undiscard.method.segment import dense_logits, wrap_segmentation

    with torch.no_grad():
        t_plain = median_time(lambda: dense_logits(model, xt), cfg.repeats)
        timing: dict[str, float] = {}
        for c in cfg.criteria:
            for b in budgets:
                for a in cfg.aggregates:
                    w = wrap_segmentation(model, budget=b, criterion=c, aggregate=a, **_wrap_options(cfg))
                    timing[f"{c}|{a}|{b}"] = median_time(lambda: w(xt), cfg.repeats)
    return t_plain, timing


def _rows(cfg: SegEvalConfig, per_image: dict, plain: dict, budgets: list[int], unaligned: dict, timing: dict,
          t_plain: float, nt: int) -> tuple[list[dict], list[dict]]:
    """The result rows (mIoU, gain with its interval, cost) and the skips-unaligned ablation rows."""
    rows, ablation = [], []
    for c in cfg.criteria:
        for a in cfg.aggregates:
            for b in budgets:
                key = f"{c}|{a}|{b}"
                r = summarize_stats(per_image[key].sum(0))
                t = timing[key]
                lo, hi = bootstrap_gain(per_image[key], per_image["plain"], seed=cfg.seed)
                r.update(criterion=c, aggregate=a, budget=b, miou_gain=r["miou"] - plain["miou"],
                         miou_gain_ci95=[lo, hi], ms_per_image=1000 * t / nt, time_ratio=t / t_plain,
                         align_skips=True)
                rows.append(r)
    for c in unaligned:
        for a in cfg.aggregates:
            for b in budgets:
                key = f"{c}|{a}|{b}|skips-unaligned"
                if key not in per_image:
                    continue
                r = summarize_stats(per_image[key].sum(0))
                lo, hi = bootstrap_gain(per_image[key], per_image["plain"], seed=cfg.seed)
                r.update(criterion=c, aggregate=a, budget=b, miou_gain=r["miou"] - plain["miou"],
                         miou_gain_ci95=[lo, hi], align_skips=False)
                ablation.append(r)
    return rows, ablation


def run_seg_eval(cfg: SegEvalConfig, out_json: str | os.PathLike | None = None, log=print, *,
                 fresh: bool = False, figure: str | os.PathLike | None = None,
                 default_budgets: bool = False) -> dict:
    """Run the evaluation described by ``cfg``; return (and write) the results dict.

    ``default_budgets``: ``cfg.budgets`` are defaults, not asked for: those above the
    model's search space are dropped with a note (otherwise they are an error).
    Steps: the saved state (:func:`_saved_state`), the budgets, the per-image counts
    (:func:`_count_images`, resumable), the timing, the rows, the result file.
    """
    from undiscard.method.segment import wrap_segmentation
    from undiscard.models.segmenters import parameter_count

    if int(os.environ.get("WORLD_SIZE", "1") or 1) > 1:
        raise UndiscardError("segmentation evaluation runs in one process; launch it without torchrun (unset WORLD_SIZE)")
    out_path = Path(out_json) if out_json else None
    config = json.loads(json.dumps(dict(cfg.__dict__)))  # as saved (JSON values) and compared on a rerun
    partial = out_path.with_suffix(".partial.safetensors") if out_path is not None else None
    state, done = _saved_state(cfg, out_path, config, fresh, figure, log)  # a refusal does not wait for the model
    if done is not None:
        return done
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loaded, data, data_name, k, ignore, notes = load_model_and_data(cfg, log)
    model = loaded.model
    n = len(data)
    if n == 0:
        raise UndiscardError(f"no images to evaluate in {cfg.data} (start {cfg.start}, limit {cfg.limit})")
    first = data.batch(0, 1)[0]
    common = _wrap_options(cfg)
    sites = wrap_segmentation(model, budget=1, **common).sites_for(first)
    budgets = _budgets(cfg, sites, default_budgets, notes, log)
    bmax = max(budgets)
    wrapped = {c: wrap_segmentation(model, budget=bmax, criterion=c, aggregate=cfg.aggregates[0], **common)
               for c in cfg.criteria}
    # A decoder that fuses maps from both sides of a searched site (SegFormer, U-Net): the skips are
    # aligned at the fusion; the same search without that alignment is reported beside it (ablation).
    with torch.no_grad():
        probe2 = wrap_segmentation(model, budget=min(2, sites.space_size), **common)
        probe2.search(first)
    fused = probe2.last_out_level is not None and probe2.last_out_level < len(sites.searchable)
    unaligned = ({c: wrap_segmentation(model, budget=bmax, criterion=c, aggregate=cfg.aggregates[0], align_skips=False,
                                       **common) for c in cfg.criteria} if fused else {})
    if state["done"]:
        log(f"resuming at image {state['done']}/{n}")
    per_image, engines = _count_images(cfg, model, data, wrapped, unaligned, budgets, k, ignore, state, partial,
                                       f"eval {Path(loaded.spec).name}")
    log("timing ...")
    xt = data.batch(0, cfg.timing_images)[0]
    nt = xt.shape[0]
    t_plain, timing = _timing(cfg, model, xt, budgets)
    plain = summarize_stats(per_image["plain"].sum(0))
    plain.update(ms_per_image=1000 * t_plain / nt, time_ratio=1.0)
    rows, ablation = _rows(cfg, per_image, plain, budgets, unaligned, timing, t_plain, nt)
    classes = None
    if data_name.startswith("fashion-mnist-seg"):
        from undiscard.data.segmentation import SEG_CLASSES

        classes = list(SEG_CLASSES)
    result = {
        "task": "segmentation",
        "model": loaded.spec,
        "model_note": loaded.note,
        "parameters": parameter_count(model),
        "data": data_name,
        "images": n,
        "start": cfg.start,
        "input_size": list(first.shape[1:]),
        "num_classes": k,
        "ignore_index": ignore,
        "classes": classes,
        "notes": notes,
        "sites": {"searchable": list(sites.searchable), "space_size": sites.space_size,
                  "stride_total": list(sites.stride_total), "names": [s.name for s in sites.sites]},
        "engine": sorted(engines),
        "alignment": "logits upsampled bilinearly to the input, shifted by +Delta px; border pixels a state does "
                     "not cover are excluded for that state",
        "config": config,
        "bootstrap": "miou_gain_ci95: 95% interval of the mIoU gain over the plain model, 1000 resamples of the "
                     "images (paired, percentile)",
        "timing": {"images": nt, "repeats": cfg.repeats, "threads": torch.get_num_threads(),
                   "plain_ms_per_image": 1000 * t_plain / nt},
        "plain": plain,
        "rows": rows,
        "skips": {"fused_across_sites": fused, "output_level": probe2.last_out_level,
                  "note": "a decoder fuses maps from both sides of a searched site: the deeper maps are shifted onto the "
                          "shallower grid at the fusion (rows); skips_unaligned: the same search without that, output "
                          "shifted by the full Delta" if fused else "no fusion across searched sites"},
        "skips_unaligned": ablation,
        "torch": torch.__version__,
    }
    if getattr(data.data, "skipped", None):
        result["skipped_corrupt"] = data.data.skipped
    if figure is not None:
        xs, ys = data.batch(0, FIGURE_IMAGES)
        samples = figure_samples(model, xs, ys, result, common)
        result["figure"] = {"path": str(figure), "images": list(range(samples["x"].shape[0])),
                            "criterion": samples["criterion"], "aggregate": samples["aggregate"], "budget": bmax}
        plot_segmentation(result, samples, figure)
    if out_path is not None:
        write_text_atomic(json.dumps(result, indent=1) + "\n", out_path)
        partial.unlink(missing_ok=True)
        partial.with_name(partial.name + ".tmp").unlink(missing_ok=True)
    return result


def per_image_stats(pred: torch.Tensor, target: torch.Tensor, k: int, ignore: int) -> torch.Tensor:
    """int32 ``(N, 3, K)``: per image ``i`` and class ``c``, ``[i, 0, c]`` true positives (target and
    prediction ``c``), ``[i, 1, c]`` false positives (predicted ``c``, target another class) and
    ``[i, 2, c]`` false negatives (target ``c``, predicted another class). Pixels whose target is
    ``ignore`` are not counted: the diagonal, column sums minus diagonal and row sums minus diagonal
    of :class:`~undiscard.data.segmentation.SegMetrics`' confusion matrix of that image.

    Shape:
        - pred, target: ``(N, H, W)`` integer class ids (any ``(N, ...)``, both the same size).
        - output: int32 ``(N, 3, K)``, ``K = k``.

    Example:
        >>> pred, target = torch.tensor([[[0, 1], [1, 1]]]), torch.tensor([[[0, 1], [0, 255]]])
        >>> per_image_stats(pred, target, 2, 255).tolist()  # TP, FP, FN per class
        [[[1, 1], [0, 1], [1, 0]]]
    """
    n = pred.shape[0]
    t, p = target.reshape(n, -1).long(), pred.reshape(n, -1).long()
    keep = t != ignore
    if bool(((t < 0) | (t >= k))[keep].any()):
        raise UndiscardError(f"targets hold values outside 0..{k - 1} that are not ignore_index={ignore}")
    if bool(((p < 0) | (p >= k))[keep].any()):
        raise UndiscardError(f"predictions hold values outside 0..{k - 1}")
    base = (torch.arange(n) * k)[:, None]
    tk, pk = (base + t.clamp(0, k - 1))[keep], (base + p)[keep]
    tp = torch.bincount(tk[(t == p)[keep]], minlength=n * k)
    per_target, per_pred = torch.bincount(tk, minlength=n * k), torch.bincount(pk, minlength=n * k)
    return torch.stack([tp, per_pred - tp, per_target - tp]).reshape(3, n, k).transpose(0, 1).to(torch.int32).contiguous()


def summarize_stats(total: torch.Tensor) -> dict:
    """``(3, K)`` summed TP / FP / FN -> ``miou`` (%, over the classes present: TP + FP + FN > 0),
    ``pixel_accuracy`` (%, sum TP / sum (TP + FN)) and ``per_class_iou`` (%, ``None`` where absent),
    computed as :class:`~undiscard.data.segmentation.SegMetrics` does from the confusion matrix.

    Shape:
        - total: ``(3, K)`` (e.g. :func:`per_image_stats` summed over images).
        - output: a dict of floats and a ``K``-long list.

    Example:
        >>> s = summarize_stats(torch.tensor([[1, 1], [0, 1], [1, 0]]))
        >>> s["miou"], s["per_class_iou"], round(s["pixel_accuracy"], 2)
        (50.0, [50.0, 50.0], 66.67)
    """
    c = total.double()
    tp, fp, fn = c[0], c[1], c[2]
    union = tp + fp + fn
    iou = torch.where(union > 0, tp / union.clamp(min=1), torch.full_like(tp, math.nan))
    present = ~iou.isnan()
    miou = float(iou[present].mean()) if bool(present.any()) else math.nan
    counted = int(total[0].sum()) + int(total[2].sum())
    acc = int(total[0].sum()) / counted if counted else math.nan
    return {"miou": 100.0 * miou, "pixel_accuracy": 100.0 * acc,
            "per_class_iou": [None if v != v else round(100.0 * float(v), 3) for v in iou.tolist()]}


def _miou_batch(counts: torch.Tensor) -> torch.Tensor:
    """``(R, 3, K)`` TP / FP / FN -> ``(R,)`` mIoU in % over the classes present (as SegMetrics)."""
    tp = counts[:, 0]
    union = counts[:, 0] + counts[:, 1] + counts[:, 2]
    iou = torch.where(union > 0, tp / union.clamp_min(1), torch.zeros_like(tp))
    return 100.0 * iou.sum(1) / (union > 0).sum(1).clamp_min(1)


def bootstrap_gain(method: torch.Tensor, plain: torch.Tensor, *, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """95% interval of ``mIoU(method) - mIoU(plain)`` over images drawn with replacement (paired).

    Args:
        method, plain: per-image TP / FP / FN ``(N, 3, K)`` of the same images (:func:`per_image_stats`).

    Shape:
        - method, plain: ``(N, 3, K)``.
        - output: ``(lo, hi)`` in mIoU points.

    Example:
        >>> st = torch.tensor([[[1, 1], [0, 1], [1, 0]], [[2, 0], [0, 0], [0, 0]]])
        >>> bootstrap_gain(st, st, resamples=20)
        (0.0, 0.0)
    """
    n, k = plain.shape[0], plain.shape[-1]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(n, (resamples, n), generator=g)
    w = torch.zeros(resamples, n, dtype=torch.float64).scatter_add_(1, idx, torch.ones(resamples, n, dtype=torch.float64))
    # counts are integers < 2**53: the weighted sums are exact, whatever the summation order
    gain = (_miou_batch((w @ method.reshape(n, -1).double()).reshape(-1, 3, k))
            - _miou_batch((w @ plain.reshape(n, -1).double()).reshape(-1, 3, k)))
    lo, hi = torch.quantile(gain, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return lo, hi


def best_aggregate(result: dict, criterion: str | None = None) -> tuple[str, str]:
    """``(criterion, aggregate)`` with the highest mIoU at the largest budget."""
    bmax = max(r["budget"] for r in result["rows"])
    rows = [r for r in result["rows"] if r["budget"] == bmax and (criterion is None or r["criterion"] == criterion)]
    best = max(rows, key=lambda r: r["miou"])
    return best["criterion"], best["aggregate"]


@torch.no_grad()
def figure_samples(model, x: torch.Tensor, y: torch.Tensor, result: dict, common: dict, count: int = FIGURE_IMAGES) -> dict:
    """Inputs, ground truth, plain and aggregated (B = max) predictions of the first ``count`` of ``x``, ``y``."""
    from undiscard.method.segment import dense_logits, wrap_segmentation

    c, a = best_aggregate(result)
    bmax = max(r["budget"] for r in result["rows"])
    xs, ys = x[:count], y[:count]
    w = wrap_segmentation(model, budget=bmax, criterion=c, aggregate=a, **common)
    return {"x": xs, "y": ys, "plain": dense_logits(model, xs).argmax(1), "ours": w(xs).argmax(1),
            "criterion": c, "aggregate": a}


def _class_colours(k: int):
    import matplotlib

    base = matplotlib.colormaps["tab20"] if k <= 20 else matplotlib.colormaps["hsv"]
    cols = [(0.0, 0.0, 0.0, 1.0)] + [base(i / max(1, (20 if k <= 20 else k) - 1)) for i in range(k - 1)]
    return cols


def plot_segmentation(result: dict, samples: dict, path: str | os.PathLike) -> Path:
    """Input | ground truth | plain | ours (B = max) per row, and mIoU vs budget on the right."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import ListedColormap
        from matplotlib.patches import Patch
    except ImportError as exc:
        raise UndiscardError(f"--plot needs matplotlib ({exc}); pip install 'undiscard[plot]'") from exc
    k, ignore = result["num_classes"], result["ignore_index"]
    cols = _class_colours(k)
    cmap = ListedColormap(cols + [(0.6, 0.6, 0.6, 1.0)])  # the last colour: ignored pixels

    def show(label: torch.Tensor):
        lab = label.clone()
        lab[lab == ignore] = k
        return lab.numpy()

    n = samples["x"].shape[0]
    bmax = max(r["budget"] for r in result["rows"])
    fig = plt.figure(figsize=(13, 2.6 * n + 0.6))
    gs = fig.add_gridspec(n, 6, width_ratios=[1, 1, 1, 1, 0.15, 2.2])
    titles = ["input", "ground truth", "plain (B=1)", f"ours (B={bmax}, {samples['aggregate']})"]
    for i in range(n):
        img = samples["x"][i].float()
        img = (img - img.min()) / (img.max() - img.min()).clamp_min(1e-6)
        panels = [img.permute(1, 2, 0).numpy() if img.shape[0] == 3 else img[0].numpy(),
                  show(samples["y"][i]), show(samples["plain"][i]), show(samples["ours"][i])]
        for j, p in enumerate(panels):
            ax = fig.add_subplot(gs[i, j])
            if j == 0:
                ax.imshow(p, cmap=None if p.ndim == 3 else "gray", interpolation="nearest")
            else:
                ax.imshow(p, cmap=cmap, vmin=0, vmax=k, interpolation="nearest")
            if j >= 2:
                valid = samples["y"][i] != ignore
                acc = float((samples["plain" if j == 2 else "ours"][i] == samples["y"][i])[valid].float().mean() * 100)
                ax.set_xlabel(f"pixel acc {acc:.1f}%", fontsize=8)
            if i == 0:
                ax.set_title(titles[j], fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
    ax = fig.add_subplot(gs[:, 5])
    p = result["plain"]
    for c, a in sorted({(r["criterion"], r["aggregate"]) for r in result["rows"]}):
        rs = sorted((r for r in result["rows"] if r["criterion"] == c and r["aggregate"] == a), key=lambda r: r["budget"])
        ax.plot([r["budget"] for r in rs], [r["miou"] for r in rs], marker="o", label=f"{c} / {a}")
    ax.axhline(p["miou"], color="k", ls="--", lw=1, label="plain")
    ax.set_xticks(sorted({r["budget"] for r in result["rows"]}))
    ax.set_xlabel("budget B (states per image)")
    ax.set_ylabel("mIoU %")
    ax.legend(fontsize=8)
    if result.get("classes"):
        handles = [Patch(color=cols[i], label=name) for i, name in enumerate(result["classes"])]
        fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 6), fontsize=7, frameon=False)
    fig.suptitle(f"{Path(result['model']).name} on {result['data']} ({result['images']} images): first "
                 f"{n} images, not picked", fontsize=10)
    fig.tight_layout(rect=(0, 0.06 if result.get("classes") else 0, 1, 0.97))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def format_seg_table(result: dict) -> str:

    p = result["plain"]
    rows = [["plain", "-", 1, f"{p['miou']:.2f}", "-", f"{p['pixel_accuracy']:.2f}", f"{p['ms_per_image']:.2f}", "1.00"]]
    for r in result["rows"]:
        lo, hi = r["miou_gain_ci95"]
        rows.append([r["criterion"], r["aggregate"], r["budget"], f"{r['miou']:.2f}",
                     f"{r['miou_gain']:+.2f} [{lo:+.2f}, {hi:+.2f}]", f"{r['pixel_accuracy']:.2f}",
                     f"{r['ms_per_image']:.2f}", f"{r['time_ratio']:.2f}"])
    for r in result.get("skips_unaligned", []):
        lo, hi = r["miou_gain_ci95"]
        rows.append([r["criterion"], r["aggregate"] + " (skips unaligned)", r["budget"], f"{r['miou']:.2f}",
                     f"{r['miou_gain']:+.2f} [{lo:+.2f}, {hi:+.2f}]", f"{r['pixel_accuracy']:.2f}", "-", "-"])
    head = (f"{result['model']} on {result['data']} ({result['images']} images, {result['num_classes']} classes); "
            f"searchable sites {result['sites']['searchable']} ({result['sites']['space_size']} states; engine "
            f"{', '.join(result['engine'])}); timing on {result['timing']['images']} images, median of "
            f"{result['timing']['repeats']}")
    return head + "\n" + table(["criterion", "aggregate", "B", "mIoU %", "gain [95% CI]", "pixel acc %", "ms/img", "x plain"], rows)
