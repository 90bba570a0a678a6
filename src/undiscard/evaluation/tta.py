"""Image-space TTA baselines, alone and stacked on recovered activations, measured.

``undiscard eval MODEL --image-tta METHOD --image-budget N`` and ``undiscard tta-study``
both run on this module:

1. **Logits of every view, cached.** For the candidate pool (:func:`undiscard.tta.transforms.augmentation_pool`,
   identity first) and each feature budget ``B_feat``, the logits of every validation and
   test image under every view are computed once (budget 1: the plain model on the view;
   ``B_feat > 1``: the per-image search on the view, aggregated) and stored in
   ``CACHE/<model>-<split>.safetensors`` (:class:`undiscard.tta.merge.LogitsCache`), keyed by view
   and budget, with the settings as metadata: a rerun reuses them and an interrupted run
   resumes at the next view; other settings are refused (``--fresh``).
2. **Fit on validation, measure on test.** GPS / AugTTA / ClassTTA are fitted on the
   validation logits (:mod:`undiscard.tta.merge`), mean / max need no fitting. With recovered
   activations (``B_feat > 1``) a learned aggregator is fitted on the ``B_feat`` logits
   ("trained on undiscard logits") and, as asked of a user who already has one, the
   aggregator fitted on the plain logits is applied to them as well ("trained on plain
   logits").
3. **Cost**: each configuration's composed module (:class:`undiscard.tta.compose.ImageTTA`,
   only the views the aggregator uses) timed interleaved with the plain model on
   ``timing_images`` test images; medians of ``repeats`` rounds.

Budgets: ``B_img`` is the number of DISTINCT views computed (GPS picks with replacement;
a repeat costs nothing), ``B_total = B_img * B_feat``. AugTTA / ClassTTA / mean / max at
image budget ``M`` use the first ``M`` views of the pool; GPS chooses ``M`` picks from
the whole pool; ``flips`` is identity + horizontal flip.
"""

from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from undiscard.evaluation.report import table
from undiscard.evaluation.runio import median_time, ratios_to_plain
from undiscard.errors import InputError, UndiscardError

__all__ = ["TTAConfig", "IMAGE_METHODS", "run_tta", "format_tta", "study_rows", "cli_rows", "paired_interval"]

IMAGE_METHODS = ("mean", "max", "gps", "augtta", "classtta", "flips")
LEARNED = ("gps", "augtta", "classtta")


@dataclass
class TTAConfig:
    model: str
    data: str = "fashion-mnist:test"
    val_data: str = "fashion-mnist:val"
    val_images: int = 500
    limit: int | None = 1000
    start: int = 0
    pool: int = 20
    criterion: str = "entropy"
    aggregate: str = "entropy"
    aggregator: str | None = None
    searchable: Any = "inner"
    batch_size: int = 128
    max_batch: int = 64
    seed: int = 0
    timing_images: int = 32
    repeats: int = 3
    threads: int = 0
    cache_dir: str = "runs/cache"
    load_aggregator: str | None = None  # a fitted image aggregator applied instead of fitting (learned rows)
    save_aggregators: str | None = None  # a folder: every fitted learned aggregator saved there
    skip_corrupt: bool = False  # a folder's unreadable images are left out (with a warning) instead of an error
    trust_pickle: bool = False  # allow a whole-module .pt model (unpickling runs code); not part of the settings


@dataclass(frozen=True)
class Row:
    """One configuration: image ``method`` at image budget ``m`` over ``b_feat`` states per view."""

    method: str
    m: int
    b_feat: int
    trained_on: str = "-"  # "plain" / "undiscard" for learned methods, "-" otherwise


def study_rows(totals: list[int], b_feat: int, methods=IMAGE_METHODS) -> list[Row]:
    """The paper-style table: every method without and with ours at each ``B_total``."""
    rows: list[Row] = []
    for method in methods:
        if method == "flips":
            rows += [Row("flips", 2, 1), Row("flips", 2, b_feat)]
            continue
        for t in totals:
            rows.append(Row(method, t, 1, "plain" if method in LEARNED else "-"))
            if t % b_feat:
                continue
            m = t // b_feat
            if method in LEARNED:
                rows += [Row(method, m, b_feat, "undiscard"), Row(method, m, b_feat, "plain")]
            else:
                rows.append(Row(method, m, b_feat))
    return rows


