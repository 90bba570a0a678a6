"""The method for classification, end to end (docs/method.md, "Search, align, aggregate"): search, align, aggregate.

:func:`wrap` turns a classifier into a drop-in ``nn.Module``: for each image it searches
``budget`` offset states (greedy best-first, batched over the images), aligns each
state's final feature map to the default grid (a sub-cell shift by ``+Delta / P``),
aggregates the maps (``mean``, ``entropy`` weights, or a learned ``attention`` set
operator) and applies the classifier's head to the result.

    >>> model = undiscard.wrap(backbone, budget=8, criterion="entropy", aggregate="entropy")  # doctest: +SKIP
    >>> logits = model(x)                                                                     # doctest: +SKIP

``budget=1`` is the plain model: the wrapped module returns exactly ``backbone(x)``.

The classifier is split into features and head: timm models say where
(``forward_features`` / ``forward_head``); any other model (torchvision, transformers, a
user's own) is split automatically at the call that turns its final map into a vector
(:mod:`undiscard.method.autosplit`), and keeps its own output type; ``split=(features_fn,
head_fn)`` with ``head_fn(features_fn(x)) == model(x)`` overrides both.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch.nn as nn

from undiscard.method.aggregate import entropy, entropy_weights, weighted_mean
from undiscard.method.align import FILLS, align_to_default
from undiscard.method.autosplit import AutoSplit, first_logits, with_logits
from undiscard.run.engine import use_states
from undiscard.method.base import StateWrapper
from undiscard.errors import OptionError, SiteMismatchError, SplitError, UndiscardError
from undiscard.run.inputs import check_batch, check_dtype, check_eval_mode
from undiscard.method.options import check_choice
from undiscard.method.search import CRITERIA, SearchResult, greedy_search, image_seeds
from undiscard.sites.sitemap import SiteMap
from undiscard.run.trie import SharedPrefixEvaluator

__all__ = ["AGGREGATES", "Details", "FeatureSplit", "Searched", "Undiscard", "split_classifier", "wrap"]

AGGREGATES = ("mean", "entropy", "attention")


# --------------------------------------------------------------------- feature / head split

@dataclass
class FeatureSplit:
    """``head(features(x)) == model(x)``; ``layout`` of the features:

    ``"NCHW"`` (CNNs, PVT), ``"NHWC"`` (Swin) or ``"tokens"`` (ViT: ``(N, T, C)``, no grid
    to align). :meth:`to_positions` / :meth:`from_positions` convert to and from the
    common ``(N, S, C)`` form the aggregators work on.
    """

    features: Callable[[torch.Tensor], torch.Tensor]
    head: Callable[[torch.Tensor], torch.Tensor]
    layout: str = "NCHW"
    auto: AutoSplit | None = None  # found by watching the forward (undiscard.method.autosplit)

    def to_positions(self, f: torch.Tensor) -> torch.Tensor:
        if self.layout == "NCHW":
            return f.flatten(2).transpose(1, 2)
        if self.layout == "NHWC":
            return f.flatten(1, 2)
        return f

    def channels(self, f: torch.Tensor) -> int:
        return int(f.shape[1] if self.layout == "NCHW" else f.shape[-1])

    def align(self, f: torch.Tensor, delta_px: torch.Tensor, stride_total: tuple[int, ...], fill: str) -> torch.Tensor:
        """Shift each map by ``+delta_px / stride_total`` cells (no-op for tokens)."""
        if self.layout == "tokens" or not bool(delta_px.any()):
            return f
        if self.layout == "NHWC":
            return align_to_default(f.permute(0, 3, 1, 2), delta_px, stride_total, fill).permute(0, 2, 3, 1)
        return align_to_default(f, delta_px, stride_total, fill)


def verify_split(model: nn.Module, split: FeatureSplit, x: torch.Tensor) -> None:
    """:class:`SplitError` unless ``split.head(split.features(x)) == model(x)`` on ``x``.

    Both sides run the same ops on the same batch, so they agree to rounding: the
    tolerance is ``sqrt(eps)`` of the dtype times the largest logit (3.5e-4 relative in
    float32), far below what another head or a wrong feature map changes (O(1) of the
    logits' scale).
    """
    with torch.no_grad():
        ref = first_logits(model(x))
        got = first_logits(split.head(split.features(x)))
    n = x.shape[0]
    if ref is None:
        raise SplitError(f"cannot verify the split: the model returned a {type(ref).__name__}, not logits")
    if not isinstance(got, torch.Tensor) or got.dim() == 0 or got.shape != ref.shape:
        shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
        raise SplitError(
            f"the split's head returned {shape} for a batch of {n}; model(x) returns {tuple(ref.shape)}. "
            f"head_fn must map features_fn(x) to the model's logits (N, K)"
        )
    tol = torch.finfo(ref.dtype).eps ** 0.5 * max(1.0, float(ref.detach().abs().max()))
    diff = float((got.detach() - ref.detach()).abs().max())
    if not diff <= tol:
        raise SplitError(
            f"the split does not reproduce the model: head_fn(features_fn(x)) differs from model(x) by {diff:.3g} "
            f"(allowed {tol:.3g}) on {n} image(s). Pass the model's own features and head: "
            f"split=(features_fn, head_fn) with head_fn(features_fn(x)) == model(x)"
        )


def split_classifier(model: nn.Module, split: tuple[Callable, Callable] | None = None) -> FeatureSplit:
    """The features / head split of ``model`` (see the module docstring).

    Raises:
        SplitError: ``split`` is not a pair of callables.
    """
    if split is not None:
        if callable(split) or not isinstance(split, (tuple, list)) or len(split) != 2 \
                or not all(callable(f) for f in split):
            got = type(split).__name__ if callable(split) or not isinstance(split, (tuple, list)) else \
                f"a {type(split).__name__} of {len(split)}: ({', '.join(type(f).__name__ for f in split)})"
            raise SplitError(
                f"split must be a pair (features_fn, head_fn) of callables with head_fn(features_fn(x)) == model(x); "
                f"got {got}"
            )
        features, head = split
        return FeatureSplit(features, head, "NCHW")
    if callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None)):
        fmt = getattr(model, "output_fmt", None)
        layout = "NHWC" if str(getattr(fmt, "value", fmt)) == "NHWC" else "NCHW"
        if hasattr(model, "cls_token") or hasattr(model, "num_prefix_tokens"):
            layout = "tokens"
        return FeatureSplit(model.forward_features, model.forward_head, layout)
    auto = AutoSplit(model)  # torchvision, transformers, any module: found per input size (check_sites)
    return FeatureSplit(auto.features, auto.head, "NCHW", auto)


def resolve_layout(layout: str, f: torch.Tensor, sites: SiteMap) -> str:
    """The layout of features ``f`` given the declared one: ``"tokens"`` when ``f`` has no
    grid axes (``(N, T, C)`` of a 2-D model), and channels-last / channels-first swapped
    when only the other reading matches the last main-path site's grid."""
    nd = len(sites.stride_total)
    if f.dim() != nd + 2:
        return "tokens"
    main = [s for s in sites.sites if s.main]
    grid = tuple(main[-1].out_grid) if main else None
    first, last = tuple(f.shape[2:]), tuple(f.shape[1:-1])
    if layout == "NCHW" and first != grid and last == grid:
        return "NHWC"
    if layout == "NHWC" and last != grid and first == grid:
        return "NCHW"
    return layout


# --------------------------------------------------------------------- search output

@dataclass
class Searched:
    """What the search found for a batch, in evaluation order (``states[:, 0]`` is the default).

    Attributes:
        states: ``(N, B, L)`` flat offset indices.
        features: ``(N, B, S, C)`` the states' final maps as positions, aligned if ``aligned``.
        logits: ``(N, B, K)`` each state's own prediction.
        delta: ``(N, B, D)`` displacement in input pixels.
        cells: ``(N, B, D)`` displacement in final-map cells (``delta / P``).
        aligned: whether ``features`` were aligned.
    """

    states: torch.Tensor
    features: torch.Tensor
    logits: torch.Tensor
    delta: torch.Tensor
    cells: torch.Tensor
    aligned: bool
    layout: str
    grid: tuple[int, ...]


@dataclass
class Details:
    """Returned with the logits when ``return_details=True``.

    ``states`` ``(N, B, L)`` the evaluated states (flat offset indices, default first),
    ``weights`` ``(N, B)`` their aggregation weights, ``delta`` ``(N, B, D)`` their
    displacement in pixels, ``sites`` the :class:`SiteMap` searched.
    """

    states: torch.Tensor
    weights: torch.Tensor
    delta: torch.Tensor
    sites: SiteMap


# --------------------------------------------------------------------- the module

class Undiscard(StateWrapper):
    """A classifier that aggregates ``budget`` searched offset states (see :func:`wrap`)."""

    criteria, aggregates, fills = CRITERIA, AGGREGATES, FILLS

    def __init__(
        self,
        model: nn.Module,
        budget: int = 4,
        criterion: str = "displacement",
        aggregate: str = "entropy",
        *,
        aggregator: Any = None,
        searchable: Any = "inner",
        align: bool = True,
        fill: str = "zeros",
        width: int | None = 1,
        max_batch: int = 64,
        seed: int = 0,
        split: tuple[Callable, Callable] | None = None,
        return_details: bool = False,
        engine: str = "trie",
        prior: Any = None,
        policy: Any = None,
        compile: bool | str | None = None,
    ) -> None:
        if policy is not None:
            try:
                policy = torch.as_tensor(policy, dtype=torch.long)
            except (TypeError, ValueError, RuntimeError):
                raise OptionError("policy must be a list of states (lists of flat offset indices)") from None
            if policy.dim() != 2 or policy.shape[0] < 1 or bool(policy[0].any()):
                raise OptionError(f"policy must be a non-empty (S, L) list of states starting with the default "
                                  f"state (all zeros); got shape {tuple(policy.shape)}")
            if budget > policy.shape[0]:
                raise OptionError(f"budget {budget} exceeds the policy's {policy.shape[0]} states")
        if prior is not None:
            prior = torch.as_tensor(prior, dtype=torch.float64)
        # a torch.compile'd model: the plain forward (budget 1) stays compiled; the engine runs the
        # eager module underneath, or (engine="segments") its captured graph, compiled as well
        if compile not in (None, False) and engine != "segments":
            raise OptionError(f"compile={compile!r} compiles the captured graph of engine='segments'; "
                              f"got engine={engine!r}")
        if compile is None and engine == "segments" and hasattr(model, "_orig_mod"):
            compile = True
        self.compile = compile
        super().__init__(getattr(model, "_orig_mod", model), budget, criterion, aggregate, searchable=searchable,
                         max_batch=max_batch, engine=engine, seed=seed, width=width, fill=fill,
                         return_details=return_details)
        if isinstance(aggregator, (str, bytes)) or hasattr(aggregator, "__fspath__"):
            from undiscard.method.learned import load_aggregator

            aggregator = load_aggregator(aggregator, model)
        if (aggregate == "attention" or criterion == "learned") and aggregator is None:
            what = "aggregate='attention'" if aggregate == "attention" else "criterion='learned'"
            raise UndiscardError(
                f"{what} needs a trained aggregator: pass aggregator=PATH (from `undiscard train-aggregator`) "
                "or an AttentionAggregator"
            )
        self.__dict__["_plain"] = model  # not a submodule: it shares the parameters of self.model
        self.split = split_classifier(self.model, split)
        self.aggregator = aggregator
        self.align = bool(align)
        self.prior, self.policy = prior, policy
        if aggregator is not None:
            aggregator.check_align(self.align)

    def check_input(self, x: Any) -> None:
        check_batch(x)

    def check_sites(self, x: torch.Tensor, sites: SiteMap) -> None:
        """The batch has the sites' spatial rank; the features / head split is verified on (up to two of) the
        images, ``head(features(x)) == model(x)`` (else :class:`SplitError`); a trained aggregator's sites match."""
        check_batch(x, len(sites.stride_total))
        if self.split.auto is not None:
            self.split = replace(self.split, layout=self.split.auto.prepare(x, sites))
        if x.shape[0]:
            verify_split(self.model, self.split, x[:2])
        if self.aggregator is not None:
            from undiscard.method.learned import sites_signature

            want = getattr(self.aggregator, "meta", {}).get("undiscard.sites")
            if want is not None and want != sites_signature(sites):
                raise SiteMismatchError(
                    f"the aggregator was trained with searchable sites {want}, but at input size "
                    f"{list(x.shape[1:])} they are {sites_signature(sites)}: use the input size and searchable "
                    "sites it was trained with"
                )

    # -- search ------------------------------------------------------------
    def search(self, x: torch.Tensor, budget: int | None = None, criterion: str | None = None) -> Searched:
        """Search ``budget`` states per image of ``x``; return their maps and predictions.

        The search's choices are discrete (its scores are computed without gradients);
        the chosen states' maps and logits carry gradients when autograd is on, so
        ``wrap(m, B)(x).sum().backward()`` reaches ``x`` and every parameter.
        Each image's search depends on the image and ``seed`` alone (:func:`image_seeds`).
        """
        budget = self.budget if budget is None else budget
        criterion = self.criterion if criterion is None else criterion
        sites = self.sites_for(x)
        stride = sites.stride_total
        sp = self.split
        dims = len(stride)

        shared = None
        if self.engine in ("trie", "segments"):
            shared = SharedPrefixEvaluator(self.model, x, sites, forward=sp.features, max_batch=self.max_batch,
                                           capture=self.engine == "segments", compile=self.compile)
        rows = [0] * len(sites.searchable)

        def features(img: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
            nonlocal sp
            if shared is not None:
                fs = [shared(img, states)]
            else:
                fs = []
                for s in range(0, img.numel(), self.max_batch):
                    with use_states(self.model, sites, states[s : s + self.max_batch]):
                        fs.append(sp.features(x[img[s : s + self.max_batch]]))
                for j in range(len(rows)):
                    rows[j] += img.numel()
            f = torch.cat(fs) if len(fs) > 1 else fs[0]
            if not grid:
                layout = resolve_layout(sp.layout, f, sites)
                if layout != sp.layout:
                    self.split = sp = replace(sp, layout=layout)
                grid.append(tuple(f.shape[2:]) if sp.layout == "NCHW" else tuple(f.shape[1:-1]))
            if self.align:
                f = sp.align(f, sites.displacement(states), stride, self.fill)
            return sp.to_positions(f)

        grid: list[tuple[int, ...]] = []

        def head_of_positions(f: torch.Tensor) -> torch.Tensor:
            return sp.head(self._from_positions(f, grid[0]))

        def score(f: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():  # the search's choices are discrete
                f = f.detach()
                if criterion == "learned":
                    cells = sites.displacement(states).double() / torch.tensor(stride, dtype=torch.float64)
                    return self.aggregator.state_logits(f, cells.to(device=f.device, dtype=f.dtype))
                return -entropy(head_of_positions(f).float())

        if self.policy is not None:  # a fixed list of states, the same for every image: no search
            if self.policy.shape[1] != len(sites.searchable):
                raise OptionError(f"the policy's states have {self.policy.shape[1]} sites, the model has "
                                  f"{len(sites.searchable)} searchable sites at this input size")
            n0, pol = x.shape[0], self.policy[:budget]
            sites.encode(pol)  # range check
            img = torch.arange(n0).repeat_interleave(pol.shape[0])
            out = features(img, pol.repeat(n0, 1))
            res = SearchResult(pol[None].expand(n0, -1, -1).clone(), out.reshape(n0, pol.shape[0], *out.shape[1:]),
                               torch.zeros(n0, pol.shape[0], dtype=torch.float64))
        else:
            res = greedy_search(
                features, x.shape[0], sites, budget, criterion, score=score, width=self.width,
                seeds=image_seeds(x, self.seed), prior=self.prior,
            )
        self.last_rows = shared.rows if shared is not None else rows
        n, b = res.states.shape[:2]
        flat = res.outputs.flatten(0, 1)
        logits = head_of_positions(flat).reshape(n, b, -1)
        delta = sites.displacement(res.states.reshape(n * b, -1)).reshape(n, b, dims)
        cells = delta.double() / torch.tensor(stride, dtype=torch.float64)
        return Searched(res.states, res.outputs, logits, delta, cells.to(device=flat.device, dtype=flat.dtype), self.align,
                        sp.layout, grid[0])

    def _from_positions(self, f: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
        lay = self.split.layout
        if lay == "NCHW":
            return f.transpose(1, 2).reshape(f.shape[0], f.shape[2], *grid)
        if lay == "NHWC":
            return f.reshape(f.shape[0], *grid, f.shape[2])
        return f

    # -- aggregation -------------------------------------------------------
    def combine(self, found: Searched, budget: int | None = None, aggregate: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Aggregate the first ``budget`` searched states: ``(logits (N, K), weights (N, B))``."""
        aggregate = self.aggregate if aggregate is None else aggregate
        b = found.states.shape[1] if budget is None else budget
        feats, logits, cells = found.features[:, :b], found.logits[:, :b], found.cells[:, :b]
        if b == 1:
            return logits[:, 0], torch.ones(logits.shape[0], 1, dtype=_weight_dtype(logits), device=logits.device)
        if aggregate == "attention":
            if self.aggregator is None:
                raise UndiscardError("aggregate='attention' needs a trained aggregator")
            agg, w = self.aggregator(feats, cells)
        else:
            if aggregate == "mean":
                w = torch.full(logits.shape[:2], 1.0 / b, dtype=_weight_dtype(feats), device=feats.device)
            elif aggregate == "entropy":
                w = entropy_weights(logits)
            else:
                check_choice("aggregate", aggregate, AGGREGATES)
            agg = weighted_mean(feats, w)
        return self.split.head(self._from_positions(agg, found.grid)), w

    def forward(self, x: torch.Tensor) -> Any:
        check_eval_mode(self.model, what="wrap(model, ...)")
        check_batch(x)
        check_dtype(self.model, x)
        if self.budget == 1 or x.shape[0] == 0:  # the plain model (an empty batch has nothing to search)
            n = x.shape[0]
            sites = self.sites_for(x) if n else None  # verifies the split on first use, as at any budget
            out = self._plain(x)
            if not self.return_details:
                return out
            sites = sites or self.sites_for(x.new_zeros((1, *x.shape[1:])))
            return out, Details(sites.zero_state(n).reshape(n, 1, len(sites.searchable)), torch.ones(n, 1, device=x.device),
                                torch.zeros(n, 1, len(sites.stride_total), dtype=torch.long), sites)
        found = self.search(x)
        logits, w = self.combine(found)
        if self.split.auto is not None:  # the model's own output type (a transformers ImageClassifierOutput)
            logits = with_logits(self.split.auto.template, logits)
        if self.return_details:
            return logits, Details(found.states, w, found.delta, self.sites_for(x))
        return logits


def _weight_dtype(t: torch.Tensor) -> torch.dtype:
    """Aggregation weights in float32 or wider (half-precision maps under autocast included)."""
    return torch.promote_types(t.dtype, torch.float32)


class _Default:
    """The value of a :func:`wrap` option that was not given (its default applies)."""

    def __repr__(self) -> str:
        return "default"


DEFAULT = _Default()

#: What :func:`wrap` uses for an option it is not given.
WRAP_DEFAULTS: dict[str, Any] = {"budget": 4, "criterion": "displacement", "aggregate": "entropy", "aggregator": None,
                                 "searchable": "inner", "align": True, "fill": "zeros", "width": 1, "max_batch": 64,
                                 "seed": 0, "split": None, "return_details": False, "engine": "trie", "prior": None,
                                 "policy": None, "compile": None}


def wrap(
    model: nn.Module,
    budget: int | None = None,
    criterion: str | None = None,
    aggregate: str | None = None,
    *,
    config: str | os.PathLike | None = None,
    aggregator: Any = None,
    searchable: Any = None,
    align: bool | None = None,
    fill: str | None = None,
    width: int | None | _Default = DEFAULT,
    max_batch: int | None = None,
    seed: int | None = None,
    split: tuple[Callable, Callable] | None = None,
    return_details: bool = False,
    engine: str | None = None,
    prior: Any = None,
    policy: Any = None,
    compile: bool | str | None = None,
) -> Undiscard:
    """Wrap a classifier so that it aggregates ``budget`` searched offset states per image.

    Args:
        model: a classifier in eval mode (timm, or any model with ``split=``).
        budget: states evaluated per image, the default included (1 = the plain model;
            default 4).
        criterion: search order: ``displacement`` (default: smallest ``|Delta|`` first),
            ``entropy`` (lower predictive entropy first), ``learned`` (needs
            ``aggregator``), ``random``.
        aggregate: ``mean``, ``entropy`` (default) or ``attention`` (needs ``aggregator``).
        config: a configuration written by ``undiscard fit`` for this model (refused,
            :class:`~undiscard.errors.ConfigError`, for any other model): it sets the
            budget, criterion, aggregation and search options, so pass none of them.
        aggregator: a trained :class:`~undiscard.method.learned.AttentionAggregator` or its path.
        searchable: the searched sites: ``"inner"`` (default: every main-path site but the
            first and the last), ``"main"``, ``"all"`` or site indices.
        align: shift the states' final maps onto the default grid before combining (default True).
        fill: the border fill of the sub-cell shift: ``"zeros"`` (default), ``"border"``, ``"circular"``.
        width: states evaluated per image per step: 1 (default; the criterion picks every
            state) or ``None`` (all neighbours of the chosen state at once: fewer steps, but
            the criterion only acts once the first state's neighbours are used up).
        max_batch: states per forward (default 64).
        seed: the seed of the per-image random choices (default 0).
        split: ``(features, head)`` callables for a model that is not a timm classifier.
        return_details: return ``(logits, Details)`` instead of the logits.
        engine: ``"trie"`` (default: the shared-prefix engine), ``"segments"`` (the same engine
            on a graph of the forward captured once per input size: no per-call interception;
            where the capture is refused, one :class:`~undiscard.run.segments.CaptureWarning`
            and ``"trie"``) or ``"rerun"`` (one forward per state). Results do not depend on it.
        compile: with ``engine="segments"``, ``torch.compile`` the captured graph (True:
            inductor, or a backend name); default: when ``model`` is itself compiled.
        prior: an ``(L, R)`` neighbour order, see :func:`undiscard.method.search.greedy_search`.
        policy: a fixed list of states evaluated for every image instead of a search
            (``budget`` of them).

    The defaults (4 states, displacement order, entropy weights) are the learning-free
    setting with the best mean validation accuracy at 4 states on the project's
    Fashion-MNIST zoo (docs/results.md, *The default wrapper*); even so it is within noise
    of the plain model there on validation. Whether any setting helps a given model is a question for its validation
    data: ``undiscard fit`` answers it and writes a configuration (``config=``).

    Returns:
        An :class:`Undiscard` module; call it like ``model``.
    """
    given = {k: v for k, v in dict(budget=budget, criterion=criterion, aggregate=aggregate, aggregator=aggregator,
                                   searchable=searchable, align=align, fill=fill, width=width, max_batch=max_batch,
                                   seed=seed, split=split, return_details=return_details, engine=engine, prior=prior,
                                   policy=policy, compile=compile).items()
             if v is not DEFAULT and (v is not None or k == "width")}
    if config is not None:
        from undiscard.method.config import WRAP_KEYS, wrap_kwargs

        clash = sorted(k for k in WRAP_KEYS if k in given)
        if clash:
            raise OptionError(f"{', '.join(clash)} come from the configuration {config}; do not pass them too")
        return Undiscard(model, **{**WRAP_DEFAULTS, **wrap_kwargs(config, model), **given})
    return Undiscard(model, **{**WRAP_DEFAULTS, **given})


def budgets_from(text: str | Sequence[int]) -> list[int]:
    """``"1,2,4"`` -> ``[1, 2, 4]`` (sorted, unique, positive)."""
    vals = text if not isinstance(text, str) else [v for v in text.split(",") if v.strip()]
    try:
        out = sorted({int(v) for v in vals})
    except ValueError:
        raise OptionError(f"budgets must be positive integers like 1,2,4,8; got {text!r}") from None
    if not out or out[0] < 1:
        raise OptionError(f"budgets must be positive integers like 1,2,4,8; got {text!r}")
    return out
