"""``undiscard eval``: accuracy, calibration and cost of the method vs the plain model.

For each criterion the search runs once per batch at the largest budget; because every
image's search is deterministic and a smaller budget's states are the first states of a
larger one's (:func:`undiscard.method.search.greedy_search`), the results at every smaller
budget are read off the same run. Costs are measured separately, side by side in the
same process: on ``timing_images`` images, the plain forward and the full method at each
budget (search + aggregation, nothing shared), median of ``repeats``.

Distributed: under ``torchrun --nproc-per-node N -m undiscard eval ...`` (``WORLD_SIZE`` >
1 in the environment) batch ``i`` of the single-process run goes to rank ``i mod N``; the
batch boundaries, and so every image's search, are those of one process. Each rank keeps
per-image confidence / correctness / NLL tagged with the image's index; rank 0 gathers
them, puts them back in image order and summarises them exactly as one process would, so
the numbers are identical (given the same ``--threads``). The cost is measured on rank 0
alone after the shards finished; only rank 0 prints and writes.

Resuming: with an output path each shard's state is saved atomically after every batch
(``OUT.partial.safetensors`` for one process, ``OUT.shard{r}of{N}.partial.safetensors`` for
rank ``r`` of ``N``: per-image records as tensors, the rest as JSON metadata, nothing that
is unpickled, :mod:`undiscard.statefile`); rerunning the same command resumes every shard
where it stopped. Saved state from other arguments or another number of processes is
refused (``fresh=True`` / ``--fresh`` deletes it and starts over); the shard files are
deleted once the JSON is written. A completed ``OUT`` is not recomputed: rerun with the
same arguments, its saved results are returned as they are (nothing is written); other
arguments are refused unless ``--fresh``, which deletes it first. The ``.partial.pt``
pickles of older versions are never loaded: refused, ``--fresh`` deletes them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from undiscard.method.aggregate import entropy
from undiscard.evaluation.runio import PeakMemory, config_diff, median_time, progress
from undiscard.statefile import write_text_atomic
from undiscard.evaluation.report import table
from undiscard.errors import UndiscardError

__all__ = ["EvalConfig", "RESULT_COLUMNS", "calibration_error", "results_rows", "run_eval", "write_results_file"]


@dataclass
class EvalConfig:
    model: str
    data: str = "fashion-mnist"
    budgets: list[int] = field(default_factory=lambda: [1, 2, 4, 8, 16])
    criteria: list[str] = field(default_factory=lambda: ["entropy"])
    aggregates: list[str] = field(default_factory=lambda: ["mean", "entropy"])
    aggregator: str | None = None
    searchable: Any = "inner"
    align: bool = True
    fill: str = "zeros"
    limit: int | None = None
    start: int = 0
    batch_size: int = 128
    max_batch: int = 64
    engine: str = "trie"
    width: int | None = 1
    seed: int = 0
    timing_images: int = 32
    repeats: int = 3
    single_states: bool = False
    threads: int = 0
    skip_corrupt: bool = False  # a folder's unreadable images are left out (with a warning) instead of an error
    pretrained: bool = False  # timm / torchvision models: download their pretrained weights
    device: str = "cpu"  # where the model and the batches run (cpu, cuda, cuda:1, ...)
    amp: bool = False  # autocast the plain model and the method (the search's entropies stay float32)
    amp_dtype: str | None = None  # float16 or bfloat16; None: bfloat16 on CPU, float16 on CUDA
    channels_last: bool = False  # model and batches in channels_last memory format
    torchcompile: str | None = None  # torch.compile backend for the plain model (and, engine segments, its graph)
    retry: bool = False  # on out-of-memory, halve the images per forward and go on; not part of the saved config
    trust_pickle: bool = False  # allow a whole-module .pt model (unpickling runs code); not part of the saved config


#: EvalConfig fields that do not change any number: not compared when resuming or reusing a result.
#: (``retry`` splits a batch into smaller forwards: every image's search stays the same.)
_NOT_CONFIG = ("trust_pickle", "retry")
#: Fields added after results were first written: a completed JSON without them had these values.
_ADDED_DEFAULTS = {"skip_corrupt": False, "pretrained": False, "device": "cpu", "amp": False, "amp_dtype": None, "channels_last": False,
                   "torchcompile": None}
_FIELDS = ("conf", "correct", "correct5", "nll")


def saved_config(cfg) -> dict:
    """``cfg``'s fields as they are saved (JSON values) and compared on a rerun."""
    return json.loads(json.dumps({k: v for k, v in cfg.__dict__.items() if k not in _NOT_CONFIG}))


