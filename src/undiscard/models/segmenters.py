"""Segmentation models: the project's two small architectures, zoo names, checkpoints.

Accepted model specs (:func:`load_segmenter`):

* ``seg:deeplabv3-tiny`` / ``seg:segformer-tiny`` -- the project's own architectures
  (:func:`build_segmenter`), random weights;
* ``torchvision:NAME`` -- ``deeplabv3_resnet50``, ``deeplabv3_resnet101``,
  ``deeplabv3_mobilenet_v3_large``, ``fcn_resnet50``, ``fcn_resnet101``,
  ``lraspp_mobilenet_v3_large``; random weights (backbone included) unless ``pretrained``;
* ``transformers:ID`` -- ``SegformerForSemanticSegmentation.from_pretrained(ID)`` (a hub
  id such as ``nvidia/segformer-b0-finetuned-ade-512-512``, downloaded, or a local folder);
* ``smp:ARCH:ENCODER`` -- ``segmentation_models_pytorch.create_model(ARCH, ENCODER)``
  (e.g. ``smp:Unet:resnet18``, ``smp:FPN:resnet34``, ``smp:DeepLabV3Plus:resnet18``),
  random weights unless ``pretrained`` (ImageNet encoder weights, downloaded);
* the path of a ``.safetensors`` checkpoint written by :func:`save_segmenter`
  (``zoo/fmnist_seg_deeplabv3.safetensors``, ``zoo/fmnist_seg_segformer.safetensors``).

The two project architectures are small on purpose (both shipped checkpoints together
stay under 2 MB in float16):

* ``deeplabv3-tiny``: torchvision's ``DeepLabV3`` meta-architecture on a narrow timm
  ``ResNet`` (BasicBlock, one block per stage, channels 16-32-64-96, deep stem of width
  8, output stride 16: the last stage is dilated), head = torchvision's ``ASPP``
  (rates 2, 4, 6; 48 channels) + 3x3 conv + 1x1 classifier, logits upsampled to the
  input inside the model (bilinear). Sites: stem conv, max-pool, layer2, layer3 (the
  dilated layer4 subsamples nowhere); the inner two are searched: 16 states.
* ``segformer-tiny``: transformers ``SegformerForSemanticSegmentation`` with hidden
  sizes 16-32-64-128, one block per stage, heads 1-1-2-4, an all-MLP head of width 64.
  Sites: four overlapping patch embeddings (strides 4, 2, 2, 2) plus the attention
  sequence reductions (side sites); the inner two patch embeddings are searched: 16
  states. Its head takes every stage, so the search runs through the engine's fallback.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from undiscard.models.spec import (META_ARCH, META_IN_CHANS, META_INPUT_SIZE, META_NUM_CLASSES,
                                   import_torchvision, is_download_error, parse_input_size, parse_int, unknown_name)
from undiscard.errors import UndiscardError, UnknownModelError

__all__ = [
    "SEG_ARCHS",
    "LoadedSegmenter",
    "build_segmenter",
    "load_segmenter",
    "parameter_count",
    "save_segmenter",
]

SEG_SPEC_FORMS = (
    "accepted segmentation model specs: 'seg:deeplabv3-tiny' or 'seg:segformer-tiny' (the project's own, random "
    "weights), 'torchvision:NAME' (deeplabv3_resnet50, fcn_resnet50, deeplabv3_mobilenet_v3_large, ...), "
    "'transformers:ID' (e.g. transformers:nvidia/segformer-b0-finetuned-ade-512-512, or a local folder), "
    "'smp:ARCH:ENCODER' (e.g. smp:Unet:resnet18), or the path of a .safetensors checkpoint written by "
    "undiscard train-segmenter"
)

_META_TASK = "undiscard.task"
_META_CONFIG = "undiscard.seg_config"

# --------------------------------------------------------------------- the project's architectures

class _FeatureTrunk(nn.Module):
    """A timm network's ``forward_features`` as the ``{"out": features}`` dict torchvision's heads read."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.body = net

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": self.body.forward_features(x)}


