"""The shared-prefix engine on a captured graph: plain code between the searchable sites
(docs/method.md, "Captured segments").

The shared-prefix engine (:mod:`~undiscard.run.trie`) watches every torch call of a
forward through a ``TorchFunctionMode``: it needs to find the subsampling calls and to
check that no tensor crosses a searchable site. Both are facts about the network and the
input size, not about one batch, so they can be established once:

1. **Capture** (once per model, forward, input size, searchable sites, device and dtype):
   trace the forward with ``torch.fx`` (timm's untraceable helpers and modules kept as
   leaves when timm is loaded), run the traced graph once node by node on a probe image
   and attribute every subsampling call to the graph node that makes it, in the order
   :func:`~undiscard.sites.discover.find_sites` recorded them.
2. **Levels**: the input has level -1, the node of searchable site ``j`` level ``j``, every
   other node the level of its inputs. A node whose inputs have two levels (a tensor
   carried across a site, a batch size read before a site and used after it), a site node
   whose input is not at the level before it, or an output not at the last level, and
   the capture is refused.
3. **Rewrite**: each searchable site's node becomes a call to one function that, during a
   pass of the engine, expands the rows of its input into the prefixes of the next level
   and runs the op at each row's offset (the same step as the interception engine); out
   of a pass it runs the op as recorded.
4. **Verify**: on a probe image the captured graph must give the interception engine's
   outputs for several states (every site at each of its corner offsets).

A pass then runs the rewritten graph: ordinary module code, the site function at the
searchable sites only. The graph can be ``torch.compile``'d: the site function is kept
out of the compiled graphs, which become the segments between the sites (one compiled
graph per segment), and a batch that changes size at every site is one dynamic shape.

Where capture is refused (data-dependent control flow, a searchable site inside a module
fx cannot trace, a tensor crossing a site), the interception engine runs instead, with the
same results, and one :class:`CaptureWarning` says why.
"""

from __future__ import annotations

import sys
import threading
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from undiscard.errors import UndiscardError
from undiscard.run.levels import LEVEL_TAG
from undiscard.sites.calls import BINDERS, is_site_call
from undiscard.sites.ops import shift_at_offset
from undiscard.sites.sitemap import SiteMap

__all__ = ["CaptureWarning", "Captured", "capture", "captured_for"]


class CaptureWarning(UserWarning):
    """The forward could not be captured as a graph; the interception engine runs instead (same results)."""


class _Refused(Exception):
    pass


_CURRENT = threading.local()  # the pass in progress (None: the graph runs as the plain model)


class _AtOffset(TorchFunctionMode):
    """Run one op with its first subsampling call at ``offset``; every other call as is."""

    def __init__(self, offset: tuple[int, ...], rank: int) -> None:
        super().__init__()
        self.offset, self.rank, self.done = offset, rank, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self.done:
            binder = BINDERS.get(func)
            if binder is not None:
                call = binder(func, args, kwargs)
                if is_site_call(call, self.rank):
                    self.done = True
                    return call.at_offset(self.offset)
        return func(*args, **kwargs)


@torch._dynamo.disable
def _site(site_index: int, level: int, rank: int, dims: tuple[int, ...] | None, op: Callable, x: torch.Tensor,
          *args, **kwargs):
    """A searchable site's op in the captured graph (see the module docstring, step 3); ``dims``: the
    spatial axes of a space-to-depth module, whose input is shifted (None: a strided call)."""
    pass_ = getattr(_CURRENT, "pass_", None)
    if pass_ is None:
        return op(x, *args, **kwargs)
    setattr(x, LEVEL_TAG, level - 1)

    def at(xs: torch.Tensor, offset: tuple[int, ...]) -> torch.Tensor:
        if dims is not None:
            return op(shift_at_offset(xs, dims, offset), *args, **kwargs)
        with _AtOffset(offset, rank):
            return op(xs, *args, **kwargs)

    return pass_.site(x, site_index, at)


def _timm_leaves() -> tuple[tuple[type, ...], tuple[Callable, ...]]:
    """timm's modules and functions that fx cannot trace (only when timm is already imported)."""
    if "timm" not in sys.modules:
        return (), ()
    try:
        from timm.layers import _fx as tfx

        return tuple(tfx._leaf_modules), tuple(tfx._autowrap_functions)
    except (ImportError, AttributeError):
        return (), ()


class _Tracer(fx.Tracer):
    def __init__(self, keep: set[str]) -> None:
        leaves, funcs = _timm_leaves()
        super().__init__(autowrap_functions=funcs)
        self.leaves, self.keep = leaves, keep

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return qualname in self.keep or isinstance(m, self.leaves) or super().is_leaf_module(m, qualname)


class _Forward(nn.Module):
    """A module whose forward is ``getattr(model, name)`` (``forward_features``, ``forward``)."""

    def __init__(self, model: nn.Module, name: str) -> None:
        super().__init__()
        self.m, self.name = model, name

    def forward(self, x):
        return getattr(self.m, self.name)(x)