def calibration_error(conf: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error with ``bins`` equal-width confidence bins.

    ``sum over bins of (share of the images in the bin) * |mean confidence - accuracy|``, a
    fraction in ``[0, 1]`` (NaN for no image); bin ``b`` holds the confidences in
    ``(b / bins, (b + 1) / bins]``.

    Shape:
        - conf: ``(N,)`` confidences in ``[0, 1]`` (e.g. the top softmax probability).
        - correct: ``(N,)`` bool or 0/1.
        - output: a Python float.

    Example:
        >>> round(calibration_error(torch.tensor([0.9, 0.9]), torch.tensor([True, False])), 6)
        0.4
    """
    if conf.numel() == 0:
        return float("nan")
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    conf, correct = conf.double(), correct.double()
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        m = (conf > lo) & (conf <= hi)
        if m.any():
            ece += float(m.double().mean() * (conf[m].mean() - correct[m].mean()).abs())
    return ece


class _Acc:
    """Per-image confidence / correctness (top-1, top-5) / NLL of one configuration."""

    def __init__(self, d: dict | None = None) -> None:
        d = d or {}
        self.conf: list[float] = d.get("conf", [])
        self.correct: list[int] = d.get("correct", [])
        self.correct5: list[int] = d.get("correct5", [])
        self.nll: list[float] = d.get("nll", [])

    def add(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        logp = torch.log_softmax(logits.detach().double().cpu(), -1)
        conf, pred = logp.exp().max(-1)
        self.conf += conf.tolist()
        self.correct += (pred == y).long().tolist()
        # top-5 as timm counts it: the label among the k = min(5, classes) largest logits
        # (ties broken by torch.topk); with fewer than 5 classes it is top-k
        top = logp.topk(min(5, logp.shape[-1]), dim=-1).indices
        self.correct5 += (top == y[:, None]).any(-1).long().tolist()
        self.nll += (-logp.gather(1, y[:, None]).squeeze(1)).tolist()

    def extend(self, other: "_Acc") -> None:
        for f in _FIELDS:
            getattr(self, f).extend(getattr(other, f))

    def state(self) -> dict:
        return {f: getattr(self, f) for f in _FIELDS}

    def summary(self) -> dict:
        n = len(self.correct)
        return {
            "n": n,
            "top1": 100.0 * sum(self.correct) / max(1, n),
            "top5": 100.0 * sum(self.correct5) / max(1, n),
            "nll": sum(self.nll) / max(1, n),
            "ece": 100.0 * calibration_error(torch.tensor(self.conf), torch.tensor(self.correct)),
        }


def load_data(spec: str, input_size: tuple[int, int, int], limit: int | None, start: int = 0, *,
              skip_corrupt: bool = False, log=None):
    """``fashion-mnist[:split]`` (default split test) or an ImageNet-style folder -> (x, y) tensors.

    A folder's images are decoded a batch at a time; one that cannot be decoded is an
    error naming it, unless ``skip_corrupt``: then the selected images are all decoded
    first and the unreadable ones left out, with a warning (``log``, default stderr)
    naming them; ``x.skipped`` lists them (``[path, reason]``).
    """
    from undiscard.data.classification import fashion_mnist_tensors, image_folder, unreadable_images

    name, _, split = spec.partition(":")
    if name in ("fashion-mnist", "fmnist"):
        split = split or "test"
        if split not in ("train", "val", "test"):
            raise UndiscardError(f"fashion-mnist split must be train, val or test; got {split!r}")
        if input_size[1] != input_size[2]:
            raise UndiscardError(f"Fashion-MNIST is square; the model's input size is {input_size}")
        x, y = fashion_mnist_tensors(split, input_size[1], input_size[0])
        end = None if limit is None else start + limit
        return x[start:end], y[start:end], f"fashion-mnist:{split}"
    path = Path(spec).expanduser()
    if path.is_dir():
        if input_size[0] == 1:  # grayscale models here are the Fashion-MNIST zoo: its normalisation
            from undiscard.data.classification import FASHION_MNIST_MEAN, FASHION_MNIST_STD

            ds = image_folder(path, input_size=input_size, mean=(FASHION_MNIST_MEAN,), std=(FASHION_MNIST_STD,))
        else:  # ImageNet mean / std, timm's eval transform
            ds = image_folder(path, input_size=input_size)
        stop = len(ds) if limit is None else min(len(ds), start + limit)
        idx = list(range(start, stop))
        skipped: list[list[str]] = []
        if skip_corrupt:
            bad = unreadable_images([ds.samples[i][0] for i in idx], "RGB" if input_size[0] == 3 else "L")
            if bad:
                drop = {p for p, _ in bad}
                idx = [i for i in idx if ds.samples[i][0] not in drop]
                skipped = [[p, why] for p, why in bad]
                warn = log or (lambda m: print(m, file=sys.stderr))
                warn(f"warning: --skip-corrupt: skipped {len(bad)} unreadable image{'s' if len(bad) > 1 else ''} in "
                     f"{path} (evaluating {len(idx)}): " + "; ".join(f"{p} ({why})" for p, why in bad))
        y = torch.tensor([ds.targets[i] for i in idx], dtype=torch.long)
        x = _LazyImages(ds, idx, input_size)
        x.skipped = skipped
        return x, y, str(path)
    raise UndiscardError(f"--data takes fashion-mnist[:train|val|test] or an image folder; got {spec!r}")


class _LazyImages:
    """Images of a folder dataset, decoded a slice at a time (ImageNet val does not fit in memory)."""

    def __init__(self, ds, indices: list[int], input_size: tuple[int, int, int]) -> None:
        self.ds, self.indices = ds, indices
        self.shape = (len(indices), *input_size)
        self.skipped: list[list[str]] = []  # [path, reason] of the images --skip-corrupt left out

    def __getitem__(self, sl: slice) -> torch.Tensor:
        if not isinstance(sl, slice):
            raise TypeError("index with a slice")  # internal: a caller bug
        return torch.stack([self.ds[i][0] for i in self.indices[sl]])


# ---------------------------------------------------------------- distributed

# A rank that resumed a finished shard waits in the final gather for the slowest shard:
# that can be hours on CPU, far past torch's 30-minute default. A crashed rank does not
# leave the others waiting this long: torchrun stops the whole group when one fails.
_GATHER_TIMEOUT = timedelta(days=7)


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    backend: str | None = None
    owned: bool = False  # this run initialised the process group: it destroys it

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
            self.owned = False


def _env_int(name: str) -> int:
    text = os.environ[name]
    try:
        return int(text)
    except ValueError:
        raise UndiscardError(f"environment variable {name} must be an integer; got {text!r}") from None


def _init_distributed() -> _Dist:
    """The process group torchrun describes in the environment (``WORLD_SIZE`` > 1), or one process.

    A group the caller already initialised is used as it is and left open. Backend: gloo,
    or ``cpu:gloo,cuda:nccl`` where CUDA is available (nccl for CUDA tensors; the object
    collectives used here stay on gloo, so several ranks may share one GPU).
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), str(dist.get_backend()), owned=False)
    if "WORLD_SIZE" not in os.environ:
        return _Dist()
    world = _env_int("WORLD_SIZE")
    if world < 1:
        raise UndiscardError(f"WORLD_SIZE must be at least 1; got {world}")
    if world == 1:
        return _Dist()
    launch = ("launch a distributed evaluation with `torchrun --nproc-per-node N -m undiscard eval ...` "
              "(or `python -m torch.distributed.run ...`), or unset WORLD_SIZE to run one process")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise UndiscardError(f"WORLD_SIZE={world} is set but {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not: {launch}")
    rank = _env_int("RANK")
    if not 0 <= rank < world:
        raise UndiscardError(f"RANK must be in 0..{world - 1} for WORLD_SIZE={world}; got {rank}: {launch}")
    if not dist.is_available():
        raise UndiscardError(f"WORLD_SIZE={world} asks for a distributed run, but this torch build has no torch.distributed")
    backend = "gloo"
    if torch.cuda.is_available():
        backend = "cpu:gloo,cuda:nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)) % torch.cuda.device_count())
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world, timeout=_GATHER_TIMEOUT)
    return _Dist(rank, world, backend, owned=True)


