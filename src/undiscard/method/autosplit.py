"""The features / head split of a classifier that does not offer one (torchvision,
transformers, segmentation_models_pytorch encoders, a user's own ``nn.Module``).

The method needs the final feature map of every state, then the head on each (and on
their aggregate). timm models say where that map is (``forward_features`` /
``forward_head``); for any other model it is found by watching one forward
(docs/method.md, "Feature / head split"):

1. Record every torch call of ``model(x)`` on a probe batch of two images (a
   ``TorchFunctionMode``, as site discovery does), with which tensors descend from the
   input.
2. Candidates: the calls after the last subsampling site that take a *grid-bearing*
   tensor (a map of the final grid, channels first or last, or a token sequence at least
   as long as the grid) and give a tensor that is not: the global pooling, the flatten,
   the class-token pick that feeds the classifier. The last one is tried first.
3. The final map is that call's input, the output of an earlier call. ``features(x)``
   runs the model through the call that makes it and returns it (the rest of the
   forward is not run). ``head(f)`` runs the model again with every call up to that one
   that depends on the input answered by a zero-cost placeholder of the recorded shape
   (no computation), ``f`` standing for the final map, so the head is the model's own
   code (every use of the map included), whatever its output type.
4. The candidate is kept only if ``head(features(x)) == model(x)`` on the probe; the next
   one is tried otherwise, and a :class:`SplitError` names every call tried when none
   reproduces the model.

Limits: the forward must make the same torch calls for every input of one size (no
control flow on values), and the head may use no input-dependent tensor but the split
one (the verification catches a head that does).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from undiscard.errors import SplitError
from undiscard.sites.calls import BINDERS, is_site_call
from undiscard.sites.sitemap import SiteMap

__all__ = ["AutoSplit", "first_logits", "with_logits"]

_PROBE = 2  # probe batch: an axis of this length in a recorded shape is the batch axis
_TRIES = 8  # candidates tried before giving up


def first_logits(out: Any) -> torch.Tensor | None:
    """The logits in a model's output: the tensor itself, ``.logits``, ``["logits"]``/``["out"]`` or the first item.

    Shape:
        - out: a tensor of any shape, or a structure holding one.
        - output: that tensor, unchanged (``None`` when there is none).
    """
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    if isinstance(out, dict):
        for key in ("logits", "out"):
            if isinstance(out.get(key), torch.Tensor):
                return out[key]
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    return None


def with_logits(template: Any, logits: torch.Tensor) -> Any:
    """``logits`` in the output type of ``template`` (one output of the model): a tensor
    as is; a transformers ``ModelOutput`` / dataclass with ``logits`` as that type with
    only ``logits`` set; a dict under its logits key; a tuple or list as its first item.
    The other fields of the model's output (hidden states, loss) belong to one forward and
    have no aggregate: they are left out.

    Shape:
        - template: one output of the model (its logits ``(N, K)``, any batch ``N``).
        - logits: ``(M, K)``; the output holds them unchanged.
    """
    if isinstance(template, torch.Tensor) or template is None:
        return logits
    if isinstance(getattr(template, "logits", None), torch.Tensor):
        try:
            return type(template)(logits=logits)
        except TypeError:
            pass
    if isinstance(template, dict):
        key = next(k for k in ("logits", "out") if isinstance(template.get(k), torch.Tensor))
        return type(template)({key: logits}) if type(template) is not dict else {key: logits}
    if isinstance(template, (tuple, list)):
        return type(template)([logits])
    return logits


@dataclass
class _Call:
    """One recorded call: whether it depends on the input, and its outputs' structure."""

    from_input: bool
    leaves: list[tuple[tuple[int, ...], torch.dtype] | None]  # per output leaf: (shape, dtype) of a tensor
    spec: Any


@dataclass
class _Plan:
    """Where one input size is split: output leaf ``leaf`` of call ``index`` is the final map."""

    index: int
    leaf: int
    name: str
    calls: list[_Call] = field(default_factory=list)
    input_shape: tuple[int, ...] = ()
    template: Any = None


