"""Invariants that hold for any model, for ``undiscard check``.

A user with a custom model runs these first:

* ``offset_zero_is_identity``: the all-zero state reproduces the model (same shapes,
  max abs difference <= 1e-6 of the output's scale);
* ``per_sample_states_match_one_by_one``: a batch whose samples carry different states
  equals the samples run one at a time, up to the rounding of batched kernels (which
  pick their summation order by batch size and CPU): ``depth * sqrt(width) * eps`` of
  the output's scale, with ``depth`` the model's conv/linear layers and ``width`` their
  longest reduction (two summation orders of ``n`` products differ by about
  ``sqrt(n) * eps``, and each layer adds one such error). A wrong or leaking state
  changes outputs by O(1) of their scale, far above it;
* ``every_offset_keeps_shapes``: every offset of every site (one site changed at a
  time) keeps the default output shapes and gives finite values; a site with more than
  :data:`MAX_OFFSETS` offsets (a 16x16 patch embedding has 256) is checked on a seeded
  sample of them that always holds the extremes (every corner of the offset grid);
* ``sites_cover_every_subsampling``: every grid reduction of the forward is a site
  (:attr:`SiteMap.missed` is empty, docs/method.md "Coverage"), so the main-path strides
  multiply to the model's real input-to-output reduction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from undiscard.run.engine import run_states
from undiscard.errors import UndiscardError
from undiscard.sites.sitemap import SiteMap

__all__ = ["CheckResult", "MAX_OFFSETS", "offsets_to_check", "rounding_bound", "run_checks"]

#: offsets per site checked one by one; a site with more is checked on a sample
MAX_OFFSETS = 16


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    detail: str


def _tensors(out) -> list[torch.Tensor]:
    return [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


def _rel_diff(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    worst = 0.0
    for x, y in zip(a, b):
        scale = max(float(x.abs().max()), 1e-12) if x.numel() else 1.0
        worst = max(worst, float((x.double() - y.double()).abs().max()) / scale if x.numel() else 0.0)
    return worst


_WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, nn.Linear)


def rounding_bound(model: nn.Module, dtype: torch.dtype = torch.float32) -> float:
    """``depth * sqrt(width) * eps``: how far (relative to the output's scale) two float
    computations of ``model`` that differ only in summation order may drift apart."""
    depth, width = 0, 1
    for m in model.modules():
        if isinstance(m, _WEIGHT_LAYERS):
            depth += 1
            fan = m.in_features if isinstance(m, nn.Linear) else m.in_channels // m.groups * math.prod(m.kernel_size)
            width = max(width, fan)
    return max(depth, 1) * math.sqrt(width) * torch.finfo(dtype).eps


def _shapes(ts: list[torch.Tensor]) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in ts]


@torch.no_grad()
def run_checks(model: nn.Module, sites: SiteMap, x: torch.Tensor, *, batch: int = 4, seed: int = 0) -> list[CheckResult]:
    """Run the model-agnostic invariants on ``model`` with inputs shaped like ``x``.

    Args:
        model: in eval mode.
        sites: from :func:`undiscard.find_sites` on this model.
        x: ``(N, C, H, W)`` example; a batch of ``batch`` random inputs of its per-sample
            shape is drawn (seeded).
        batch: the number of random inputs.
        seed: the seed of the inputs and of the per-sample states.

    Shape:
        - x: ``(N, C, *spatial)``; only its per-sample shape ``x.shape[1:]``, dtype and device
          are used (the checks run on ``(batch, *x.shape[1:])`` random inputs).
        - output: one :class:`CheckResult` per invariant.

    Example:
        >>> from undiscard import find_sites
        >>> model = nn.Sequential(*[nn.Conv2d(1 if i == 0 else 2, 2, 3, stride=2, padding=1) for i in range(3)]).eval()
        >>> x = torch.zeros(1, 1, 16, 16)
        >>> [(r.name, r.passed) for r in run_checks(model, find_sites(model, x), x)]  # doctest: +NORMALIZE_WHITESPACE
        [('offset_zero_is_identity', True), ('per_sample_states_match_one_by_one', True),
         ('every_offset_keeps_shapes', True), ('sites_cover_every_subsampling', True)]
    """
    g = torch.Generator().manual_seed(seed)
    xb = torch.randn((batch, *x.shape[1:]), generator=g, dtype=x.dtype).to(x.device)
    results = []

    plain = _tensors(model(xb))
    zero = _tensors(run_states(model, xb, sites.zero_state(), sites))
    same_shape = _shapes(plain) == _shapes(zero)
    d = _rel_diff(plain, zero) if same_shape else float("inf")
    results.append(
        CheckResult("offset_zero_is_identity", same_shape and d <= 1e-6, f"max rel diff {d:.1e}, shapes {'equal' if same_shape else 'DIFFER'}")
    )

    everything = sites.with_searchable("all")
    if everything.space_size > 1:
        try:
            results.append(_per_sample(model, xb, everything, batch, g))
        except UndiscardError as e:
            results.append(CheckResult("per_sample_states_match_one_by_one", False, str(e)))
    results.append(_every_offset(model, xb[:1], everything, g))
    results.append(_coverage(sites))
    return results


def _coverage(sites: SiteMap) -> CheckResult:
    total = "x".join(map(str, sites.stride_total))
    if not sites.missed:
        return CheckResult("sites_cover_every_subsampling", True,
                           f"every grid reduction is a site (main-path stride {total})")
    return CheckResult("sites_cover_every_subsampling", False,
                       f"main-path stride {total} misses {len(sites.missed)} step(s): {'; '.join(sites.missed)}")


def offsets_to_check(site, generator: torch.Generator | None = None, limit: int = MAX_OFFSETS) -> list[int]:
    """The non-zero flat offsets of ``site`` to check: all of them, or for a site with more
    than ``limit``, every corner of its offset grid plus a seeded sample of the rest.

    Example:
        >>> from undiscard import find_sites
        >>> site = find_sites(nn.Conv2d(1, 1, 16, stride=16), torch.zeros(1, 1, 32, 32))[0]
        >>> picked = offsets_to_check(site, torch.Generator().manual_seed(0))
        >>> len(picked), [site.offset_of(k) for k in picked[:3]]
        (16, [(0, 15), (15, 0), (15, 15)])
    """
    n = site.num_offsets
    if n - 1 <= limit:
        return list(range(1, n))
    corners = [site.index_of(tuple(c)) for c in torch.cartesian_prod(
        *[torch.tensor([0, r - 1]) for r in site.stride]).reshape(-1, len(site.stride)).tolist()]
    picked = list(dict.fromkeys(k for k in corners if k != 0))
    rest = torch.tensor([k for k in range(1, n) if k not in picked])
    order = torch.randperm(len(rest), generator=generator)
    picked += rest[order[: max(limit - len(picked), 0)]].tolist()
    return picked


def _per_sample(model, xb, everything, batch, g) -> CheckResult:
    states = torch.stack([torch.randint(0, s.num_offsets, (batch,), generator=g) for s in everything.searchable_sites], 1)
    together = _tensors(run_states(model, xb, states, everything))
    alone = [_tensors(run_states(model, xb[i : i + 1], states[i], everything)) for i in range(batch)]
    alone_cat = [torch.cat([a[k] for a in alone]) for k in range(len(together))]
    ok_shape = _shapes(together) == _shapes(alone_cat)
    d = _rel_diff(alone_cat, together) if ok_shape else float("inf")
    dtype = next((t.dtype for t in together if t.is_floating_point()), torch.float32)
    tol = rounding_bound(model, dtype)
    return CheckResult("per_sample_states_match_one_by_one", ok_shape and d <= tol,
                       f"max rel diff {d:.1e} over {batch} samples (allowed {tol:.1e}: the rounding of batched kernels)")


def _every_offset(model, x1, everything, g) -> CheckResult:
    rows = []
    sampled = 0
    for j, site in enumerate(everything.searchable_sites):
        picked = offsets_to_check(site, g)
        sampled += site.num_offsets - 1 - len(picked)
        for k in picked:
            r = torch.zeros(len(everything.searchable), dtype=torch.long)
            r[j] = k
            rows.append(r)
    bad: list[str] = []
    ref_shapes = _shapes(_tensors(model(x1)))
    chunk = 16
    for start in range(0, len(rows), chunk):
        st = torch.stack(rows[start : start + chunk])
        out = _tensors(run_states(model, x1.expand(len(st), *x1.shape[1:]), st, everything))
        if [s[1:] for s in _shapes(out)] != [s[1:] for s in ref_shapes]:
            bad.append(f"states {start}..{start + len(st) - 1}: shapes {_shapes(out)} != {ref_shapes}")
        for t in out:
            if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                bad.append(f"states {start}..{start + len(st) - 1}: non-finite output")
                break
    return CheckResult(
        "every_offset_keeps_shapes",
        not bad,
        f"{len(rows)} single-site offsets over {len(everything)} sites"
        + (f" ({sampled} more sampled out: sites over {MAX_OFFSETS} offsets are checked at their corners and a "
           f"seeded sample)" if sampled else "")
        + (f"; {'; '.join(bad[:3])}" if bad else ""),
    )