def _agree(d: _Dist, err: str | None) -> None:
    """Raise ``err`` -- or any other rank's -- on every rank, so that no rank waits for one that gave up."""
    if d.world > 1:
        import torch.distributed as dist

        errs: list[str | None] = [None] * d.world
        dist.all_gather_object(errs, err)
        err = next((e for e in errs if e), None)
    if err:
        raise UndiscardError(err)


# ---------------------------------------------------------------- saved state


#: What ``OUT.partial.safetensors`` holds (:func:`undiscard.statefile.save_state`): a shard's
#: per-image records; 3 = the first format that is not a pickle.
PARTIAL_KIND = "undiscard.eval-partial/4"  # 4: top-5 per image
_PARTIAL = ".partial.safetensors"
_LEGACY = ".partial.pt"  # the pickles of older versions: never loaded


def _partial_path(out: Path, rank: int, world: int) -> Path:
    return out.with_suffix(_PARTIAL) if world == 1 else out.with_suffix(f".shard{rank}of{world}{_PARTIAL}")


def _saved_partials(out: Path, legacy: bool = False) -> dict[Path, int]:
    """Saved partial states of ``out`` -> the number of processes of the run that saved each
    (``legacy``: the ``.partial.pt`` pickle files instead, which are refused, never loaded)."""
    ext = _LEGACY if legacy else _PARTIAL
    found: dict[Path, int] = {}
    single = out.with_suffix(ext)
    if single.exists():
        found[single] = 1
    if out.parent.is_dir():
        pat = re.compile(re.escape(out.with_suffix("").name) + r"\.shard(\d+)of(\d+)" + re.escape(ext))
        for f in sorted(out.parent.iterdir()):
            m = pat.fullmatch(f.name)
            if m:
                found[f] = int(m.group(2))
    return found


def _to_file(state: dict) -> dict:
    """A shard's state with its per-image lists as tensors (float64 / int64: exact)."""
    acc = {k: {"conf": torch.tensor(v["conf"], dtype=torch.float64),
               "correct": torch.tensor(v["correct"], dtype=torch.int64),
               "correct5": torch.tensor(v["correct5"], dtype=torch.int64),
               "nll": torch.tensor(v["nll"], dtype=torch.float64)} for k, v in state["acc"].items()}
    return {**state, "index": torch.tensor(state["index"], dtype=torch.int64), "acc": acc}


def _from_file(state: dict) -> dict:
    acc = {k: {f: v[f].tolist() for f in _FIELDS} for k, v in state["acc"].items()}
    return {**state, "index": state["index"].tolist(), "acc": acc}


def read_partial(path: str | os.PathLike) -> dict:
    """A saved shard state (``OUT.partial.safetensors``) as :func:`run_eval` resumes it; never unpickles."""
    from undiscard.statefile import load_state

    return _from_file(load_state(path, PARTIAL_KIND, what="partial evaluation",
                                 hint="add --fresh to delete it and start over"))


def _save_atomic(obj: Any, path: Path) -> None:
    """Write a shard's state (safetensors + JSON metadata, never a pickle): a ``.tmp`` file, then ``os.replace``."""
    from undiscard.statefile import save_state

    save_state(_to_file(obj), path, PARTIAL_KIND)


