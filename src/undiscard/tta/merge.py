"""Image-space TTA aggregation over cached logits (the image-TTA baselines; docs/tta.md).

Every aggregator maps the logits of ``A`` augmentations of each image,
``(N, A, K)`` (index 0: the identity), to one ``(N, K)`` prediction given as
**log-probabilities**. The learned ones are fitted once on cached validation
logits:

* ``mean``: ``log mean_a softmax(l_a)``.
* ``max``: ``p_k = max_a softmax(l_a)_k``, renormalised to sum 1; returns ``log p``.
* ``gps``: Greedy Policy Search (Molchanov et al., "Greedy Policy Search: A Simple
  Baseline for Learnable Test-Time Augmentation", UAI 2020). A temperature ``T`` is
  fitted on the identity's logits (minimum NLL, a deterministic golden-section search
  on ``log T`` in ``[log 0.01, log 100]``; the NLL is convex in ``1/T``, so the search
  finds its minimum in that range). Then ``budget`` times, *with replacement*, the
  augmentation whose addition most lowers the NLL of the running mean of
  ``softmax(l_a / T)`` over the picks is added (ties: the lowest index). Prediction:
  ``log mean_{a in picks} softmax(l_a / T)`` (duplicates count by multiplicity).
* ``augtta`` / ``classtta``: Shanmugam et al., "Better Aggregation in Test-Time
  Augmentation" (ICCV 2021). Prediction ``log_softmax(sum_a w_a l_a)`` (AugTTA,
  ``w (A,)``) or ``log_softmax_k(sum_a w_{a,k} l_{a,k})`` (ClassTTA, ``w (A, K)``).
  **Constraint:** ``w >= 0`` and ``sum_a w_a = 1`` (AugTTA); ``sum_a w_{a,k} = 1``
  for every class ``k`` (ClassTTA: one simplex per class). Parametrised as a softmax
  over the augmentation axis, ``w = softmax(theta, dim=0)``; **initialised uniform**
  (``theta = 0``: the plain mean of the logits). The NLL is convex in ``w`` (a
  log-sum-exp of a linear map), so the start only sets the path, not the optimum.
  Fitted by full-batch Adam (500 steps, lr 0.5 on ``theta``: within ~1e-5 nats of
  the optimum on synthetic N=1000, A=20, K=10 logits, under a second) in float64 on
  the NLL of the cached logits; no randomness
  is involved (``seed`` seeds torch's generator only for symmetry with the other
  learners), so a fit is deterministic.

Aggregators save to / load from safetensors with metadata (method, augmentation
names, ``trained_on``, budget). Loading with the names of the current augmentation
list refuses a different list or order.

:class:`LogitsCache` keeps cached logits on disk (one safetensors file, written
atomically) and refuses a file made under different settings.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn

from undiscard.statefile import save_safetensors_atomic
from undiscard.errors import InputError, UndiscardError

__all__ = [
    "METHODS",
    "ImageAggregator",
    "mean_aggregator",
    "max_aggregator",
    "fit_gps",
    "fit_augtta",
    "fit_classtta",
    "fit_image_aggregator",
    "fit_temperature",
    "LogitsCache",
]

METHODS: tuple[str, ...] = ("mean", "max", "gps", "augtta", "classtta")

_FORMAT = "undiscard.image_aggregator/1"
_CACHE_FORMAT = "undiscard.logits_cache/1"


# ----------------------------------------------------------------- checks

def _check_names(names: Sequence[str]) -> list[str]:
    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise InputError(f"names must be a list of augmentation names (str); got {names!r}")
    names = list(names)
    if not names:
        raise InputError("names must list at least one augmentation (the identity first)")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise InputError(f"augmentation names must be unique; repeated: {dup}")
    return names


def _check_logits(logits: torch.Tensor, a: int | None = None) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or not logits.is_floating_point():
        got = f"{tuple(logits.shape)} {logits.dtype}" if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise InputError(f"logits must be a float tensor (N, A, K); got {got}")
    if a is not None and logits.shape[1] != a:
        raise InputError(
            f"logits have A={logits.shape[1]} augmentations (shape {tuple(logits.shape)}) but the aggregator "
            f"was built for {a}: pass the logits of exactly its augmentation list, in its order"
        )


def _check_fit_inputs(logits: torch.Tensor, y: torch.Tensor, names: Sequence[str]) -> list[str]:
    names = _check_names(names)
    _check_logits(logits, len(names))
    n, _, k = logits.shape
    if n < 1:
        raise InputError("fitting needs at least one image; got N=0")
    if not isinstance(y, torch.Tensor) or y.shape != (n,) or y.dtype not in (torch.long, torch.int32, torch.int64):
        got = f"{tuple(y.shape)} {y.dtype}" if isinstance(y, torch.Tensor) else type(y).__name__
        raise InputError(f"y must be an integer tensor (N,) = ({n},) of labels; got {got}")
    if (y < 0).any() or (y >= k).any():
        raise InputError(f"labels must be in 0..{k - 1} (K={k} classes); got {int(y.min())}..{int(y.max())}")
    if not torch.isfinite(logits).all():
        raise InputError("logits contain NaN or inf; fit on finite logits")
    return names


def _nll(logp: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return -logp.gather(-1, y[:, None]).mean()


# ------------------------------------------------------------- aggregator

class ImageAggregator(nn.Module):
    """Aggregates the logits of ``A`` augmentations into log-probabilities.

    Build with :func:`mean_aggregator`, :func:`max_aggregator`, :func:`fit_gps`,
    :func:`fit_augtta`, :func:`fit_classtta` or :func:`fit_image_aggregator`.

    Attributes:
        method: one of :data:`METHODS`.
        names: the augmentation names, in the order of the logits' ``A`` axis.
        trained_on: free text saying which logits it was fitted on.
        budget: number of augmentation evaluations it was built for (GPS: the
            number of picks; otherwise ``A``).
        temperature: GPS temperature (float; 1.0 for the others).
        picks: GPS picks, indices into ``names`` (length ``budget``); None otherwise.
        weights: AugTTA ``(A,)`` / ClassTTA ``(A, K)`` weights; None otherwise.
        context: what else the fit depended on (e.g. the model and the input size the
            views were made for), saved with it and checked by :meth:`load`.

    Example:
        >>> agg = mean_aggregator(["identity", "hflip"])
        >>> agg(torch.zeros(4, 2, 10)).exp().sum(-1)
        tensor([1., 1., 1., 1.])
    """

    def __init__(
        self,
        method: str,
        names: Sequence[str],
        *,
        temperature: float = 1.0,
        picks: Sequence[int] | None = None,
        weights: torch.Tensor | None = None,
        trained_on: str = "",
        budget: int | None = None,
        context: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise InputError(f"unknown aggregation method {method!r}; valid: {', '.join(METHODS)}")
        self.method = method
        self.names = _check_names(names)
        self.trained_on = str(trained_on)
        a = len(self.names)
        self.temperature = float(temperature)
        self.picks = None if picks is None else [int(p) for p in picks]
        if method == "gps":
            if not self.picks or not all(0 <= p < a for p in self.picks):
                raise InputError(f"gps needs picks, indices in 0..{a - 1}; got {picks!r}")
            if not self.temperature > 0:
                raise InputError(f"temperature must be positive; got {temperature}")
        if method in ("augtta", "classtta"):
            if weights is None or weights.shape[0] != a or weights.dim() != (1 if method == "augtta" else 2):
                raise InputError(
                    f"{method} needs weights of shape {'(A,)' if method == 'augtta' else '(A, K)'} with A={a}; "
                    f"got {None if weights is None else tuple(weights.shape)}"
                )
            self.register_buffer("weights", weights.detach().clone().float())
        else:
            self.weights = None
        self.budget = int(budget) if budget is not None else (len(self.picks) if self.picks else a)
        self.context = {str(k): str(v) for k, v in (context or {}).items()}

    def used(self) -> list[int]:
        """Indices (sorted) of the augmentations the prediction depends on."""
        if self.method == "gps":
            return sorted(set(self.picks))
        return list(range(len(self.names)))

    def extra_repr(self) -> str:
        extra = f", T={self.temperature:.4g}, picks={self.picks}" if self.method == "gps" else ""
        return f"method={self.method!r}, A={len(self.names)}{extra}, trained_on={self.trained_on!r}"

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """``(N, A, K)`` logits, ``A == len(self.names)`` -> ``(N, K)`` log-probabilities."""
        _check_logits(logits, len(self.names))
        if self.method == "mean":
            return torch.logsumexp(torch.log_softmax(logits, -1), 1) - math.log(logits.shape[1])
        if self.method == "max":
            lp = torch.log_softmax(logits, -1).amax(1)
            return lp - torch.logsumexp(lp, -1, keepdim=True)
        if self.method == "gps":
            return self.forward_used(logits[:, self.used()])
        w = self.weights.to(logits.dtype)
        if self.method == "augtta":
            return torch.log_softmax(torch.einsum("nak,a->nk", logits, w), -1)
        if w.shape[1] != logits.shape[2]:
            raise InputError(f"classtta was fitted for K={w.shape[1]} classes; logits have K={logits.shape[2]}")
        return torch.log_softmax((logits * w).sum(1), -1)

    def forward_used(self, logits_used: torch.Tensor) -> torch.Tensor:
        """Like :meth:`forward`, given only the logits of :meth:`used` ``(N, len(used()), K)``, in that order."""
        used = self.used()
        _check_logits(logits_used, len(used))
        if self.method != "gps":
            return self.forward(logits_used)
        counts = torch.tensor([self.picks.count(u) for u in used], dtype=logits_used.dtype, device=logits_used.device)
        logw = (counts / counts.sum()).log().view(1, -1, 1)
        return torch.logsumexp(logw + torch.log_softmax(logits_used / self.temperature, -1), 1)

    # -- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write a safetensors file (weights, if any) with the method, names, budget and ``trained_on``."""

        out = Path(os.path.expanduser(str(path)))
        out.parent.mkdir(parents=True, exist_ok=True)
        tensors = {"weights": self.weights.contiguous().cpu()} if self.weights is not None else {}
        meta = {
            "undiscard.format": _FORMAT,
            "method": self.method,
            "names": json.dumps(self.names),
            "trained_on": self.trained_on,
            "budget": str(self.budget),
            "temperature": repr(self.temperature),
            "picks": json.dumps(self.picks),
            "context": json.dumps(self.context, sort_keys=True),
        }
        return save_safetensors_atomic(tensors, out, meta)

    @classmethod
    def load(cls, path: str | os.PathLike, names: Sequence[str] | None = None,
             context: dict[str, str] | None = None) -> "ImageAggregator":
        """Load an aggregator; with ``names`` (the current augmentation list) check it matches,
        with ``context`` check every key the file also records (e.g. model, input size).

        Raises:
            UndiscardError: a missing or foreign file, ``names`` differing from the
                list it was fitted with (other augmentations, or another order), or a
                ``context`` value differing from the saved one.
        """
        from safetensors import safe_open

        p = Path(os.path.expanduser(str(path)))
        if not p.is_file():
            raise UndiscardError(f"no image-TTA aggregator at {p}: fit one first")
        try:
            with safe_open(str(p), "pt") as fh:
                meta = fh.metadata() or {}
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise UndiscardError(f"{p} is not a safetensors file ({exc})") from None
        if meta.get("undiscard.format") != _FORMAT:
            raise UndiscardError(
                f"{p} is not an undiscard image-TTA aggregator (format {meta.get('undiscard.format')!r})"
            )
        saved = json.loads(meta["names"])
        if names is not None:
            names = list(names)
            if names != saved:
                how = (
                    "the same augmentations in a different order"
                    if sorted(names) == sorted(saved)
                    else f"missing {[n for n in saved if n not in names]}, extra {[n for n in names if n not in saved]}"
                )
                raise UndiscardError(
                    f"{p} was fitted on the augmentations {saved} but the current list is {names} ({how}). "
                    "Use the list it was fitted with (same names, same order), or refit the aggregator "
                    "on logits cached for the current list."
                )
        saved_ctx = json.loads(meta.get("context", "{}"))
        for k, v in (context or {}).items():
            if k in saved_ctx and saved_ctx[k] != str(v):
                raise UndiscardError(
                    f"{p} was fitted with {k} = {saved_ctx[k]!r}, but it is now {str(v)!r}: refit it for this setting"
                )
        picks = json.loads(meta.get("picks", "null"))
        return cls(
            meta["method"],
            saved,
            temperature=float(meta.get("temperature", "1.0")),
            picks=picks,
            weights=tensors.get("weights"),
            trained_on=meta.get("trained_on", ""),
            budget=int(meta["budget"]),
            context=saved_ctx,
        ).eval()


