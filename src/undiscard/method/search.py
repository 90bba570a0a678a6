"""Greedy best-first search over the state lattice, per image, batched (docs/method.md, "Search").

Start at the default state. Keep every evaluated state; repeatedly take, for each image,
the most promising evaluated state whose neighbours (states that differ at exactly one
searchable site) are not all evaluated, and evaluate some of them, until the image has
``budget`` evaluated states (the default included: ``budget=1`` is the plain model).
The lattice is connected, so while a state is unevaluated some evaluated state has an
unevaluated neighbour: every state is reachable, and ``budget == space_size`` evaluates
them all.

Each step gathers the new states of ALL images and evaluates them in one call of
``evaluate`` (no per-image forward); only the bookkeeping is per image.

Criteria (how promising an evaluated state is; the neighbours of the chosen state are
taken in seeded random order, or nearest first for ``displacement``):

* ``entropy``: lower predictive entropy first (learning-free);
* ``learned``: higher learned weight first (``score`` from :meth:`AttentionAggregator.state_logits`);
* ``random``: seeded random priority;
* ``displacement``: smallest ``|Delta|`` first.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from undiscard.errors import StateError
from undiscard.method.options import check_choice
from undiscard.sites.sitemap import SiteMap

__all__ = ["CRITERIA", "SearchResult", "greedy_search", "image_seeds", "neighbours"]

CRITERIA = ("entropy", "learned", "random", "displacement")


@dataclass
class SearchResult:
    """What the search evaluated, per image, in evaluation order.

    Attributes:
        states: ``(N, B, L)`` flat offset indices; ``states[:, 0]`` is the default state.
        outputs: ``(N, B, ...)`` what ``evaluate`` returned for each state.
        scores: ``(N, B)`` the criterion's promise of each state (higher = more promising).
    """

    states: torch.Tensor
    outputs: torch.Tensor
    scores: torch.Tensor


_HASH_MOD = (1 << 31) - 1  # a Mersenne prime: products of two residues fit in int64


def image_seeds(x: torch.Tensor, seed: int = 0) -> list[int]:
    """One generator seed per image, a function of the image's values and ``seed`` alone.

    The seed of image ``i`` does not depend on its batch-mates, its position in the
    batch, the batch size, the device or the engine, so a search is a function of the
    image (and ``seed``) alone. The values are read as float32 bit patterns and hashed
    with integer arithmetic (exact on every device); equal images get equal seeds.

    Shape:
        ``x``: ``(N, ...)``; returns ``N`` integers in ``[0, 2**62)``.

    Example:
        >>> x = torch.randn(3, 1, 4, 4)
        >>> image_seeds(x)[1] == image_seeds(x[1:2])[0] == image_seeds(x.flip(0))[1]
        True
        >>> image_seeds(x, seed=1) != image_seeds(x, seed=0)
        True
    """
    n = x.shape[0]
    if n == 0:
        return []
    v = x.detach().reshape(n, -1)
    if v.is_complex():
        v = torch.view_as_real(v).reshape(n, -1)
    v = v.to(torch.float32).contiguous()
    bits = (v.view(torch.int32).to(torch.int64) & 0xFFFFFFFF) % _HASH_MOD  # (N, D) residues
    k = torch.arange(1, bits.shape[1] + 1, device=bits.device, dtype=torch.int64)
    out = []
    for mult in (2654435761, 2246822519):  # two independent position weights: 62 bits in all
        w = (k * mult) % _HASH_MOD
        out.append(((bits * w) % _HASH_MOD).sum(1) % _HASH_MOD)
    h = (out[0] << 31) | out[1]
    s = (int(seed) * 0x9E3779B97F4A7C15) & ((1 << 62) - 1)
    return [(int(a) ^ s) for a in h.tolist()]


def neighbours(state: tuple[int, ...], sites: SiteMap) -> list[tuple[int, ...]]:
    """States that differ from ``state`` at exactly one searchable site."""
    out = []
    for j, site in enumerate(sites.searchable_sites):
        for k in range(site.num_offsets):
            if k != state[j]:
                out.append(state[:j] + (k,) + state[j + 1 :])
    return out


def greedy_search(
    evaluate: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    n_images: int,
    sites: SiteMap,
    budget: int,
    criterion: str = "entropy",
    *,
    score: Callable[[torch.Tensor], torch.Tensor] | None = None,
    width: int | None = None,
    seeds: list[int] | None = None,
    seed: int = 0,
    prior: torch.Tensor | None = None,
) -> SearchResult:
    """Search ``budget`` states per image.

    Args:
        evaluate: ``(image_index (M,), states (M, L)) -> outputs (M, ...)``; called once per
            step with the new states of every image.
        n_images: ``N``.
        sites: the searchable sites define the lattice.
        budget: evaluated states per image, the default included (``1 <= B <= space_size``).
        criterion: one of :data:`CRITERIA`.
        score: ``(outputs (M, ...), states (M, L)) -> (M,)`` promise (higher = better);
            required for ``entropy`` (e.g. minus the entropy of the logits) and ``learned``.
        width: at most this many neighbours evaluated per image per step (default: all
            unevaluated neighbours of the chosen state, up to the budget left).
        seeds: one generator seed per image (:func:`image_seeds` of the batch, so that an
            image's search depends on the image alone). Each image draws its ``random``
            priorities and neighbour order from its own generator, so a search with a
            larger budget evaluates the states of a smaller one first (in the same order):
            budgets are prefixes.
        seed: used only without ``seeds``: image ``i`` then draws from
            ``seed * 1_000_003 + i``, which ties the result to the image's position.
        prior: ``(L, R)`` usefulness of offset ``k`` at searchable site ``j`` (for
            example fitted on validation by :func:`undiscard.evaluation.fit.site_prior`); the
            neighbours of the chosen state are then taken in descending prior of the
            offset they change (ties in the image's random order) instead of a random order.

    Raises:
        StateError: a budget outside ``1..space_size``, or a missing ``score``.
        OptionError: an unknown criterion.

    Shape:
        - evaluate: image indices ``(M,)`` and states ``(M, L)`` -> outputs ``(M, *F)``.
        - score: outputs ``(M, *F)`` and states ``(M, L)`` -> ``(M,)``.
        - prior: ``(L, R)``, ``R`` at least the largest searchable site's offset count.
        - output: a :class:`SearchResult` with ``states`` ``(N, B, L)``, ``outputs``
          ``(N, B, *F)`` and ``scores`` ``(N, B)``, ``N = n_images``, ``B = budget``,
          ``L = len(sites.searchable)``.

    Example:
        Two searched sites of 4 offsets each (16 states), nearest displacement first:

        >>> import torch.nn as nn
        >>> from undiscard import find_sites
        >>> model = nn.Sequential(*[nn.Conv2d(1, 1, 3, stride=2, padding=1) for _ in range(4)])
        >>> sites = find_sites(model, torch.zeros(1, 1, 32, 32))
        >>> res = greedy_search(lambda img, st: st.float(), 3, sites, budget=5, criterion="displacement")
        >>> res.states.shape, res.outputs.shape, res.scores.shape
        (torch.Size([3, 5, 2]), torch.Size([3, 5, 2]), torch.Size([3, 5]))
        >>> res.states[0].tolist()  # the default state first
        [[0, 0], [1, 0], [2, 0], [3, 0], [0, 1]]
        >>> sites.displacement(res.states[0]).tolist()  # in input pixels
        [[0, 0], [0, 2], [2, 0], [2, 2], [0, 4]]
    """
    check_choice("criterion", criterion, CRITERIA)
    if criterion in ("entropy", "learned") and score is None:
        raise StateError(f"criterion {criterion!r} needs a score function (outputs -> promise)")
    space = sites.space_size
    if not 1 <= budget <= space:
        raise StateError(
            f"budget {budget} is outside 1..{space}: the search space of the {len(sites.searchable)} searchable "
            f"sites {list(sites.searchable)} holds {space} states. Lower the budget or search more sites."
        )
    # One generator per image: an image's draws do not depend on the other images or on
    # the budget, so the first b states of a budget-B search are the budget-b search.
    if seeds is None:
        seeds = [seed * 1_000_003 + i for i in range(n_images)]
    if len(seeds) != n_images:
        raise StateError(f"seeds must hold one seed per image ({n_images}); got {len(seeds)}")
    gens = [torch.Generator().manual_seed(int(s) % (1 << 63)) for s in seeds]
    L = len(sites.searchable)
    zero = (0,) * L

    def promise(img: list[int], states: torch.Tensor, outputs: torch.Tensor) -> list[float]:
        if criterion == "random":
            return [float(torch.rand((), generator=gens[i], dtype=torch.float64)) for i in img]
        if criterion == "displacement":
            return (-sites.displacement(states).double().norm(dim=1)).tolist()
        return score(outputs, states).double().tolist()

    if prior is not None:
        prior = torch.as_tensor(prior, dtype=torch.float64)
        need_r = max(s.num_offsets for s in sites.searchable_sites) if L else 0
        if prior.dim() != 2 or prior.shape[0] != L or prior.shape[1] < need_r:
            raise StateError(f"prior must be (searchable sites, offsets) = ({L}, {need_r}); "
                             f"got {tuple(prior.shape)}")

    def order(i: int, cands: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
        if prior is not None:
            perm = torch.randperm(len(cands), generator=gens[i]).tolist()
            cands = [cands[j] for j in perm]
            base = evaluated[i][expanding[i]]
            key = [float(prior[j, c[j]]) for c in cands for j in range(L) if c[j] != base[j]]
            return [cands[j] for j in sorted(range(len(cands)), key=lambda j: -key[j])]
        if criterion == "displacement":
            d = sites.displacement(torch.tensor(cands, dtype=torch.long).reshape(len(cands), L)).double().norm(dim=1)
            return [cands[j] for j in torch.argsort(d, stable=True).tolist()]
        perm = torch.randperm(len(cands), generator=gens[i]).tolist()
        return [cands[j] for j in perm]

    seen: list[dict[tuple[int, ...], int]] = [{zero: 0} for _ in range(n_images)]
    evaluated: list[list[tuple[int, ...]]] = [[zero] for _ in range(n_images)]
    prom: list[list[float]] = [[] for _ in range(n_images)]
    outs: list[list[torch.Tensor]] = [[] for _ in range(n_images)]
    exhausted: list[set[int]] = [set() for _ in range(n_images)]  # nodes whose neighbours are all evaluated
    expanding = [0] * n_images  # the node whose neighbours are being ordered

    # a criterion that never looks at the outputs (displacement, random) plans the whole
    # search first and evaluates every state in ONE call: the same states, fewer passes
    planned: list[tuple[int, tuple[int, ...]]] | None = [] if criterion in ("displacement", "random") else None

    def run(img: list[int], sts: list[tuple[int, ...]]) -> None:
        st = torch.tensor(sts, dtype=torch.long).reshape(len(sts), L)
        if planned is not None:
            p = promise(img, st, None)
            planned.extend(zip(img, sts))
        else:
            o = evaluate(torch.tensor(img, dtype=torch.long), st)
            p = promise(img, st, o)
        for r, i in enumerate(img):
            if planned is None:
                outs[i].append(o[r])
            prom[i].append(p[r])

    run(list(range(n_images)), [zero] * n_images)
    while True:
        req_img: list[int] = []
        req_st: list[tuple[int, ...]] = []
        for i in range(n_images):
            need = budget - len(evaluated[i])
            if need <= 0:
                continue
            for node in sorted(range(len(evaluated[i])), key=lambda n: -prom[i][n]):
                if node in exhausted[i]:
                    continue
                fresh = [s for s in neighbours(evaluated[i][node], sites) if s not in seen[i]]
                if not fresh:
                    exhausted[i].add(node)
                    continue
                expanding[i] = node
                take = order(i, fresh)[: min(need, width or need)]
                for st in take:
                    seen[i][st] = len(evaluated[i])
                    evaluated[i].append(st)
                    req_img.append(i)
                    req_st.append(st)
                break
        if not req_img:
            break
        run(req_img, req_st)
    if planned is not None:
        img = torch.tensor([i for i, _ in planned], dtype=torch.long)
        o = evaluate(img, torch.tensor([st for _, st in planned], dtype=torch.long).reshape(len(planned), L))
        for r, (i, _) in enumerate(planned):
            outs[i].append(o[r])
    return SearchResult(
        states=torch.tensor(evaluated, dtype=torch.long).reshape(n_images, budget, L),
        outputs=torch.stack([torch.stack(o) for o in outs]),
        scores=torch.tensor(prom, dtype=torch.float64),
    )