def cli_rows(method: str, image_budget: int, budgets: list[int]) -> list[Row]:
    """``undiscard eval --image-tta METHOD --image-budget M --budget ...``: one method, each ``B_feat``."""
    m = 2 if method == "flips" else image_budget
    rows = []
    for f in budgets:
        if method in LEARNED:
            rows.append(Row(method, m, f, "plain" if f == 1 else "undiscard"))
            if f > 1:
                rows.append(Row(method, m, f, "plain"))
        else:
            rows.append(Row(method, m, f))
    return rows


def _norm(input_size) -> tuple[tuple[float, ...], tuple[float, ...]]:
    from undiscard.data.classification import FASHION_MNIST_MEAN, FASHION_MNIST_STD, IMAGENET_MEAN, IMAGENET_STD

    if input_size[0] == 1:  # the grayscale models here are the Fashion-MNIST zoo
        return (FASHION_MNIST_MEAN,), (FASHION_MNIST_STD,)
    return tuple(IMAGENET_MEAN), tuple(IMAGENET_STD)


def _log(msg: str) -> None:
    print(msg, file=sys.stderr)


def _cache_path(cfg: TTAConfig, split_spec: str) -> Path:
    stem = Path(cfg.model).name.replace(".safetensors", "").replace(":", "_")
    tag = hashlib.sha1(split_spec.encode()).hexdigest()[:8]
    return Path(cfg.cache_dir) / f"{stem}-{split_spec.split(':')[-1].replace('/', '_')}-{tag}.safetensors"


def _view_logits_cached(cache, u, view, x, budgets: list[int], batch_size: int, log) -> dict[int, torch.Tensor]:
    from undiscard.tta.compose import view_logits

    keys = {b: f"{view.name}|B={b}" for b in budgets}
    have = {b: cache.get(k) for b, k in keys.items()}
    todo = [b for b, v in have.items() if v is None]
    if todo:
        log(f"  view {view.name}: B_feat {todo} on {x.shape[0]} images")
        got = view_logits(u, view, x, todo, batch_size)
        for b in todo:
            cache.put(keys[b], got[b])
            have[b] = got[b]
    return have


def _summary(logp: torch.Tensor, y: torch.Tensor) -> dict:
    from undiscard.evaluation.classify import calibration_error

    logp = torch.log_softmax(logp.double(), -1)
    conf, pred = logp.exp().max(-1)
    correct = pred == y
    return {"correct": "".join("1" if c else "0" for c in correct.tolist()),  # per image, for paired intervals
            "top1": 100.0 * float(correct.double().mean()),
            "nll": float(-logp.gather(1, y[:, None]).mean()),
            "ece": 100.0 * calibration_error(conf, correct.long())}


def _check_rows(cfg: TTAConfig, rows: list[Row]) -> None:
    for r in rows:
        if r.method not in IMAGE_METHODS:
            raise InputError(f"image TTA method must be one of {', '.join(IMAGE_METHODS)}; got {r.method!r}")
        if r.m < 1 or r.b_feat < 1:
            raise InputError(f"image and feature budgets must be positive; got {r.m}, {r.b_feat}")
        if r.method != "gps" and r.m > cfg.pool:
            raise InputError(f"{r.method} at image budget {r.m} needs {r.m} views, but the pool has {cfg.pool} "
                             "(raise --tta-pool or lower --image-budget)")


def _views_of(r: Row, pool_size: int) -> list[int]:
    """The pool views a row's aggregator chooses from (GPS: all of them; the others: the first ``m``)."""
    return list(range(pool_size)) if r.method == "gps" else list(range(2 if r.method == "flips" else r.m))


