"""The ``undiscard`` command line: the parser (one ``add_<command>`` per subcommand) and :func:`main`.

    undiscard sites [MODEL]              the subsampling sites of a model, as a table or JSON
    undiscard check [MODEL]              the invariants that hold for any model; exit 1 on a failure
    undiscard eval MODEL                 accuracy, NLL, ECE and cost of the method against the plain model
                                         (classification, segmentation, image TTA, a fitted --config)
    undiscard fit MODEL --data VAL       choose the configuration on validation (or keep the plain model)
    undiscard fit-policy MODEL           dataset-level state lists, against per-image search
    undiscard tta-study MODEL            image-space TTA without and with ours at equal cost
    undiscard train-aggregator MODEL     train the attention aggregator on a frozen backbone
    undiscard train-backbone ARCH        train a zoo classifier on Fashion-MNIST (seeded, resumable)
    undiscard train-segmenter ARCH       train a zoo segmenter on Fashion-MNIST-Seg (seeded, resumable)
    undiscard bench                      time, FLOPs and memory of ours against the plain model and the floor

Every option: docs/cli.md (generated from this parser). MODEL is ``timm:NAME``,
``torchvision:NAME``, ``zoo:NAME`` or a checkpoint path (:mod:`undiscard.models.classifiers`).
"""

from __future__ import annotations

import argparse
import sys
import warnings
from collections.abc import Sequence

from undiscard.cli import commands as c
from undiscard.cli.commands import DEFAULT_MODEL
from undiscard.errors import UndiscardError

__all__ = ["build_parser", "main", "SUBCOMMANDS"]


def _tta_args(sp):
    sp.add_argument("--tta-val", default="fashion-mnist:val", help="data the image aggregators are fitted on")
    sp.add_argument("--tta-val-images", type=int, default=500, help="validation images (default 500)")
    sp.add_argument("--tta-pool", type=int, default=20, help="candidate views, identity first (default 20)")
    sp.add_argument("--cache-dir", default="runs/cache", help="where view logits are cached (default runs/cache)")

def _model_args(sp):
    sp.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                    help=f"timm:NAME, torchvision:NAME or a checkpoint path (default {DEFAULT_MODEL})")
    sp.add_argument("--input-size", nargs="+", type=int, metavar="N",
                    help="example input size without the batch: C L (1-D: audio), C H W (images) or C T H W "
                         "(video, volumes) (default: the model's own)")
    sp.add_argument("--pretrained", action="store_true", help="download pretrained weights (default: random)")
    sp.add_argument("--num-classes", type=int, default=None, help="build the zoo model with this many classes")
    sp.add_argument("--in-chans", type=int, default=None, help="build the zoo model with this many input channels")
    sp.add_argument("--searchable", default="inner",
                    help="searchable sites: inner (default: main-path sites but first and last), main, all, or 1,2,3")
    _trust_arg(sp)

def _trust_arg(sp):
    sp.add_argument("--trust-pickle", action="store_true",
                    help="allow MODEL to be a .pt/.pth whole-module pickle: loading it runs whatever code the file "
                         "holds, so only for files you trust (default: refused; prefer a .safetensors checkpoint)")

def _corrupt_arg(sp):
    sp.add_argument("--skip-corrupt", action="store_true",
                    help="with an image folder as --data: leave out the images that cannot be decoded, with a "
                         "warning naming them (default: such an image is an error naming it)")


def add_sites(sub) -> None:
    """``undiscard sites``."""
    sp = sub.add_parser("sites", help="list the subsampling sites of a model")
    _model_args(sp)
    sp.add_argument("--json", action="store_true", help="print a JSON list of sites")
    sp.set_defaults(func=c.cmd_sites)


def add_check(sub) -> None:
    """``undiscard check``."""
    sp = sub.add_parser("check", help="run the invariants that hold for any model; exit 1 on a failure")
    _model_args(sp)
    sp.add_argument("--batch", type=int, default=4, help="batch size for the per-sample check (default 4)")
    sp.set_defaults(func=c.cmd_check)


