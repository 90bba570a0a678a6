"""Verify undiscard on every architecture listed below and write docs/architectures.md.

For each model (random weights, seeded): the sites found and their total stride; the
model's actual reduction, read off the final feature map the features / head split
returns (independent of the sites); `undiscard check`'s invariants; whether the wrapper
at budget 1 returns exactly ``model(x)``; and whether budget 4 runs and gives finite
output of the model's shape and type. Resumable: finished rows are kept in
runs/architectures.json (delete it, or pass --fresh, to redo them).

    .venv/bin/python scripts/verify_archs.py            # every row, then the doc
    .venv/bin/python scripts/verify_archs.py --only timm:levit_128s
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import undiscard  # noqa: E402
from undiscard.compat import ensure_torchvision  # noqa: E402

# (zoo, name, input size without the batch, note); timm / torchvision at their smallest sensible size
C128, C224 = (3, 128, 128), (3, 224, 224)
ARCHS: list[tuple[str, str, tuple[int, ...], str]] = [
    # timm: CNNs
    ("timm", "resnet18", C128, "residual, max-pool stem"),
    ("timm", "resnet50", C128, "bottleneck residual"),
    ("timm", "resnet26d", C128, "deep stem, avg-pool shortcut"),
    ("timm", "resnext26ts", C128, "grouped convs"),
    ("timm", "seresnext26d_32x4d", C128, "squeeze-excitation"),
    ("timm", "mobilenetv2_100", C128, "strided depthwise"),
    ("timm", "mobilenetv3_small_100", C128, "strided depthwise, SE"),
    ("timm", "efficientnet_b0", C128, "same-padding depthwise"),
    ("timm", "efficientnetv2_rw_t", C128, "fused MBConv"),
    ("timm", "mixnet_s", C128, "mixed kernel sizes"),
    ("timm", "mnasnet_100", C128, "searched mobile net"),
    ("timm", "ghostnet_100", C128, "ghost modules"),
    ("timm", "rexnet_100", C128, "rank expansion"),
    ("timm", "regnetx_002", C128, "RegNet"),
    ("timm", "regnety_002", C128, "RegNet with SE"),
    ("timm", "densenet121", C128, "dense blocks, avg-pool transitions"),
    ("timm", "dla34", C128, "deep layer aggregation (multi-scale)"),
    ("timm", "dpn68", C128, "dual-path"),
    ("timm", "hrnet_w18_small", C128, "multi-resolution branches"),
    ("timm", "inception_v3", (3, 160, 160), "valid convs, functional pools"),
    ("timm", "cspdarknet53", C128, "cross-stage partial"),
    ("timm", "tresnet_m", C128, "space-to-depth stem, blur pool"),
    ("timm", "convnext_atto", C128, "patchify stem"),
    ("timm", "convnextv2_atto", C128, "patchify stem, GRN"),
    ("timm", "repvit_m1", C128, "re-parameterised mobile"),
    # timm: transformers and hybrids
    ("timm", "vit_tiny_patch16_224", C224, "patch embedding, class token"),
    ("timm", "deit_tiny_patch16_224", C224, "patch embedding, 256 offsets"),
    ("timm", "cait_xxs24_224", C224, "class attention"),
    ("timm", "swin_tiny_patch4_window7_224", C224, "reshape patch merging"),
    ("timm", "pvt_v2_b0", C128, "overlapping patch embeddings, side sites"),
    ("timm", "levit_128s", C224, "strided-slice subsampling attention"),
    ("timm", "mobilevitv2_050", C128, "hybrid CNN-transformer"),
    ("timm", "coatnet_nano_rw_224", C224, "hybrid CNN-transformer"),
    ("timm", "maxvit_nano_rw_256", (3, 256, 256), "hybrid, block/grid attention"),
    ("timm", "efficientformer_l1", C224, "hybrid, pooling mixer"),
    ("timm", "poolformer_s12", C224, "pooling token mixer"),
    ("timm", "edgenext_xx_small", C224, "hybrid, split depthwise"),
    ("timm", "fastvit_t8", C224, "re-parameterised hybrid"),
    # torchvision
    ("torchvision", "resnet18", C128, ""),
    ("torchvision", "resnet50", C128, ""),
    ("torchvision", "resnext50_32x4d", C128, ""),
    ("torchvision", "wide_resnet50_2", C128, ""),
    ("torchvision", "mobilenet_v2", C128, ""),
    ("torchvision", "mobilenet_v3_small", C128, ""),
    ("torchvision", "efficientnet_b0", C128, ""),
    ("torchvision", "efficientnet_v2_s", C128, ""),
    ("torchvision", "convnext_tiny", C128, ""),
    ("torchvision", "regnet_y_400mf", C128, ""),
    ("torchvision", "densenet121", C128, ""),
    ("torchvision", "googlenet", C128, "Inception, ceil-mode pools"),
    ("torchvision", "inception_v3", (3, 160, 160), ""),
    ("torchvision", "shufflenet_v2_x0_5", C128, "channel shuffle"),
    ("torchvision", "squeezenet1_0", C128, "fire modules"),
    ("torchvision", "mnasnet0_5", C128, ""),
    ("torchvision", "vgg11", C128, "adaptive pool before the head"),
    ("torchvision", "alexnet", C224, ""),
    ("torchvision", "vit_b_16", C224, "class token"),
    ("torchvision", "swin_t", C224, "strided-slice patch merging"),
    ("torchvision", "swin_v2_t", C224, "strided-slice patch merging"),
    ("torchvision", "maxvit_t", C224, "hybrid"),
    ("torchvision", "r3d_18", (3, 8, 64, 64), "video, 3-D convs"),
    ("torchvision", "mc3_18", (3, 8, 64, 64), "video, mixed 3-D / 2-D"),
    # transformers (small random configs)
    ("transformers", "ResNetForImageClassification", C128, ""),
    ("transformers", "ConvNextForImageClassification", C128, ""),
    ("transformers", "ViTForImageClassification", C128, "class token"),
    ("transformers", "SwinForImageClassification", C128, "strided-slice patch merging"),
    ("transformers", "EfficientNetForImageClassification", C128, "global AvgPool2d(1280) pooler"),
    ("transformers", "MobileNetV2ForImageClassification", C128, ""),
    ("transformers", "DeiTForImageClassification", C128, "class and distillation tokens"),
    # segmentation
    ("seg", "torchvision:fcn_resnet50", (3, 96, 96), "dilated backbone"),
    ("seg", "torchvision:deeplabv3_mobilenet_v3_large", (3, 96, 96), "ASPP"),
    ("seg", "torchvision:lraspp_mobilenet_v3_large", (3, 96, 96), ""),
    ("seg", "smp:Unet:resnet18", (3, 96, 96), "skips across sites"),
    ("seg", "smp:FPN:resnet18", (3, 96, 96), "feature pyramid"),
    ("seg", "smp:DeepLabV3Plus:resnet18", (3, 96, 96), ""),
    ("seg", "smp:PSPNet:resnet18", (3, 96, 96), "pyramid pooling"),
    # the project's own
    ("local", "conv1d-audio", (1, 256), "1-D"),
]


class Audio1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(1, 16, 7, 2, 3), nn.ReLU(), nn.MaxPool1d(2), nn.Conv1d(16, 32, 3, 2, 1),
                                  nn.ReLU(), nn.Conv1d(32, 32, 3, 2, 1))
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.body(x).mean(-1))


def _transformers(name: str, size: int) -> nn.Module:
    import transformers as T

    small = dict(num_labels=10)
    if name == "ResNetForImageClassification":
        return T.ResNetForImageClassification(T.ResNetConfig(embedding_size=32, hidden_sizes=[32, 64, 96, 128],
                                                             depths=[1, 1, 1, 1], **small))
    if name == "ConvNextForImageClassification":
        return T.ConvNextForImageClassification(T.ConvNextConfig(hidden_sizes=[32, 64, 96, 128],
                                                                 depths=[1, 1, 1, 1], **small))
    if name in ("ViTForImageClassification", "DeiTForImageClassification"):
        cfg = dict(image_size=size, patch_size=16, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=128, **small)
        if name == "ViTForImageClassification":
            return T.ViTForImageClassification(T.ViTConfig(**cfg))
        return T.DeiTForImageClassificationWithTeacher(T.DeiTConfig(**cfg))
    if name == "SwinForImageClassification":
        return T.SwinForImageClassification(T.SwinConfig(image_size=size, patch_size=4, embed_dim=32,
                                                         depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4], window_size=4,
                                                         **small))
    if name == "EfficientNetForImageClassification":
        return T.EfficientNetForImageClassification(T.EfficientNetConfig(image_size=size, width_coefficient=1.0,
                                                                         depth_coefficient=1.0, hidden_dim=1280, **small))
    if name == "MobileNetV2ForImageClassification":
        return T.MobileNetV2ForImageClassification(T.MobileNetV2Config(image_size=size, depth_multiplier=0.5, **small))
    raise KeyError(name)


def build(zoo: str, name: str, size: tuple[int, ...]) -> nn.Module:
    torch.manual_seed(0)
    if zoo == "timm":
        import timm

        return timm.create_model(name)
    if zoo == "torchvision":
        import torchvision

        kw = {"init_weights": False, "aux_logits": False} if name in ("googlenet", "inception_v3") else {}
        if name == "vit_b_16":
            kw = {"image_size": size[-1]}
        return torchvision.models.get_model(name, weights=None, **kw)
    if zoo == "transformers":
        return _transformers(name, size[-1])
    if zoo == "seg":
        from undiscard.models.segmenters import load_segmenter

        return load_segmenter(name, num_classes=4).model
    if zoo == "local":
        return Audio1d()
    raise KeyError(zoo)


def _logits(out):
    from undiscard.method.autosplit import first_logits

    return first_logits(out)


def _actual_stride(f: torch.Tensor, layout: str, size: tuple[int, ...], found: tuple[int, ...]) -> str:
    """The input-to-final-map reduction, read off the features (not the sites)."""
    spatial = size[1:]
    if layout == "tokens":
        cells = math.prod(math.ceil(n / r) for n, r in zip(spatial, found))
        tokens = f.shape[1]
        for prefix in range(0, 9):  # class / distillation / register tokens
            n = tokens - prefix
            if n > 0 and n == cells:
                return "x".join(str(r) for r in found)
            if n > 0 and len(spatial) == 2 and spatial[0] == spatial[1]:
                r = spatial[0] / math.sqrt(n)
                if abs(r - round(r)) < 1e-9:
                    return f"{round(r)}x{round(r)}"
        return f"? ({tokens} tokens)"
    grid = tuple(f.shape[2:]) if layout == "NCHW" else tuple(f.shape[1:-1])
    # each axis: the stride R with ceil(n / R) == grid (the smallest, when several fit)
    out = []
    for n, g in zip(spatial, grid):
        r = next((r for r in range(1, n + 1) if math.ceil(n / r) == g), None)
        out.append(str(r) if r is not None else "?")
    return "x".join(out)


def verify(zoo: str, name: str, size: tuple[int, ...]) -> dict:
    from undiscard.evaluation.checks import run_checks

    t0 = time.perf_counter()
    row: dict = {"zoo": zoo, "name": name, "input": "x".join(map(str, size))}
    model = build(zoo, name, size).eval()
    x = torch.randn(2, *size, generator=torch.Generator().manual_seed(1))
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        sites = undiscard.find_sites(model, x[:1])
        row["sites"] = len(sites)
        row["kinds"] = ",".join(sorted({s.kind for s in sites}))
        row["stride"] = "x".join(map(str, sites.stride_total))
        row["missed"] = list(sites.missed)
        checks = run_checks(model, sites, x[:1], batch=2)
        row["check"] = f"{sum(c.passed for c in checks)}/{len(checks)}"
        row["check_failed"] = [f"{c.name}: {c.detail}" for c in checks if not c.passed]
        ref = model(x)
        if zoo == "seg":
            plain = undiscard.wrap_segmentation(model, budget=1)(x)
            from undiscard.method.segment import dense_logits

            row["b1_exact"] = bool(torch.equal(plain, dense_logits(model, x)))
            y = undiscard.wrap_segmentation(model, budget=4)(x)
            row["b4"] = bool(torch.isfinite(y).all() and y.shape == plain.shape)
            row["actual"] = "—"
        else:
            plain = undiscard.wrap(model, budget=1)(x)
            row["b1_exact"] = bool(type(plain) is type(ref) and torch.equal(_logits(plain), _logits(ref)))
            w = undiscard.wrap(model, budget=4)
            y = w(x)
            row["b4"] = bool(type(y) is type(ref) and _logits(y).shape == _logits(ref).shape
                             and torch.isfinite(_logits(y)).all())
            f = w.split.features(x)
            row["actual"] = _actual_stride(f, w.split.layout, size, sites.stride_total)
            row["split"] = "timm" if hasattr(model, "forward_head") else f"automatic ({w.split.layout})"
    row["warnings"] = sorted({f"{w.category.__name__}" for w in caught})
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def render(rows: list[dict], path: Path) -> None:
    ok = [r for r in rows if "error" not in r and r["check"].split("/")[0] == r["check"].split("/")[1]
          and r["b1_exact"] and r["b4"] and (r["actual"] in ("—", r["stride"]))]
    lines = [
        "# Verified architectures",
        "",
        "Generated by `.venv/bin/python scripts/verify_archs.py` (random weights, seeded; do not edit by hand).",
        "Per model: the sites found and their total stride; the *actual* reduction, read off the final",
        "feature map that the features / head split returns (independently of the sites; `—` for",
        "segmentation, whose output is full-resolution); `undiscard check` (invariants passed / run,",
        "coverage included); the wrapper at budget 1 returning exactly `model(x)` (same type); budget 4",
        "running with finite output of the model's shape and type.",
        "",
        f"**{len(ok)} of {len(rows)} pass every column.**",
        "",
        "| zoo | model | input | sites | kinds | total stride | actual | check | B=1 exact | B=4 runs | split | note |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = {(z, n): note for z, n, _, note in ARCHS}
    for r in rows:
        note = notes.get((r["zoo"], r["name"]), "")
        if "error" in r:
            lines.append(f"| {r['zoo']} | {r['name']} | {r['input']} | — | — | — | — | — | — | — | — | "
                         f"fails: {r['error']} |")
            continue
        lines.append(
            f"| {r['zoo']} | {r['name']} | {r['input']} | {r['sites']} | {r['kinds']} | {r['stride']} | "
            f"{r['actual']} | {r['check']} | {'yes' if r['b1_exact'] else 'NO'} | {'yes' if r['b4'] else 'NO'} | "
            f"{r.get('split', 'segmentation')} | {note} |")
    failed = [r for r in rows if r not in ok]
    lines += ["", "## What fails, and why", ""]
    if not failed:
        lines.append("Nothing: every listed architecture passes every column.")
    for r in failed:
        why = r.get("error") or "; ".join(r.get("check_failed", []) + r.get("missed", [])) or \
            ("budget 1 differs from the model" if not r.get("b1_exact") else
             "budget 4 failed" if not r.get("b4") else f"actual stride {r['actual']} != {r['stride']}")
        lines.append(f"* **{r['zoo']}:{r['name']}**: {why}")
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "docs" / "architectures.md"))
    p.add_argument("--cache", default=str(ROOT / "runs" / "architectures.json"))
    p.add_argument("--only", default=None, help="ZOO:NAME, comma-separated: verify only these (others kept)")
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ensure_torchvision()
    cache = Path(args.cache)
    done = {} if args.fresh or not cache.exists() else json.loads(cache.read_text())
    only = set(args.only.split(",")) if args.only else None
    for zoo, name, size, _ in ARCHS:
        key = f"{zoo}:{name}"
        if key in done and not (only and key in only):
            continue
        if only and key not in only:
            continue
        try:
            row = verify(zoo, name, size)
        except Exception as e:  # noqa: BLE001 - every failure is a row of the table
            row = {"zoo": zoo, "name": name, "input": "x".join(map(str, size)),
                   "error": f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}",
                   "trace": traceback.format_exc()[-2000:]}
        done[key] = row
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps(done, indent=1))
        print(f"{key}: {row.get('error') or (row['sites'], row['stride'], row['actual'], row['check'], row['b1_exact'], row['b4'], row['seconds'])}",
              flush=True)
    rows = [done[f"{z}:{n}"] for z, n, _, _ in ARCHS if f"{z}:{n}" in done]
    render(rows, Path(args.out))
    print(f"wrote {args.out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