class _Stop(Exception):
    def __init__(self, value: torch.Tensor) -> None:
        super().__init__()
        self.value = value


class _Record(TorchFunctionMode):
    def __init__(self, x: torch.Tensor, spatial_rank: int) -> None:
        super().__init__()
        self.derived: dict[int, Any] = {id(x): x}  # id -> tensor (kept alive for the id to stay unique)
        self.producer: dict[int, tuple[int, int]] = {}  # id -> (call index, output leaf index)
        self.calls: list[_Call] = []
        self.args: list[list[tuple[int, tuple[int, ...], tuple[int, int] | None]]] = []  # (position, shape, producer)
        self.outs: list[list[tuple[int, ...]]] = []  # input-derived output shapes
        self.names: list[str] = []
        self.last_site = -1
        self.spatial_rank = spatial_rank

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        flat, _ = tree_flatten((args, kwargs))
        arg_info = [(p, tuple(a.shape), self.producer.get(id(a))) for p, a in enumerate(flat)
                    if isinstance(a, torch.Tensor) and self.derived.get(id(a)) is a]
        from_input = bool(arg_info)
        binder = BINDERS.get(func)
        if from_input and binder is not None and is_site_call(binder(func, args, kwargs), self.spatial_rank):
            self.last_site = len(self.calls)
        leaves, spec = tree_flatten(out)
        out_shapes = []
        for k, t in enumerate(leaves):
            if isinstance(t, torch.Tensor) and from_input:
                self.derived[id(t)] = t
                self.producer[id(t)] = (len(self.calls), k)  # the last call to write it (in-place ops)
                out_shapes.append(tuple(t.shape))
        self.calls.append(_Call(from_input, [(tuple(t.shape), t.dtype) if isinstance(t, torch.Tensor) else None
                                             for t in leaves], spec))
        self.args.append(arg_info)
        self.outs.append(out_shapes)
        self.names.append(getattr(func, "__name__", str(func)))
        return out


class _Features(TorchFunctionMode):
    """Run through call ``index``; stop there with its output leaf ``leaf``."""

    def __init__(self, plan: _Plan) -> None:
        super().__init__()
        self.plan, self.i = plan, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.i == self.plan.index:
            raise _Stop(tree_flatten(out)[0][self.plan.leaf])
        self.i += 1
        return out