def add_eval(sub) -> None:
    """``undiscard eval``."""
    sp = sub.add_parser("eval", help="accuracy, NLL, ECE and cost of the method vs the plain model",
                        description="Accuracy, NLL, ECE and cost of the method vs the plain model. Distributed: "
                                    "torchrun --nproc-per-node N -m undiscard eval MODEL ... shards the batches "
                                    "across N processes; rank 0 prints and writes the merged numbers, identical "
                                    "to one process's.")
    sp.add_argument("model", help="a checkpoint (.safetensors from train-backbone) or timm:NAME; with --task "
                                  "segmentation: a checkpoint from train-segmenter, seg:deeplabv3-tiny, "
                                  "torchvision:deeplabv3_resnet50 (or fcn_resnet50, ...), smp:ARCH:ENCODER (e.g. "
                                  "smp:Unet:resnet18) or transformers:ID (a Hugging Face SegFormer id or folder)")
    sp.add_argument("--task", choices=("classification", "segmentation"), default="classification",
                    help="classification (default: top-1, NLL, ECE) or segmentation (mIoU, pixel accuracy)")
    sp.add_argument("--data", default="fashion-mnist",
                    help="fashion-mnist[:train|val|test] (default test) or an image folder; with --task segmentation: "
                         "fashion-mnist-seg[:split] (default fashion-mnist-seg:test), cityscapes:ROOT[:split] or "
                         "ade20k:ROOT[:split]")
    sp.add_argument("--size", default=None, metavar="H[,W]",
                    help="segmentation only: resize the images to H x W (H alone: square), bilinearly, and the label "
                         "maps nearest-neighbour (needed for data sets of mixed image sizes such as ADE20K)")
    sp.add_argument("--budget", default=(1, 2, 4, 8, 16),
                    help="budgets B, comma-separated (default 1,2,4,8,16; with --task segmentation 1,4,10, leaving "
                         "out those above the model's search space)")
    sp.add_argument("--criterion", default="entropy", help="search criteria, comma-separated: entropy,learned,random,displacement")
    sp.add_argument("--aggregate", default=None,
                    help="aggregations, comma-separated: mean,entropy,attention (default mean,entropy; with "
                         "--image-tta ONE, default entropy)")
    sp.add_argument("--aggregator", default=None, help="trained aggregator (.safetensors) for attention / learned")
    sp.add_argument("--searchable", default="inner", help="searchable sites: inner (default), main, all, or 1,2,3")
    sp.add_argument("--no-align", action="store_true", help="aggregate unaligned maps (ablation)")
    sp.add_argument("--limit", type=int, default=None, help="evaluate this many images (default all)")
    sp.add_argument("--start", type=int, default=0, help="first image index (default 0)")
    sp.add_argument("--batch-size", type=int, default=128)
    sp.add_argument("--max-batch", type=int, default=64,
                    help="at most this many image-states per forward (default 64; larger batches are slower per image on CPU)")
    sp.add_argument("--engine", choices=("trie", "segments", "rerun"), default=None,
                    help="trie (default; segments with --torchcompile): each distinct prefix computed once across the "
                         "search; segments: the same on a graph captured once (less Python per op, compilable); "
                         "rerun: one forward per state")
    sp.add_argument("--width", type=int, default=1,
                    help="states evaluated per image per search step (default 1: the criterion picks each; 0: all neighbours)")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--timing-images", type=int, default=32, help="images the cost is measured on (default 32)")
    sp.add_argument("--repeats", type=int, default=3, help="timing repeats, the median is reported (default 3)")
    sp.add_argument("--single-states", action="store_true", help="also the accuracy of every one-site state")
    sp.add_argument("--config", default=None, metavar="PATH",
                    help="evaluate the configuration `undiscard fit` wrote for this model against the plain model "
                         "(gain with 95%% interval, McNemar test, NLL / ECE, time)")
    sp.add_argument("--consistency", type=int, default=None, metavar="N",
                    help="also the shift consistency: the share of images predicted the same under two random "
                         "shifts of up to N pixels (plain vs the configuration)")
    sp.add_argument("--calibration-val", default=None, metavar="DATA",
                    help="with --config / --consistency: validation data to fit each predictor's temperature on, "
                         "for NLL and ECE after temperature scaling (e.g. fashion-mnist:val)")
    sp.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    g = sp.add_argument_group("timm validate.py flags (classification)")
    g.add_argument("--pretrained", action="store_true",
                   help="timm:NAME / torchvision:NAME: download the pretrained weights (default: random weights)")
    g.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    g.add_argument("--amp", action="store_true",
                   help="autocast the plain model and the method (the search's entropies stay float32)")
    g.add_argument("--amp-dtype", default=None, choices=("float16", "bfloat16"),
                   help="autocast dtype (implies --amp; default bfloat16 on CPU, float16 on CUDA)")
    g.add_argument("--channels-last", action="store_true", help="model and images in channels_last memory format")
    g.add_argument("--torchcompile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="torch.compile the model (default backend inductor); the engine becomes segments, whose "
                        "captured graph is compiled with the same backend, unless --engine says otherwise")
    g.add_argument("--retry", action="store_true",
                   help="on out-of-memory, halve the images per forward and go on (same states per image)")
    g.add_argument("--results-file", default=None, metavar="PATH",
                   help="also write one row per predictor with timm's columns (model, top1, top1_err, top5, top5_err, "
                        "param_count, img_size, interpolation) and ours (budget, criterion, aggregate, cost in plain "
                        "forwards, ms_per_img, peak_memory_mb)")
    g.add_argument("--results-format", default=None, choices=("csv", "json"),
                   help="format of --results-file (default: json for a .json path, csv otherwise)")
    sp.add_argument("--json", default=None,
                    help="write results here; progress is saved per shard as it completes and a rerun of the same "
                         "command resumes it (OUT.partial.safetensors, or OUT.shard{r}of{N}.partial.safetensors under "
                         "torchrun); a completed OUT is reused by the same command (printed, not recomputed) and "
                         "refused with other arguments")
    sp.add_argument("--fresh", action="store_true",
                    help="delete the saved partial results and a completed --json OUT and start over (needed after "
                         "changing arguments)")
    _trust_arg(sp)
    _corrupt_arg(sp)
    sp.add_argument("--plot", default=None, help="write a PNG of accuracy and cost vs budget; with --task segmentation: "
                                                 "the first images' input / ground truth / baseline / ours and mIoU "
                                                 "vs budget")
    _tta_args(sp)
    sp.add_argument("--image-tta", default="none", choices=("none", "flips", "mean", "max", "gps", "augtta", "classtta"),
                    help="image-space TTA stacked on the method: each view gets B_feat = each --budget states; "
                         "learned aggregators are fitted on --tta-val (default none: feature space only)")
    sp.add_argument("--image-budget", type=int, default=None,
                    help="image views (default 4; GPS: picks with replacement; others: the first N of the pool; "
                         "not with flips, which is 2 views)")
    sp.add_argument("--image-aggregator", default=None,
                    help="a fitted gps/augtta/classtta aggregator (.safetensors from --save-image-aggregators) to "
                         "apply instead of fitting one; refused if fitted on another view list, model or input size")
    sp.add_argument("--save-image-aggregators", default=None, metavar="DIR",
                    help="save every fitted image aggregator here, one .safetensors per row")
    sp.set_defaults(func=c.cmd_eval)


