"""Choosing a configuration on validation data: ``undiscard fit``.

Whether offsets help depends on the model: on some, a few states chosen on data add
accuracy; on others nothing beats the plain model. :func:`fit` decides on the user's
own validation split, within a cost cap, and never picks a configuration whose gain is
not significant there.

**The state table.** For every validation image, the logits of every state of the
search space (the head applied to the state's final map aligned to the default grid):
``(N, S, K)``. Every learning-free configuration is a function of this table, because
the classifier heads the wrappers support are affine in the final map (global pooling
then linear): the head of a weighted mean of aligned maps, with weights summing to 1, is
the same weighted mean of the states' logits. So the search (:func:`table_search` runs
:func:`undiscard.method.search.greedy_search` itself, reading outputs from the table) and the
aggregation are replayed for each candidate without running the network again.
:func:`state_table` checks the affinity on the first images and refuses a head that
is not affine.

**Candidates**, each with a cost in states evaluated per image (each state costs at
most one plain forward; states sharing a prefix share its computation, so the measured
time is lower):

* the plain model (cost 1);
* per-image search: criterion ``entropy`` / ``random`` / ``displacement``, ``width`` 1
  (one new state per step) or all neighbours of the chosen state (``width=None``: the
  single-site states of the default first), neighbours in random order or ranked by
  a *prior* (:func:`site_prior`: the validation NLL gain of averaging the default with
  each single-site state), ``mean`` or ``entropy`` aggregation, budgets ``2..max_cost``;
* a dataset-level *policy* (:func:`fit_table_policy`): one ordered list of states for
  every image, chosen greedily to lower the validation NLL of their mean; its first
  ``b`` states, ``mean`` or ``entropy`` aggregated.

**The decision.** The validation images are split into two halves (seeded). For each
half, the priors and policies are fitted on the other half and the best candidate
there (highest top-1, then lowest NLL, then lowest cost) predicts this half: every
validation image gets an out-of-fold prediction of the whole fitting procedure. If
that beats the plain model with an exact McNemar p below ``alpha`` (and a positive
gain), the procedure is rerun on all validation images and its choice is written;
otherwise the configuration is the plain model. The file records the evidence either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from undiscard.method.aggregate import entropy, entropy_weights, weighted_mean
from undiscard.errors import OptionError, UndiscardError
from undiscard.method.search import greedy_search, image_seeds
from undiscard.sites.sitemap import SiteMap
from undiscard.sites.discover import find_sites
from undiscard.evaluation.stats import compare

__all__ = ["StateTable", "state_table", "table_search", "replay", "aggregate_logits", "site_prior", "fit_table_policy",
           "Candidate", "candidates", "fit", "MAX_TABLE_SPACE"]

#: the largest search space whose table is computed (states per image)
MAX_TABLE_SPACE = 256
LEARNING_FREE = ("entropy", "random", "displacement")


@dataclass
class StateTable:
    """``logits[i, s]``: image ``i`` under ``states[s]`` (``states[0]`` is the default state).

    ``seeds``: :func:`undiscard.method.search.image_seeds` of the images (the search's
    generators), ``sites``: the searched sites.
    """

    states: torch.Tensor  # (S, L)
    logits: torch.Tensor  # (N, S, K) float32
    seeds: list[int]
    sites: SiteMap

    def subset(self, idx: torch.Tensor) -> StateTable:
        return StateTable(self.states, self.logits[idx], [self.seeds[i] for i in idx.tolist()], self.sites)

    def index(self) -> dict[tuple[int, ...], int]:
        return {tuple(s): i for i, s in enumerate(self.states.tolist())}


def all_states(sites: SiteMap) -> torch.Tensor:
    """Every state of the searchable sites ``(S, L)``, the default first (row-major order)."""
    ranges = [torch.arange(s.num_offsets) for s in sites.searchable_sites]
    if not ranges:
        return torch.zeros(1, 0, dtype=torch.long)
    return torch.cartesian_prod(*ranges).reshape(-1, len(ranges))


@torch.no_grad()
def state_table(model: nn.Module, x: Any, *, searchable: Any = "inner", batch: int = 32, align: bool = True,
                fill: str = "zeros", seed: int = 0, split=None, progress: Callable[[int], None] | None = None,
                max_space: int = MAX_TABLE_SPACE) -> StateTable:
    """The :class:`StateTable` of ``model`` on ``x`` (a tensor or anything sliceable into batches).

    Raises:
        UndiscardError: the space holds more than ``max_space`` states, or the model's
            head is not affine in the final map (the table would not replay it).
    """
    from undiscard.method.classify import Undiscard

    first = x[0:1]
    sites = find_sites(model, first, searchable=searchable)
    states = all_states(sites)
    if states.shape[0] > max_space:
        raise UndiscardError(f"the search space of sites {list(sites.searchable)} holds {states.shape[0]} states, "
                             f"more than {max_space}: fit fewer searchable sites")
    u = Undiscard(model, budget=states.shape[0], policy=states, aggregate="mean", searchable=searchable,
                  align=align, fill=fill, seed=seed, split=split, max_batch=256)
    n = x.shape[0]
    logits, seeds = [], []
    for s in range(0, n, batch):
        xb = x[s : s + batch]
        found = u.search(xb)
        if s == 0:
            _check_affine(u, found)
        logits.append(found.logits.float())
        seeds += image_seeds(xb, seed)
        if progress is not None:
            progress(xb.shape[0])
    return StateTable(states, torch.cat(logits), seeds, u.sites_for(first))


def _check_affine(u, found) -> None:
    """The head of the mean of two states' maps must be the mean of their logits."""
    if found.states.shape[1] < 2:
        return
    m = u.split.head(u._from_positions(found.features[:, :2].mean(1), found.grid))
    ref = found.logits[:, :2].mean(1)
    tol = torch.finfo(torch.float32).eps ** 0.5 * max(1.0, float(ref.abs().max()))
    if float((m - ref).abs().max()) > tol:
        raise UndiscardError("the model's head is not affine in its final feature map (the head of a mean of "
                             "maps is not the mean of their logits), so `fit` cannot replay aggregations from a "
                             "table of logits; evaluate configurations with `undiscard eval` instead")


