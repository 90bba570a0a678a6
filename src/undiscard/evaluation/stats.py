"""Statistics for comparing a method with the plain model on the same images.

Every gain is paired: both predictions are made on the same images, so the comparison
resamples images, not predictions.

* :func:`paired_bootstrap`: the gain in top-1 points with a 95% percentile interval
  over images drawn with replacement;
* :func:`mcnemar`: the exact two-sided sign test on the images where exactly one of the
  two is right (under "no difference" each such image is a fair coin);
* :func:`calibration`: NLL and ECE (15 equal-width bins), raw and after temperature
  scaling with a temperature fitted on separate (validation) logits, the fair way to
  compare the calibration of two predictors (Ashukha et al., 2020).
"""

from __future__ import annotations

import math

import torch

from undiscard.errors import InputError

__all__ = ["paired_bootstrap", "mcnemar", "compare", "calibration", "nll"]


def _as_correct(c: torch.Tensor, name: str) -> torch.Tensor:
    c = torch.as_tensor(c)
    if c.dim() != 1:
        raise InputError(f"{name} must be one correctness flag per image (N,), got shape {tuple(c.shape)}")
    return c.to(torch.float64)


def paired_bootstrap(correct: torch.Tensor, base: torch.Tensor, *, resamples: int = 2000,
                     seed: int = 0) -> tuple[float, float, float]:
    """``(gain, lo, hi)``: top-1(correct) - top-1(base) in points and its 95% interval.

    ``correct`` / ``base``: ``(N,)`` booleans (or 0/1) for the same ``N`` images. The
    interval is the 2.5 and 97.5 percentiles of the gain over ``resamples`` sets of ``N``
    images drawn with replacement (seeded).

    Shape:
        - correct, base: ``(N,)`` bool or 0/1, ``N >= 1``.
        - output: three Python floats, in points (percent of the images).

    Example:
        >>> gain, lo, hi = paired_bootstrap(torch.tensor([1, 1, 1, 0]), torch.tensor([1, 0, 1, 0]), resamples=200)
        >>> gain, 0 <= lo <= gain <= hi <= 100
        (25.0, True)
    """
    a, b = _as_correct(correct, "correct"), _as_correct(base, "base")
    if a.shape != b.shape or a.numel() == 0:
        raise InputError(f"a paired comparison needs the same non-empty set of images; got {a.numel()} and {b.numel()}")
    d = a - b
    n = d.numel()
    g = torch.Generator().manual_seed(seed)
    sums = torch.empty(resamples, dtype=torch.float64)
    for s in range(0, resamples, 256):  # 256 resamples at a time: bounded memory for large N
        k = min(256, resamples - s)
        idx = torch.randint(0, n, (k, n), generator=g)
        sums[s : s + k] = d[idx].sum(1)
    gains = 100.0 * sums / n
    lo, hi = torch.quantile(gains, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return 100.0 * float(d.mean()), lo, hi


def mcnemar(correct: torch.Tensor, base: torch.Tensor) -> dict:
    """Exact McNemar test of ``correct`` against ``base`` on the same images.

    Returns ``{"wins": b, "losses": c, "p": p}``: ``b`` images right only with
    ``correct``, ``c`` right only with ``base``, and the two-sided binomial p-value of
    ``min(b, c)`` among ``b + c`` fair coin flips (1.0 when ``b + c == 0``).

    Shape:
        - correct, base: ``(N,)`` bool or 0/1.
        - output: a dict of two ints and a float.

    Example:
        >>> mcnemar(torch.tensor([True, True, True, False]), torch.tensor([False, False, True, False]))
        {'wins': 2, 'losses': 0, 'p': 0.5}
    """
    a, z = _as_correct(correct, "correct").bool(), _as_correct(base, "base").bool()
    if a.shape != z.shape:
        raise InputError(f"a paired comparison needs the same images; got {a.numel()} and {z.numel()}")
    wins, losses = int((a & ~z).sum()), int((~a & z).sum())
    n, k = wins + losses, min(wins, losses)
    if n == 0:
        return {"wins": 0, "losses": 0, "p": 1.0}
    # P(X <= k) for X ~ Bin(n, 1/2), summed in log space (exact enough for any n)
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    m = max(logs)
    tail = math.exp(m) * sum(math.exp(v - m) for v in logs)
    return {"wins": wins, "losses": losses, "p": min(1.0, 2.0 * tail)}


def compare(correct: torch.Tensor, base: torch.Tensor, *, resamples: int = 2000, seed: int = 0) -> dict:
    """Gain in points, its paired-bootstrap 95% interval, and the McNemar test, as one dict.

    Shape:
        - correct, base: ``(N,)`` bool or 0/1, ``N >= 1``.
        - output: ``{"gain", "lo", "hi", "wins", "losses", "p"}``
          (:func:`paired_bootstrap`, :func:`mcnemar`).

    Example:
        >>> sorted(compare(torch.tensor([1, 1, 0]), torch.tensor([1, 0, 0]), resamples=10))
        ['gain', 'hi', 'lo', 'losses', 'p', 'wins']
    """
    gain, lo, hi = paired_bootstrap(correct, base, resamples=resamples, seed=seed)
    return {"gain": gain, "lo": lo, "hi": hi, **mcnemar(correct, base)}


def nll(logits: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of ``y`` under ``softmax(logits / temperature)``.

    Shape:
        - logits: ``(N, K)``.
        - y: ``(N,)`` int64 labels.
        - output: a Python float (computed in float64).

    Example:
        >>> math.isclose(nll(torch.zeros(3, 4), torch.tensor([0, 1, 2])), math.log(4))
        True
    """
    logp = torch.log_softmax(logits.double() / temperature, -1)
    return float(-logp.gather(1, y[:, None]).mean())


def calibration(logits: torch.Tensor, y: torch.Tensor, val_logits: torch.Tensor | None = None,
                val_y: torch.Tensor | None = None, bins: int = 15) -> dict:
    """NLL and ECE of ``logits``; with validation logits also after temperature scaling.

    Returns ``{"nll", "ece"}`` and, when ``val_logits`` / ``val_y`` are given,
    ``{"temperature", "nll_ts", "ece_ts"}``: the temperature is fitted on the validation
    logits of the same predictor and applied to ``logits``. ECE is a fraction in ``[0, 1]``
    (:func:`~undiscard.evaluation.classify.calibration_error` with ``bins`` bins).

    Shape:
        - logits: ``(N, K)``; y: ``(N,)`` int64 labels.
        - val_logits: ``(N_val, K)``; val_y: ``(N_val,)``.
        - output: a dict of Python floats.

    Example:
        >>> sorted(calibration(torch.zeros(2, 3), torch.tensor([0, 1]), torch.zeros(2, 3), torch.tensor([0, 1])))
        ['ece', 'ece_ts', 'nll', 'nll_ts', 'temperature']
    """
    from undiscard.evaluation.classify import calibration_error
    from undiscard.tta.merge import fit_temperature

    def ece(t: float) -> float:
        p = torch.softmax(logits.double() / t, -1)
        conf, pred = p.max(1)
        return calibration_error(conf, pred == y, bins)

    out = {"nll": nll(logits, y), "ece": ece(1.0)}
    if val_logits is not None and val_y is not None:
        t = fit_temperature(val_logits, val_y)
        out.update(temperature=t, nll_ts=nll(logits, y, t), ece_ts=ece(t))
    return out