def _deeplabv3_tiny(num_classes: int, in_chans: int, *, channels=(16, 32, 64, 96), layers=(1, 1, 1, 1),
                    stem_width: int = 8, head_channels: int = 48, rates=(2, 4, 6), output_stride: int = 16) -> nn.Module:
    from undiscard.compat import ensure_torchvision

    ensure_torchvision()
    from timm.models.resnet import BasicBlock, ResNet
    from torchvision.models.segmentation.deeplabv3 import ASPP, DeepLabV3

    net = ResNet(block=BasicBlock, layers=list(layers), channels=tuple(channels), in_chans=in_chans,
                 stem_type="deep", stem_width=stem_width, output_stride=output_stride, num_classes=0, global_pool="")
    head = nn.Sequential(
        ASPP(channels[-1], list(rates), out_channels=head_channels),
        nn.Conv2d(head_channels, head_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(head_channels),
        nn.ReLU(),
        nn.Conv2d(head_channels, num_classes, 1),
    )
    return DeepLabV3(_FeatureTrunk(net), head, None)


def _segformer_tiny(num_classes: int, in_chans: int, *, hidden_sizes=(16, 32, 64, 128), depths=(1, 1, 1, 1),
                    num_attention_heads=(1, 1, 2, 4), decoder_hidden_size: int = 64, mlp_ratios=(4, 4, 4, 4)) -> nn.Module:
    from undiscard.compat import ensure_torchvision

    ensure_torchvision()
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    cfg = SegformerConfig(num_channels=in_chans, hidden_sizes=list(hidden_sizes), depths=list(depths),
                          num_attention_heads=list(num_attention_heads), decoder_hidden_size=decoder_hidden_size,
                          mlp_ratios=list(mlp_ratios), num_labels=num_classes, semantic_loss_ignore_index=255)
    return SegformerForSemanticSegmentation(cfg)


SEG_ARCHS = {"deeplabv3-tiny": _deeplabv3_tiny, "segformer-tiny": _segformer_tiny}


def build_segmenter(arch: str, num_classes: int = 11, in_chans: int = 1, **config: Any) -> nn.Module:
    """One of the project's architectures (:data:`SEG_ARCHS`), random weights, eval mode.

    Args:
        arch: ``"deeplabv3-tiny"`` or ``"segformer-tiny"`` (see the module docstring).
        num_classes, in_chans: output classes and input channels.
        **config: overrides of the architecture's defaults (e.g. ``channels=(16, 32, 64, 128)``).

    Returns:
        The model; called on ``(N, in_chans, H, W)`` it returns torchvision's
        ``{"out": (N, K, H, W)}`` (deeplabv3) or transformers' output with
        ``.logits`` ``(N, K, H/4, W/4)`` (segformer, call with ``pixel_values=``).
    """
    if arch not in SEG_ARCHS:
        raise UnknownModelError(f"no segmentation architecture {arch!r}; the project's are {sorted(SEG_ARCHS)}")
    if num_classes < 1 or in_chans < 1:
        raise UndiscardError(f"num_classes and in_chans must be positive; got {num_classes}, {in_chans}")
    try:
        model = SEG_ARCHS[arch](num_classes, in_chans, **config)
    except TypeError as exc:
        raise UndiscardError(f"bad configuration for {arch}: {exc}") from exc
    return model.eval()


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------- loading by name

@dataclass
class LoadedSegmenter:
    """A segmentation model ready to run (eval mode), plus what the CLI needs to know.

    ``input_size`` ``(C, H, W)`` is the model's default input; ``num_classes`` its output
    classes; ``pretrained``: the weights are not a random initialisation; ``note`` says
    where they came from.
    """

    model: nn.Module
    spec: str
    input_size: tuple[int, int, int]
    num_classes: int
    pretrained: bool
    note: str


_RANDOM_NOTE = "random weights (no pretrained weights requested)"


def _download_error(spec: str, exc: BaseException) -> UndiscardError:

    why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if is_download_error(exc):
        return UndiscardError(f"the weights of {spec} could not be downloaded ({why}). Check the network connection "
                              "(pretrained weights need one), or pass a local folder / checkpoint instead")
    return UndiscardError(f"could not load {spec}: {why}")


def _load_torchvision(name: str, spec: str, pretrained: bool, num_classes: int | None, in_chans: int | None) -> LoadedSegmenter:

    tv = import_torchvision()
    names = tv.models.list_models(module=tv.models.segmentation)
    if name not in names:

        raise unknown_name("torchvision", name, names,
                            "python -c \"import torchvision; print(torchvision.models.list_models(module=torchvision.models.segmentation))\"")
    if in_chans not in (None, 3):
        raise UndiscardError(f"torchvision segmentation models take 3 input channels, not in_chans={in_chans}; "
                             "use smp:ARCH:ENCODER (any channel count) or the project's seg: architectures")
    kw: dict[str, Any] = {"weights": "DEFAULT" if pretrained else None, "weights_backbone": None}
    if pretrained:
        kw.pop("weights_backbone")
    if num_classes is not None:
        kw["num_classes"] = num_classes
    try:
        model = tv.models.get_model(name, **kw)
    except Exception as exc:
        raise _download_error(spec, exc) from exc
    k = num_classes if num_classes is not None else _out_channels(model)
    note = "pretrained weights (torchvision DEFAULT)" if pretrained else _RANDOM_NOTE
    return LoadedSegmenter(model.eval(), spec, (3, 520, 520), k, pretrained, note)


def _out_channels(model: nn.Module) -> int:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            last = m
    if last is None:
        raise UndiscardError(f"cannot tell the number of classes of {type(model).__name__}")
    return int(last.out_channels)


def _load_transformers(name: str, spec: str) -> LoadedSegmenter:
    from undiscard.compat import ensure_torchvision

    ensure_torchvision()
    try:
        from transformers import AutoModelForSemanticSegmentation
    except ImportError as exc:
        raise UndiscardError(f"transformers is not installed ({exc}); pip install 'undiscard[zoo]'") from exc
    if not name:
        raise UnknownModelError(f"{spec}: name a model, e.g. transformers:nvidia/segformer-b0-finetuned-ade-512-512")
    try:
        model = AutoModelForSemanticSegmentation.from_pretrained(name)
    except Exception as exc:
        raise _download_error(spec, exc) from exc
    c = int(getattr(model.config, "num_channels", 3))
    size = getattr(model.config, "image_size", 512)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    return LoadedSegmenter(model.eval(), spec, (c, size, size), int(model.config.num_labels), True,
                           f"weights from transformers ({name})")


def _load_smp(rest: str, spec: str, pretrained: bool, num_classes: int | None, in_chans: int | None) -> LoadedSegmenter:
    from undiscard.compat import ensure_torchvision

    ensure_torchvision()
    try:
        import segmentation_models_pytorch as smp
    except ImportError as exc:
        raise UndiscardError(f"segmentation_models_pytorch is not installed ({exc}); "
                             "pip install segmentation-models-pytorch (or 'undiscard[zoo]')") from exc
    arch, _, encoder = rest.partition(":")
    if not arch or not encoder:
        raise UnknownModelError(f"{spec}: write smp:ARCH:ENCODER, e.g. smp:Unet:resnet18 or smp:FPN:resnet34")
    k = num_classes if num_classes is not None else 1
    c = in_chans if in_chans is not None else 3
    try:
        model = smp.create_model(arch, encoder_name=encoder, encoder_weights="imagenet" if pretrained else None,
                                 classes=k, in_channels=c)
    except KeyError as exc:
        raise UnknownModelError(f"{spec}: segmentation_models_pytorch knows no architecture or encoder {exc}") from exc
    except Exception as exc:
        raise _download_error(spec, exc) from exc
    note = "ImageNet encoder weights (smp), random decoder" if pretrained else _RANDOM_NOTE
    return LoadedSegmenter(model.eval(), spec, (c, 512, 512), k, pretrained, note)


# --------------------------------------------------------------------- checkpoints

def save_segmenter(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    arch: str,
    num_classes: int,
    in_chans: int,
    input_size: tuple[int, int, int],
    config: dict | None = None,
    extra_metadata: dict[str, str] | None = None,
    half: bool = True,
) -> Path:
    """Write one of the project's segmenters to ``.safetensors`` (float16 by default).

    The metadata (``undiscard.arch`` = ``seg:ARCH``, classes, channels, input size ``C,H,W``
    and the builder ``config``) lets :func:`load_segmenter` rebuild it.
    """
    from safetensors.torch import save_model

    if arch.removeprefix("seg:") not in SEG_ARCHS:
        raise UndiscardError(f"arch must be one of {['seg:' + a for a in SEG_ARCHS]}; got {arch!r}")
    size = tuple(int(v) for v in input_size)
    if len(size) != 3:
        raise UndiscardError(f"input_size must be (C, H, W), got {input_size!r}")
    meta = {
        META_ARCH: "seg:" + arch.removeprefix("seg:"),
        _META_TASK: "segmentation",
        META_NUM_CLASSES: str(int(num_classes)),
        META_IN_CHANS: str(int(in_chans)),
        META_INPUT_SIZE: ",".join(map(str, size)),
        _META_CONFIG: json.dumps(config or {}),
    }
    meta.update({str(k): str(v) for k, v in (extra_metadata or {}).items()})
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_model(copy.deepcopy(model).half() if half else model, str(out), metadata=meta)
    return out


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The metadata of a ``.safetensors`` file."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as exc:
        raise UndiscardError(f"{path} is not a readable safetensors file: {exc}") from exc


def _load_checkpoint(path: Path, spec: str) -> LoadedSegmenter:
    from safetensors.torch import load_file


    meta = read_metadata(path)
    arch = meta.get(META_ARCH, "")
    if not arch.startswith("seg:"):
        what = f"a model of arch {arch!r}" if arch else "no 'undiscard.arch' metadata"
        raise UndiscardError(f"{path} holds {what}, not one of undiscard's segmentation checkpoints (arch 'seg:...'). "
                             "Classification checkpoints go to `undiscard eval` without --task segmentation.")
    k = parse_int(meta, META_NUM_CLASSES, path)
    c = parse_int(meta, META_IN_CHANS, path)
    if k is None or c is None:
        raise UndiscardError(f"{path}: metadata needs {META_NUM_CLASSES} and {META_IN_CHANS}")
    try:
        config = json.loads(meta.get(_META_CONFIG) or "{}")
    except json.JSONDecodeError as exc:
        raise UndiscardError(f"{path}: metadata {_META_CONFIG} is not JSON ({exc})") from exc
    model = build_segmenter(arch.removeprefix("seg:"), k, c, **config)
    state = load_file(str(path), device="cpu")
    own = model.state_dict()
    state = {key: (t.to(own[key].dtype) if key in own and t.is_floating_point() else t) for key, t in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise UndiscardError(f"{path} does not match the architecture {arch} it names: {exc}") from exc
    size = parse_input_size(meta[META_INPUT_SIZE], path) if META_INPUT_SIZE in meta else (c, 96, 96)
    return LoadedSegmenter(model.eval(), spec, size, k, True, f"weights from checkpoint {path} ({arch})")


def load_segmenter(spec: str, *, pretrained: bool = False, num_classes: int | None = None,
                   in_chans: int | None = None) -> LoadedSegmenter:
    """Build or load the segmentation model ``spec`` names (see the module docstring).

    ``num_classes`` / ``in_chans`` size a random-weight build (for a checkpoint they come
    from its metadata, and a different request is an error). Raises
    :class:`UnknownModelError` for names nobody knows and :class:`UndiscardError` for
    weights that cannot be downloaded or read. The model is returned in eval mode.
    """
    spec = spec.strip()
    if spec.startswith("seg:"):
        arch = spec[4:]
        if pretrained:
            raise UndiscardError(f"{spec} has no pretrained weights; train them with `undiscard train-segmenter` "
                                 "or load zoo/fmnist_seg_*.safetensors")
        k, c = num_classes or 11, in_chans or 1
        model = build_segmenter(arch, k, c)
        return LoadedSegmenter(model, spec, (c, 96, 96), k, False, _RANDOM_NOTE)
    if spec.startswith("torchvision:"):
        return _load_torchvision(spec[len("torchvision:"):], spec, pretrained, num_classes, in_chans)
    if spec.startswith("transformers:"):
        return _load_transformers(spec[len("transformers:"):], spec)
    if spec.startswith("smp:"):
        return _load_smp(spec[len("smp:"):], spec, pretrained, num_classes, in_chans)
    path = Path(os.path.expanduser(spec))
    if path.is_file():
        if path.suffix.lower() != ".safetensors":
            raise UnknownModelError(f"{spec}: segmentation checkpoints are .safetensors files; {SEG_SPEC_FORMS}")
        loaded = _load_checkpoint(path, spec)
        for given, stored, what in ((num_classes, loaded.num_classes, "num_classes"), (in_chans, loaded.input_size[0], "in_chans")):
            if given is not None and given != stored:
                raise UndiscardError(f"{path} was saved with {what}={stored}, but {what}={given} was requested")
        return loaded
    if path.is_dir():
        return _load_transformers(str(path), spec)  # a local transformers folder (config.json + weights)
    if "/" in spec or os.sep in spec or path.suffix:
        raise UnknownModelError(f"no such file: {spec}; {SEG_SPEC_FORMS}")
    raise UnknownModelError(f"cannot load segmentation model {spec!r}. {SEG_SPEC_FORMS}")