def aggregate_logits(logits: torch.Tensor, how: str) -> torch.Tensor:
    """``(N, B, K)`` states' logits -> ``(N, K)``: the wrapper's ``mean`` / ``entropy`` aggregation.

    Shape:
        - logits: ``(N, B, K)``.
        - output: ``(N, K)``.

    Example:
        >>> lg = torch.tensor([[[2.0, 0.0], [0.0, 0.0]]])
        >>> aggregate_logits(lg, "mean").tolist(), aggregate_logits(lg, "entropy").argmax(1).tolist()
        ([[1.0, 0.0]], [0])
    """
    if how == "mean":
        return logits.mean(1)
    if how == "entropy":
        return weighted_mean(logits, entropy_weights(logits))
    raise OptionError(f"aggregate must be mean or entropy here; got {how!r}")


def table_search(table: StateTable, budget: int, criterion: str = "entropy", *, width: int | None = 1,
                 prior: torch.Tensor | None = None) -> torch.Tensor:
    """The states the wrapper's search evaluates per image, as table indices ``(N, budget)``.

    It runs :func:`undiscard.method.search.greedy_search` with the images' own seeds and the
    table as the network, so the result is the wrapper's (same criterion, width, prior).

    Shape:
        - table: ``logits`` ``(N, S, K)``, ``states`` ``(S, L)``.
        - prior: ``(L, R)`` or ``None``.
        - output: ``(N, budget)`` int64 indices into ``table.states``, the default (0) first.

    Example:
        >>> model = nn.Sequential(*[nn.Conv2d(1, 1, 3, stride=2, padding=1) for _ in range(3)])
        >>> sites = find_sites(model, torch.zeros(1, 1, 16, 16))  # one searched site: 4 states
        >>> g = torch.Generator().manual_seed(0)
        >>> table = StateTable(all_states(sites), torch.randn(5, 4, 3, generator=g), list(range(5)), sites)
        >>> idx = table_search(table, 3)
        >>> idx.shape, idx[:, 0].tolist()
        (torch.Size([5, 3]), [0, 0, 0, 0, 0])
    """
    index = table.index()
    lg = table.logits
    n = lg.shape[0]

    def evaluate(img: torch.Tensor, st: torch.Tensor) -> torch.Tensor:  # "outputs": (image, table index) pairs
        return torch.stack([img, torch.tensor([index[tuple(r)] for r in st.tolist()], dtype=torch.long)], 1)

    def score(out: torch.Tensor, st: torch.Tensor) -> torch.Tensor:
        return -entropy(lg[out[:, 0], out[:, 1]])

    res = greedy_search(evaluate, n, table.sites, budget, criterion, score=score, width=width,
                        seeds=table.seeds, prior=prior)
    return res.outputs[..., 1].reshape(n, budget)