def add_tta_study(sub) -> None:
    """``undiscard tta-study``."""
    sp = sub.add_parser("tta-study", help="image-space TTA baselines without and with recovered activations, at equal B_total",
                        description="Every image method (mean, max, GPS, AugTTA, ClassTTA, flips) without ours (B_feat=1) "
                                    "and with ours (B_feat=--feature-budget) at each B_total of --totals; learned "
                                    "aggregators fitted on --tta-val; logits cached under --cache-dir (a rerun resumes).")
    sp.add_argument("model", help="a checkpoint (.safetensors from train-backbone) or timm:NAME")
    sp.add_argument("--data", default="fashion-mnist:test", help="test data (default fashion-mnist:test)")
    sp.add_argument("--totals", default="10,20", help="B_total values, comma-separated (default 10,20)")
    sp.add_argument("--feature-budget", type=int, default=5, help="B_feat of the rows with ours (default 5)")
    sp.add_argument("--criterion", default="entropy", help="feature-space search criterion (default entropy)")
    sp.add_argument("--aggregate", default="entropy", help="feature-space aggregation (default entropy)")
    sp.add_argument("--aggregator", default=None, help="trained feature aggregator for attention / learned")
    sp.add_argument("--searchable", default="inner")
    sp.add_argument("--limit", type=int, default=1000, help="test images (default 1000)")
    sp.add_argument("--start", type=int, default=0)
    sp.add_argument("--batch-size", type=int, default=128)
    sp.add_argument("--max-batch", type=int, default=64)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--timing-images", type=int, default=32)
    sp.add_argument("--repeats", type=int, default=3)
    sp.add_argument("--threads", type=int, default=0)
    sp.add_argument("--json", default=None, help="write the results here (a report of other arguments is not "
                                                 "overwritten without --fresh)")
    sp.add_argument("--fresh", action="store_true", help="delete the cached logits of these settings first (and "
                                                         "allow replacing a --json of other arguments)")
    _trust_arg(sp)
    _corrupt_arg(sp)
    _tta_args(sp)
    sp.set_defaults(func=c.cmd_tta_study)


