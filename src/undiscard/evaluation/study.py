"""The zoo study: what the method gives each zoo model, measured on the full test split.

``python -m undiscard.evaluation.study NAME CHECKPOINT --out results/study/NAME.json`` (driven
for every zoo model by ``scripts/study.sh``) computes, for one model:

* the state tables (:func:`undiscard.evaluation.fit.state_table`) of the 5 000 validation and
  10 000 test images, cached under ``--cache`` (resumable: each finished table is kept);
* **search comparison on validation**: top-1 at budgets 1..16 of every search variant
  (criterion, width, neighbour prior, policy) and aggregation; variants fitted on data
  (prior, policy) are cross-fitted (fitted on one half of validation, measured on the
  other, both ways) so that no number is in-sample;
* **the fitted configuration** (:func:`undiscard.evaluation.fit.fit`, cost cap 4), written next to
  the checkpoint as ``NAME.config.json``, and applied with the real wrapper to the test
  split: gain with paired-bootstrap interval and McNemar test, NLL / ECE raw and after
  temperature scaling (temperatures fitted on validation), measured time ratio;
* every variant on test at budgets 2, 4, 8, 16 against plain (priors / policies fitted
  on all of validation);
* shift consistency on test (two random shifts of up to ``--shift`` pixels): plain, the
  fitted configuration, and the default wrapper;
* with ``--ablations``: unaligned maps, and the search over every main-path site
  (on the first ``--main-images`` test images);
* with ``--aggregator PATH``: the learned criterion and the attention aggregation, and
  the attention control (the aggregator applied to the default state alone).

Every number is from this command; ``scripts/render_study.py`` turns the JSON files into
``docs/results.md`` and the README's headline table.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
from pathlib import Path

import torch

from undiscard.evaluation.runio import median_time
from undiscard.evaluation.fit import StateTable, aggregate_logits, fit, fit_table_policy, replay, site_prior, state_table, table_search
from undiscard.evaluation.stats import compare

__all__ = ["checkpoint_sha256", "BUDGETS_TEST", "DEFAULT_WRAP", "cached_table", "VARIANTS", "variant_indices",
           "search_on_validation", "search_on_test", "paired_correct", "run", "resolved_default",
           "refresh_default", "offset_augment_study", "main"]

BUDGETS_TEST = (2, 4, 8, 16)
DEFAULT_WRAP = {"budget": 4}  # the default wrapper at the fitted configuration's cost cap


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a checkpoint file's bytes (what a study was computed from; ``scripts/study.sh`` compares it)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def cached_table(path: Path, model, x, **kw) -> StateTable:
    """The state table of ``model`` on ``x``, cached at ``path``; a cache of another model (its weights'
    fingerprint) or another number of images is recomputed, never reused."""
    from undiscard.method.config import model_fingerprint
    from undiscard.sites.discover import find_sites
    from undiscard.statefile import load_state, save_state

    fingerprint = model_fingerprint(model)
    if path.exists():
        d = load_state(path, "undiscard.study-table/1", what="state table cache")
        if d.get("fingerprint") == fingerprint and d["logits"].shape[0] == x.shape[0]:
            sites = find_sites(model, x[0:1], searchable=kw.get("searchable", "inner"))
            return StateTable(d["states"], d["logits"], [int(s) for s in d["seeds"]], sites)
        _log(f"  table {path.name}: cached for another model or image set; computing it afresh")
    t0 = time.perf_counter()
    t = state_table(model, x, batch=64, **kw)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_state({"states": t.states, "logits": t.logits, "seeds": [str(s) for s in t.seeds],
                "fingerprint": fingerprint}, path, "undiscard.study-table/1")
    _log(f"  table {path.name}: {tuple(t.logits.shape)} in {time.perf_counter() - t0:.0f} s")
    return t


def _top1(lg: torch.Tensor, y: torch.Tensor) -> float:
    return 100 * float((lg.argmax(1) == y).double().mean())


def _gather(table: StateTable, idx: torch.Tensor) -> torch.Tensor:
    return table.logits.gather(1, idx[..., None].expand(-1, -1, table.logits.shape[-1]))


#: search variants: name -> (criterion, width, uses the prior)
VARIANTS = {
    "entropy, width 1, random order": ("entropy", 1, False),
    "entropy, width all (single-site first)": ("entropy", None, False),
    "entropy, width 1, prior order": ("entropy", 1, True),
    "entropy, width all, prior order": ("entropy", None, True),
    "random": ("random", 1, False),
    "displacement": ("displacement", 1, False),
}


def variant_indices(table: StateTable, fit_on: StateTable, y_fit: torch.Tensor, budget: int) -> dict[str, torch.Tensor]:
    """Per variant, the ``(N, budget)`` table indices it evaluates (the prior / policy fitted on ``fit_on``).

    Shape:
        - table: ``logits`` ``(N, S, K)``; fit_on: ``logits`` ``(N_fit, S, K)``.
        - y_fit: ``(N_fit,)`` int64 labels of ``fit_on``'s images.
        - output: ``{variant: (N, budget)}`` int64 table indices (the policy's: ``(N, min(budget, S))``).
    """
    prior = site_prior(fit_on, y_fit)
    out = {name: table_search(table, budget, crit, width=width, prior=prior if p else None)
           for name, (crit, width, p) in VARIANTS.items()}
    out["policy (dataset-level)"] = torch.tensor(fit_table_policy(fit_on, y_fit, budget)).expand(
        table.logits.shape[0], -1)
    return out


def search_on_validation(tv: StateTable, yv: torch.Tensor, seed: int = 0) -> dict:
    """Top-1 of every variant x aggregation at budgets 1..S on validation, cross-fitted.

    Shape:
        - tv: ``logits`` ``(N, S, K)``; yv: ``(N,)`` int64 labels.
        - output: ``{"images", "budgets", "top1": {"variant | aggregation": S top-1s in points}}``.
    """
    n, space = tv.logits.shape[0], tv.states.shape[0]
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    halves = [perm[: n // 2], perm[n // 2 :]]
    correct: dict[str, torch.Tensor] = {}
    for f in range(2):
        this, other = halves[f], halves[1 - f]
        sub = tv.subset(this)
        idx = variant_indices(sub, tv.subset(other), yv[other], space)
        for name, ix in idx.items():
            lg = _gather(sub, ix)
            for agg in ("mean", "entropy"):
                key = f"{name} | {agg}"
                c = correct.setdefault(key, torch.zeros(space, n, dtype=torch.bool))
                for b in range(1, space + 1):
                    c[b - 1, this] = aggregate_logits(lg[:, :b], agg).argmax(1) == yv[this]
    return {"images": n, "budgets": list(range(1, space + 1)),
            "top1": {k: [100 * float(c[b].double().mean()) for b in range(space)] for k, c in correct.items()}}


def search_on_test(tt: StateTable, yt: torch.Tensor, idx: dict[str, torch.Tensor]) -> dict:
    """Every variant x aggregation on test: top-1 at budgets 1..S, and against the plain model at
    :data:`BUDGETS_TEST`.

    Returns ``{"rows": {"variant | aggregation": {budget: compare(...)}}, "curve": {"variant |
    aggregation": S top-1s in points}}`` (:func:`undiscard.evaluation.stats.compare`).

    Shape:
        - tt: ``logits`` ``(N, S, K)``; yt: ``(N,)`` int64 labels.
        - idx: ``{variant: (N, S)}`` table indices (:func:`variant_indices` at budget ``S``).
    """
    space = tt.states.shape[0]
    plain = tt.logits[:, 0].argmax(1) == yt
    rows = {}
    per_budget = {}
    for name, ix in idx.items():
        lg = _gather(tt, ix)
        for agg in ("mean", "entropy"):
            key = f"{name} | {agg}"
            rows[key] = {}
            per_budget[key] = [_top1(aggregate_logits(lg[:, :b], agg), yt) for b in range(1, space + 1)]
            for b in BUDGETS_TEST:
                if b <= space:
                    c = aggregate_logits(lg[:, :b], agg).argmax(1) == yt
                    rows[key][str(b)] = compare(c, plain)
    return {"rows": rows, "curve": per_budget}


def paired_correct(tt: StateTable, yt, a: tuple[str, str], b: tuple[str, str], budget: int, idx) -> dict:
    """``a`` vs ``b`` (variant, aggregation) on test at ``budget``: gain of a over b with interval and McNemar."""
    ca = aggregate_logits(_gather(tt, idx[a[0]][:, :budget]), a[1]).argmax(1) == yt
    cb = aggregate_logits(_gather(tt, idx[b[0]][:, :budget]), b[1]).argmax(1) == yt
    return compare(ca, cb)


def run(name: str, ckpt: str, out: Path, cache: Path, *, shift: int = 8, ablations: bool = False,
        main_images: int = 1000, aggregator: str | None = None, config_out: Path | None = None,
        test_limit: int | None = None, val_limit: int | None = None, consistency_images: int = 2000) -> dict:
    from undiscard.method.config import save_config
    from undiscard.data.classification import fashion_mnist_tensors
    from undiscard.method.classify import wrap
    from undiscard.models.classifiers import load_model
    from undiscard.evaluation.paired import consistency, paired_report, predict

    sha = checkpoint_sha256(ckpt)
    result: dict = json.loads(out.read_text()) if out.exists() else {}
    if result.get("checkpoint_sha256") != sha:  # another model under this name: nothing of its study is kept
        result = {}
    result.update(name=name, checkpoint=ckpt, checkpoint_sha256=sha)
    loaded = load_model(ckpt)
    model = loaded.model
    c, h, _ = loaded.input_size
    xv, yv = fashion_mnist_tensors("val", h, c)
    xt, yt = fashion_mnist_tensors("test", h, c)
    if test_limit:
        xt, yt = xt[:test_limit], yt[:test_limit]
    if val_limit:
        xv, yv = xv[:val_limit], yv[:val_limit]
    _log(f"{name}: tables")
    tv = cached_table(cache / name / "val_inner.safetensors", model, xv)
    tt = cached_table(cache / name / "test_inner.safetensors", model, xt)
    result["sites"] = {"searchable": list(tt.sites.searchable), "space": int(tt.states.shape[0]),
                       "all": tt.sites.as_dicts()}
    result["val_top1"], result["test_top1"] = _top1(tv.logits[:, 0], yv), _top1(tt.logits[:, 0], yt)
    with torch.no_grad():
        result["final_map"] = list(model.forward_features(xt[:1]).shape[-2:])
    result["input_size"] = list(loaded.input_size)
    result["params"] = sum(p.numel() for p in model.parameters())
    summary = Path(ckpt).with_suffix(".json")
    if summary.exists():
        result["training"] = json.loads(summary.read_text())

    _log(f"{name}: search comparison on validation")
    result["search_val"] = search_on_validation(tv, yv)
    _log(f"{name}: variants on test")
    test_idx = variant_indices(tt, tv, yv, tt.states.shape[0])
    result["search_test"] = search_on_test(tt, yt, test_idx)
    result.pop("complete", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    _log(f"{name}: fit (cost cap 4)")
    fitted = fit(tv, yv, 4, log=_log)
    config_out = config_out or Path(ckpt).with_suffix(".config.json")
    save_config(config_out, {"model": ckpt, "data": "fashion-mnist:val", "input_size": list(loaded.input_size),
                             "sites": list(tv.sites.searchable), **fitted}, model)
    ours = wrap(model, config=config_out)
    default = wrap(model, **DEFAULT_WRAP)
    _log(f"{name}: the fitted configuration on test ({fitted['name']})")
    plain_t, plain_v = tt.logits[:, 0], tv.logits[:, 0]
    ours_t = predict(ours, xt, 128)  # the product path, end to end
    replayed = replay(tt, fitted["wrap"])
    check = {"same_prediction": float((replayed.argmax(1) == ours_t.argmax(1)).double().mean()),
             "max_abs_logit_diff": float((replayed - ours_t).abs().max())}
    _log(f"  wrapper vs table replay on test: {check}")
    head = paired_report(ours_t, plain_t, yt, val_ours=replay(tv, fitted["wrap"]), val_plain=plain_v, val_y=yv)
    head["wrapper_vs_replay"] = check
    dflt = paired_report(replay(tt, resolved_default()), plain_t, yt, val_ours=replay(tv, resolved_default()),
                         val_plain=plain_v, val_y=yv)
    xb = xt[:256]
    with torch.no_grad():
        tp = median_time(lambda: model(xb), 5)
        head["time_ratio"] = median_time(lambda: ours(xb), 5) / tp
        dflt["time_ratio"] = median_time(lambda: default(xb), 5) / tp
    result["fitted"] = {"config": str(config_out), "name": fitted["name"], "cost": fitted["cost"],
                        "wrap": {k: v for k, v in fitted["wrap"].items() if k != "prior"},
                        "validation": fitted["validation"], "test": head}
    result["default"] = {"wrap": resolved_default(), "test": dflt}

    _log(f"{name}: shift consistency (up to {shift} px)")
    same = consistency({"plain": model, "fitted": ours, "default": default}, xt[:consistency_images], shift)
    plain_same = same["plain"]
    result["consistency"] = {"max_shift": shift, "images": int(plain_same.numel()), **{k: 100 * float(v.double().mean()) for k, v in same.items()},
                             "fitted_vs_plain": compare(same["fitted"], plain_same),
                             "default_vs_plain": compare(same["default"], plain_same)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")

    if ablations:
        _log(f"{name}: ablations")
        abl = {}
        tu = cached_table(cache / name / "test_inner_noalign.safetensors", model, xt, align=False)
        tuv = cached_table(cache / name / "val_inner_noalign.safetensors", model, xv, align=False)
        rows = {}
        for agg in ("mean", "entropy"):
            for b in BUDGETS_TEST:
                ia = table_search(tt, b, "entropy", width=1)
                iu = table_search(tu, b, "entropy", width=1)
                ca = aggregate_logits(_gather(tt, ia), agg).argmax(1) == yt
                cu = aggregate_logits(_gather(tu, iu), agg).argmax(1) == yt
                rows[f"{agg} B={b}"] = {"aligned": 100 * float(ca.double().mean()),
                                        "unaligned": 100 * float(cu.double().mean()), **compare(ca, cu)}
        abl["alignment"] = rows
        del tuv
        m = min(main_images, xt.shape[0])
        tm = cached_table(cache / name / f"test{m}_main.safetensors", model, xt[:m], searchable="main")
        sub = tt.subset(torch.arange(m))
        rows = {}
        for b in BUDGETS_TEST:
            ci = aggregate_logits(_gather(sub, table_search(sub, b, "entropy", width=1)), "entropy").argmax(1) == yt[:m]
            cm = aggregate_logits(_gather(tm, table_search(tm, b, "entropy", width=1)), "entropy").argmax(1) == yt[:m]
            rows[f"B={b}"] = {"inner": 100 * float(ci.double().mean()), "main": 100 * float(cm.double().mean()),
                              **compare(ci, cm)}
        abl["sites"] = {"images": m, "inner": list(tt.sites.searchable), "main": list(tm.sites.searchable),
                        "rows": rows}
        abl["criteria_B4"] = {
            "entropy_vs_random": paired_correct(tt, yt, ("entropy, width 1, random order", "entropy"),
                                                ("random", "entropy"), 4, test_idx),
            "random_vs_displacement": paired_correct(tt, yt, ("random", "entropy"), ("displacement", "entropy"), 4,
                                                     test_idx),
            "entropy_agg_vs_mean_agg": paired_correct(tt, yt, ("entropy, width 1, random order", "entropy"),
                                                      ("entropy, width 1, random order", "mean"), 8, test_idx),
        }
        result["ablations"] = abl
        out.write_text(json.dumps(result, indent=2) + "\n")

    if aggregator:
        _log(f"{name}: learned criterion / attention")
        from undiscard.method.learned import load_aggregator

        agg = load_aggregator(aggregator, model)
        plain_c = plain_t.argmax(1) == yt
        ref = replay(tt, {"budget": 8, "criterion": "entropy", "aggregate": "entropy", "width": 1}).argmax(1) == yt
        rows = {"entropy search, entropy B=8 (reference)": {"top1": 100 * float(ref.double().mean()),
                                                            **compare(ref, plain_c)}}
        for crit, aggname in (("entropy", "attention"), ("learned", "entropy"), ("learned", "attention")):
            lg = predict(wrap(model, 8, crit, aggname, aggregator=agg, width=1), xt, 128)
            c_ = lg.argmax(1) == yt
            rows[f"{crit} search, {aggname} B=8"] = {"top1": _top1(lg, yt), **compare(c_, plain_c),
                                                     "vs_reference": compare(c_, ref)}
        # the control: the aggregator's correction of the default state's map alone
        w1 = wrap(model, 2, "entropy", "attention", aggregator=agg)

        def control(x):
            found = w1.search(x, budget=1)
            a_, _ = agg(found.features[:, :1], found.cells[:, :1])
            return w1.split.head(w1._from_positions(a_, found.grid))

        lg = predict(control, xt, 128)
        rows["control: attention on the default state alone"] = {"top1": _top1(lg, yt),
                                                                  **compare(lg.argmax(1) == yt, plain_c)}
        result["learned"] = {"aggregator": aggregator, "rows": rows}
        out.write_text(json.dumps(result, indent=2) + "\n")
    result["complete"] = True
    out.write_text(json.dumps(result, indent=2) + "\n")
    _log(f"{name}: wrote {out}")
    return result


def resolved_default() -> dict:
    """``DEFAULT_WRAP`` with the wrapper's own defaults filled in (what ``wrap(model, budget=4)`` runs)."""
    import inspect

    from undiscard.method.classify import Undiscard

    sig = inspect.signature(Undiscard.__init__).parameters
    keys = ("criterion", "aggregate", "width", "searchable")
    return {**{k: sig[k].default for k in keys}, **DEFAULT_WRAP}


def refresh_default(name: str, ckpt: str, out: Path, cache: Path, *, shift: int = 8,
                    consistency_images: int = 2000) -> dict:
    """Recompute the default wrapper's rows of a finished study (after the library default changed)."""
    from undiscard.data.classification import fashion_mnist_tensors
    from undiscard.method.classify import wrap
    from undiscard.models.classifiers import load_model
    from undiscard.evaluation.paired import consistency, paired_report

    result = json.loads(out.read_text())
    loaded = load_model(ckpt)
    model = loaded.model
    c, h, _ = loaded.input_size
    xv, yv = fashion_mnist_tensors("val", h, c)
    xt, yt = fashion_mnist_tensors("test", h, c)
    tv = cached_table(cache / name / "val_inner.safetensors", model, xv)
    tt = cached_table(cache / name / "test_inner.safetensors", model, xt)
    cfg = resolved_default()
    default = wrap(model, **DEFAULT_WRAP)
    dflt = paired_report(replay(tt, cfg), tt.logits[:, 0], yt, val_ours=replay(tv, cfg), val_plain=tv.logits[:, 0],
                         val_y=yv)
    xb = xt[:256]
    with torch.no_grad():
        tp = median_time(lambda: model(xb), 5)
        dflt["time_ratio"] = median_time(lambda: default(xb), 5) / tp
    result["default"] = {"wrap": cfg, "test": dflt}
    same = consistency({"plain": model, "default": default}, xt[:consistency_images], shift)
    result["consistency"].update(default=100 * float(same["default"].double().mean()),
                                 default_vs_plain=compare(same["default"], same["plain"]))
    out.write_text(json.dumps(result, indent=2) + "\n")
    _log(f"{name}: refreshed the default wrapper's rows ({cfg})")
    return result


def offset_augment_study(aug: str, base: str, out: Path, cache: Path, *, variant: str,
                         aggregate: str = "entropy") -> dict:
    """Offset-augmented training (``aug``) against the same architecture trained normally (``base``).

    Uses the test tables of both (``cache/aug`` and ``cache/base``, from :func:`run`): both
    plain models, and each with ``variant`` / ``aggregate`` (the validated default) at
    budgets 2, 4, 8, every number against the normally trained plain model.
    """
    from undiscard.data.classification import fashion_mnist_tensors
    from undiscard.models.classifiers import load_model

    res: dict = {"aug": aug, "base": base, "variant": variant, "aggregate": aggregate, "rows": {}}
    tabs = {}
    for key, name in (("aug", aug), ("base", base)):
        loaded = load_model(f"zoo/fmnist-{name}.safetensors")
        c, h, _ = loaded.input_size
        xt, yt = fashion_mnist_tensors("test", h, c)
        xv, yv = fashion_mnist_tensors("val", h, c)
        tabs[key] = (cached_table(cache / name / "test_inner.safetensors", loaded.model, xt),
                     cached_table(cache / name / "val_inner.safetensors", loaded.model, xv))
    base_plain = tabs["base"][0].logits[:, 0].argmax(1) == yt
    name_of = {"aug": aug, "base": base}
    for key in ("base", "aug"):
        tt, tv = tabs[key]
        res["rows"][f"{key} plain"] = {"top1": _top1(tt.logits[:, 0], yt),
                                       **compare(tt.logits[:, 0].argmax(1) == yt, base_plain)}
        idx = variant_indices(tt, tv, yv, 8)[variant]
        for b in (2, 4, 8):
            c_ = aggregate_logits(_gather(tt, idx[:, :b]), aggregate).argmax(1) == yt
            res["rows"][f"{key} B={b}"] = {"top1": 100 * float(c_.double().mean()), **compare(c_, base_plain)}
        cfg_path = Path(f"zoo/fmnist-{name_of[key]}.config.json")
        if cfg_path.exists():
            cfg = json.loads(cfg_path.read_text())
            c_ = replay(tt, cfg["wrap"]).argmax(1) == yt
            res["rows"][f"{key} fitted ({cfg['name']}, cost {cfg['cost']})"] = {
                "top1": 100 * float(c_.double().mean()), **compare(c_, base_plain)}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    _log(f"offset augmentation: wrote {out}")
    return res


def main(argv=None) -> int:

    p = argparse.ArgumentParser(prog="python -m undiscard.evaluation.study", description=__doc__.splitlines()[0])
    p.add_argument("name", help="the model's name in the results (or 'offset-augment')")
    p.add_argument("checkpoint", help="its checkpoint (for offset-augment: AUG_NAME,BASE_NAME)")
    p.add_argument("--variant", default="entropy, width 1, random order",
                   help="offset-augment: the search variant (a key of VARIANTS)")
    p.add_argument("--out", required=True)
    p.add_argument("--cache", default="runs/study")
    p.add_argument("--shift", type=int, default=8, help="largest shift of the consistency metric, pixels (8)")
    p.add_argument("--consistency-images", type=int, default=2000, help="first N test images for consistency")
    p.add_argument("--ablations", action="store_true")
    p.add_argument("--main-images", type=int, default=1000)
    p.add_argument("--aggregator", default=None)
    p.add_argument("--config-out", default=None)
    p.add_argument("--test-limit", type=int, default=None, help="first N test images (a quick check)")
    p.add_argument("--val-limit", type=int, default=None, help="first N validation images (a quick check)")
    p.add_argument("--refresh-default", action="store_true",
                   help="only recompute the default wrapper's rows of a finished study")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.name == "offset-augment":
        aug, base = a.checkpoint.split(",")
        offset_augment_study(aug, base, Path(a.out), Path(a.cache), variant=a.variant)
        return 0
    if a.refresh_default:
        refresh_default(a.name, a.checkpoint, Path(a.out), Path(a.cache), shift=a.shift,
                        consistency_images=a.consistency_images)
        return 0
    run(a.name, a.checkpoint, Path(a.out), Path(a.cache), shift=a.shift, ablations=a.ablations,
        main_images=a.main_images, aggregator=a.aggregator, config_out=Path(a.config_out) if a.config_out else None,
        test_limit=a.test_limit, val_limit=a.val_limit, consistency_images=a.consistency_images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