def completed_result(out: Path, config: dict, *, task: str = "classification", command: str = "undiscard eval",
                     defaults: dict | None = None) -> dict | None:
    """The results in a completed ``out`` written with ``config`` (``None`` when there is no ``out``).

    Raises :class:`UndiscardError` when ``out`` holds something else: results of other
    arguments (named), another task, or a file that is not such a result. Nothing is
    recomputed or overwritten without ``--fresh``. ``defaults``: the value of a setting
    that a result file does not record (e.g. ``skip_corrupt``: ``False``).
    """
    if not out.exists():
        return None
    fresh = "add --fresh to delete it and start over, or choose another --json"
    try:
        saved = json.loads(out.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UndiscardError(f"{out} exists and is not the JSON of a {command} result ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}); {fresh}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("config"), dict) or "rows" not in saved:
        raise UndiscardError(f"{out} exists and is not a {command} result; {fresh}")
    saved_task = saved.get("task", "classification")
    if saved_task != task:
        raise UndiscardError(f"{out} holds a completed {saved_task} evaluation, this is a {task} one; {fresh}")
    known = {**{k: v for k, v in (defaults or {}).items() if k in config}, **saved["config"]}
    if known != config:
        raise UndiscardError(f"{out}: completed evaluation with other arguments ({config_diff(saved['config'], config)}); "
                             f"it is not overwritten: rerun with the same arguments to see its results, or {fresh}")
    return saved


def _completed_on_rank0(out: Path, d: _Dist, config: dict) -> dict | None:
    """:func:`completed_result` as rank 0 sees it, on every rank (another node may not see rank 0's disk)."""
    err, saved = None, None
    if d.rank == 0:
        try:
            saved = completed_result(out, config, defaults=_ADDED_DEFAULTS)
        except UndiscardError as exc:
            err = str(exc)
    if d.world > 1:
        import torch.distributed as dist

        seen: list = [None] * d.world
        dist.all_gather_object(seen, (err, saved is not None))
        err, complete = seen[0]
        if d.rank != 0:
            saved = {} if complete else None  # only rank 0 returns the results
    if err:
        raise UndiscardError(err)
    return saved


def _load_shard_state(out: Path, d: _Dist, config: dict, batch_size: int, fresh: bool, log) -> dict:
    """This rank's saved state (or a new one); refuses state saved with other arguments, on every rank."""
    state: dict[str, Any] = {"version": 3, "config": config, "shard": [d.rank, d.world], "batches": 0, "done": 0,
                             "index": [], "acc": {}}
    if fresh:
        # Every rank deletes what it sees (a node may not share the others' disk), then all wait,
        # so that no rank's new state is deleted by another. A completed OUT goes too: starting
        # over means its results are replaced.
        for f in [*_saved_partials(out), *_saved_partials(out, legacy=True), *([out] if d.rank == 0 else [])]:
            try:
                f.unlink()
            except FileNotFoundError:  # another rank was first
                continue
            log(f"--fresh: deleted {f}")
        d.barrier()
    err = None
    saved = _saved_partials(out)
    legacy = sorted(str(f) for f in _saved_partials(out, legacy=True))
    other = sorted(str(f) for f, w in saved.items() if w != d.world)
    mine = _partial_path(out, d.rank, d.world)
    if legacy:
        err = (f"{', '.join(legacy)}: partial evaluation in a pickle format; it is not loaded "
               "(unpickling a file can run code) and cannot be resumed: add --fresh to delete it and start over")
    elif other:
        worlds = sorted({saved[Path(f)] for f in other})
        err = (f"{', '.join(other)}: partial evaluation saved by a run with {' / '.join(map(str, worlds))} process(es); "
               f"this run has {d.world}. Rerun with the same number of processes to resume it, or add --fresh "
               f"to delete it and start over")
    elif mine in saved:
        try:
            prev = read_partial(mine)
        except UndiscardError as exc:
            prev, err = None, str(exc)
        except Exception as exc:  # well-formed safetensors, but not the fields of a state
            prev, err = None, f"{mine}: unreadable partial evaluation ({exc!r}); add --fresh to delete it and start over"
        if prev is not None:
            if prev.get("config") != config:
                diff = config_diff(prev.get("config") or {}, config)
                err = (f"{mine}: partial evaluation saved with other arguments ({diff}); rerun with the same arguments "
                       f"to resume it, or add --fresh to delete it and start over")
            else:
                prev.setdefault("shard", [d.rank, d.world])
                state = prev
    _agree(d, err)
    return state


def _merge(parts: list[dict], n: int) -> dict[str, _Acc]:
    """The shards' per-image records put back in image order: the accumulators of one process."""
    index = [i for p in parts for i in p["index"]]
    if sorted(index) != list(range(n)):
        raise UndiscardError(f"internal error: the shards cover {len(index)} image records, "
                             f"{len(set(index))} distinct, not the {n} images 0..{n - 1}")
    order = sorted(range(len(index)), key=index.__getitem__)
    keys = list(dict.fromkeys(k for p in parts for k in p["acc"]))
    accs: dict[str, _Acc] = {}
    for k in keys:
        cols = {}
        for field_ in _FIELDS:
            flat = []
            for p in parts:
                if p["index"]:
                    if k not in p["acc"]:
                        raise UndiscardError(f"internal error: a shard has no results for {k!r}")
                    flat += p["acc"][k][field_]
            cols[field_] = [flat[j] for j in order]
        accs[k] = _Acc(cols)
    return accs


class _Silent:
    def update(self, k: int) -> None:
        pass

    def close(self) -> None:
        pass


# ---------------------------------------------------------------- device, precision, memory

AMP_DTYPES = ("float16", "bfloat16")


@dataclass
class _Runtime:
    """Where and how the forwards run: device, autocast dtype (None: off), memory format."""

    device: torch.device
    amp_dtype: torch.dtype | None = None
    channels_last: bool = False

    def batch(self, xb: torch.Tensor) -> torch.Tensor:
        xb = xb.to(self.device)
        if self.channels_last and xb.dim() == 4:
            xb = xb.contiguous(memory_format=torch.channels_last)
        return xb

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _runtime(cfg: EvalConfig) -> _Runtime:
    try:
        dev = torch.device(cfg.device)
    except (RuntimeError, TypeError, ValueError):
        raise UndiscardError(f"--device takes cpu, cuda or cuda:N; got {cfg.device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise UndiscardError(f"--device takes cpu, cuda or cuda:N; got {cfg.device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UndiscardError(f"--device {cfg.device}: this torch build or machine has no CUDA device "
                                 f"(torch {torch.__version__}); use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UndiscardError(f"--device {cfg.device}: there are {torch.cuda.device_count()} CUDA device(s)")
    amp = None
    if cfg.amp or cfg.amp_dtype is not None:
        name = cfg.amp_dtype or ("bfloat16" if dev.type == "cpu" else "float16")
        if name not in AMP_DTYPES:
            raise UndiscardError(f"--amp-dtype takes {' or '.join(AMP_DTYPES)}; got {name!r}")
        amp = getattr(torch, name)
    return _Runtime(dev, amp, cfg.channels_last)


def _prepare_model(model: torch.nn.Module, cfg: EvalConfig, rt: _Runtime) -> torch.nn.Module:
    """The model on the device, in channels_last, compiled, as ``cfg`` asks."""
    model = model.to(rt.device)
    if rt.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.torchcompile:
        try:
            model = torch.compile(model, backend=cfg.torchcompile)
        except Exception as exc:  # an unknown backend, no compiler: torch's own message
            raise UndiscardError(f"--torchcompile {cfg.torchcompile}: torch.compile failed ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    return model


_OOM_TEXT = ("out of memory", "can't allocate memory", "not enough memory")


def _is_oom(exc: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", None)
    return (oom is not None and isinstance(exc, oom)) or (
        isinstance(exc, RuntimeError) and any(t in str(exc).lower() for t in _OOM_TEXT))


# ---------------------------------------------------------------- the evaluation


def run_eval(cfg: EvalConfig, out_json: str | os.PathLike | None = None, log=print, *, fresh: bool = False) -> dict | None:
    """Run the evaluation described by ``cfg``; return (and write) the results dict.

    With ``out_json``, the state is saved after every batch and a rerun resumes it;
    ``fresh=True`` deletes saved state first. Under torchrun (``WORLD_SIZE`` > 1) the
    batches are sharded across the ranks: rank 0 returns the merged results (identical to
    one process's) and writes the file, every other rank returns ``None``.
    """
    d = _init_distributed()
    try:
        return _run_eval(cfg, Path(out_json) if out_json else None, log, fresh, d)
    finally:
        d.close()


def _single_states(sites) -> list[tuple[int, int, torch.Tensor]]:
    """``(site, offset index, state)`` for every single non-default offset at one main-path site."""
    full = sites.with_searchable("main")
    single = []
    for j, i in enumerate(full.searchable):
        for k in range(1, full.sites[i].num_offsets):
            st = full.zero_state()
            st[j] = k
            single.append((i, k, st))
    return single


def _count_shard(cfg: EvalConfig, model, x, y, sites, wrapped: dict, single: list, batches: list[int], state: dict,
                 accs: dict, out_path: Path | None, d: _Dist, shard_n: int, desc: str, rt: _Runtime, log) -> None:
    """Accumulate this rank's batches into ``accs`` (per configuration), saving ``state`` after each batch.

    A batch runs in forwards of ``per`` images (the whole batch unless ``cfg.retry`` halved
    it on an out-of-memory error, timm's ``--retry``): each image's search depends on the
    image alone, so splitting a batch changes no state, only how many rows one forward holds.
    """
    from undiscard.run.engine import use_states

    base = getattr(model, "_orig_mod", model)  # single states run through the interception: eager

    def count(xb: torch.Tensor, yb: torch.Tensor, part: dict) -> None:
        def acc(key: str) -> _Acc:
            return part.setdefault(key, _Acc())

        with rt.autocast():
            acc("plain").add(model(xb), yb)
            for c, w in wrapped.items():
                found = w.search(xb)
                for b in cfg.budgets:
                    for a in cfg.aggregates:
                        logits, _ = w.combine(found, b, a)
                        acc(f"{c}|{a}|{b}").add(logits, yb)
                    if b == 1 and "attention" in cfg.aggregates:
                        # control: the trained aggregator on the default state alone. What it
                        # gains here is a learned correction of the features, not recovered states.
                        a1, _ = w.aggregator(found.features[:, :1], found.cells[:, :1])
                        acc(f"{c}|attention-default-only|1").add(w.split.head(w._from_positions(a1, found.grid)), yb)
                    lg = found.logits[:, :b]
                    pick = (-entropy(lg)).argmax(1).to(lg.device)
                    acc(f"{c}|best-single|{b}").add(lg.gather(1, pick[:, None, None].expand(-1, 1, lg.shape[-1])).squeeze(1), yb)
            if single:
                full = sites.with_searchable("main")
                for i, k, st in single:
                    with use_states(base, full, st):
                        acc(f"single|{i}|{k}").add(base(xb), yb)

    bs = cfg.batch_size
    per = bs
    bar = progress(shard_n, desc) if d.rank == 0 else _Silent()
    bar.update(state["done"])
    with torch.no_grad(), contextlib.closing(bar):  # closed on an error too: its line ends
        for bi in batches[state["batches"]:]:
            s = bi * bs
            xb, yb = x[s : s + bs], y[s : s + bs]
            while True:
                part: dict[str, _Acc] = {}
                try:
                    for t in range(0, len(yb), per):
                        count(rt.batch(xb[t : t + per]), yb[t : t + per], part)
                    break
                except Exception as exc:
                    if not _is_oom(exc):
                        raise
                    del part
                    if rt.device.type == "cuda":
                        torch.cuda.empty_cache()
                    now = min(per, len(yb))
                    if not cfg.retry:
                        raise UndiscardError(f"out of memory with {now} images per forward ({type(exc).__name__}); "
                                             "add --retry to halve the images per forward and go on, or lower "
                                             "--batch-size / --max-batch") from None
                    if now == 1:
                        raise UndiscardError(f"out of memory with one image per forward ({type(exc).__name__}): "
                                             "lower --max-batch (image-states per forward) or the budget") from None
                    per = now // 2
                    log(f"out of memory with {now} images per forward; retrying with {per} (--retry)")
            for k, v in part.items():
                accs.setdefault(k, _Acc()).extend(v)
            state["batches"] += 1
            state["done"] += len(yb)
            state["index"] += range(s, s + len(yb))
            if out_path is not None:
                state["acc"] = {k: v.state() for k, v in accs.items()}
                _save_atomic(state, _partial_path(out_path, d.rank, d.world))
            bar.update(len(yb))


def _timing(cfg: EvalConfig, model, xt: torch.Tensor, common: dict, rt: _Runtime
            ) -> tuple[float, dict[str, float], dict[str, float | None]]:
    """Seconds per batch ``xt`` of the plain model and of every configuration, side by side in
    this process, and the peak memory (MB) of each (``"plain"`` and the configurations' keys)."""
    from undiscard.method.classify import wrap

    def measure(fn) -> tuple[float, float | None]:
        def run():
            fn()
            rt.sync()

        with PeakMemory(rt.device) as pm:
            t = median_time(run, cfg.repeats)
        return t, pm.mb

    timing: dict[str, float] = {}
    peaks: dict[str, float | None] = {}
    with torch.no_grad(), rt.autocast():
        t_plain, peaks["plain"] = measure(lambda: model(xt))
        for c in cfg.criteria:
            for b in cfg.budgets:
                for a in cfg.aggregates:
                    w = wrap(model, budget=b, criterion=c, aggregate=a, **common)
                    timing[f"{c}|{a}|{b}"], peaks[f"{c}|{a}|{b}"] = measure(lambda: w(xt))
    return t_plain, timing, peaks


def _rows(cfg: EvalConfig, accs: dict, sites, single: list, timing: dict, t_plain: float, nt: int,
          peaks: dict | None = None) -> tuple[list[dict], list[dict]]:
    """The result rows per configuration (accuracy, NLL, ECE, cost) and per single state."""
    rows = []
    for c in cfg.criteria:
        for a in cfg.aggregates + ["best-single", "attention-default-only"]:
            for b in cfg.budgets:
                if f"{c}|{a}|{b}" not in accs:
                    continue
                r = accs[f"{c}|{a}|{b}"].summary()
                t = timing.get(f"{c}|{a}|{b}")
                r.update(criterion=c, aggregate=a, budget=b,
                         ms_per_image=None if t is None else 1000 * t / nt,
                         time_ratio=None if t is None else t / t_plain,
                         peak_memory_mb=(peaks or {}).get(f"{c}|{a}|{b}"))
                rows.append(r)
    singles = []
    for i, k, _ in single:
        r = accs[f"single|{i}|{k}"].summary()
        site = sites.sites[i]
        r.update(site=i, site_name=site.name, offset=list(site.offset_of(k)), searchable=i in sites.searchable)
        singles.append(r)
    return rows, singles


def _run_eval(cfg: EvalConfig, out_path: Path | None, log, fresh: bool, d: _Dist) -> dict | None:
    from undiscard.method.classify import wrap
    from undiscard.models.classifiers import load_model

    if d.world > 1:
        log = (lambda log0: lambda m: log0(f"[rank {d.rank}/{d.world}] {m}"))(log)
        if d.rank == 0:
            log(f"{d.world} processes ({d.backend}): batch i of {cfg.batch_size} images on rank i mod {d.world}")
    config = saved_config(cfg)
    # saved state first: a refusal should not wait for the model and the data
    if out_path is not None:
        from undiscard.statefile import check_output_path

        check_output_path(out_path, "--json")
        if not fresh:
            done = _completed_on_rank0(out_path, d, config)
            if done is not None:
                log(f"{out_path} is complete (saved by a run with the same arguments): its results, nothing "
                    "recomputed; add --fresh to recompute them")
                return done if d.rank == 0 else None
        state = _load_shard_state(out_path, d, config, cfg.batch_size, fresh, log)
    else:
        state = {"batches": 0, "done": 0, "index": [], "acc": {}}
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rt = _runtime(cfg)
    loaded = load_model(cfg.model, pretrained=cfg.pretrained, trust_pickle=cfg.trust_pickle)
    params = sum(p.numel() for p in loaded.model.parameters())
    model = _prepare_model(loaded.model, cfg, rt)
    x, y, data_name = load_data(cfg.data, loaded.input_size, cfg.limit, cfg.start, skip_corrupt=cfg.skip_corrupt,
                                log=log)
    n = x.shape[0]
    if n == 0:
        raise UndiscardError(f"no images to evaluate in {cfg.data} (start {cfg.start}, limit {cfg.limit})")
    bmax = max(cfg.budgets)
    needs_agg = "attention" in cfg.aggregates or "learned" in cfg.criteria
    if needs_agg and not cfg.aggregator:
        raise UndiscardError("aggregate 'attention' and criterion 'learned' need --aggregator PATH (undiscard train-aggregator)")
    common = dict(searchable=cfg.searchable, align=cfg.align, fill=cfg.fill, max_batch=cfg.max_batch, seed=cfg.seed, width=cfg.width,
                  engine=cfg.engine,
                  aggregator=cfg.aggregator if needs_agg else None)
    if cfg.engine == "segments" and cfg.torchcompile:
        common["compile"] = cfg.torchcompile  # the captured graph, with the model's backend
    probe = wrap(model, budget=1, **common)
    sites = probe.sites_for(rt.batch(x[:1]))
    if bmax > sites.space_size:
        raise UndiscardError(
            f"budget {bmax} exceeds the search space of {sites.space_size} states "
            f"(searchable sites {list(sites.searchable)}); lower --budget or use --searchable main/all"
        )
    aggregator = probe.aggregator
    common["aggregator"] = aggregator

    # ---- this rank's shard: batch i (the batches of one process) on rank i mod world
    bs = cfg.batch_size
    batches = list(range(d.rank, -(-n // bs), d.world))
    shard_n = sum(min(bs, n - i * bs) for i in batches)
    if state["done"]:
        log(f"resuming at image {state['done']}/{shard_n}" + (f" of shard {d.rank}" if d.world > 1 else ""))
    accs: dict[str, _Acc] = {k: _Acc(v) for k, v in state["acc"].items()}

    wrapped = {c: wrap(model, budget=bmax, criterion=c, aggregate=cfg.aggregates[0], **common) for c in cfg.criteria}
    single = _single_states(sites) if cfg.single_states else []
    desc = f"eval {Path(loaded.spec).name}" + (f" (shard 0 of {d.world})" if d.world > 1 else "")
    _count_shard(cfg, model, x, y, sites, wrapped, single, batches, state, accs, out_path, d, shard_n, desc, rt, log)

    # ---- rank 0 merges every shard's per-image records, in image order
    shard = {"index": state["index"], "acc": {k: v.state() for k, v in accs.items()}}
    if d.world > 1:
        import torch.distributed as dist

        parts: list | None = [None] * d.world if d.rank == 0 else None
        dist.gather_object(shard, parts, dst=0)
        if d.rank != 0:
            return None
        log(f"gathered the {d.world} shards")
    else:
        parts = [shard]
    accs = _merge(parts, n)

    # ---- cost, side by side in this process (with several processes: rank 0 alone, the others done)
    log("timing ..." if d.world == 1 else f"timing on rank 0 only (the other {d.world - 1} rank(s) have finished) ...")
    xt = rt.batch(x[: cfg.timing_images])
    t_plain, timing, peaks = _timing(cfg, model, xt, common, rt)
    nt = xt.shape[0]
    plain = accs["plain"].summary()
    plain.update(ms_per_image=1000 * t_plain / nt, time_ratio=1.0, peak_memory_mb=peaks.get("plain"))
    rows, singles = _rows(cfg, accs, sites, single, timing, t_plain, nt, peaks)
    result = {
        "model": loaded.spec,
        "model_note": loaded.note,
        "data": data_name,
        "images": n,
        "start": cfg.start,
        "input_size": list(loaded.input_size),
        "param_count": round(params / 1e6, 2),
        "interpolation": _interpolation(data_name, loaded.input_size),
        "device": str(rt.device),
        "amp_dtype": None if rt.amp_dtype is None else str(rt.amp_dtype).removeprefix("torch."),
        "sites": {"searchable": list(sites.searchable), "space_size": sites.space_size,
                  "stride_total": list(sites.stride_total), "names": [s.name for s in sites.sites]},
        "config": config,
        "timing": {"images": nt, "repeats": cfg.repeats, "threads": torch.get_num_threads(),
                   "plain_ms_per_image": 1000 * t_plain / nt,
                   "peak_memory": ("CUDA memory allocated" if rt.device.type == "cuda" else
                                   "peak resident memory of the process (model and data included)"),
                   "measured_on": "one process" if d.world == 1 else f"rank 0 of {d.world}, alone after the shards finished"},
        "processes": d.world,
        "plain": plain,
        "rows": rows,
        "single_states": singles,
        "torch": torch.__version__,
    }
    if getattr(x, "skipped", None):
        result["skipped_corrupt"] = x.skipped
    if out_path is not None:
        write_text_atomic(json.dumps(result, indent=1) + "\n", out_path)
        # every shard's state (a rank on another node without a shared disk keeps its own: it is
        # complete, so a rerun of the same command reuses it and ends with the same numbers)
        for f, w in _saved_partials(out_path).items():
            if w == d.world:
                f.unlink(missing_ok=True)
                f.with_name(f.name + ".tmp").unlink(missing_ok=True)  # left by a rank killed mid-write
    return result


def _interpolation(data_name: str, input_size) -> str:
    """How the images were resized to the model's input (timm's ``interpolation`` column)."""
    if data_name.startswith("fashion-mnist"):
        return "none" if tuple(input_size[1:]) == (28, 28) else "bilinear"
    return "bicubic"  # the folder loader: timm's eval transform


#: The columns of ``--results-file``: timm ``validate.py``'s, then the method's.
RESULT_COLUMNS = ("model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size", "interpolation",
                  "budget", "criterion", "aggregate", "cost", "ms_per_img", "peak_memory_mb")


def results_rows(result: dict) -> list[dict]:
    """One row per predictor of an ``undiscard eval`` result (the plain model first), with
    :data:`RESULT_COLUMNS`: accuracies in percent rounded as timm rounds them (4 decimals),
    ``param_count`` in millions, ``cost`` the time in plain forwards (None where not timed)."""
    size = result["input_size"]
    head = {"model": result["model"], "param_count": result.get("param_count"),
            "img_size": size[-1], "interpolation": result.get("interpolation")}
    out = []
    plain = {**result["plain"], "criterion": "plain", "aggregate": "none", "budget": 1}
    for r in [plain, *result["rows"]]:
        top5 = r.get("top5")
        row = {**head, "top1": round(r["top1"], 4), "top1_err": round(100 - r["top1"], 4),
               "top5": None if top5 is None else round(top5, 4), "top5_err": None if top5 is None else round(100 - top5, 4),
               "budget": r["budget"], "criterion": r["criterion"], "aggregate": r["aggregate"],
               "cost": None if r.get("time_ratio") is None else round(r["time_ratio"], 4),
               "ms_per_img": None if r.get("ms_per_image") is None else round(r["ms_per_image"], 4),
               "peak_memory_mb": None if r.get("peak_memory_mb") is None else round(r["peak_memory_mb"], 1)}
        out.append({k: row[k] for k in RESULT_COLUMNS})
    return out


def write_results_file(result: dict, path: str | os.PathLike, fmt: str | None = None) -> Path:
    """Write :func:`results_rows` as CSV (a header, one line per row; empty cells for None) or
    JSON (a list of objects); ``fmt`` None: JSON for a ``.json`` path, CSV otherwise."""
    import csv
    import io

    path = Path(path)
    fmt = fmt or ("json" if path.suffix.lower() == ".json" else "csv")
    rows = results_rows(result)
    if fmt == "json":
        text = json.dumps(rows, indent=4) + "\n"
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
        text = buf.getvalue()
    else:
        raise UndiscardError(f"--results-format takes csv or json; got {fmt!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(text, path)
    return path


def format_table(result: dict) -> str:

    p = result["plain"]

    def top5(r: dict) -> str:
        return "-" if r.get("top5") is None else f"{r['top5']:.2f}"

    rows = [["plain", "-", 1, f"{p['top1']:.2f}", top5(p), f"{p['nll']:.4f}", f"{p['ece']:.2f}",
             f"{p['ms_per_image']:.2f}", "1.00"]]
    for r in result["rows"]:
        ms = "-" if r["ms_per_image"] is None else f"{r['ms_per_image']:.2f}"
        ratio = "-" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}"
        rows.append([r["criterion"], r["aggregate"], r["budget"], f"{r['top1']:.2f}", top5(r), f"{r['nll']:.4f}",
                     f"{r['ece']:.2f}", ms, ratio])
    head = (f"{result['model']} on {result['data']} ({result['images']} images); searchable sites "
            f"{result['sites']['searchable']} ({result['sites']['space_size']} states); timing on "
            f"{result['timing']['images']} images, median of {result['config']['repeats']}")
    if result.get("processes", 1) > 1:
        head += f"; accuracy from {result['processes']} processes, timing on rank 0 alone"
    if result.get("device", "cpu") != "cpu" or result.get("amp_dtype"):
        head += f"; {result.get('device', 'cpu')}" + (f", autocast {result['amp_dtype']}" if result.get("amp_dtype") else "")
    out = head + "\n" + table(["criterion", "aggregate", "B", "top-1 %", "top-5 %", "NLL", "ECE %", "ms/img", "x plain"],
                              rows)
    if result["single_states"]:
        srows = [[s["site"], s["site_name"], "x".join(map(str, s["offset"])), "yes" if s["searchable"] else "no",
                  f"{s['top1']:.2f}", f"{s['top1'] - p['top1']:+.2f}"] for s in result["single_states"]]
        out += "\n\nsingle states (one site off its default offset):\n" + table(
            ["site", "name", "offset", "searchable", "top-1 %", "vs plain"], srows)
    return out


def plot(result: dict, path: str | os.PathLike) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise UndiscardError(f"--plot needs matplotlib ({exc}); pip install 'undiscard[plot]'") from exc
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    p = result["plain"]
    keys = sorted({(r["criterion"], r["aggregate"]) for r in result["rows"]})
    for c, a in keys:
        rs = sorted((r for r in result["rows"] if r["criterion"] == c and r["aggregate"] == a), key=lambda r: r["budget"])
        bs = [r["budget"] for r in rs]
        ax1.plot(bs, [r["top1"] for r in rs], marker="o", label=f"{c} / {a}")
        if rs[0]["time_ratio"] is not None:
            ax2.plot(bs, [r["time_ratio"] for r in rs], marker="o", label=f"{c} / {a}")
    ax1.axhline(p["top1"], color="k", ls="--", lw=1, label="plain")
    ax2.axhline(1.0, color="k", ls="--", lw=1)
    for ax in (ax1, ax2):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("budget B (states per image)")
    ax1.set_ylabel("top-1 %")
    ax2.set_ylabel("time / plain forward")
    ax1.legend(fontsize=7)
    fig.suptitle(f"{Path(result['model']).name} on {result['data']} ({result['images']} images)", fontsize=9)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