def add_train_aggregator(sub) -> None:
    """``undiscard train-aggregator``."""
    sp = sub.add_parser("train-aggregator", help="train the attention aggregator on a frozen backbone")
    sp.add_argument("model", help="the backbone: a checkpoint or timm:NAME")
    sp.add_argument("--out", required=True, help="output .safetensors path")
    sp.add_argument("--data", default="fashion-mnist:train", help="training data (default fashion-mnist:train)")
    sp.add_argument("--images", type=int, default=4000, help="training images (default 4000)")
    sp.add_argument("--start", type=int, default=0)
    sp.add_argument("--states", type=int, default=16, help="states cached per image; budgets drawn from 1..this")
    sp.add_argument("--epochs", type=int, default=10)
    sp.add_argument("--batch-size", type=int, default=64)
    sp.add_argument("--lr", type=float, default=1e-3)
    sp.add_argument("--dim", type=int, default=128)
    sp.add_argument("--heads", type=int, default=4)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--searchable", default="inner")
    sp.add_argument("--no-align", action="store_true", help="train on unaligned maps (ablation)")
    sp.add_argument("--threads", type=int, default=0)
    sp.add_argument("--fresh", action="store_true",
                    help="delete the feature cache and an existing --out first (an --out trained with the same "
                         "settings is otherwise kept, one of other settings refused)")
    _trust_arg(sp)
    _corrupt_arg(sp)
    sp.set_defaults(func=c.cmd_train_aggregator)


