"""One function per subcommand (``cmd_NAME(args) -> exit status``), called by :func:`undiscard.cli.app.main`.

Heavy modules (models, evaluation) are imported inside the command that needs them, so
``undiscard --help`` and the light commands start without them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from undiscard.errors import UndiscardError
from undiscard.evaluation import report
from undiscard.evaluation.report import fmt_shape
from undiscard.evaluation.runio import config_diff, median_time, mtime, progress
from undiscard.statefile import write_json_atomic
from undiscard.cli.parse import check_outputs, csv, parse_searchable, parse_size

__all__ = ["DEFAULT_MODEL", "cmd_sites", "cmd_check", "cmd_train_backbone", "cmd_eval", "cmd_fit",
           "cmd_tta_study", "cmd_train_aggregator", "cmd_eval_segmentation", "cmd_train_segmenter",
           "cmd_fit_policy", "cmd_bench"]

DEFAULT_MODEL = "timm:resnet50"


def _load(args):
    from undiscard.models.classifiers import load_model
    from undiscard.sites.discover import find_sites

    loaded = load_model(args.model, pretrained=args.pretrained, num_classes=args.num_classes, in_chans=args.in_chans,
                        trust_pickle=args.trust_pickle)
    size = tuple(args.input_size) if args.input_size else loaded.input_size
    if not 2 <= len(size) <= 4 or any(v <= 0 for v in size):
        raise UndiscardError(f"--input-size takes 2 to 4 positive integers: C L (1-D), C H W (images) or C T H W "
                             f"(video, volumes); got {' '.join(map(str, size))}")
    x = torch.randn(1, *size, generator=torch.Generator().manual_seed(0))
    sites = find_sites(loaded.model, x, searchable=parse_searchable(args.searchable))
    return loaded, size, x, sites


def cmd_sites(args) -> int:
    loaded, size, _, sites = _load(args)
    if args.json:
        print(json.dumps(sites.as_dicts(), indent=2))
        return 0
    rows = []
    for s in sites:
        rows.append([
            s.index, s.name, s.kind, fmt_shape(s.stride), fmt_shape(s.cum_stride), f"{fmt_shape(s.in_grid)} -> {fmt_shape(s.out_grid)}",
            s.num_offsets, "yes" if s.index in sites.searchable else "no", "main" if s.main else "side",
        ])
    print(f"{loaded.spec}  input {fmt_shape(size)}  ({loaded.note})")
    print(report.table(["#", "name", "kind", "stride", "cum_stride", "grid", "offsets", "searchable", "path"], rows))
    print(
        f"{len(sites)} sites, {len(sites.searchable)} searchable, search space {sites.space_size} states, "
        f"total stride {fmt_shape(sites.stride_total)}"
    )
    return 0


def cmd_check(args) -> int:
    from undiscard.evaluation.checks import run_checks

    loaded, size, x, sites = _load(args)
    print(f"{loaded.spec}  input {fmt_shape(size)}  {len(sites)} sites  ({loaded.note})")
    results = run_checks(loaded.model, sites, x, batch=args.batch)
    print(report.table(["check", "result", "detail"], [[r.name, "PASS" if r.passed else "FAIL", r.detail] for r in results]))
    failed = [r for r in results if not r.passed]
    print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    return 1 if failed else 0


def cmd_train_backbone(args) -> int:
    from undiscard.models.train_classifier import Recipe, train_backbone

    check_outputs(("--out", args.out))
    torch.set_num_threads(args.threads) if args.threads else None
    recipe = Recipe(arch=args.arch, size=args.size, in_chans=args.in_chans, epochs=args.epochs,
                    batch_size=args.batch_size, lr=args.lr, seed=args.seed, augment=args.augment,
                    offset_augment=args.offset_augment)
    train_backbone(recipe, args.out, root=args.data_root, half=not args.fp32, fresh=args.fresh,
                   replace=args.replace, log=lambda m: print(m, file=sys.stderr))
    return 0


_TIMM_FLAGS = (("--pretrained", "pretrained", False), ("--device", "device", "cpu"), ("--amp", "amp", False),
               ("--amp-dtype", "amp_dtype", None),
               ("--channels-last", "channels_last", False), ("--torchcompile", "torchcompile", None),
               ("--retry", "retry", False), ("--results-file", "results_file", None),
               ("--results-format", "results_format", None))


def cmd_eval(args) -> int:
    if args.engine is None:
        args.engine = "segments" if args.torchcompile else "trie"
    if args.task == "segmentation" or args.image_tta != "none" or args.config or args.consistency:
        given = [flag for flag, attr, default in _TIMM_FLAGS if getattr(args, attr) != default]
        if given:
            raise UndiscardError(f"{', '.join(given)}: timm validate.py flags of the classification evaluation "
                                 "(undiscard eval MODEL without --task segmentation, --image-tta, --config or "
                                 "--consistency)")
    if args.results_format and not args.results_file:
        raise UndiscardError("--results-format needs --results-file PATH")
    check_outputs(("--json", args.json), ("--plot", args.plot), ("--results-file", args.results_file),
                   ("--save-image-aggregators", args.save_image_aggregators, True),
                   *([("--cache-dir", args.cache_dir, True)] if args.image_tta != "none" else []))
    if args.size is not None and args.task != "segmentation":
        raise UndiscardError("--size is a segmentation option (with --task segmentation it resizes the images "
                             "bilinearly and the labels nearest-neighbour); classification evaluates at the "
                             "model's input size")
    if args.aggregate is None:
        args.aggregate = "mean,entropy" if args.image_tta == "none" else "entropy"
    if args.image_tta == "none":
        for flag, given in (("--image-budget", args.image_budget is not None),
                            ("--image-aggregator", args.image_aggregator is not None),
                            ("--save-image-aggregators", args.save_image_aggregators is not None)):
            if given:
                raise UndiscardError(f"{flag} needs --image-tta METHOD (image-space TTA is off)")
    if args.task == "segmentation":

        if args.image_tta != "none":
            raise UndiscardError("--image-tta is for classification; segmentation evaluates the feature-space "
                                 "method alone (--task segmentation)")

        return cmd_eval_segmentation(args)
    if args.image_tta != "none":
        return _cmd_eval_image_tta(args)
    if args.config or args.consistency:
        return _cmd_eval_paired(args)
    from undiscard.evaluation.classify import EvalConfig, format_table, plot, run_eval, write_results_file
    from undiscard.method.classify import AGGREGATES, budgets_from
    from undiscard.method.search import CRITERIA

    criteria, aggregates = csv(args.criterion), csv(args.aggregate)
    for c in criteria:
        if c not in CRITERIA:
            raise UndiscardError(f"--criterion takes {', '.join(CRITERIA)} (comma-separated); got {c!r}")
    for a in aggregates:
        if a not in AGGREGATES:
            raise UndiscardError(f"--aggregate takes {', '.join(AGGREGATES)} (comma-separated); got {a!r}")
    if args.limit is not None and args.limit < 1:
        raise UndiscardError(f"--limit must be positive; got {args.limit}")
    if args.width < 0:
        raise UndiscardError(f"--width must be >= 0 (0 = all neighbours); got {args.width}")
    if args.batch_size < 1 or args.max_batch < 1:
        raise UndiscardError(f"--batch-size and --max-batch must be positive; got {args.batch_size}, {args.max_batch}")
    cfg = EvalConfig(
        model=args.model, data=args.data, budgets=budgets_from(args.budget), criteria=criteria, aggregates=aggregates,
        aggregator=args.aggregator, searchable=parse_searchable(args.searchable), align=not args.no_align,
        limit=args.limit, start=args.start, batch_size=args.batch_size, max_batch=args.max_batch, width=args.width or None, seed=args.seed,
        engine=args.engine, timing_images=args.timing_images, repeats=args.repeats, single_states=args.single_states, threads=args.threads,
        skip_corrupt=args.skip_corrupt, trust_pickle=args.trust_pickle, pretrained=args.pretrained,
        device=args.device, amp=args.amp,
        amp_dtype=args.amp_dtype, channels_last=args.channels_last, torchcompile=args.torchcompile, retry=args.retry,
    )
    before = mtime(args.json)
    result = run_eval(cfg, args.json, log=lambda m: print(m, file=sys.stderr), fresh=args.fresh)
    if result is None:  # a rank other than 0 of a torchrun launch: rank 0 prints and writes
        return 0
    print(format_table(result))
    if args.results_file:
        print(f"wrote {write_results_file(result, args.results_file, args.results_format)}", file=sys.stderr)
    if args.json and mtime(args.json) != before:  # not when a completed file was reused
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        print(f"wrote {plot(result, args.plot)}", file=sys.stderr)
    return 0


def cmd_fit(args) -> int:
    from undiscard.method.config import save_config
    from undiscard.evaluation.classify import load_data
    from undiscard.evaluation.fit import LEARNING_FREE, fit, state_table
    from undiscard.models.classifiers import load_model

    check_outputs(("--out", args.out))
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.max_cost < 1:
        raise UndiscardError(f"--max-cost is in plain forwards, at least 1; got {args.max_cost}")
    if not 0 < args.alpha < 1:
        raise UndiscardError(f"--alpha is a significance level in (0, 1); got {args.alpha}")
    loaded = load_model(args.model, trust_pickle=args.trust_pickle)
    x, y, data_name = load_data(args.data, loaded.input_size, args.limit, skip_corrupt=args.skip_corrupt)
    searchable = parse_searchable(args.searchable)
    bar = progress(x.shape[0], "state table")
    table = state_table(loaded.model, x, searchable=searchable, batch=args.batch_size, progress=bar.update)
    bar.close()
    res = fit(table, y, args.max_cost, alpha=args.alpha, seed=args.seed, searchable=searchable,
              criteria=LEARNING_FREE)
    save_config(args.out, {"model": args.model, "data": data_name, "input_size": list(loaded.input_size),
                           "sites": list(table.sites.searchable), **res}, loaded.model)
    v = res["validation"]
    print(f"{args.model} on {data_name} ({v['images']} images), cost cap {args.max_cost} plain forwards")
    print(f"  plain top-1 {v['plain_top1']:.2f}; best candidate: {v['best_candidate']}")
    print(f"  {v['decision']}")
    print(f"  chosen: {res['name']} (cost {res['cost']})")
    print(f"wrote {args.out}: apply it with undiscard.wrap(model, config={args.out!r}) or "
          f"`undiscard eval {args.model} --config {args.out}`", file=sys.stderr)
    return 0


def _cmd_eval_paired(args) -> int:
    """``eval --config`` / ``--consistency``: one configuration against the plain model."""
    from undiscard.evaluation.classify import load_data
    from undiscard.method.classify import budgets_from, wrap
    from undiscard.models.classifiers import load_model
    from undiscard.evaluation.paired import consistency, paired_report, predict

    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, trust_pickle=args.trust_pickle)
    model = loaded.model
    if args.config:
        ours = wrap(model, config=args.config, max_batch=args.max_batch)
        what = f"config {args.config}"
    else:
        budgets, crit, agg = budgets_from(args.budget), csv(args.criterion), csv(args.aggregate or "entropy")
        if len(budgets) != 1 or len(crit) != 1 or len(agg) != 1:
            raise UndiscardError("--consistency without --config compares ONE configuration with the plain model: "
                                 "give one --budget, one --criterion and one --aggregate (or --config PATH)")
        ours = wrap(model, budgets[0], crit[0], agg[0], aggregator=args.aggregator, width=args.width or None,
                    searchable=parse_searchable(args.searchable), max_batch=args.max_batch, seed=args.seed)
        what = f"budget {budgets[0]}, {crit[0]} search, {agg[0]} aggregation"
    x, y, data_name = load_data(args.data, loaded.input_size, args.limit, args.start, skip_corrupt=args.skip_corrupt)
    bar = progress(2 * x.shape[0], "plain + configured")
    plain_logits = predict(model, x, args.batch_size, bar.update)
    ours_logits = predict(ours, x, args.batch_size, bar.update)
    bar.close()
    val = {}
    if args.calibration_val:
        xv, yv, _ = load_data(args.calibration_val, loaded.input_size, None)
        val = {"val_plain": predict(model, xv, args.batch_size), "val_ours": predict(ours, xv, args.batch_size),
               "val_y": yv}
    rep = paired_report(ours_logits, plain_logits, y, seed=args.seed, **val)
    xt = x[: args.timing_images]
    with torch.no_grad():
        t_plain, t_ours = median_time(lambda: model(xt), args.repeats), median_time(lambda: ours(xt), args.repeats)
    rep["time_ratio"] = t_ours / t_plain
    if args.consistency:
        bar = progress(x.shape[0], "shift consistency")
        same = consistency({"plain": model, "ours": ours}, x, args.consistency, batch=args.batch_size,
                           seed=args.seed, progress=bar.update)
        bar.close()
        rep["consistency"] = {"max_shift": args.consistency, "plain": 100 * float(same["plain"].double().mean()),
                              "ours": 100 * float(same["ours"].double().mean())}
    rep.update(model=args.model, data=data_name, configuration=what)
    print(f"{args.model} on {data_name} ({rep['images']} images): {what}")
    print(f"  top-1   plain {rep['plain_top1']:.2f}   ours {rep['top1']:.2f}   gain {rep['gain']:+.2f} "
          f"[{rep['lo']:+.2f}, {rep['hi']:+.2f}] (95% paired bootstrap), McNemar p = {rep['p']:.3g} "
          f"({rep['wins']} wins, {rep['losses']} losses)")
    pc, oc = rep["plain_calibration"], rep["calibration"]
    print(f"  NLL     plain {pc['nll']:.4f}   ours {oc['nll']:.4f}" +
          (f"   after temperature scaling: plain {pc['nll_ts']:.4f}   ours {oc['nll_ts']:.4f}" if "nll_ts" in oc else ""))
    print(f"  ECE     plain {pc['ece']:.4f}   ours {oc['ece']:.4f}" +
          (f"   after temperature scaling: plain {pc['ece_ts']:.4f}   ours {oc['ece_ts']:.4f}" if "ece_ts" in oc else ""))
    print(f"  time    {rep['time_ratio']:.2f}x the plain forward (median of {args.repeats}, {xt.shape[0]} images)")
    if "consistency" in rep:
        c = rep["consistency"]
        print(f"  shift consistency (two random shifts of up to {c['max_shift']} px): plain {c['plain']:.2f}%   "
              f"ours {c['ours']:.2f}%")
    if args.json:
        check_outputs(("--json", args.json))
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rep, indent=2) + "\n")
        print(f"wrote {args.json}", file=sys.stderr)
    return 0


#: Options that change no number of an image-TTA report: left out of the arguments it records.
_NOT_ARGUMENTS = ("func", "command", "json", "fresh", "plot", "threads", "trust_pickle", "cache_dir",
                  "save_image_aggregators")


def _report_identity(args, name: str) -> dict:
    """What an image-TTA ``--json`` report records of the command that wrote it (JSON values)."""
    return json.loads(json.dumps({"name": name, "arguments": {k: v for k, v in sorted(vars(args).items())
                                                              if k not in _NOT_ARGUMENTS}}))


def _check_report(path: str | None, identity: dict, fresh: bool) -> None:
    """Refuse to overwrite a ``--json`` report of other arguments (or not a report of this command) unless ``--fresh``.

    The same arguments recompute it: the view logits come from the cache, so the numbers
    are the same ones (the costs are measured again).
    """
    if not path or fresh or not Path(path).exists():
        return
    name = identity["name"]
    redo = ("add --fresh to replace it (it also deletes the cached view logits of these settings), or choose "
            "another --json")
    try:
        saved = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UndiscardError(f"{path} exists and is not the JSON of an `undiscard {name}` result "
                             f"({type(exc).__name__}); {redo}") from None
    got = saved.get("command") if isinstance(saved, dict) else None
    if not isinstance(got, dict) or got.get("name") != name or not isinstance(got.get("arguments"), dict):
        raise UndiscardError(f"{path} exists and is not a result of `undiscard {name}`; it is not overwritten: {redo}")
    if got["arguments"] != identity["arguments"]:

        raise UndiscardError(f"{path}: completed `undiscard {name}` result of other arguments "
                             f"({config_diff(got['arguments'], identity['arguments'])}); it is not overwritten: rerun "
                             f"with the same arguments, or {redo}")


def _tta_config(args, **kw):
    from undiscard.evaluation.tta import TTAConfig

    if args.tta_pool < 1 or args.tta_val_images < 1:
        raise UndiscardError(f"--tta-pool and --tta-val-images must be positive; got {args.tta_pool}, {args.tta_val_images}")
    data = args.data if ":" in args.data or Path(args.data).expanduser().is_dir() else f"{args.data}:test"
    crit, agg = csv(args.criterion), csv(args.aggregate)
    for flag, vals in (("--criterion", crit), ("--aggregate", agg)):
        if len(vals) > 1:
            raise UndiscardError(f"with image-space TTA {flag} takes ONE value (the feature-space method of every "
                                 f"view); got {','.join(vals)}")
    return TTAConfig(model=args.model, data=data, val_data=args.tta_val, val_images=args.tta_val_images, limit=args.limit,
                     start=args.start, pool=args.tta_pool, criterion=crit[0] if crit else "entropy",
                     aggregate=agg[0] if agg else "entropy", aggregator=args.aggregator,
                     searchable=parse_searchable(args.searchable), batch_size=args.batch_size, max_batch=args.max_batch,
                     seed=args.seed, timing_images=args.timing_images, repeats=args.repeats, threads=args.threads,
                     cache_dir=args.cache_dir, skip_corrupt=args.skip_corrupt, trust_pickle=args.trust_pickle, **kw)


def _write_json(result: dict, path: str | None) -> None:
    if path:
        print(f"wrote {write_json_atomic(result, path, indent=1)}", file=sys.stderr)


def _cmd_eval_image_tta(args) -> int:
    from undiscard.method.classify import budgets_from
    from undiscard.evaluation.tta import cli_rows, format_tta, run_tta

    if args.image_tta == "flips":
        if args.image_budget is not None:
            raise UndiscardError("--image-budget does not apply to --image-tta flips (identity + horizontal flip: 2 views)")
    elif args.image_budget is None:
        args.image_budget = 4
    elif args.image_budget < 1:
        raise UndiscardError(f"--image-budget must be positive; got {args.image_budget}")
    if args.image_aggregator is not None and args.image_tta not in ("gps", "augtta", "classtta"):
        raise UndiscardError(f"--image-aggregator loads a fitted gps / augtta / classtta aggregator; "
                             f"--image-tta {args.image_tta} has nothing to fit")
    for flag, bad in (("--single-states", args.single_states), ("--no-align", args.no_align), ("--plot", args.plot)):
        if bad:
            raise UndiscardError(f"{flag} is not available with --image-tta (it applies to the feature-space table)")
    cfg = _tta_config(args, load_aggregator=args.image_aggregator, save_aggregators=args.save_image_aggregators)
    rows = cli_rows(args.image_tta, args.image_budget, budgets_from(args.budget))
    identity = _report_identity(args, "eval --image-tta")
    _check_report(args.json, identity, args.fresh)
    result = run_tta(cfg, rows, fresh=args.fresh)
    result["command"] = identity
    print(format_tta(result))
    _write_json(result, args.json)
    return 0


def cmd_tta_study(args) -> int:
    from undiscard.method.classify import budgets_from
    from undiscard.evaluation.tta import format_tta, run_tta, study_rows

    totals = budgets_from(args.totals)
    if args.feature_budget < 2:
        raise UndiscardError(f"--feature-budget is B_feat of the rows with ours and must be >= 2 (1 is the image "
                             f"method alone, already in the table); got {args.feature_budget}")
    check_outputs(("--json", args.json), ("--cache-dir", args.cache_dir, True))
    cfg = _tta_config(args)
    identity = _report_identity(args, "tta-study")
    _check_report(args.json, identity, args.fresh)
    result = run_tta(cfg, study_rows(totals, args.feature_budget), fresh=args.fresh)
    result["command"] = identity
    result["study"] = {"totals": totals, "feature_budget": args.feature_budget}
    print(format_tta(result))
    _write_json(result, args.json)
    return 0


def cmd_train_aggregator(args) -> int:
    from undiscard.method.learned import train_aggregator
    from undiscard.evaluation.classify import load_data
    from undiscard.method.classify import wrap
    from undiscard.models.classifiers import load_model

    check_outputs(("--out", args.out))
    if args.threads:
        torch.set_num_threads(args.threads)
    log = lambda m: print(m, file=sys.stderr)  # noqa: E731
    loaded = load_model(args.model, trust_pickle=args.trust_pickle)
    x, y, _ = load_data(args.data, loaded.input_size, args.images, args.start, skip_corrupt=args.skip_corrupt, log=log)
    x = x if isinstance(x, torch.Tensor) else x[:]  # a folder: decode the training subset once
    w = wrap(loaded.model, budget=1, searchable=parse_searchable(args.searchable), align=not args.no_align)
    train_aggregator(w, x, y, args.out, states_per_image=args.states, epochs=args.epochs, batch_size=args.batch_size,
                     lr=args.lr, dim=args.dim, heads=args.heads, seed=args.seed, backbone_name=loaded.spec,
                     fresh=args.fresh, log=log)
    return 0


def cmd_eval_segmentation(args) -> int:
    """``undiscard eval MODEL --task segmentation ...`` (the options of ``undiscard eval``)."""
    from undiscard.evaluation.segment import DEFAULT_BUDGETS, SegEvalConfig, format_seg_table, run_seg_eval
    from undiscard.method.classify import budgets_from
    from undiscard.method.segment import SEG_AGGREGATES, SEG_CRITERIA

    wrong = [opt for opt, given in (("--single-states", args.single_states), ("--aggregator", args.aggregator),
                                    ("--no-align", args.no_align)) if given]
    if wrong:
        raise UndiscardError(f"{', '.join(wrong)} {'is a classification option' if len(wrong) == 1 else 'are classification options'}"
                             "; --task segmentation aligns every state at input resolution and aggregates with "
                             f"{' / '.join(SEG_AGGREGATES)}")
    criteria = csv(args.criterion)
    aggregates = csv("mean,entropy" if args.aggregate is None else args.aggregate)  # None: --aggregate not given
    for c in criteria:
        if c not in SEG_CRITERIA:
            raise UndiscardError(f"--criterion takes {', '.join(SEG_CRITERIA)} with --task segmentation; got {c!r}")
    for a in aggregates:
        if a not in SEG_AGGREGATES:
            raise UndiscardError(f"--aggregate takes {', '.join(SEG_AGGREGATES)} with --task segmentation; got {a!r}")
    if not criteria or not aggregates:
        raise UndiscardError("--criterion and --aggregate need at least one value each")
    if args.limit is not None and args.limit < 1:
        raise UndiscardError(f"--limit must be positive; got {args.limit}")
    if args.width < 0:
        raise UndiscardError(f"--width must be >= 0 (0 = all neighbours); got {args.width}")
    if args.batch_size < 1 or args.max_batch < 1 or args.timing_images < 1 or args.repeats < 1:
        raise UndiscardError("--batch-size, --max-batch, --timing-images and --repeats must be positive")
    data = args.data if args.data != "fashion-mnist" else "fashion-mnist-seg:test"  # the classification default
    size = getattr(args, "size", None)
    # --budget's parser default is a tuple (classification's 1,2,4,8,16); a given --budget is the text typed
    budget_given = isinstance(args.budget, str)
    cfg = SegEvalConfig(
        model=args.model, data=data, size=None if size is None else parse_size(size),
        budgets=budgets_from(args.budget) if budget_given else list(DEFAULT_BUDGETS), criteria=criteria, aggregates=aggregates,
        searchable=parse_searchable(args.searchable), limit=args.limit, start=args.start, batch_size=args.batch_size,
        max_batch=args.max_batch, engine=args.engine, width=args.width or None, seed=args.seed,
        timing_images=args.timing_images, repeats=args.repeats, threads=args.threads, skip_corrupt=args.skip_corrupt,
    )
    before = mtime(args.json)
    result = run_seg_eval(cfg, args.json, log=lambda m: print(m, file=sys.stderr), fresh=args.fresh, figure=args.plot,
                          default_budgets=not budget_given)
    print(format_seg_table(result))
    if args.json and mtime(args.json) != before:  # not when a completed file was reused
        print(f"wrote {args.json}", file=sys.stderr)
    if args.plot:
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def cmd_train_segmenter(args) -> int:
    from undiscard.models.train_segmenter import SegRecipe, train_segmenter

    check_outputs(("--out", args.out))
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = SegRecipe.for_arch(args.arch, steps=args.steps, lr=args.lr, batch_size=args.batch_size, size=args.size,
                                seed=args.seed, val_images=args.val_images)
    train_segmenter(recipe, args.out, root=args.data_root, half=not args.fp32, fresh=args.fresh,
                    log=lambda m: print(m, file=sys.stderr))
    return 0


def cmd_fit_policy(args) -> int:
    from undiscard.evaluation import policy

    check_outputs(("--json", args.json), ("--plot", args.plot))
    if args.threads:
        torch.set_num_threads(args.threads)
    spaces = None
    if args.spaces:
        try:
            spaces = {k: [int(v) for v in vs.split(",")] for k, _, vs in (t.partition("=") for t in args.spaces.split(";"))}
        except ValueError:
            raise UndiscardError(f"--spaces wants NAME=I,J;NAME=K (site indices); got {args.spaces!r}") from None
    out = Path(args.json) if args.json else None
    previous = None
    if out is not None and out.exists() and not args.fresh:
        try:
            previous = json.loads(out.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise UndiscardError(f"{out} exists and is not the JSON of a fit-policy result ({type(exc).__name__}); "
                                 "add --fresh to replace it, or choose another --json") from None
        if not isinstance(previous, dict):
            raise UndiscardError(f"{out} exists and is not a fit-policy result; add --fresh to replace it, or choose "
                                 "another --json")

    def save(result):
        if out is not None:
            write_json_atomic(result, out, indent=1)

    result = policy.run_study(args.model, spaces=spaces, val_images=args.val_images, test_limit=args.limit,
                              max_budget=args.max_budget, timing_images=args.timing_images, repeats=args.repeats,
                              save=save, previous=previous, previous_name=str(out), trust_pickle=args.trust_pickle)
    print(policy.format_study(result))
    if args.plot:
        policy.plot_study(result, args.plot)
    return 0


def cmd_bench(args) -> int:
    from undiscard.evaluation import bench
    from undiscard.method.classify import budgets_from

    check_outputs(("--json", args.json), ("--plot", args.plot))
    try:
        memory = [(m, int(b), int(n)) for m, b, n in (t.split(":") for t in csv(args.memory))]
    except ValueError:
        raise UndiscardError(f"--memory wants MODEL:B:BATCH items, e.g. resnet50:32:8; got {args.memory!r}") from None
    if args.from_json:
        result = json.loads(Path(args.from_json).read_text())
    else:
        result = bench.run_bench(
            csv(args.models), size=args.size, batch=args.batch, budgets=budgets_from(args.budget),
            repeats=args.repeats, threads=args.threads, channels_last=args.channels_last, memory=memory,
            options=args.options or None, compile=not args.no_compile, latency=csv(args.latency),
            latency_repeats=args.latency_repeats, device=args.device,
        )
    print(bench.format_markdown(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        bench.plot_bench(result, args.plot)
    if args.readme:
        bench.write_readme(result, args.readme)
    return 0