def replay(table: StateTable, wrap: dict) -> torch.Tensor:
    """The logits ``(N, K)`` that ``undiscard.wrap(model, **wrap)`` gives on the table's images.

    ``wrap`` holds learning-free settings only (``budget``, ``criterion``, ``aggregate``,
    ``width``, ``prior``, ``policy``) over the table's searchable sites; unset ones take
    the wrapper's defaults.

    Shape:
        - table: ``logits`` ``(N, S, K)``.
        - output: ``(N, K)``.

    Example:
        >>> model = nn.Sequential(*[nn.Conv2d(1, 1, 3, stride=2, padding=1) for _ in range(3)])
        >>> sites = find_sites(model, torch.zeros(1, 1, 16, 16))  # one searched site: 4 states
        >>> g = torch.Generator().manual_seed(0)
        >>> table = StateTable(all_states(sites), torch.randn(5, 4, 3, generator=g), list(range(5)), sites)
        >>> torch.equal(replay(table, {"budget": 1}), table.logits[:, 0])
        True
        >>> replay(table, {"budget": 2, "criterion": "entropy", "aggregate": "mean"}).shape
        torch.Size([5, 3])
    """
    import inspect

    from undiscard.method.classify import Undiscard

    defaults = {k: v.default for k, v in inspect.signature(Undiscard.__init__).parameters.items()
                if v.default is not inspect.Parameter.empty}
    cfg = {**defaults, **wrap}
    b, agg = int(cfg["budget"]), cfg["aggregate"]
    n = table.logits.shape[0]
    if b == 1:
        return table.logits[:, 0]
    if cfg.get("policy") is not None:
        index = table.index()
        idx = torch.tensor([index[tuple(s)] for s in cfg["policy"][:b]]).expand(n, -1)
    else:
        prior = cfg.get("prior")
        idx = table_search(table, b, cfg["criterion"], width=cfg["width"],
                           prior=None if prior is None else torch.as_tensor(prior, dtype=torch.float64))
    return aggregate_logits(table.logits.gather(1, idx[..., None].expand(-1, -1, table.logits.shape[-1])), agg)


def _nll(lg: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.nn.functional.cross_entropy(lg.double(), y))


def site_prior(table: StateTable, y: torch.Tensor) -> torch.Tensor:
    """``(L, R)``: for offset ``k`` of searchable site ``j``, how much averaging the default
    state with the single-site state ``(0, .., k, .., 0)`` lowers the NLL on ``y``
    (0 for ``k = 0``). Higher is more useful.

    Shape:
        - table: ``logits`` ``(N, S, K)`` (its states must include every single-site state).
        - y: ``(N,)`` int64 labels.
        - output: ``(L, R)`` float64, ``R`` the largest searchable site's offset count.
    """
    sites = table.sites
    L = len(sites.searchable)
    r = max((s.num_offsets for s in sites.searchable_sites), default=1)
    prior = torch.zeros(L, r, dtype=torch.float64)
    index = table.index()
    base = _nll(table.logits[:, 0], y)
    for j, site in enumerate(sites.searchable_sites):
        for k in range(1, site.num_offsets):
            st = [0] * L
            st[j] = k
            s = index[tuple(st)]
            prior[j, k] = base - _nll((table.logits[:, 0] + table.logits[:, s]) / 2, y)
    return prior