def add_train_backbone(sub) -> None:
    """``undiscard train-backbone``."""
    sp = sub.add_parser("train-backbone", help="train a zoo backbone on Fashion-MNIST (seeded, resumable)")
    sp.add_argument("arch", help="zoo:NAME (zoo:fmnist-resnet, zoo:fmnist-mobilenet, zoo:fmnist-pvt), timm:NAME or "
                                 "torchvision:NAME")
    sp.add_argument("--out", required=True, help="output .safetensors path")
    sp.add_argument("--augment", default="crop", choices=("crop", "shift"),
                    help="crop: random-resized crop + translation + flip, per image (default); shift: random "
                         "translation by up to 3 source pixels + flip, batched (cheaper)")
    sp.add_argument("--offset-augment", type=float, default=0.0, metavar="P",
                    help="with probability P per sample, train under a random state of the searchable sites "
                         "(default 0: standard training)")
    sp.add_argument("--size", type=int, default=128, help="input side in pixels (default 128)")
    sp.add_argument("--in-chans", type=int, default=1, help="input channels (default 1)")
    sp.add_argument("--epochs", type=float, default=1.0, help="epochs, fractions allowed (default 1)")
    sp.add_argument("--batch-size", type=int, default=128)
    sp.add_argument("--lr", type=float, default=2e-3)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    sp.add_argument("--fp32", action="store_true", help="store float32 weights (default float16)")
    sp.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST IDX files")
    sp.add_argument("--fresh", action="store_true",
                    help="delete the resume file, an existing --out and its JSON summary first (an --out of the same "
                         "recipe is otherwise kept, one of another recipe refused)")
    sp.add_argument("--replace", action="store_true",
                    help="train this recipe over an --out of another recipe; the old model stays in place, usable, "
                         "until the new one is written over it (interrupt and rerun to resume)")
    sp.set_defaults(func=c.cmd_train_backbone)