class _ViewLogits:
    """The logits of pool views at each B_feat on one split, computed once and cached on disk."""

    def __init__(self, cache, u, pool: list, x: torch.Tensor, batch_size: int, log) -> None:
        self.cache, self.u, self.pool, self.x, self.batch_size, self.log = cache, u, pool, x, batch_size, log
        self.logits: dict[tuple[int, int], torch.Tensor] = {}

    def ensure(self, want: dict[int, set[int]]) -> None:
        """Compute (or read) the logits of view ``i`` at every B_feat in ``want[i]``."""
        for i, bs in sorted(want.items()):
            bs = sorted(b for b in bs if (i, b) not in self.logits)
            if bs:
                got = _view_logits_cached(self.cache, self.u, self.pool[i], self.x, bs, self.batch_size, self.log)
                for b, v in got.items():
                    self.logits[(i, b)] = v

    def stack(self, idx: list[int], b: int, used=None) -> torch.Tensor:
        """``(N, len(idx), K)`` logits of views ``idx`` at B_feat ``b``; views not in ``used`` are zeros."""
        used = set(range(len(idx))) if used is None else set(used)
        ref = next(self.logits[(i, b)] for j, i in enumerate(idx) if j in used)
        return torch.stack([self.logits[(i, b)] if j in used else torch.zeros_like(ref)
                            for j, i in enumerate(idx)], 1)


def _fit(cfg: TTAConfig, rows: list[Row], val: _ViewLogits, yv: torch.Tensor, names: list[str], context: dict,
         log) -> list[tuple[Row, Any, list[int]]]:
    """Every row's image aggregator, fitted on the validation logits (or loaded, or learning-free)."""
    from undiscard.tta.merge import ImageAggregator, fit_image_aggregator, max_aggregator, mean_aggregator

    fitted: list[tuple[Row, Any, list[int]]] = []
    for r in rows:
        idx = _views_of(r, len(names))
        sub = [names[i] for i in idx]
        if r.method in ("mean", "flips"):
            agg = mean_aggregator(sub)
        elif r.method == "max":
            agg = max_aggregator(sub)
        elif cfg.load_aggregator is not None:
            agg = ImageAggregator.load(cfg.load_aggregator, names=sub, context=context)
            if agg.method != r.method or (r.method == "gps" and agg.budget != r.m):
                raise UndiscardError(
                    f"{cfg.load_aggregator} is a {agg.method} aggregator with budget {agg.budget}; asked for "
                    f"{r.method} at image budget {r.m}")
        else:
            fit_b = 1 if r.trained_on == "plain" else r.b_feat
            trained = "plain logits" if fit_b == 1 else f"undiscard B_feat={fit_b} logits"
            kw = {"budget": r.m} if r.method == "gps" else {}
            agg = fit_image_aggregator(r.method, val.stack(idx, fit_b), yv, sub, trained_on=trained, **kw)
            agg.context = dict(context)
            if cfg.save_aggregators:
                saved = agg.save(Path(cfg.save_aggregators) / f"{r.method}-m{r.m}-fit_bfeat{fit_b}.safetensors")
                log(f"saved {saved}")
        fitted.append((r, agg, idx))
    return fitted


def _evaluate(fitted: list, test: _ViewLogits, yt: torch.Tensor, names: list[str], pool: list
              ) -> tuple[list[dict], list[tuple]]:
    """Per fitted row: its test accuracy / NLL / ECE and the views it uses; and what timing it needs."""
    out_rows: list[dict] = []
    modules: list[tuple] = []
    for r, agg, idx in fitted:
        used = sorted(set(agg.used()))
        with torch.no_grad():
            logp = agg(test.stack(idx, r.b_feat, used))
        row = {"method": r.method, "b_img": len(used), "b_feat": r.b_feat, "b_total": len(used) * r.b_feat,
               "image_budget": r.m, "trained_on": r.trained_on, "views": [names[idx[j]] for j in used],
               **_summary(logp, yt)}
        if r.method == "gps":
            row["picks"] = [names[idx[j]] for j in agg.picks]
            row["temperature"] = float(agg.temperature)
        out_rows.append(row)
        modules.append((agg, [pool[i] for i in idx], r.b_feat))
    return out_rows, modules