def fit_table_policy(table: StateTable, y: torch.Tensor, max_budget: int) -> list[int]:
    """Greedy forward selection of ``max_budget`` table states (the default first) that
    lowers the NLL of the mean of their logits on ``y``; returns table indices.

    Shape:
        - table: ``logits`` ``(N, S, K)``.
        - y: ``(N,)`` int64 labels.
        - output: ``min(max_budget, S)`` distinct indices into ``table.states``, ``0`` first.
    """
    chosen = [0]
    total = table.logits[:, 0].double().clone()
    for k in range(2, min(max_budget, table.states.shape[0]) + 1):
        best = None
        for c in range(table.states.shape[0]):
            if c in chosen:
                continue
            v = _nll((total + table.logits[:, c]) / k, y)
            if best is None or v < best[0]:
                best = (v, c)
        chosen.append(best[1])
        total += table.logits[:, best[1]]
    return chosen


@dataclass
class Candidate:
    """One configuration: its wrap arguments, its cost (states per image) and its table indices per image."""

    name: str
    wrap: dict
    cost: int
    chosen: torch.Tensor  # (N, cost) table indices
    aggregate: str = "mean"
    extra: dict = field(default_factory=dict)

    def logits(self, table: StateTable) -> torch.Tensor:
        lg = table.logits.gather(1, self.chosen[..., None].expand(-1, -1, table.logits.shape[-1]))
        return aggregate_logits(lg, self.aggregate) if self.cost > 1 else lg[:, 0]


def candidates(table: StateTable, fit_on: StateTable, y_fit: torch.Tensor, max_cost: int, *,
               criteria: Sequence[str] = LEARNING_FREE, searchable: Any = "inner") -> list[Candidate]:
    """Every candidate of cost ``<= max_cost`` on ``table``, its priors and policies fitted on ``fit_on``.

    Shape:
        - table: ``logits`` ``(N, S, K)``; fit_on: ``logits`` ``(N_fit, S, K)`` (same states).
        - y_fit: ``(N_fit,)`` int64 labels of ``fit_on``'s images.
        - output: :class:`Candidate` s, each with ``chosen`` ``(N, cost)`` table indices.
    """
    n = table.logits.shape[0]
    space = table.states.shape[0]
    top = min(max_cost, space)
    base = {"searchable": searchable}
    out = [Candidate("plain", {"budget": 1}, 1, torch.zeros(n, 1, dtype=torch.long))]
    if top < 2:
        return out
    prior = site_prior(fit_on, y_fit)
    for crit in criteria:
        for width in (1, None):
            for use_prior in (False, True):
                if use_prior and crit == "displacement":
                    continue  # displacement orders neighbours itself
                idx = table_search(table, top, crit, width=width, prior=prior if use_prior else None)
                for agg in ("mean", "entropy"):
                    for b in range(2, top + 1):
                        w = {**base, "budget": b, "criterion": crit, "aggregate": agg, "width": width}
                        if use_prior:
                            w["prior"] = prior.tolist()
                        name = f"search {crit} width={width or 'all'}{' prior' if use_prior else ''} {agg} B={b}"
                        out.append(Candidate(name, w, b, idx[:, :b], agg))
    policy = fit_table_policy(fit_on, y_fit, top)
    states = table.states[policy].tolist()
    for agg in ("mean", "entropy"):
        for b in range(2, len(policy) + 1):
            w = {**base, "budget": b, "aggregate": agg, "policy": states[:b]}
            out.append(Candidate(f"policy {agg} b={b}", w, b, torch.tensor(policy[:b]).expand(n, -1), agg))
    return out