# ------------------------------------------------------- learning-free ones

def mean_aggregator(names: Sequence[str], *, trained_on: str = "") -> ImageAggregator:
    """``log mean_a softmax(l_a)`` over all ``A`` augmentations."""
    return ImageAggregator("mean", names, trained_on=trained_on)


def max_aggregator(names: Sequence[str], *, trained_on: str = "") -> ImageAggregator:
    """``log(p / sum_k p_k)`` with ``p_k = max_a softmax(l_a)_k``."""
    return ImageAggregator("max", names, trained_on=trained_on)


# ------------------------------------------------------------------- GPS

def fit_temperature(logits: torch.Tensor, y: torch.Tensor, *, lo: float = 0.01, hi: float = 100.0,
                    iters: int = 100) -> float:
    """The temperature ``T`` in ``[lo, hi]`` minimising the NLL of ``log_softmax(logits / T)``.

    ``logits (N, K)``, ``y (N,)``. Golden-section search on ``log T`` in float64
    (deterministic; the NLL is convex in ``1/T``, hence unimodal in ``log T``).

    Shape:
        - logits: ``(N, K)``.
        - y: ``(N,)`` integer labels.
        - output: a Python float.

    Example:
        >>> y = torch.tensor([0, 1, 1, 0])
        >>> over = 10 * torch.nn.functional.one_hot(y, 2).float()  # right, and over-confident at T = 1
        >>> over[0] = over[0].flip(0)  # one confident mistake
        >>> fit_temperature(over, y) > 1
        True
    """
    z = logits.detach().double()

    def nll(log_t: float) -> float:
        return float(_nll(torch.log_softmax(z / math.exp(log_t), -1), y))

    a, b = math.log(lo), math.log(hi)
    g = (math.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = nll(c), nll(d)
    for _ in range(iters):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = nll(c)
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = nll(d)
    # the ends too, so a minimum at the boundary (separable data: T -> lo) is kept
    best = min((nll(a), a), (nll(b), b), (fc, c), (fd, d))
    return math.exp(best[1])


def fit_gps(
    logits: torch.Tensor,
    y: torch.Tensor,
    names: Sequence[str],
    budget: int,
    *,
    trained_on: str = "plain logits",
) -> ImageAggregator:
    """Greedy Policy Search (Molchanov et al. 2020) on cached logits.

    Args:
        logits: ``(N, A, K)``, index 0 the identity (its logits set the temperature).
        y: ``(N,)`` labels.
        names: the ``A`` augmentation names.
        budget: number of greedy picks (with replacement), >= 1.

    Returns:
        an :class:`ImageAggregator` with ``.temperature`` and ``.picks`` (length ``budget``).

    Shape:
        - logits: ``(N, A, K)``.
        - y: ``(N,)`` integer labels in ``0..K-1``.
        - output: an aggregator mapping ``(N', A, K)`` logits to ``(N', K)`` log-probabilities.

    Example:
        >>> y = torch.tensor([0, 1, 1, 0])
        >>> good = 4 * torch.nn.functional.one_hot(y, 2).float()
        >>> logits = torch.stack([good, -good], 1)  # (N, A, K) = (4, 2, 2): the identity right, the view wrong
        >>> agg = fit_gps(logits, y, ["identity", "hflip"], budget=2)
        >>> agg.picks, agg(logits).argmax(1).tolist()
        ([0, 0], [0, 1, 1, 0])
    """
    names = _check_fit_inputs(logits, y, names)
    if not hasattr(budget, "__index__") or isinstance(budget, bool) or budget < 1:
        raise InputError(f"gps budget must be an int >= 1 (number of picks); got {budget!r}")
    budget = int(budget)
    t = fit_temperature(logits[:, 0], y)
    probs = torch.softmax(logits.detach().double() / t, -1)  # (N, A, K)
    p_true = probs.gather(-1, y.view(-1, 1, 1).expand(-1, probs.shape[1], 1))[..., 0]  # (N, A)
    running = torch.zeros(probs.shape[0], dtype=torch.float64)  # sum over picks of p(y)
    picks: list[int] = []
    for step in range(budget):
        nll = -torch.log(((running[:, None] + p_true) / (step + 1)).clamp_min(1e-300)).mean(0)  # (A,)
        best = int(torch.argmin(nll))  # first minimum on ties
        picks.append(best)
        running = running + p_true[:, best]
    return ImageAggregator("gps", names, temperature=t, picks=picks, trained_on=trained_on, budget=budget)


# --------------------------------------------------------- AugTTA / ClassTTA

def _fit_simplex_weights(logits, y, per_class: bool, epochs: int, lr: float, seed: int) -> torch.Tensor:
    torch.manual_seed(seed)  # nothing random below; kept so a fit never depends on outside state
    z = logits.detach().double()
    _, a, k = z.shape
    theta = torch.zeros((a, k) if per_class else (a,), dtype=torch.float64, requires_grad=True)  # uniform start
    opt = torch.optim.Adam([theta], lr=lr)
    for _ in range(epochs):
        opt.zero_grad()
        w = torch.softmax(theta, 0)
        mixed = (z * w).sum(1) if per_class else torch.einsum("nak,a->nk", z, w)
        loss = _nll(torch.log_softmax(mixed, -1), y)
        loss.backward()
        opt.step()
    return torch.softmax(theta.detach(), 0).float()


def fit_augtta(
    logits: torch.Tensor,
    y: torch.Tensor,
    names: Sequence[str],
    *,
    epochs: int = 500,
    lr: float = 0.5,
    seed: int = 0,
    trained_on: str = "plain logits",
) -> ImageAggregator:
    """AugTTA (Shanmugam et al. 2021): one weight per augmentation on the simplex.

    ``logits (N, A, K)``, ``y (N,)``. Prediction ``log_softmax(sum_a w_a l_a)``,
    ``w >= 0``, ``sum_a w_a = 1``; ``w = softmax(theta)``, ``theta = 0`` at the start
    (uniform), full-batch Adam for ``epochs`` steps. Exposes ``.weights (A,)``.

    Shape:
        - logits: ``(N, A, K)``.
        - y: ``(N,)`` integer labels in ``0..K-1``.
        - output: an aggregator with ``weights`` ``(A,)``, mapping ``(N', A, K)`` to ``(N', K)``.

    Example:
        >>> y = torch.tensor([0, 1, 1, 0])
        >>> good = 4 * torch.nn.functional.one_hot(y, 2).float()
        >>> agg = fit_augtta(torch.stack([good, -good], 1), y, ["identity", "hflip"], epochs=50)
        >>> agg.weights.shape, bool(agg.weights[0] > agg.weights[1]), torch.allclose(agg.weights.sum(), torch.tensor(1.0))
        (torch.Size([2]), True, True)
    """
    names = _check_fit_inputs(logits, y, names)
    w = _fit_simplex_weights(logits, y, False, epochs, lr, seed)
    return ImageAggregator("augtta", names, weights=w, trained_on=trained_on)


def fit_classtta(
    logits: torch.Tensor,
    y: torch.Tensor,
    names: Sequence[str],
    *,
    epochs: int = 500,
    lr: float = 0.5,
    seed: int = 0,
    trained_on: str = "plain logits",
) -> ImageAggregator:
    """ClassTTA (Shanmugam et al. 2021): one weight per augmentation and class.

    ``logits (N, A, K)``, ``y (N,)``. Prediction ``log_softmax_k(sum_a w_{a,k} l_{a,k})``,
    ``w >= 0``, ``sum_a w_{a,k} = 1`` for every ``k``; ``w = softmax(theta, dim=0)``,
    uniform start, full-batch Adam. Exposes ``.weights (A, K)``.

    Shape:
        - logits: ``(N, A, K)``.
        - y: ``(N,)`` integer labels in ``0..K-1``.
        - output: an aggregator with ``weights`` ``(A, K)`` (each column summing to 1), mapping
          ``(N', A, K)`` to ``(N', K)``.

    Example:
        >>> y = torch.tensor([0, 1, 1, 0])
        >>> good = 4 * torch.nn.functional.one_hot(y, 2).float()
        >>> agg = fit_classtta(torch.stack([good, -good], 1), y, ["identity", "hflip"], epochs=50)
        >>> agg.weights.shape, torch.allclose(agg.weights.sum(0), torch.ones(2))
        (torch.Size([2, 2]), True)
    """
    names = _check_fit_inputs(logits, y, names)
    w = _fit_simplex_weights(logits, y, True, epochs, lr, seed)
    return ImageAggregator("classtta", names, weights=w, trained_on=trained_on)


def fit_image_aggregator(
    method: str,
    logits: torch.Tensor,
    y: torch.Tensor,
    names: Sequence[str],
    budget: int | None = None,
    **kw,
) -> ImageAggregator:
    """Build or fit the ``method`` aggregator (one of :data:`METHODS`).

    ``budget`` is the number of GPS picks (required for ``gps``). The other methods
    use all ``A`` augmentations: a ``budget`` other than ``A`` is refused (pass the
    logits of the first ``budget`` augmentations instead). ``kw`` goes to the fitter
    (``trained_on``, and ``epochs``/``lr``/``seed`` for AugTTA/ClassTTA).

    Shape:
        - logits: ``(N, A, K)``, ``A = len(names)``.
        - y: ``(N,)`` integer labels in ``0..K-1``.
        - output: an aggregator mapping ``(N', A, K)`` logits to ``(N', K)`` log-probabilities.

    Example:
        >>> logits, y = torch.zeros(4, 2, 3), torch.tensor([0, 1, 2, 0])
        >>> fit_image_aggregator("mean", logits, y, ["identity", "hflip"]).method
        'mean'
        >>> fit_image_aggregator("gps", logits, y, ["identity", "hflip"], budget=3).picks
        [0, 0, 0]
    """
    if method not in METHODS:
        raise InputError(f"unknown image-TTA aggregation method {method!r}; valid: {', '.join(METHODS)}")
    if method == "gps":
        if budget is None:
            raise InputError("gps needs a budget (the number of augmentation picks)")
        unknown = set(kw) - {"trained_on"}
        if unknown:
            raise InputError(f"gps takes only trained_on besides the budget; got {sorted(unknown)}")
        return fit_gps(logits, y, names, budget, **kw)
    a = len(names)
    if budget is not None and budget != a:
        raise InputError(
            f"{method} uses all A={a} augmentations, so budget={budget} cannot be honoured; "
            f"pass the logits and names of the first {budget} augmentations, or use gps"
        )
    if method in ("mean", "max"):
        _check_fit_inputs(logits, y, names)
        unknown = set(kw) - {"trained_on"}
        if unknown:
            raise InputError(f"{method} takes no fitting options; got {sorted(unknown)}")
        build = mean_aggregator if method == "mean" else max_aggregator
        return build(names, trained_on=kw.get("trained_on", ""))
    return (fit_augtta if method == "augtta" else fit_classtta)(logits, y, names, **kw)


# ------------------------------------------------------------ logits cache

def _meta_str(v) -> str:
    return v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)