class _Attribute(fx.Interpreter):
    """Run a graph node by node and attribute each subsampling call to its node."""

    def __init__(self, gm: fx.GraphModule, rank: int) -> None:
        super().__init__(gm)
        self.rank = rank
        self.calls: dict[fx.Node, list[tuple[Any, int]]] = {}  # node -> [(call, order of the call)]
        self.count = 0
        self.node: fx.Node | None = None
        self.first_arg: dict[fx.Node, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        self.node = n
        if n.args and isinstance(n.args[0], fx.Node):
            self.first_arg[n] = self.env.get(n.args[0])
        return super().run_node(n)


class _Watch(TorchFunctionMode):
    def __init__(self, interp: _Attribute) -> None:
        super().__init__()
        self.i = interp

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        binder = BINDERS.get(func)
        if binder is not None:
            call = binder(func, args, kwargs)
            if is_site_call(call, self.i.rank):
                self.i.calls.setdefault(self.i.node, []).append((call, self.i.count))
                self.i.count += 1
        return func(*args, **kwargs)


@dataclass
class Captured:
    """A forward traced and rewritten for the engine (module docstring); ``run(x)`` is the forward."""

    graph: fx.GraphModule
    compiled: Any = None

    def run(self, x: torch.Tensor, pass_: Any) -> Any:
        prev = getattr(_CURRENT, "pass_", None)
        _CURRENT.pass_ = pass_
        try:
            return self.compiled(x) if self.compiled is not None else self.graph.forward(x)
        finally:
            _CURRENT.pass_ = prev

    def compile(self, backend: str = "inductor", **kwargs: Any) -> Captured:
        """``torch.compile`` the graph (the segments between the sites; dynamic batch sizes)."""
        self.compiled = torch.compile(self.graph, backend=backend, dynamic=True, **kwargs)
        return self


def _root(model: nn.Module, forward: Callable | None) -> nn.Module:
    if forward is None or forward is model:
        return _Forward(model, "forward")
    owner = getattr(forward, "__self__", None)
    name = getattr(forward, "__name__", None)
    if owner is model and isinstance(name, str):
        return _Forward(model, name)
    raise _Refused("the forward to run is not a method of the model (an automatic features / head split)")


def _build(model: nn.Module, forward: Callable | None, sites: SiteMap, x: torch.Tensor) -> Captured:
    root = _root(model, forward)
    # space-to-depth modules that are searchable sites stay whole: their input is shifted
    s2d = {f"m.{path}" if path else "m": (si, tuple(dims)) for path, si, dims in sites.module_sites
           if si in sites.searchable}
    try:
        tracer = _Tracer(set(s2d))
        graph = tracer.trace(root)
    except Exception as e:  # noqa: BLE001 - any tracing failure refuses the capture
        raise _Refused(f"torch.fx cannot trace the forward ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    gm = fx.GraphModule(tracer.root, graph)
    rank = len(sites.input_shape) - 2
    interp = _Attribute(gm, rank)
    try:
        with torch.no_grad(), _Watch(interp):
            interp.run(x)
    except Exception as e:  # noqa: BLE001
        raise _Refused(f"the traced graph does not run ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None
    if interp.count != len(sites.calls):
        raise _Refused(f"the traced graph makes {interp.count} subsampling calls, the model {len(sites.calls)}")
    level_of_site = {si: j for j, si in enumerate(sites.searchable)}
    site_nodes: dict[fx.Node, int] = {}  # node -> searchable site index
    for node, calls in interp.calls.items():
        idx = [sites.calls[k][2] for _, k in calls]
        searched = [si for si in idx if si in level_of_site]
        if not searched:
            continue
        if len(calls) != 1 or interp.first_arg.get(node) is not calls[0][0].x or node.op not in (
                "call_module", "call_function", "call_method"):
            raise _Refused(f"a searchable site's op is inside graph node {node.name!r} with other ops (a module "
                           "fx keeps whole)")
        site_nodes[node] = searched[0]
    for node in graph.nodes:
        if node.op == "call_module" and node.target in s2d:
            if node in site_nodes or not node.args or not isinstance(node.args[0], fx.Node):
                raise _Refused(f"space-to-depth site {node.target!r} is not one module call on one tensor")
            site_nodes[node] = s2d[node.target][0]
    found = sorted(set(site_nodes.values()))
    if found != sorted(level_of_site):
        raise _Refused("not every searchable site was found in the traced graph")
    # levels (module docstring, step 2)
    level: dict[fx.Node, int | None] = {}
    for node in graph.nodes:
        if node.op == "placeholder":
            level[node] = -1
            continue
        ins = {level[a] for a in node.all_input_nodes} - {None}
        if node in site_nodes:
            j = level_of_site[site_nodes[node]]
            first = node.args[0]
            rest = {level[a] for a in node.all_input_nodes if a is not first} - {None}
            if level[first] != j - 1 or rest:
                raise _Refused(f"the input of searchable site {site_nodes[node]} ({node.name}) is not at the level "
                               "before it")
            level[node] = j
        elif len(ins) > 1:
            raise _Refused(f"graph node {node.name!r} combines tensors from both sides of a searchable site")
        else:
            level[node] = ins.pop() if ins else None
        if node.op == "output" and level[node] != len(sites.searchable) - 1:
            raise _Refused("the output does not come after the last searchable site")
    # rewrite (step 3); the ops are reached through attributes of the graph module
    n_ops = 0
    for node, si in site_nodes.items():
        j = level_of_site[si]
        dims = s2d[node.target][1] if node.op == "call_module" and node.target in s2d else None
        with graph.inserting_before(node):
            if node.op == "call_module":
                op_node = graph.get_attr(node.target)
            else:
                name = f"_undiscard_site_op{n_ops}"
                n_ops += 1
                gm.add_submodule(name, _Fn(node.target if node.op == "call_function" else _method(node.target)))
                op_node = graph.get_attr(name)
        with graph.inserting_after(node):
            new = graph.call_function(_site, (si, j, rank, dims, op_node, *node.args), dict(node.kwargs))
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    graph.lint()
    gm.recompile()
    return Captured(gm)


class _Fn(nn.Module):
    """A function as a submodule of the graph module (so that the graph can name it)."""

    def __init__(self, fn: Callable) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


def _method(name: str) -> Callable:
    def call(x, *args, **kwargs):
        return getattr(x, name)(*args, **kwargs)

    return call


_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> {key: Captured | reason}


def capture(model: nn.Module, forward: Callable | None, sites: SiteMap, x: torch.Tensor,
            reference: Callable | None = None) -> Captured:
    """Capture ``forward`` (default ``model``) for ``sites`` at ``x``'s size (module docstring).

    ``reference(model, x, images, states, sites, forward=, captured=)``: the engine's pass (the
    shared-prefix engine hands its own in); when given, the capture is checked against the
    intercepting pass on a probe (step 4 of the module docstring) and refused if they differ.
    Raises :class:`UndiscardError` with the reason when the capture is refused.

    Shape:
        - x: ``(N, C, *spatial)``, a probe batch at the size the engine will run (one image is used).
    """
    probe = x[:1].detach()
    try:
        cap = _build(model, forward, sites, probe)
        if reference is not None:
            _verify(reference, model, forward, sites, probe, cap)
    except _Refused as e:
        raise UndiscardError(str(e)) from None
    return cap


def _verify(run: Callable, model, forward, sites: SiteMap, x: torch.Tensor, cap: Captured) -> None:
    L = len(sites.searchable)
    states = [[0] * L]
    for j, si in enumerate(sites.searchable):
        n = sites.sites[si].num_offsets
        for k in (1, n - 1):
            if 0 < k < n:
                s = [0] * L
                s[j] = k
                states.append(s)
    st = torch.tensor(states, dtype=torch.long)
    images = torch.zeros(len(states), dtype=torch.long)
    with torch.no_grad():
        ref = run(model, x, images, st, sites, forward=forward, captured=None)
        got = run(model, x, images, st, sites, forward=forward, captured=cap)
    if ref is None:
        raise _Refused("a tensor crosses a searchable site")
    if got is None or not isinstance(got.outputs, torch.Tensor) or got.outputs.shape != ref.outputs.shape:
        raise _Refused("the captured graph's outputs differ in shape from the model's")
    a, b = got.outputs.double(), ref.outputs.double()
    scale = float(b.abs().max()) if b.numel() else 1.0
    # the same ops on the same rows in the same order: they can differ only where a kernel picks
    # another algorithm (another memory layout of an intermediate), by at most one rounding per op
    n_ops = sum(n.op in ("call_function", "call_method", "call_module") for n in cap.graph.graph.nodes)
    tol = n_ops * torch.finfo(ref.outputs.dtype).eps * max(scale, 1.0)
    if not torch.allclose(a, b, rtol=0, atol=tol):
        raise _Refused(f"the captured graph's outputs differ from the model's by {float((a - b).abs().max()):.3g}")


def captured_for(model: nn.Module, forward: Callable | None, sites: SiteMap, x: torch.Tensor,
                 compile: str | bool | None = None, reference: Callable | None = None) -> Captured | None:
    """The capture for this model, forward, input size, sites, device and dtype (made once and kept
    with the model); None, with one :class:`CaptureWarning` per key, when it is refused.

    Shape:
        - x: ``(N, C, *spatial)``, the batch the engine runs.
    """
    fname = getattr(forward, "__name__", None) if forward is not None else "forward"
    p = next(model.parameters(), None)
    key = (fname, tuple(x.shape[1:]), sites.searchable, len(sites.calls), x.device, x.dtype,
           None if p is None else (p.device, p.dtype), torch.is_autocast_enabled(x.device.type),
           compile if compile not in (None, False) else None)
    per = _CACHE.setdefault(model, {})
    if key not in per:
        try:
            cap = capture(model, forward, sites, x, reference)
            if compile not in (None, False):
                cap.compile("inductor" if compile is True else str(compile))
            per[key] = cap
        except UndiscardError as e:
            per[key] = str(e)
            warnings.warn(f"the forward of {type(model).__name__} cannot be captured as a graph ({e}); the "
                          "interception engine runs instead (same results)", CaptureWarning, stacklevel=3)
    got = per[key]
    return got if isinstance(got, Captured) else None
