"""A dataset-level offset policy: one fixed, ordered list of states for every image.

Per-image search (docs/method.md, "Search") pays for its adaptivity: ``B`` states per image, found one
step at a time. A *policy* is fitted once on the validation split, the way GPS
(Molchanov et al. 2020) picks image augmentations: start from the default state and
greedily append the state whose addition most lowers the NLL of the aggregated (mean of
aligned final maps) prediction on validation. At test time the first ``b`` states of
the list are evaluated in ONE shared-prefix pass (no search, no per-step passes): states
that share their first offsets share the computation, so a list that varies mostly the
last sites costs far less than ``b`` forwards.

``undiscard fit-policy`` fits one policy per search space (sets of searchable sites, the
last site allowed) and reports the accuracy/cost Pareto front over spaces and budgets
next to per-image search on the same images.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from undiscard.evaluation.runio import config_diff, ratios_to_plain
from undiscard.errors import StateError, UndiscardError
from undiscard.method.classify import Undiscard
from undiscard.sites.sitemap import SiteMap
from undiscard.run.trie import run_trie

__all__ = ["Policy", "fit_policy", "policy_features", "evaluate_policy", "pareto_front", "MAX_SPACE"]

MAX_SPACE = 64  # states whose validation features are held at once while fitting


@dataclass
class Policy:
    """``states``: ordered flat offsets over ``searchable`` (``states[0]`` the default);
    ``val_nll`` / ``val_acc``: the validation NLL / top-1 of the mean of the first ``b``."""

    searchable: list[int]
    states: list[list[int]]
    val_nll: list[float]
    val_acc: list[float]

    def to_dict(self) -> dict:
        return asdict(self)


def _all_states(sites: SiteMap) -> torch.Tensor:
    ranges = [torch.arange(s.num_offsets) for s in sites.searchable_sites]
    if len(ranges) == 1:
        return ranges[0][:, None]
    return torch.cartesian_prod(*ranges)


@torch.no_grad()
def policy_features(u: Undiscard, x: torch.Tensor, sites: SiteMap, states: torch.Tensor, *,
                    batch: int = 16) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Aligned final maps ``(N, S, P, C)`` of every image under every state of ``states`` ``(S, L)``
    (one shared-prefix pass per batch of images) and the map's grid.

    Shape:
        - x: ``(N, C_in, H, W)``.
        - states: ``(S, L)`` flat offset indices.
        - output: ``(N, S, P, C)`` (``P`` positions of the final map, ``C`` its channels) and
          the grid, e.g. ``(h, w)``.
    """
    sp = u.split
    delta = sites.displacement(states)
    outs = []
    for s in range(0, x.shape[0], batch):
        xb = x[s : s + batch]
        n = xb.shape[0]
        st = states[None].expand(n, -1, -1)
        flat = run_trie(u.model, xb, st, sites, max_batch=4 * u.max_batch, forward=sp.features).outputs.flatten(0, 1)
        if u.align:
            flat = sp.align(flat, delta.repeat(n, 1), sites.stride_total, u.fill)
        grid = tuple(flat.shape[2:]) if sp.layout == "NCHW" else tuple(flat.shape[1:-1])
        pos = sp.to_positions(flat)
        outs.append(pos.reshape(n, states.shape[0], *pos.shape[1:]))
    return torch.cat(outs), grid