def add_train_segmenter(sub) -> None:
    """``undiscard train-segmenter``."""
    sp = sub.add_parser("train-segmenter", help="train deeplabv3-tiny or segformer-tiny on fashion-mnist-seg (seeded, resumable)")
    sp.add_argument("arch", choices=("deeplabv3-tiny", "segformer-tiny"))
    sp.add_argument("--out", required=True, help="output .safetensors path (a JSON summary is written beside it)")
    sp.add_argument("--steps", type=int, default=None, help="optimiser steps (default: the shipped recipe's)")
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--lr", type=float, default=None, help="peak learning rate (default: the shipped recipe's)")
    sp.add_argument("--size", type=int, default=96, help="canvas side in pixels (default 96)")
    sp.add_argument("--val-images", type=int, default=500, help="fashion-mnist-seg:val canvases for the final mIoU")
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    sp.add_argument("--fp32", action="store_true", help="store float32 weights (default float16)")
    sp.add_argument("--data-root", default=None, help="folder with the Fashion-MNIST IDX files")
    sp.add_argument("--fresh", action="store_true",
                    help="delete the resume file, an existing --out and its JSON summary first (an --out of the same "
                         "recipe is otherwise kept, one of another recipe refused)")
    sp.set_defaults(func=c.cmd_train_segmenter)


def add_fit(sub) -> None:
    """``undiscard fit``."""
    sp = sub.add_parser("fit", help="choose the configuration (search, budget, aggregation, or plain) on validation "
                                    "data within a cost cap; write it as JSON",
                        description="Choose, on the model's validation data, the configuration that maximises "
                                    "validated top-1 within --max-cost plain forwards; the plain model unless the "
                                    "gain is significant on validation. Writes a JSON config that "
                                    "undiscard.wrap(model, config=PATH) and `undiscard eval --config PATH` apply.")
    sp.add_argument("model", help="a checkpoint (.safetensors), zoo:NAME, timm:NAME or torchvision:NAME")
    sp.add_argument("--data", default="fashion-mnist:val", help="validation data: fashion-mnist:val (default) or an "
                                                                "image folder")
    sp.add_argument("--out", required=True, help="the configuration to write (.json)")
    sp.add_argument("--max-cost", type=int, default=4, help="at most this many states per image (default 4)")
    sp.add_argument("--searchable", default="inner", help="sites searched: inner (default), main, all, or 1,2,3")
    sp.add_argument("--alpha", type=float, default=0.05, help="significance level of the gain over plain (0.05)")
    sp.add_argument("--limit", type=int, default=None, help="use the first N validation images")
    sp.add_argument("--batch-size", type=int, default=32)
    sp.add_argument("--seed", type=int, default=0)
    sp.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    _trust_arg(sp)
    _corrupt_arg(sp)
    sp.set_defaults(func=c.cmd_fit)


def add_fit_policy(sub) -> None:
    """``undiscard fit-policy``."""
    sp = sub.add_parser("fit-policy", help="fit dataset-level state lists on the val split; compare with per-image search")
    sp.add_argument("model", help="a checkpoint (.safetensors) trained on Fashion-MNIST")
    sp.add_argument("--val-images", type=int, default=500, help="fashion-mnist:val images the policy is fitted on")
    sp.add_argument("--limit", type=int, default=2000, help="fashion-mnist:test images evaluated (default 2000)")
    sp.add_argument("--max-budget", type=int, default=10, help="longest policy / per-image search budget (default 10)")
    sp.add_argument("--spaces", default=None, help="search spaces NAME=I,J;NAME=K (default: inner, last, last2, last3)")
    sp.add_argument("--timing-images", type=int, default=32)
    sp.add_argument("--repeats", type=int, default=3)
    sp.add_argument("--threads", type=int, default=0)
    sp.add_argument("--json", default=None, help="write results here; a rerun resumes from it (same settings; "
                                                 "other settings are refused)")
    sp.add_argument("--fresh", action="store_true", help="ignore a saved --json and start over")
    sp.add_argument("--plot", default=None, help="PNG of accuracy vs cost with the Pareto front")
    _trust_arg(sp)
    sp.set_defaults(func=c.cmd_fit_policy)


def add_bench(sub) -> None:
    """``undiscard bench``."""
    sp = sub.add_parser("bench", help="time/FLOPs/memory of ours vs the plain model, a re-run baseline and the trie floor")
    sp.add_argument("--models", default="resnet18,resnet50,mobilenetv2_100", help="timm models (random weights)")
    sp.add_argument("--size", type=int, default=224)
    sp.add_argument("--batch", type=int, default=16)
    sp.add_argument("--budget", default="1,4,10,16", help="budgets B (default 1,4,10,16)")
    sp.add_argument("--repeats", type=int, default=3, help="interleaved repeats; medians are reported")
    sp.add_argument("--threads", type=int, default=0, help="torch CPU threads (default: torch's)")
    sp.add_argument("--channels-last", action="store_true", help="run every model in channels_last")
    sp.add_argument("--memory", default="resnet50:10:16,resnet50:32:8",
                    help="peak-RSS points MODEL:B:BATCH, comma-separated ('' for none)")
    sp.add_argument("--options", default="resnet50", help="model to try channels_last / torch.compile on ('' for none)")
    sp.add_argument("--no-compile", action="store_true", help="skip the torch.compile variant")
    sp.add_argument("--latency", default="resnet50,mobilenetv2_100",
                    help="models timed at batch 1 (p50/p90 ms per image; '' for none)")
    sp.add_argument("--latency-repeats", type=int, default=15, help="batch-1 repeats (default 15)")
    sp.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    sp.add_argument("--json", default=None, help="write the measurements here")
    sp.add_argument("--plot", default=None, help="write a PNG of time vs B here")
    sp.add_argument("--readme", default=None, help="re-render the <!-- bench:start/end --> section of this Markdown file (docs/benchmarks.md)")
    sp.add_argument("--from-json", default=None, help="measure nothing: render a saved --json")
    sp.set_defaults(func=c.cmd_bench)


#: Every subcommand, in the order ``undiscard --help`` lists them.
SUBCOMMANDS = (add_sites, add_check, add_eval, add_tta_study, add_train_aggregator, add_train_backbone, add_train_segmenter, add_fit, add_fit_policy, add_bench)


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: one ``add_<command>`` per subcommand."""
    p = argparse.ArgumentParser(prog="undiscard", description="Recover the activations that subsampling layers discard.")
    sub = p.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    # The compat guard's one-time notice (undiscard.compat) is for library users; on the
    # command line it would precede every table. Detection ops are never used here.
    warnings.filterwarnings("ignore", message="torchvision's C extension did not load")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UndiscardError as e:
        print(f"undiscard: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nundiscard: interrupted; what was finished is saved: run the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