def _time(cfg: TTAConfig, model, xtime: torch.Tensor, out_rows: list[dict], modules: list[tuple], wrap_kw: dict,
          log) -> float:
    """Each distinct (views, B_feat) once, interleaved with the plain model: ``cost`` and ``ms_per_image`` of
    every row. Returns the plain model's seconds per batch."""
    from undiscard.tta.compose import ImageTTA

    groups: dict[tuple, list[int]] = {}
    for k, row in enumerate(out_rows):
        groups.setdefault((tuple(row["views"]), row["b_feat"]), []).append(k)
    fns = {}
    for key, ks in groups.items():
        agg, views, f = modules[ks[0]]
        tta = ImageTTA(model, views, agg, f, **wrap_kw)
        fns[key] = (lambda t=tta: t(xtime))
    log(f"timing {len(fns)} configurations on {xtime.shape[0]} images ...")
    with torch.no_grad():
        plain_t = _median_plain(model, xtime, cfg.repeats)
        ratios = ratios_to_plain(lambda: model(xtime), fns, cfg.repeats)
    for key, ks in groups.items():
        for k in ks:
            out_rows[k]["cost"] = ratios[key]
            out_rows[k]["ms_per_image"] = 1000 * plain_t * ratios[key] / xtime.shape[0]
    return plain_t


def run_tta(cfg: TTAConfig, rows: list[Row], *, log=_log, save=None, fresh: bool = False) -> dict:
    """Fit every row's image aggregator on validation, evaluate on test, time it (see the module docstring).

    Steps: the validation logits of every view a fit needs (cached), the fits (:func:`_fit`),
    the test logits of the views the fitted aggregators use (cached), the test rows
    (:func:`_evaluate`), the cost (:func:`_time`).
    """
    from undiscard.evaluation.classify import load_data
    from undiscard.method.classify import Undiscard
    from undiscard.method.learned import backbone_fingerprint
    from undiscard.models.classifiers import load_model
    from undiscard.tta.merge import LogitsCache
    from undiscard.tta.transforms import augmentation_pool

    _check_rows(cfg, rows)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loaded = load_model(cfg.model, trust_pickle=cfg.trust_pickle)
    model = loaded.model
    xv, yv, val_name = load_data(cfg.val_data, loaded.input_size, cfg.val_images, skip_corrupt=cfg.skip_corrupt, log=log)
    xt, yt, test_name = load_data(cfg.data, loaded.input_size, cfg.limit, cfg.start, skip_corrupt=cfg.skip_corrupt,
                                  log=log)
    if len(yv) == 0 or len(yt) == 0:
        raise UndiscardError(f"no images: {len(yv)} validation ({cfg.val_data}), {len(yt)} test ({cfg.data})")
    fingerprint = backbone_fingerprint(model)
    size_tag = "x".join(str(v) for v in loaded.input_size)
    context = {"model": loaded.spec, "weights": fingerprint, "input_size": size_tag}
    mean, std = _norm(loaded.input_size)
    pool = augmentation_pool(tuple(loaded.input_size[1:]), mean, std, n=cfg.pool)
    names = [t.name for t in pool]
    wrap_kw = dict(criterion=cfg.criterion, aggregate=cfg.aggregate, aggregator=cfg.aggregator,
                   searchable=cfg.searchable, max_batch=cfg.max_batch, seed=cfg.seed)
    u = Undiscard(model, 2, **wrap_kw)
    space = u.sites_for(xt[:1]).space_size
    feats = sorted({r.b_feat for r in rows} | {1})
    if feats[-1] > space:
        raise UndiscardError(f"B_feat {feats[-1]} exceeds the search space of {space} states; lower it")
    settings = {k: v for k, v in asdict(cfg).items()
                if k not in ("threads", "cache_dir", "load_aggregator", "save_aggregators", "trust_pickle")}
    settings.update(val_images=int(len(yv)), test_images=int(len(yt)), pool_names=names)

    split_logits = {}
    for split, x, spec, start in (("val", xv, cfg.val_data, 0), ("test", xt, cfg.data, cfg.start)):
        # Entries are keyed by view name and B_feat, so another pool size reuses them; the
        # weights' fingerprint catches a checkpoint retrained under the same path.
        meta = {"model": cfg.model, "weights": fingerprint, "input_size": size_tag, "data": spec,
                "images": str(int(x.shape[0])), "start": str(start),
                "feature": json.dumps({k: str(v) for k, v in wrap_kw.items()}, sort_keys=True)}
        path = _cache_path(cfg, f"{spec}@{start}+{x.shape[0]}")
        if fresh and path.exists():
            path.unlink()
        split_logits[split] = _ViewLogits(LogitsCache(path, meta=meta), u, pool, x, cfg.batch_size, log)
    val, test = split_logits["val"], split_logits["test"]

    val_want: dict[int, set[int]] = {}
    for r in rows:
        if r.method in LEARNED:
            for i in _views_of(r, len(pool)):
                val_want.setdefault(i, set()).add(1 if r.trained_on == "plain" else r.b_feat)
    log(f"validation: logits of {len(val_want)} views on {len(yv)} images")
    val.ensure(val_want)
    fitted = _fit(cfg, rows, val, yv, names, context, log)

    test_want: dict[int, set[int]] = {0: {1}}
    for r, agg, idx in fitted:
        for j in agg.used():
            test_want.setdefault(idx[j], set()).add(r.b_feat)
    feats_id = sorted({1} | {r.b_feat for r in rows} | {r.m * r.b_feat for r in rows if r.m * r.b_feat <= space})
    test_want[0] |= set(feats_id)  # ours alone on the identity view, for context
    log(f"test: logits of {len(test_want)} views on {len(yt)} images")
    test.ensure(test_want)
    plain = _summary(test.logits[(0, 1)], yt)
    out_rows, modules = _evaluate(fitted, test, yt, names, pool)
    xtime = xt[: cfg.timing_images]
    plain_t = _time(cfg, model, xtime, out_rows, modules, wrap_kw, log)
    result: dict = {"settings": settings}
    result.update(model=loaded.spec, data=test_name, val=val_name, images=int(len(yt)), val_images=int(len(yv)),
                  input_size=list(loaded.input_size), space_size=space,
                  plain={**plain, "ms_per_image": 1000 * plain_t / xtime.shape[0], "cost": 1.0},
                  feature_only=_feature_only(test.logits, yt),
                  rows=out_rows, timing={"images": int(xtime.shape[0]), "repeats": cfg.repeats,
                                         "threads": torch.get_num_threads()},
                  torch=torch.__version__)
    if save:
        save(result)
    return result