def _head(u: Undiscard, pos: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    return u.split.head(u._from_positions(pos, grid))


@torch.no_grad()
def fit_policy(u: Undiscard, x: torch.Tensor, y: torch.Tensor, sites: SiteMap, max_budget: int, *,
               batch: int = 16, log=print) -> Policy:
    """Greedy forward selection of ``max_budget`` states (without repetition) on ``(x, y)``.

    Shape:
        - x: ``(N, C, H, W)``; y: ``(N,)`` int64 labels.
        - output: a :class:`Policy` of ``max_budget`` states of ``L = len(sites.searchable)``
          flat offsets each, and ``max_budget`` validation NLLs / top-1s.
    """
    if sites.space_size > MAX_SPACE:
        raise StateError(f"a policy space of {sites.space_size} states is more than {MAX_SPACE}: search fewer sites")
    if not 1 <= max_budget <= sites.space_size:
        raise StateError(f"max budget {max_budget} is outside 1..{sites.space_size} (the space of sites {list(sites.searchable)})")
    cand = _all_states(sites)
    parts = []
    for s in range(0, x.shape[0], batch):
        f, grid = policy_features(u, x[s : s + batch], sites, cand, batch=batch)
        parts.append(f.to(torch.float16))
    feats = torch.cat(parts)
    n = x.shape[0]
    chosen = [0]  # the default state is index 0 of the cartesian product
    total = feats[:, 0].float()
    logits = _head(u, total, grid)
    nll = [float(F.cross_entropy(logits, y))]
    acc = [float((logits.argmax(1) == y).float().mean())]
    for k in range(2, max_budget + 1):
        best = None
        for c in range(cand.shape[0]):
            if c in chosen:
                continue
            lg = _head(u, (total + feats[:, c].float()) / k, grid)
            v = float(F.cross_entropy(lg, y))
            if best is None or v < best[0]:
                best = (v, c, float((lg.argmax(1) == y).float().mean()))
        chosen.append(best[1])
        total = total + feats[:, best[1]].float()
        nll.append(best[0])
        acc.append(best[2])
        log(f"  b={k}: + state {cand[best[1]].tolist()}  val NLL {best[0]:.4f}  top-1 {100 * best[2]:.2f}  ({n} images)")
    return Policy(list(sites.searchable), [cand[c].tolist() for c in chosen], nll, acc)


@torch.no_grad()
def evaluate_policy(u: Undiscard, policy: Policy, x, y: torch.Tensor, sites: SiteMap, *, batch: int = 64) -> list[float]:
    """Top-1 on ``(x, y)`` of the mean of the first ``b`` states, for every ``b``.

    Shape:
        - x: ``(N, C, H, W)`` (a tensor or anything sliceable); y: ``(N,)`` int64 labels.
        - output: ``len(policy.states)`` top-1s in points.
    """
    states = torch.tensor(policy.states, dtype=torch.long)
    correct = torch.zeros(states.shape[0])
    for s in range(0, y.shape[0], batch):
        f, grid = policy_features(u, x[s : s + batch], sites, states, batch=batch)
        cum = f.float().cumsum(1)
        for b in range(states.shape[0]):
            lg = _head(u, cum[:, b] / (b + 1), grid)
            correct[b] += float((lg.argmax(1) == y[s : s + batch]).sum())
    return (100 * correct / y.shape[0]).tolist()


@torch.no_grad()
def policy_cost(u: Undiscard, policy: Policy, x: torch.Tensor, sites: SiteMap, budgets: Sequence[int],
                repeats: int = 3) -> dict[int, float]:
    """Wall time of the policy at each budget / the plain forward, interleaved, medians."""
    states = torch.tensor(policy.states, dtype=torch.long)
    sp = u.split

    def run(b: int):
        if b == 1:
            return u.model(x)
        st = states[None, :b].expand(x.shape[0], -1, -1)
        f = run_trie(u.model, x, st, sites, forward=sp.features).outputs.flatten(0, 1)
        if u.align:
            f = sp.align(f, sites.displacement(states[:b]).repeat(x.shape[0], 1), sites.stride_total, u.fill)
        return sp.head(f.reshape(x.shape[0], b, *f.shape[1:]).mean(1))

    return ratios_to_plain(lambda: u.model(x), {b: (lambda b=b: run(b)) for b in budgets}, repeats)


def pareto_front(points: Sequence[dict]) -> list[dict]:
    """Points (``cost``, ``top1``) not beaten on both by another point, by cost."""
    front = []
    for p in sorted(points, key=lambda p: (p["cost"], -p["top1"])):
        if not front or p["top1"] > front[-1]["top1"]:
            front.append(p)
    return front


def default_spaces(sites_main: Sequence[int], inner: Sequence[int]) -> dict[str, list[int]]:
    """Named search spaces: the per-image default (``inner``: main sites but the first and
    last), the last main site, the last two, the last three (duplicates dropped)."""
    last = list(sites_main[-1:])
    spaces = {"inner": list(inner), "last": last, "last2": list(sites_main[-2:]),
              "last3": list(sites_main[-3:])}
    out: dict[str, list[int]] = {}
    for k, v in spaces.items():
        if v and v not in out.values():
            out[k] = v
    return out



def run_study(spec: str, *, spaces: dict[str, list[int]] | None = None, val_images: int = 500, test_limit: int = 2000,
              max_budget: int = 10, cost_budgets: Sequence[int] = (2, 3, 4, 6, 8, 10), timing_images: int = 32,
              repeats: int = 3, batch: int = 64, log=print, save=None, previous: dict | None = None,
              previous_name: str = "the saved study", trust_pickle: bool = False) -> dict:
    """Fit a policy per space on ``fashion-mnist:val``, evaluate on the test split next to
    per-image search (entropy criterion, the same mean aggregation); Pareto front.
    ``save(result)`` is called after every finished part; ``previous`` (a saved result with
    the same settings) skips the parts it holds; one with other settings is refused
    (:class:`UndiscardError` naming ``previous_name`` and the differences): it is never
    overwritten silently."""
    from undiscard.evaluation.classify import load_data
    from undiscard.models.classifiers import load_model
    from undiscard.sites.discover import find_sites

    if previous is not None and not isinstance(previous.get("settings") if isinstance(previous, dict) else None, dict):
        raise UndiscardError(f"{previous_name} is not a fit-policy result; add --fresh to replace it, or choose "
                             "another --json")
    loaded = load_model(spec, trust_pickle=trust_pickle)
    model = loaded.model
    xv, yv, _ = load_data("fashion-mnist:val", loaded.input_size, val_images)
    xt, yt, _ = load_data("fashion-mnist:test", loaded.input_size, test_limit)
    main = list(find_sites(model, xt[:1], searchable="main").searchable)
    inner = list(find_sites(model, xt[:1], searchable="inner").searchable)
    spaces = spaces or default_spaces(main, inner)
    settings = {"model": spec, "val_images": int(yv.shape[0]), "test_images": int(yt.shape[0]), "max_budget": max_budget,
                "cost_budgets": list(cost_budgets), "timing_images": timing_images, "repeats": repeats,
                "spaces": spaces, "aggregate": "mean", "align": True}
    settings = json.loads(json.dumps(settings))  # as saved and compared
    if previous is not None and previous["settings"] != settings:
        raise UndiscardError(f"{previous_name} was made with other settings ({config_diff(previous['settings'], settings)}); "
                             "it is not overwritten: rerun with those settings to resume or reuse it, or add --fresh to "
                             "start over (or choose another --json)")
    result = previous if previous is not None else {"settings": settings}
    result.setdefault("policies", {})
    xtime = xt[:timing_images]
    plain_correct = None
    for name, space in spaces.items():
        if name in result["policies"]:
            log(f"{name}: done (saved)")
            continue
        u = Undiscard(model, 2, "entropy", "mean", searchable=space)
        sites = u.sites_for(xt[:1])
        b_max = min(max_budget, sites.space_size)
        log(f"{name}: sites {list(sites.searchable)} ({sites.space_size} states): fitting on {yv.shape[0]} val images")
        pol = fit_policy(u, xv, yv, sites, b_max, log=log)
        acc = evaluate_policy(u, pol, xt, yt, sites, batch=batch)
        cost = policy_cost(u, pol, xtime, sites, [b for b in cost_budgets if b <= b_max], repeats)
        result["policies"][name] = {**pol.to_dict(), "test_top1": acc, "cost": {str(b): c for b, c in cost.items()}}
        log(f"  test top-1 by b: {[round(a, 2) for a in acc]}; cost x plain {[(b, round(c, 2)) for b, c in cost.items()]}")
        if save:
            save(result)
    if "search" not in result:
        b_max = max_budget
        u = Undiscard(model, b_max, "entropy", "mean")
        correct = torch.zeros(b_max)
        log(f"per-image search (entropy, mean, B={b_max}) on {yt.shape[0]} test images")
        with torch.no_grad():
            for s in range(0, yt.shape[0], batch):
                found = u.search(xt[s : s + batch])
                for b in range(1, b_max + 1):
                    lg, _ = u.combine(found, b)
                    correct[b - 1] += float((lg.argmax(1) == yt[s : s + batch]).sum())
        wrappers = {b: Undiscard(model, b, "entropy", "mean") for b in cost_budgets if b <= b_max}
        cost = ratios_to_plain(lambda: model(xtime), {b: (lambda w=w: w(xtime)) for b, w in wrappers.items()}, repeats)
        result["search"] = {"test_top1": (100 * correct / yt.shape[0]).tolist(),
                            "cost": {str(b): c for b, c in cost.items()}}
        if save:
            save(result)
    plain_correct = result["search"]["test_top1"][0]
    points = [{"method": f"policy {n}", "b": b, "top1": p["test_top1"][b - 1], "cost": c, "val_top1": 100 * p["val_acc"][b - 1]}
              for n, p in result["policies"].items() for b, c in ((int(k), v) for k, v in p["cost"].items())]
    points += [{"method": "per-image search", "b": int(b), "top1": result["search"]["test_top1"][int(b) - 1], "cost": c}
               for b, c in result["search"]["cost"].items()]
    points.append({"method": "plain", "b": 1, "top1": plain_correct, "cost": 1.0})
    result["points"] = points
    result["pareto"] = pareto_front(points)
    gain10 = result["search"]["test_top1"][max_budget - 1] - plain_correct
    cheap = [p for p in points if p["method"].startswith("policy") and p["cost"] <= 4.0]
    # chosen on VALIDATION accuracy (ties: the cheaper), so the test number is not picked on test
    best = max(cheap, key=lambda p: (p["val_top1"], -p["cost"])) if cheap else None
    result["target"] = {"search_gain_B": max_budget, "search_gain": gain10,
                        "best_policy_cost_le_4": best,
                        "kept": (best["top1"] - plain_correct) / gain10 if best and gain10 > 0 else None}
    if save:
        save(result)
    return result


def format_study(result: dict) -> str:
    """Markdown: per space the policy's test top-1 and cost at each timed budget, then per-image search."""
    st = result["settings"]
    plain = result["search"]["test_top1"][0]
    lines = ["| method | sites | " + " | ".join(f"b={b}" for b in st["cost_budgets"]) + " |",
             "|---|---|" + "---|" * len(st["cost_budgets"])]

    def cell(top1, cost):
        return f"{top1:.2f} ({top1 - plain:+.2f}) @ {cost:.2f}x"

    for name, p in result["policies"].items():
        cells = [cell(p["test_top1"][b - 1], p["cost"][str(b)]) if str(b) in p["cost"] else "-" for b in st["cost_budgets"]]
        lines.append(f"| policy `{name}` | {p['searchable']} | " + " | ".join(cells) + " |")
    s = result["search"]
    cells = [cell(s["test_top1"][b - 1], s["cost"][str(b)]) if str(b) in s["cost"] else "-" for b in st["cost_budgets"]]
    lines.append("| per-image search | inner | " + " | ".join(cells) + " |")
    t = result["target"]
    front = ", ".join(f"{p['method']} b={p['b']} ({p['top1']:.2f} @ {p['cost']:.2f}x)" for p in result["pareto"])
    lines += ["", f"Plain {plain:.2f}. Pareto front (accuracy vs cost): {front}."]
    if t["best_policy_cost_le_4"]:
        bp = t["best_policy_cost_le_4"]
        kept = "n/a (per-image search gained nothing)" if t["kept"] is None else f"{100 * t['kept']:.0f}%"
        lines.append(f"The policy point costing <= 4 plain forwards with the best VALIDATION top-1 ({bp['val_top1']:.2f}): "
                     f"{bp['method']} b={bp['b']}, test {bp['top1']:.2f} "
                     f"({bp['top1'] - plain:+.2f}) at {bp['cost']:.2f}x; per-image search B={t['search_gain_B']} gains "
                     f"{t['search_gain']:+.2f}: the policy keeps {kept} of it (target >= 80%).")
    return "\n".join(lines)


def plot_study(result: dict, path) -> None:
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    groups: dict[str, list] = {}
    for p in result["points"]:
        groups.setdefault(p["method"], []).append(p)
    for name, ps in groups.items():
        ps = sorted(ps, key=lambda p: p["cost"])
        ax.plot([p["cost"] for p in ps], [p["top1"] for p in ps], "o-" if len(ps) > 1 else "s", label=name)
    fr = result["pareto"]
    ax.plot([p["cost"] for p in fr], [p["top1"] for p in fr], "k:", lw=1, label="Pareto front")
    ax.axvline(4.0, color="0.7", lw=1)
    ax.set_xlabel("time / plain forward")
    ax.set_ylabel("test top-1 %")
    ax.set_title(result["settings"]["model"])
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