class _Head(TorchFunctionMode):
    """Replay the forward on placeholders; ``f`` is the split call's output; run the rest."""

    def __init__(self, plan: _Plan, f: torch.Tensor) -> None:
        super().__init__()
        self.plan, self.f, self.i = plan, f, 0
        self.zero = torch.zeros((), device=f.device)

    def _stub(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        n = self.f.shape[0]
        shape = tuple(n if (a == 0 and s == _PROBE) else s for a, s in enumerate(shape))
        return self.zero.to(dtype).expand(shape)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        i = self.i
        self.i += 1
        if i <= self.plan.index:
            call = self.plan.calls[i]
            if call.from_input and call.leaves and all(leaf is not None for leaf in call.leaves):
                leaves = [self._stub(*leaf) for leaf in call.leaves]
                if i == self.plan.index:
                    leaves[self.plan.leaf] = self.f
                return tree_unflatten(leaves, call.spec)
        return func(*args, **kwargs)


def _grid_layout(shape: tuple[int, ...], grid: tuple[int, ...]) -> str | None:
    """``"NCHW"``, ``"NHWC"`` or ``"tokens"`` if a tensor of ``shape`` carries the final grid."""
    nd = len(grid)

    def near(g: tuple[int, ...]) -> bool:
        return all(abs(a - b) <= 2 and a >= 1 for a, b in zip(g, grid)) and not (
            all(a == 1 for a in g) and not all(b == 1 for b in grid))

    if len(shape) == nd + 2:
        if near(shape[2:]):
            return "NCHW"
        if near(shape[1:-1]):
            return "NHWC"
    cells = 1
    for g in grid:
        cells *= g
    if nd > 1 and len(shape) == 3 and cells <= shape[1] <= cells + 16:
        return "tokens"
    return None


class AutoSplit:
    """``features`` / ``head`` of ``model`` found by watching its forward (module docstring)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.plans: dict[tuple[int, ...], _Plan] = {}
        self.current: _Plan | None = None
        self.layout = "NCHW"

    def prepare(self, x: torch.Tensor, sites: SiteMap) -> str:
        """Find and verify the split for ``x``'s input size; its features' layout."""
        key = tuple(x.shape[1:])
        if key in self.plans:
            self.current = self.plans[key]
            return self.layout
        probe = x[:_PROBE] if x.shape[0] >= _PROBE else x[:1].expand(_PROBE, *x.shape[1:]).clone()
        rec = _Record(probe, len(sites.stride_total))
        with torch.no_grad(), rec:
            ref = self.model(probe)
        main = [s for s in sites.sites if s.main]
        grid = tuple(main[-1].out_grid) if main else tuple(x.shape[2:])
        candidates: list[tuple[int, int, str]] = []
        for i in range(len(rec.calls) - 1, rec.last_site, -1):
            outs_grid = any(_grid_layout(s, grid) for s in rec.outs[i])
            for _, shape, producer in rec.args[i]:
                layout = _grid_layout(shape, grid)
                if layout and not outs_grid and producer is not None and producer[0] >= rec.last_site \
                        and all(c[:2] != producer for c in candidates):
                    candidates.append((*producer, layout))
                    break
        tried = []
        want = first_logits(ref)
        for i, leaf, layout in candidates[:_TRIES]:
            plan = _Plan(i, leaf, f"the output of call {i} ({rec.names[i]})", rec.calls, key, ref)
            self.current = plan
            try:
                with torch.no_grad():
                    got = first_logits(self._head(self._features(probe)))
            except Exception as e:  # noqa: BLE001 - a failing candidate is reported below
                tried.append(f"{plan.name}: {type(e).__name__}")
                continue
            if isinstance(got, torch.Tensor) and want is not None and got.shape == want.shape and bool(
                    torch.allclose(got, want, rtol=1e-5, atol=1e-6 * max(1.0, float(want.abs().max())))):
                self.plans[key] = plan
                self.layout = layout
                return layout
            tried.append(f"{plan.name}: head(features(x)) != model(x)")
        self.current = None
        raise SplitError(
            f"cannot split {type(self.model).__name__} into features and head automatically: "
            + (f"tried the calls after its last subsampling site that turn the final {'x'.join(map(str, grid))} "
               f"map into something else ({'; '.join(tried)})" if tried else
               f"no call after its last subsampling site turns the final {'x'.join(map(str, grid))} map into "
               f"something else")
            + ". Pass split=(features_fn, head_fn) with head_fn(features_fn(x)) == model(x)."
        )

    def _plan_for(self, shape: tuple[int, ...]) -> _Plan:
        plan = self.plans.get(shape) or self.current
        if plan is None:
            raise SplitError("the automatic split is found per input size: call the wrapper on a batch first")
        return plan

    def _features(self, x: torch.Tensor) -> torch.Tensor:
        mode = _Features(self.current)
        try:
            with mode:
                self.model(x)
        except _Stop as stop:
            return stop.value
        raise SplitError("the forward ended before its split call: its control flow depends on the input values")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self.current = self._plan_for(tuple(x.shape[1:]))
        return self._features(x)

    def _head(self, f: torch.Tensor) -> Any:
        plan = self.current
        stub = torch.zeros((), dtype=f.dtype, device=f.device).expand(f.shape[0], *plan.input_shape)
        with _Head(plan, f):
            return self.model(stub)

    def head(self, f: torch.Tensor) -> torch.Tensor:
        return first_logits(self._head(f))

    @property
    def template(self) -> Any:
        return self.current.template if self.current is not None else None