def _feature_only(test_logits: dict, y: torch.Tensor) -> list[dict]:
    """Ours alone (identity view) at every cached feature budget."""
    return [{"b_feat": b, **_summary(v, y)} for (i, b), v in sorted(test_logits.items()) if i == 0]


def paired_interval(a: str, b: str, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95% paired-bootstrap interval of top-1(b) - top-1(a) in points, from per-image correctness strings."""
    x = torch.tensor([int(c) for c in a], dtype=torch.float64)
    z = torch.tensor([int(c) for c in b], dtype=torch.float64)
    if x.shape != z.shape or x.numel() == 0:
        raise InputError("paired interval needs two correctness strings over the same images")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.numel(), (resamples, x.numel()), generator=g)
    d = 100.0 * ((z - x)[idx].mean(1))
    lo, hi = torch.quantile(d, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return lo, hi


def _median_plain(model, x, repeats: int) -> float:

    return median_time(lambda: model(x), repeats)


def format_tta(result: dict) -> str:

    p = result["plain"]
    rows = [["plain", "-", 1, 1, 1, f"{p['top1']:.2f}", f"{p['nll']:.4f}", f"{p['ece']:.2f}", "1.00"]]
    for r in result["rows"]:
        rows.append([r["method"], r["trained_on"], r["b_img"], r["b_feat"], r["b_total"], f"{r['top1']:.2f}",
                     f"{r['nll']:.4f}", f"{r['ece']:.2f}", f"{r['cost']:.2f}"])
    head = (f"{result['model']} on {result['data']} ({result['images']} images); image aggregators fitted on "
            f"{result['val']} ({result['val_images']} images); pool of {len(result['settings']['pool_names'])} views")
    return head + "\n" + table(["image TTA", "trained on", "B_img", "B_feat", "B_total", "top-1 %", "NLL", "ECE %",
                                 "x plain"], rows)