def _score(c: Candidate, table: StateTable, y: torch.Tensor) -> tuple[float, float, int]:
    lg = c.logits(table)
    return float((lg.argmax(1) == y).double().mean()), _nll(lg, y), c.cost


def best_candidate(table: StateTable, y: torch.Tensor, max_cost: int, **kw) -> tuple[Candidate, list[dict]]:
    """The best candidate on ``(table, y)`` (priors and policies fitted on the same images) and all scores."""
    cands = candidates(table, table, y, max_cost, **kw)
    scored = [(c, *_score(c, table, y)) for c in cands]
    best = max(scored, key=lambda t: (t[1], -t[2], -t[3]))
    rows = [{"name": c.name, "cost": c.cost, "top1": 100 * a, "nll": v} for c, a, v, _ in scored]
    return best[0], rows


def fit(table: StateTable, y: torch.Tensor, max_cost: int = 4, *, alpha: float = 0.05, seed: int = 0,
        searchable: Any = "inner", criteria: Sequence[str] = LEARNING_FREE, log=None) -> dict:
    """Choose a configuration on validation images (see the module docstring).

    Returns ``{"wrap": wrap arguments, "name", "cost", "validation": evidence}``;
    ``wrap`` is ``{"budget": 1}`` (the plain model) when nothing beats the plain model
    significantly.

    Shape:
        - table: ``logits`` ``(N, S, K)``, ``N >= 20`` validation images.
        - y: ``(N,)`` int64 labels.
    """
    if max_cost < 1:
        raise OptionError(f"--max-cost is in plain forwards, at least 1; got {max_cost}")
    n = y.shape[0]
    if n < 20:
        raise UndiscardError(f"fit needs a validation set of at least 20 images to decide anything; got {n}")
    kw = {"searchable": searchable, "criteria": criteria}
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    halves = [perm[: n // 2], perm[n // 2 :]]
    oof = torch.zeros(n, dtype=torch.bool)
    fold_choice = []
    for f in range(2):
        this, other = halves[f], halves[1 - f]
        best, _ = best_candidate(table.subset(other), y[other], max_cost, **kw)
        # apply the procedure's choice, with priors / policies fitted on the other half, to this half
        sub = table.subset(this)
        again = [c for c in candidates(sub, table.subset(other), y[other], max_cost, **kw) if c.name == best.name][0]
        oof[this] = again.logits(sub).argmax(1) == y[this]
        fold_choice.append(best.name)
    plain = table.logits[:, 0].argmax(1) == y
    evidence = compare(oof, plain, seed=seed)
    significant = evidence["p"] < alpha and evidence["gain"] > 0
    final, rows = best_candidate(table, y, max_cost, **kw)
    chosen = final if significant else Candidate("plain", {"budget": 1}, 1, torch.zeros(n, 1, dtype=torch.long))
    acc_chosen = float((chosen.logits(table).argmax(1) == y).double().mean())
    decision = (f"{final.name}: the fitting procedure's out-of-fold gain on validation is "
                f"{evidence['gain']:+.2f} points [{evidence['lo']:+.2f}, {evidence['hi']:+.2f}], McNemar p = "
                f"{evidence['p']:.3g}")
    decision += " (significant)" if significant else f" (not significant at {alpha}): the plain model"
    if log:
        log(decision)
    return {
        "name": chosen.name,
        "cost": chosen.cost,
        "wrap": chosen.wrap,
        "validation": {
            "images": n,
            "max_cost": max_cost,
            "alpha": alpha,
            "plain_top1": 100 * float(plain.double().mean()),
            "chosen_top1_in_sample": 100 * acc_chosen,
            "best_candidate": final.name,
            "fold_choices": fold_choice,
            "crossfit": evidence,
            "significant": significant,
            "decision": decision,
            "top_candidates": sorted(rows, key=lambda r: -r["top1"])[:10],
        },
    }


def cost_note(cost: int) -> str:
    return f"{cost} state{'s' if cost != 1 else ''} per image (at most {cost} plain forward{'s' if cost != 1 else ''})"
