"""``undiscard eval``: accuracy, calibration and cost of the method vs the plain model.

For each criterion the search runs once per batch at the largest budget; because every
image's search is deterministic and a smaller budget's states are the first states of a
larger one's (:func:`undiscard.search.greedy_search`), the results at every smaller
budget are read off the same run. Costs are measured separately, side by side in the
same process: on ``timing_images`` images, the plain forward and the full method at each
budget (search + aggregation, nothing shared), median of ``repeats``.

Results are written as JSON after every batch; rerunning the same command with the
same output resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from undiscard.aggregate import entropy
from undiscard.errors import UndiscardError

__all__ = ["EvalConfig", "calibration_error", "run_eval"]


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
    width: int | None = 1
    seed: int = 0
    timing_images: int = 32
    repeats: int = 3
    single_states: bool = False
    threads: int = 0


def calibration_error(conf: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    """Expected calibration error with ``bins`` equal-width confidence bins."""
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
    """Per-image confidence / correctness / NLL of one configuration."""

    def __init__(self, d: dict | None = None) -> None:
        d = d or {}
        self.conf: list[float] = d.get("conf", [])
        self.correct: list[int] = d.get("correct", [])
        self.nll: list[float] = d.get("nll", [])

    def add(self, logits: torch.Tensor, y: torch.Tensor) -> None:
        logp = torch.log_softmax(logits.double(), -1)
        conf, pred = logp.exp().max(-1)
        self.conf += conf.tolist()
        self.correct += (pred == y).long().tolist()
        self.nll += (-logp.gather(1, y[:, None]).squeeze(1)).tolist()

    def state(self) -> dict:
        return {"conf": self.conf, "correct": self.correct, "nll": self.nll}

    def summary(self) -> dict:
        n = len(self.correct)
        return {
            "n": n,
            "top1": 100.0 * sum(self.correct) / max(1, n),
            "nll": sum(self.nll) / max(1, n),
            "ece": 100.0 * calibration_error(torch.tensor(self.conf), torch.tensor(self.correct)),
        }


def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)
    except ImportError:
        class _Plain:
            def __init__(self) -> None:
                self.n = 0

            def update(self, k: int) -> None:
                self.n += k
                print(f"\r{desc}: {self.n}/{total}", end="", file=sys.stderr, flush=True)

            def close(self) -> None:
                print(file=sys.stderr)

        return _Plain()


def load_data(spec: str, input_size: tuple[int, int, int], limit: int | None, start: int = 0):
    """``fashion-mnist[:split]`` (default split test) or an ImageNet-style folder -> (x, y) tensors."""
    from undiscard.data import fashion_mnist_tensors, image_folder

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
            from undiscard.data import FASHION_MNIST_MEAN, FASHION_MNIST_STD

            ds = image_folder(path, input_size=input_size, mean=(FASHION_MNIST_MEAN,), std=(FASHION_MNIST_STD,))
        else:  # ImageNet mean / std, timm's eval transform
            ds = image_folder(path, input_size=input_size)
        stop = len(ds) if limit is None else min(len(ds), start + limit)
        idx = list(range(start, stop))
        y = torch.tensor([ds.targets[i] for i in idx], dtype=torch.long)
        return _LazyImages(ds, idx, input_size), y, str(path)
    raise UndiscardError(f"--data takes fashion-mnist[:train|val|test] or an image folder; got {spec!r}")


class _LazyImages:
    """Images of a folder dataset, decoded a slice at a time (ImageNet val does not fit in memory)."""

    def __init__(self, ds, indices: list[int], input_size: tuple[int, int, int]) -> None:
        self.ds, self.indices = ds, indices
        self.shape = (len(indices), *input_size)

    def __getitem__(self, sl: slice) -> torch.Tensor:
        if not isinstance(sl, slice):
            raise TypeError("index with a slice")
        return torch.stack([self.ds[i][0] for i in self.indices[sl]])


def _median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def run_eval(cfg: EvalConfig, out_json: str | os.PathLike | None = None, log=print) -> dict:
    """Run the evaluation described by ``cfg``; return (and write) the results dict."""
    from undiscard.method import wrap
    from undiscard.models import load_model

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    loaded = load_model(cfg.model)
    model = loaded.model
    x, y, data_name = load_data(cfg.data, loaded.input_size, cfg.limit, cfg.start)
    n = x.shape[0]
    if n == 0:
        raise UndiscardError(f"no images to evaluate in {cfg.data} (start {cfg.start}, limit {cfg.limit})")
    bmax = max(cfg.budgets)
    needs_agg = "attention" in cfg.aggregates or "learned" in cfg.criteria
    if needs_agg and not cfg.aggregator:
        raise UndiscardError("aggregate 'attention' and criterion 'learned' need --aggregator PATH (undiscard train-aggregator)")
    common = dict(searchable=cfg.searchable, align=cfg.align, fill=cfg.fill, max_batch=cfg.max_batch, seed=cfg.seed, width=cfg.width,
                  aggregator=cfg.aggregator if needs_agg else None)
    probe = wrap(model, budget=1, **common)
    sites = probe.sites_for(x[:1])
    if bmax > sites.space_size:
        raise UndiscardError(
            f"budget {bmax} exceeds the search space of {sites.space_size} states "
            f"(searchable sites {list(sites.searchable)}); lower --budget or use --searchable main/all"
        )
    aggregator = probe.aggregator
    common["aggregator"] = aggregator
    config = {k: v for k, v in cfg.__dict__.items()}
    out_path = Path(out_json) if out_json else None
    state: dict[str, Any] = {"config": config, "done": 0, "acc": {}}
    if out_path is not None and out_path.with_suffix(".partial.pt").exists():
        prev = torch.load(out_path.with_suffix(".partial.pt"), weights_only=False)
        if prev.get("config") == config:
            state = prev
            log(f"resuming at image {state['done']}/{n}")
    accs: dict[str, _Acc] = {k: _Acc(v) for k, v in state["acc"].items()}

    def acc(key: str) -> _Acc:
        return accs.setdefault(key, _Acc())

    wrapped = {c: wrap(model, budget=bmax, criterion=c, aggregate=cfg.aggregates[0], **common) for c in cfg.criteria}
    single: list[tuple[int, int, torch.Tensor]] = []
    if cfg.single_states:
        full = sites.with_searchable("main")
        for j, i in enumerate(full.searchable):
            for k in range(1, full.sites[i].num_offsets):
                st = full.zero_state()
                st[j] = k
                single.append((i, k, st))
    bar = _progress(n, f"eval {Path(loaded.spec).name}")
    bar.update(state["done"])
    with torch.no_grad():
        for s in range(state["done"], n, cfg.batch_size):
            xb, yb = x[s : s + cfg.batch_size], y[s : s + cfg.batch_size]
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
                    acc(f"{c}|best-single|{b}").add(found.logits[:, :b].gather(
                        1, (-entropy(found.logits[:, :b])).argmax(1)[:, None, None].expand(-1, 1, found.logits.shape[-1])
                    ).squeeze(1), yb)
            if single:
                from undiscard.engine import use_states

                full = sites.with_searchable("main")
                for i, k, st in single:
                    with use_states(model, full, st):
                        acc(f"single|{i}|{k}").add(model(xb), yb)
            state["done"] = min(n, s + cfg.batch_size)
            if out_path is not None:
                state["acc"] = {k: v.state() for k, v in accs.items()}
                out_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = out_path.with_suffix(".partial.tmp")
                torch.save(state, tmp)
                os.replace(tmp, out_path.with_suffix(".partial.pt"))
            bar.update(len(yb))
    bar.close()

    # ---- cost, side by side in this process
    log("timing ...")
    xt = x[: cfg.timing_images]
    t_plain = _median_time(lambda: model(xt), cfg.repeats)
    timing: dict[str, float] = {}
    with torch.no_grad():
        for c in cfg.criteria:
            for b in cfg.budgets:
                for a in cfg.aggregates:
                    w = wrap(model, budget=b, criterion=c, aggregate=a, **common)
                    timing[f"{c}|{a}|{b}"] = _median_time(lambda: w(xt), cfg.repeats)
    nt = xt.shape[0]
    plain = accs["plain"].summary()
    plain.update(ms_per_image=1000 * t_plain / nt, time_ratio=1.0)
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
                         time_ratio=None if t is None else t / t_plain)
                rows.append(r)
    singles = []
    for i, k, st in single:
        r = accs[f"single|{i}|{k}"].summary()
        site = sites.sites[i]
        r.update(site=i, site_name=site.name, offset=list(site.offset_of(k)), searchable=i in sites.searchable)
        singles.append(r)
    result = {
        "model": loaded.spec,
        "model_note": loaded.note,
        "data": data_name,
        "images": n,
        "start": cfg.start,
        "input_size": list(loaded.input_size),
        "sites": {"searchable": list(sites.searchable), "space_size": sites.space_size,
                  "stride_total": list(sites.stride_total), "names": [s.name for s in sites.sites]},
        "config": config,
        "timing": {"images": nt, "repeats": cfg.repeats, "threads": torch.get_num_threads(),
                   "plain_ms_per_image": 1000 * t_plain / nt},
        "plain": plain,
        "rows": rows,
        "single_states": singles,
        "torch": torch.__version__,
    }
    if out_path is not None:
        out_path.write_text(json.dumps(result, indent=1) + "\n")
        out_path.with_suffix(".partial.pt").unlink(missing_ok=True)
    return result


def format_table(result: dict) -> str:
    from undiscard.cli import _table

    p = result["plain"]
    rows = [["plain", "-", 1, f"{p['top1']:.2f}", f"{p['nll']:.4f}", f"{p['ece']:.2f}", f"{p['ms_per_image']:.2f}", "1.00"]]
    for r in result["rows"]:
        ms = "-" if r["ms_per_image"] is None else f"{r['ms_per_image']:.2f}"
        ratio = "-" if r["time_ratio"] is None else f"{r['time_ratio']:.2f}"
        rows.append([r["criterion"], r["aggregate"], r["budget"], f"{r['top1']:.2f}", f"{r['nll']:.4f}",
                     f"{r['ece']:.2f}", ms, ratio])
    head = (f"{result['model']} on {result['data']} ({result['images']} images); searchable sites "
            f"{result['sites']['searchable']} ({result['sites']['space_size']} states); timing on "
            f"{result['timing']['images']} images, median of {result['config']['repeats']}")
    out = head + "\n" + _table(["criterion", "aggregate", "B", "top-1 %", "NLL", "ECE %", "ms/img", "x plain"], rows)
    if result["single_states"]:
        srows = [[s["site"], s["site_name"], "x".join(map(str, s["offset"])), "yes" if s["searchable"] else "no",
                  f"{s['top1']:.2f}", f"{s['top1'] - p['top1']:+.2f}"] for s in result["single_states"]]
        out += "\n\nsingle states (one site off its default offset):\n" + _table(
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
