"""The learned aggregator (``attention``; docs/method.md, "Aggregation") and its training.

:class:`AttentionAggregator` is a small set operator over the ``B`` aligned final maps of
one image. At each map position the ``B`` states form a set of tokens:

    z_b   = W_in LN(f_b) + E(Delta_b)                (project to d, add the encoding of Delta)
    a_b   = g(mean over positions of z_b)            (the state's weight logit)
    h     = z + MHA(LN(z)),  h = h + MLP(LN(h))      (attention across the B states)
    out   = sum_b softmax(a)_b * (f_b + W_out h_b)   (weighted, residual in feature space)

``g``'s last layer and ``W_out`` start at zero, so the untrained aggregator IS the mean
(uniform weights, zero correction). It is permutation-invariant and takes any ``B``:
trained once with budgets drawn at random per batch, it serves every budget. ``a_b``
depends on state ``b`` alone: it is the ``learned`` search criterion (higher first).

Checkpoints are safetensors with metadata naming the backbone (architecture and a
fingerprint of its weights), the searchable sites, the feature width and whether maps
were aligned; :func:`load_aggregator` refuses one that does not match the backbone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from undiscard.errors import SiteMismatchError, UndiscardError

__all__ = ["AttentionAggregator", "backbone_fingerprint", "load_aggregator", "save_aggregator", "train_aggregator"]

_FORMAT = "undiscard.aggregator/1"


class AttentionAggregator(nn.Module):
    def __init__(self, channels: int, dim: int = 128, heads: int = 4, mlp_ratio: float = 2.0, spatial_dims: int = 2,
                 frequencies: int = 4, meta: dict[str, str] | None = None) -> None:
        super().__init__()
        if channels < 1 or dim < 1 or heads < 1 or dim % heads:
            raise UndiscardError(f"need channels >= 1 and dim divisible by heads; got {channels}, {dim}, {heads}")
        self.channels, self.dim, self.heads, self.spatial_dims, self.frequencies = channels, dim, heads, spatial_dims, frequencies
        self.mlp_ratio = mlp_ratio
        self.meta: dict[str, str] = dict(meta or {})
        self.norm_in = nn.LayerNorm(channels)
        self.proj_in = nn.Linear(channels, dim)
        self.enc = nn.Sequential(nn.Linear(spatial_dims * (1 + 2 * frequencies), dim), nn.GELU(), nn.Linear(dim, dim))
        self.score = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1))
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))
        self.proj_out = nn.Linear(dim, channels)
        for layer in (self.score[-1], self.proj_out):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def config(self) -> dict[str, Any]:
        return {"channels": self.channels, "dim": self.dim, "heads": self.heads, "mlp_ratio": self.mlp_ratio,
                "spatial_dims": self.spatial_dims, "frequencies": self.frequencies}

    def encode(self, cells: torch.Tensor) -> torch.Tensor:
        """``(..., D)`` displacement in final-map cells -> ``(..., dim)``."""
        k = torch.arange(1, self.frequencies + 1, dtype=cells.dtype, device=cells.device)
        ang = math.pi * cells[..., None] * k  # (..., D, F)
        feats = torch.cat([cells[..., None], ang.sin(), ang.cos()], -1).flatten(-2)
        return self.enc(feats)

    def _tokens(self, f: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        return self.proj_in(self.norm_in(f)) + self.encode(cells)[..., None, :]

    def state_logits(self, f: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
        """The weight logit of each state on its own: ``f (M, S, C)``, ``cells (M, D)`` -> ``(M,)``."""
        return self.score(self._tokens(f, cells).mean(-2)).squeeze(-1)

    def forward(self, f: torch.Tensor, cells: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Aggregate ``f (N, B, S, C)`` with displacements ``cells (N, B, D)``.

        ``mask`` ``(N, B)``: False marks padding states. Returns ``(out (N, S, C), weights (N, B))``.
        """
        if f.dim() != 4 or f.shape[-1] != self.channels:
            raise SiteMismatchError(
                f"the aggregator takes (N, B, positions, {self.channels}) maps; got {tuple(f.shape)}: it was trained "
                f"for another backbone"
            )
        n, b, s, c = f.shape
        z = self._tokens(f, cells)  # (N, B, S, d)
        a = self.score(z.mean(2)).squeeze(-1)  # (N, B)
        if mask is not None:
            a = a.masked_fill(~mask, float("-inf"))
        w = torch.softmax(a, dim=1)
        t = z.permute(0, 2, 1, 3).reshape(n * s, b, self.dim)
        q = self.norm1(t)
        kpm = None if mask is None else (~mask).repeat_interleave(s, 0)
        t = t + self.attn(q, q, q, key_padding_mask=kpm, need_weights=False)[0]
        t = t + self.mlp(self.norm2(t))
        corr = self.proj_out(t).reshape(n, s, b, c).permute(0, 2, 1, 3)
        out = ((f + corr) * w[..., None, None]).sum(1)
        return out, w

    def check_align(self, align: bool) -> None:
        trained = self.meta.get("undiscard.align")
        if trained is not None and (trained == "1") != bool(align):
            how = "aligned" if trained == "1" else "unaligned"
            raise UndiscardError(f"this aggregator was trained on {how} maps; use align={trained == '1'}")