class LogitsCache:
    """Named tensors (e.g. cached logits) in one safetensors file with metadata.

    ``LogitsCache(path, meta={...})`` opens ``path`` (or starts empty when it does not
    exist) and refuses a file whose metadata differs from ``meta`` (non-str values are
    compared as JSON). :meth:`put` rewrites the file atomically (a temporary file,
    then ``os.replace``), so an interrupted run never leaves a torn cache.

    Args:
        path: the ``.safetensors`` file.
        meta: what the cached values depend on (model, data, image count, config).
        fresh: ignore an existing file (it is overwritten on the first :meth:`put`).

    Raises:
        UndiscardError: the file is not a logits cache, or was written with other metadata.
    """

    def __init__(self, path: str | os.PathLike, meta: dict | None = None, *, fresh: bool = False) -> None:
        self.path = Path(os.path.expanduser(str(path)))
        want = {str(k): _meta_str(v) for k, v in (meta or {}).items()}
        self._tensors: dict[str, torch.Tensor] = {}
        self.meta: dict[str, str] = want
        if fresh or not self.path.exists():
            return
        from safetensors import safe_open

        try:
            with safe_open(str(self.path), "pt") as fh:
                file_meta = dict(fh.metadata() or {})
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        except Exception as exc:  # safetensors raises its own error types
            raise UndiscardError(
                f"{self.path} is not a readable safetensors file ({exc}); delete it or pass --fresh"
            ) from None
        if file_meta.pop("undiscard.format", None) != _CACHE_FORMAT:
            raise UndiscardError(f"{self.path} is not an undiscard logits cache; delete it or pass --fresh")
        if meta is not None and file_meta != want:
            diff = [
                f"{k}: cache has {file_meta.get(k, '<missing>')!r}, now {want.get(k, '<missing>')!r}"
                for k in sorted(set(file_meta) | set(want))
                if file_meta.get(k) != want.get(k)
            ]
            raise UndiscardError(
                f"the logits cache {self.path} was written under other settings ({'; '.join(diff)}); "
                "pass --fresh to discard it (or delete the file)"
            )
        self.meta = file_meta
        self._tensors = tensors

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def __len__(self) -> int:
        return len(self._tensors)

    def keys(self) -> list[str]:
        """The stored keys, sorted."""
        return sorted(self._tensors)

    def get(self, key: str, default: torch.Tensor | None = None) -> torch.Tensor | None:
        """The tensor stored under ``key``, or ``default``."""
        return self._tensors.get(key, default)

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Store ``tensor`` under ``key`` and rewrite the file atomically."""

        if not isinstance(key, str) or not isinstance(tensor, torch.Tensor):
            raise InputError(f"put(key: str, tensor: Tensor); got {type(key).__name__}, {type(tensor).__name__}")
        self._tensors[key] = tensor.detach().cpu().contiguous().clone()
        save_safetensors_atomic(self._tensors, self.path, {**self.meta, "undiscard.format": _CACHE_FORMAT},
                                tmp_name=f".{self.path.name}.{os.getpid()}.tmp")
