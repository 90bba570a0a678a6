"""Render results/seg_*.json into the segmentation section of docs/segmentation.md (between the markers).

    python scripts/render_seg.py          # rewrite that section of docs/segmentation.md in place
    python scripts/render_seg.py --print  # print the section instead

Every number in the section comes from results/seg_deeplabv3.json, results/seg_segformer.json
(written by `scripts/seg_results.sh`), the training summaries zoo/fmnist_seg_*.json and, if
present, the cost benchmark results/seg_bench_cpu.json (`scripts/seg_bench.sh`).
Without the markers in docs/segmentation.md the section is printed and the script exits 0 with a note.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "segmentation.md"
START, END = "<!-- seg:start -->", "<!-- seg:end -->"
MODELS = [("deeplabv3", "DeepLabV3-tiny (torchvision DeepLabV3, timm ResNet, OS 16)"),
          ("segformer", "SegFormer-tiny (transformers)")]
PAPER = ("the paper (baseline / B=4 / B=10): DeepLabV3-R50 Cityscapes 79.60 / 79.72 / 79.73, ADE20K 42.72 / 42.77 / "
         "42.81; SegFormer Cityscapes 76.54 / 77.01 / 77.05, ADE20K 37.41 / 37.68 / 37.67")


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def row(res: dict, aggregate: str, budget: int, criterion: str = "entropy") -> dict | None:
    for r in res["rows"]:
        if (r["criterion"], r["aggregate"], r["budget"]) == (criterion, aggregate, budget):
            return r
    return None


def cell(r: dict | None) -> str:
    if r is None:
        return "-"
    lo, hi = r["miou_gain_ci95"]
    return f"{r['miou']:.2f} ({r['miou_gain']:+.2f}, [{lo:+.2f}, {hi:+.2f}])"


def render() -> str:
    found = [(key, label, load(ROOT / "results" / f"seg_{key}.json"), load(ROOT / "zoo" / f"fmnist_seg_{key}.json"))
             for key, label in MODELS]
    found = [f for f in found if f[2] is not None]
    bench = load(ROOT / "results" / "seg_bench_cpu.json")
    if not found:
        return "_No segmentation results: run `bash scripts/seg_results.sh`._"
    res0 = found[0][2]
    budgets = sorted({r["budget"] for r in res0["rows"] if r["budget"] > 1})
    aggs = [a for a in ("mean", "entropy") if row(res0, a, budgets[-1])]
    out = [
        f"Semantic segmentation on **{res0['data']}** (the first {res0['images']} test canvases, "
        f"{res0['input_size'][1]}x{res0['input_size'][2]}, {res0['num_classes']} classes: background + the ten "
        "Fashion-MNIST classes), with the two models the project trains itself. Search criterion `entropy` (mean "
        "pixel entropy of the aligned prediction), width 1; each state's logits are upsampled to the input, shifted "
        "by +Delta px, and border pixels a state does not cover are left out of its vote. mIoU in %; in brackets "
        "the gain over the plain model and its 95% interval (paired bootstrap over the images, 1000 resamples).",
        "",
    ]
    head = "| model | baseline | " + " | ".join(f"B={b} {a}" for b in budgets for a in aggs) + " |"
    out += [head, "|" + "---|" * (head.count("|") - 1)]
    for key, label, res, _ in found:
        cells = [cell(row(res, a, b)) for b in budgets for a in aggs]
        out.append(f"| {label} | {res['plain']['miou']:.2f} | " + " | ".join(cells) + " |")
    out += ["", "Pixel accuracy and cost (ms per image on "
            f"{res0['timing']['threads']} CPU thread(s), {res0['timing']['images']} images, median of "
            f"{res0['timing']['repeats']}; the method includes its search):", ""]
    head = ("| model | params | weights (fp16) | val mIoU (training) | pixel acc baseline | "
            + " | ".join(f"pixel acc B={b} {a}" for b in budgets for a in aggs)
            + " | ms/img plain | " + " | ".join(f"ms/img B={b} (x plain)" for b in budgets) + " | engine |")
    out += [head, "|" + "---|" * (head.count("|") - 1)]
    for key, label, res, train in found:
        size = ROOT / "zoo" / f"fmnist_seg_{key}.safetensors"
        mb = f"{size.stat().st_size / 1e6:.2f} MB" if size.exists() else "-"
        val = f"{train['val']['miou']:.2f}" if train else "-"
        pa = [f"{row(res, a, b)['pixel_accuracy']:.2f}" for b in budgets for a in aggs]
        # cost: the mean aggregate's timing (the entropy aggregate costs the same search)
        ms = []
        for b in budgets:
            r = row(res, aggs[0], b)
            ms.append(f"{r['ms_per_image']:.1f} ({r['time_ratio']:.1f}x)")
        out.append(f"| {label.split(' (')[0]} | {res['parameters']:,} | {mb} | {val} | {res['plain']['pixel_accuracy']:.2f} | "
                   + " | ".join(pa) + f" | {res['plain']['ms_per_image']:.1f} | " + " | ".join(ms)
                   + f" | {', '.join(res['engine'])} |")
    out += ["", "Reading it:", ""]
    for key, label, res, train in found:
        bmax = budgets[-1]
        best = max((row(res, a, bmax) for a in aggs), key=lambda r: r["miou"])
        lo, hi = best["miou_gain_ci95"]
        verdict = ("a gain" if lo > 0 else "a loss" if hi < 0 else "no change distinguishable from noise")
        out.append(f"- {label.split(' (')[0]}: at B={bmax} the better aggregate ({best['aggregate']}) gives "
                   f"{best['miou_gain']:+.2f} mIoU, 95% interval [{lo:+.2f}, {hi:+.2f}]: {verdict}; "
                   f"searchable sites {res['sites']['searchable']} ({res['sites']['space_size']} states, total stride "
                   f"{'x'.join(map(str, res['sites']['stride_total']))}); figure: `results/seg_{key}.png`.")
        if res.get("skips", {}).get("fused_across_sites"):
            un = [r for r in res.get("skips_unaligned", []) if r["budget"] == bmax]
            if un:
                worst = min(un, key=lambda r: r["miou"])
                best_un = max(un, key=lambda r: r["miou"])
                out[-1] += (f" Its head fuses maps from both sides of the searched sites; without aligning them at "
                            f"the fusion (output shifted by the full Delta) B={bmax} gives {best_un['miou']:.2f} to "
                            f"{worst['miou']:.2f} mIoU ({best_un['miou_gain']:+.2f} / {worst['miou_gain']:+.2f}).")
        if train:
            out[-1] += (f" Trained {train['steps']} steps in {train['train_seconds'] / 60:.1f} min "
                        f"({train['threads']} thread(s)); val mIoU {train['val']['miou']:.2f}.")
    out += [f"- For context, {PAPER}. Those are 512+ px street/indoor scenes with 19/150 classes and "
            "pretrained ResNet-50/MiT backbones; these are 96 px canvases and sub-megabyte models trained for minutes.",
            "- SegFormer's head takes every encoder stage (a tensor crosses the searched sites), so its states run "
            "through the engine's fallback (one batched forward per state, same results as the shared-prefix path; "
            "tested). Only the stages after a site move with its offset, so `wrap_segmentation` (`align_skips=True`) "
            "shifts each deeper stage onto the shallowest one's grid where the head fuses them; the output then "
            "needs no shift (stage 0 is before both searched sites).",
            "- Cost: these models take under a millisecond per 96 px image, so the per-state work the method adds at "
            "input resolution (each state's softmax and per-pixel entropy, computed once and used by both the search "
            "and the aggregation; the shifted sums) and the engine's bookkeeping weigh about as much as the B "
            "forwards themselves: the ratio to the plain model is above B here. "
            + bench_summary(bench),
            "",
            "Reproduce (trains the two models if `zoo/fmnist_seg_*.safetensors` are missing, then evaluates and "
            "re-renders this section):",
            "",
            "```bash",
            "bash scripts/seg_results.sh",
            f"# = per model: undiscard eval zoo/fmnist_seg_MODEL.safetensors --task segmentation --data {res0['data']} "
            f"--limit {res0['images']} --budget {','.join(map(str, res0['config']['budgets']))} "
            f"--aggregate {','.join(res0['config']['aggregates'])} --criterion {','.join(res0['config']['criteria'])} "
            f"--batch-size {res0['config']['batch_size']} --threads {res0['config']['threads']} "
            "--json results/seg_MODEL.json --plot results/seg_MODEL.png",
            "```"]
    if bench is not None:
        out += ["", *bench_lines(bench)]
    return "\n".join(out)


def _bench_row(m: dict, engine: str, budget: int) -> dict | None:
    for r in m["rows"]:
        if (r["engine"], r["budget"]) == (engine, budget):
            return r
    return None


def bench_summary(bench: dict | None) -> str:
    """One sentence on the real-size model of results/seg_bench_cpu.json (or a pointer to the script)."""
    if bench is None:
        return "The cost on a real-size model: `bash scripts/seg_bench.sh`."
    big = max(bench["models"], key=lambda m: m["input"][1] * m["input"][2])
    parts = []
    for b in (4, 10):
        r = _bench_row(big, "trie", b)
        if r is not None:
            parts.append(f"B={b} {r['ratio']:.1f}x")
    rr = _bench_row(big, "rerun", 10)
    txt = (f"On a real-size model ({big['label'].split(' (')[0]}, {big['input'][1]}x{big['input'][2]}, "
           f"{big['threads']} threads) the same method costs {', '.join(parts)} the plain forward")
    if rr is not None:
        txt += f" (one forward per state: B=10 {rr['ratio']:.1f}x)"
    return txt + ": the cost table below."


def bench_lines(bench: dict) -> list[str]:
    """The side-by-side cost table of results/seg_bench_cpu.json (scripts/seg_bench.sh)."""
    models = bench["models"]
    keys: list[tuple[str, int]] = sorted({(r["engine"], r["budget"]) for m in models for r in m["rows"]},
                                         key=lambda k: (k[0] != "trie", k[1]))
    head = ["model", "input", "batch", "threads", "searched states", "plain ms/img"] + [
        f"B={b}" + (" (rerun)" if e == "rerun" else "") + " ms/img (x plain)" for e, b in keys]
    out = [f"Cost side by side (`bash scripts/seg_bench.sh`: one process, median of {models[0]['repeats']} "
           "interleaved repeats; the whole prediction, search and aggregation, criterion entropy, aggregate mean; "
           "engine `trie` = shared prefixes, falling back to one batched forward per state where a decoder "
           "takes maps from both sides of a searched site (SegFormer); `rerun` = one batched forward per state). "
           "Without sharing the ideal is B x plain:", "",
           "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in models:
        cells = []
        for k in keys:
            r = _bench_row(m, *k)
            cells.append("-" if r is None else f"{r['ms_per_image']:.1f} ({r['ratio']:.1f}x)")
        c, h, w = m["input"]
        out.append(f"| {m['label']} | {c}x{h}x{w} | {m['batch']} | {m['threads']} | {m['space_size']} (sites "
                   f"{m['searchable']}) | {m['plain_ms_per_image']:.1f} | " + " | ".join(cells) + " |")
    return out


def main(argv: list[str]) -> int:
    text = render()
    body = DOC.read_text() if DOC.exists() else ""
    if "--print" in argv or START not in body or END not in body:
        print(text)
        if "--print" not in argv:
            print(f"\nnote: {DOC.relative_to(ROOT)} has no {START} ... {END} markers; printed the section instead",
                  file=sys.stderr)
        return 0
    head, rest = body.split(START, 1)
    _, tail = rest.split(END, 1)
    DOC.write_text(f"{head}{START}\n{text}\n{END}{tail}")
    print(f"rendered the segmentation section into {DOC.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