# ------------------------------------------------------------------ identity of a backbone

def backbone_fingerprint(model: nn.Module) -> str:
    """A short hash of the backbone's parameter names, shapes and (float16-rounded) values."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        if t.is_floating_point():
            h.update(t.detach().to(torch.float16).cpu().contiguous().numpy().tobytes())
        else:
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def sites_signature(sites) -> str:
    return json.dumps([[s.kind, list(s.stride), list(s.out_grid)] for s in sites.searchable_sites])


def save_aggregator(agg: AttentionAggregator, path: str | os.PathLike, meta: dict[str, str]) -> Path:
    try:
        from safetensors.torch import save_model
    except ImportError as exc:
        raise UndiscardError(f"saving an aggregator needs safetensors ({exc}); pip install 'undiscard[zoo]'") from exc
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    full = {**agg.meta, **meta, "undiscard.format": _FORMAT, "undiscard.config": json.dumps(agg.config())}
    save_model(agg, str(out), metadata={k: str(v) for k, v in full.items()})
    agg.meta = full
    return out


def load_aggregator(path: str | os.PathLike, model: nn.Module | None = None, sites=None) -> AttentionAggregator:
    """Load an aggregator; with ``model`` (and ``sites``) check it was trained for them.

    Raises :class:`UndiscardError` for a missing or foreign file and
    :class:`SiteMismatchError` when the backbone or its sites differ.
    """
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise UndiscardError(f"no aggregator checkpoint at {p}: train one with `undiscard train-aggregator`")
    try:
        from safetensors import safe_open
        from safetensors.torch import load_model as st_load
    except ImportError as exc:
        raise UndiscardError(f"loading an aggregator needs safetensors ({exc}); pip install 'undiscard[zoo]'") from exc
    try:
        with safe_open(str(p), "pt") as fh:
            meta = fh.metadata() or {}
    except Exception as exc:
        raise UndiscardError(f"{p} is not a safetensors file ({exc})") from None
    if meta.get("undiscard.format") != _FORMAT:
        raise UndiscardError(f"{p} is not an undiscard aggregator checkpoint (format {meta.get('undiscard.format')!r})")
    agg = AttentionAggregator(**json.loads(meta["undiscard.config"]), meta=meta)
    st_load(agg, str(p))
    agg.eval()
    if model is not None:
        fp = backbone_fingerprint(model)
        if meta.get("undiscard.backbone_fingerprint") != fp:
            raise SiteMismatchError(
                f"{p} was trained for backbone {meta.get('undiscard.backbone')!r} (fingerprint "
                f"{meta.get('undiscard.backbone_fingerprint')}), but this model's weights have fingerprint {fp}: "
                "train an aggregator for this backbone with `undiscard train-aggregator`"
            )
    if sites is not None and meta.get("undiscard.sites") != sites_signature(sites):
        raise SiteMismatchError(
            f"{p} was trained with searchable sites {meta.get('undiscard.sites')} but these are "
            f"{sites_signature(sites)}: use the same --searchable and input size"
        )
    return agg


# ------------------------------------------------------------------ training

def _random_states(sites, n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """``(n, k, L)``: the default state then ``k - 1`` distinct random non-default states per image."""
    space = sites.space_size
    if k > space:
        raise UndiscardError(f"{k} states per image but the search space holds only {space}")
    radices = [s.num_offsets for s in sites.searchable_sites]
    out = torch.zeros(n, k, len(radices), dtype=torch.long)
    for i in range(n):
        flat = torch.randperm(space - 1, generator=gen)[: k - 1] + 1
        for j in range(len(radices) - 1, -1, -1):
            out[i, 1:, j] = flat % radices[j]
            flat = flat // radices[j]
    return out


#: What ``OUT.cache.safetensors`` holds (:func:`undiscard.statefile.save_state`).
_CACHE_KIND = "undiscard.aggregator-cache/2"


def _data_digest(images: torch.Tensor, labels: torch.Tensor, chunk: int = 256) -> str:
    """A short hash of the training images and labels (a chunk at a time: an expanded view stays one)."""
    h = hashlib.sha256()
    for t in (images, labels):
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        for s in range(0, t.shape[0], chunk):
            h.update(t[s : s + chunk].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _completed(out: Path, identity: dict, log) -> dict | None:
    """The summary of an ``out`` trained with the same ``identity`` (nothing to train), None when there is no
    ``out``; an ``out`` of other settings, or not an aggregator, is refused."""
    from undiscard.statefile import looks_like_pickle

    if not out.exists():
        return None
    redo = "add --fresh to retrain it (this replaces it), or choose another --out"
    try:
        from safetensors import safe_open

        if looks_like_pickle(out):
            raise ValueError("a pickle")  # internal: caught just below
        with safe_open(str(out), "pt") as fh:
            meta = dict(fh.metadata() or {})
    except Exception as exc:
        raise UndiscardError(f"{out} exists and is not an aggregator checkpoint ({exc}); {redo}") from None
    if meta.get("undiscard.format") != _FORMAT:
        raise UndiscardError(f"{out} exists and is not an aggregator checkpoint; {redo}")
    diff = [key for key, v in identity.items() if meta.get(key) != v]
    if diff:
        raise UndiscardError(f"{out} holds an aggregator trained with other settings (differing: "
                             f"{', '.join(d.removeprefix('undiscard.') for d in diff)}); {redo}")
    log(f"{out} is complete (trained with the same settings, backbone and data): nothing to train; "
        "add --fresh to retrain it")
    return {"loss": json.loads(meta.get("undiscard.loss", "[]")), "out": str(out)}


def _feature_cache(wrapped, sites, images: torch.Tensor, states: torch.Tensor, k: int, key: dict, cache_path: Path,
                   t0: float, log) -> dict:
    """The aligned final maps of ``k`` states per image (float16 ``(n, k, positions, C)``), computed once in
    chunks and saved to ``cache_path`` (resumable: an interrupted run saves what it has)."""
    from undiscard.run.engine import use_states
    from undiscard.statefile import load_state, save_state

    model, sp, stride, n = wrapped.model, wrapped.split, sites.stride_total, images.shape[0]
    cache: dict[str, Any] = {"done": 0, "feats": None}
    if cache_path.exists():
        prev = load_state(cache_path, _CACHE_KIND, what="aggregator feature cache",
                          hint="delete it (or add --fresh) and rerun")
        if prev.get("key") != key:
            log(f"{cache_path} was computed for other settings, backbone or images: computing the features afresh")
        else:
            cache = prev
            log(f"resuming the feature cache at {cache['done']}/{n} images")
    chunk = max(1, wrapped.max_batch // k)
    try:
        with torch.no_grad():
            while cache["done"] < n:
                s = cache["done"]
                idx = torch.arange(s, min(n, s + chunk))
                st = states[idx].flatten(0, 1)
                x = images[idx].repeat_interleave(k, 0)
                with use_states(model, sites, st):
                    f = sp.features(x)
                if wrapped.align:
                    f = sp.align(f, sites.displacement(st), stride, wrapped.fill)
                grid = tuple(f.shape[2:]) if sp.layout == "NCHW" else tuple(f.shape[1:-1])
                pos = sp.to_positions(f)
                f = pos.reshape(len(idx), k, *pos.shape[1:])
                if cache["feats"] is None:
                    cache["feats"] = torch.empty(n, k, f.shape[2], f.shape[3], dtype=torch.float16)
                    cache["grid"] = grid
                cache["feats"][idx] = f.half()
                cache["done"] = int(idx[-1]) + 1
                if (s // chunk) % 20 == 0:
                    log(f"features {cache['done']}/{n} images x {k} states ({time.perf_counter() - t0:.0f} s)")
    except KeyboardInterrupt:
        save_state({**cache, "key": key}, cache_path, _CACHE_KIND)
        raise UndiscardError("interrupted; the feature cache is saved: run the same command again to resume") from None
    save_state({**cache, "key": key}, cache_path, _CACHE_KIND)
    return cache


def _fit(wrapped, sites, cache: dict, states: torch.Tensor, labels: torch.Tensor, k: int, gen: torch.Generator,
         t0: float, *, epochs: int, batch_size: int, lr: float, weight_decay: float, dim: int, heads: int, seed: int,
         log) -> tuple[AttentionAggregator, list[float]]:
    """Train the aggregator on the cached maps: a random budget and random states (the default always in) per
    batch, cross-entropy through the frozen head. Returns it and the loss per epoch."""
    model, sp, stride = wrapped.model, wrapped.split, sites.stride_total
    n = cache["feats"].shape[0]
    feats = cache["feats"]
    delta = sites.displacement(states.flatten(0, 1)).reshape(n, k, -1)
    cells = (delta.double() / torch.tensor(stride, dtype=torch.float64)).float()
    grid = cache["grid"]
    channels = feats.shape[-1]
    torch.manual_seed(seed)
    agg = AttentionAggregator(channels, dim=dim, heads=heads, spatial_dims=len(stride))
    opt = torch.optim.AdamW(agg.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = max(1, n // batch_size)
    total = epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.05, anneal_strategy="cos")
    crit = nn.CrossEntropyLoss()
    for p in model.parameters():
        p.requires_grad_(False)
    history = []
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=gen)
        agg.train()
        tot = 0.0
        for b in range(steps_per_epoch):
            idx = perm[b * batch_size : (b + 1) * batch_size]
            B = int(torch.randint(1, k + 1, (), generator=gen))
            pick = torch.cat([torch.zeros(len(idx), 1, dtype=torch.long),
                              torch.argsort(torch.rand(len(idx), k - 1, generator=gen), 1)[:, : B - 1] + 1], 1)
            f = torch.gather(feats[idx].float(), 1, pick[..., None, None].expand(-1, -1, feats.shape[2], channels))
            c = torch.gather(cells[idx], 1, pick[..., None].expand(-1, -1, cells.shape[-1]))
            a, _ = agg(f, c)
            logits = sp.head(wrapped._from_positions(a, grid))
            loss = crit(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            tot += loss.item()
        history.append(tot / steps_per_epoch)
        log(f"aggregator epoch {epoch + 1}/{epochs} loss {history[-1]:.4f} ({time.perf_counter() - t0:.0f} s)")
    return agg, history


def train_aggregator(
    wrapped,
    images: torch.Tensor,
    labels: torch.Tensor,
    out: str | os.PathLike,
    *,
    states_per_image: int = 16,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 1e-3,
    weight_decay: float = 0.05,
    dim: int = 128,
    heads: int = 4,
    seed: int = 0,
    backbone_name: str = "",
    fresh: bool = False,
    log=print,
) -> dict:
    """Train an :class:`AttentionAggregator` on a frozen backbone and save it to ``out``.

    ``wrapped``: an :class:`undiscard.method.classify.Undiscard` (it fixes searchable sites, align,
    fill). For every training image the final maps of ``states_per_image`` states (the
    default and random others) are computed once and cached (float16, resumable: a
    ``OUT.cache.safetensors`` file, tied to the backbone's weights, the sites, the images
    and the settings; an ``OUT.cache.pt`` pickle is refused, never
    loaded); each batch then draws a budget ``B`` uniformly from
    ``1..states_per_image`` and a random subset of ``B`` states (the default always in),
    and the aggregator learns to make the frozen head right (cross-entropy), with AdamW
    and a cosine schedule.

    An ``out`` that already holds an aggregator trained with the same settings, backbone
    and data is not retrained (its training losses are returned); another one is refused
    unless ``fresh``, which also deletes the feature cache.

    Returns ``{"loss": mean training loss per epoch, "out": the checkpoint's path}``.

    Shape:
        - images: ``(N, C, H, W)``, the wrapped model's input (already normalised).
        - labels: ``(N,)`` integer class indices.
        - The feature cache holds float16 ``(N, k, S, C_f)`` maps, ``k = min(states_per_image,
          space_size)`` states per image, ``S`` positions of the final map, ``C_f`` its channels.
    """
    from undiscard.errors import FileTrustError

    out = Path(out)
    cache_path = out.with_name(out.name + ".cache.safetensors")
    legacy = out.with_name(out.name + ".cache.pt")
    model = wrapped.model
    model.eval()
    sites = wrapped.sites_for(images[:1])
    k = min(states_per_image, sites.space_size)
    n = images.shape[0]
    train_meta = {"images": n, "states_per_image": k, "epochs": epochs, "batch_size": batch_size, "lr": lr,
                  "weight_decay": weight_decay, "dim": dim, "heads": heads, "seed": seed}
    identity = {"undiscard.backbone_fingerprint": backbone_fingerprint(model), "undiscard.sites": sites_signature(sites),
                "undiscard.searchable": json.dumps(list(sites.searchable)),
                "undiscard.input_size": json.dumps(list(images.shape[1:])),
                "undiscard.align": "1" if wrapped.align else "0", "undiscard.fill": wrapped.fill,
                "undiscard.data": _data_digest(images, labels), "undiscard.train": json.dumps(train_meta)}
    if fresh:
        for f in (cache_path, legacy, out):
            if f.exists():
                f.unlink()
                log(f"--fresh: deleted {f}")
    done = _completed(out, identity, log)
    if done is not None:
        return done
    if legacy.exists():
        raise FileTrustError(f"{legacy}: a feature cache in a pickle format; it is not loaded "
                             "(unpickling a file can run code): add --fresh to delete it (or delete it) and rerun")
    gen = torch.Generator().manual_seed(seed)
    states = _random_states(sites, n, k, gen)
    key = {"n": n, "k": k, "seed": seed, **{kk: v for kk, v in identity.items() if kk != "undiscard.train"}}
    t0 = time.perf_counter()
    cache = _feature_cache(wrapped, sites, images, states, k, key, cache_path, t0, log)
    agg, history = _fit(wrapped, sites, cache, states, labels, k, gen, t0, epochs=epochs, batch_size=batch_size, lr=lr,
                        weight_decay=weight_decay, dim=dim, heads=heads, seed=seed, log=log)
    channels = cache["feats"].shape[-1]
    agg.eval()
    meta = {
        "undiscard.backbone": backbone_name,
        **identity,
        "undiscard.feature_dim": str(channels),
        "undiscard.loss": json.dumps(history),
    }
    save_aggregator(agg, out, meta)
    cache_path.unlink(missing_ok=True)
    log(f"wrote {out}")
    return {"loss": history, "out": str(out)}
