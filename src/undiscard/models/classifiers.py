"""Model loading for the CLI: zoo names and local checkpoints.

Accepted model specs:

* ``timm:NAME`` -- a timm model (``timm.list_models()`` lists the names);
* ``torchvision:NAME`` -- a torchvision classification model
  (``torchvision.models.list_models()``);
* a ``.safetensors`` file written by :func:`save_checkpoint` (it carries the
  ``undiscard.arch`` metadata that says which model to build);
* a ``.pt`` / ``.pth`` file holding a whole ``nn.Module`` saved with
  ``torch.save(model, path)``, only with ``trust_pickle=True`` (``--trust-pickle`` on
  the command line): loading it unpickles arbitrary Python objects, which can run any
  code the file holds. Without the opt-in such a file is refused
  (:class:`~undiscard.errors.FileTrustError`); a tensor-only ``.pt`` (a state_dict) is
  read with ``weights_only=True`` just to say what it holds.

Zoo models come with random weights unless ``pretrained=True`` (which downloads
them). Every loaded model is returned in eval mode.
"""

from __future__ import annotations

import copy
import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from undiscard.models.spec import (META_ARCH, META_IN_CHANS, META_INPUT_SIZE, META_NUM_CLASSES, import_timm,
                                   import_torchvision, is_download_error, parse_input_size, parse_int, unknown_name)
from undiscard.errors import FileTrustError, UndiscardError, UnknownModelError

__all__ = ["LoadedModel", "load_model", "save_checkpoint", "SPEC_FORMS"]

SPEC_FORMS = (
    "accepted model specs: 'timm:NAME' (e.g. timm:resnet50), 'torchvision:NAME' "
    "(e.g. torchvision:resnet18), 'zoo:NAME' (the project's own small architectures: zoo:fmnist-resnet, "
    "zoo:fmnist-mobilenet, zoo:fmnist-pvt), or the path of an existing .safetensors checkpoint "
    "(written by undiscard, with 'undiscard.arch' metadata) or .pt/.pth file holding a "
    "whole nn.Module saved with torch.save(model) (loaded only with --trust-pickle / trust_pickle=True)"
)


_RANDOM_NOTE = "random weights (no pretrained weights requested; pass --pretrained to download)"


@dataclass
class LoadedModel:
    """A model ready to run, plus what the CLI needs to know about it.

    ``input_size`` is the model's default input as ``(C, H, W)``. ``pretrained``
    is true when the weights are not a random initialisation (downloaded, or
    read from a checkpoint). ``note`` says where the weights came from.
    """

    model: nn.Module
    spec: str
    input_size: tuple[int, int, int]
    pretrained: bool
    note: str


def _download_failed(spec: str, exc: BaseException) -> UndiscardError:
    return UndiscardError(
        f"pretrained weights for {spec} could not be downloaded ({type(exc).__name__}: "
        f"{str(exc).splitlines()[0] if str(exc) else ''}). Check the network connection, or omit "
        "--pretrained to run with random weights."
    )


def _load_zoo_arch(name: str, spec: str, pretrained: bool, num_classes: int | None,
                   in_chans: int | None) -> LoadedModel:
    from undiscard.models import archs as zoo_archs

    if pretrained:
        raise UndiscardError(f"{spec}: the project's own architectures have no downloadable weights; load a "
                             "checkpoint trained with `undiscard train-backbone` instead")
    c = 1 if in_chans is None else int(in_chans)
    model = zoo_archs.build(name, 10 if num_classes is None else num_classes, c)
    return LoadedModel(model, spec, (c, zoo_archs.INPUT_SIZE, zoo_archs.INPUT_SIZE), False, _RANDOM_NOTE)


def _load_timm(name: str, spec: str, pretrained: bool, num_classes: int | None, in_chans: int | None) -> LoadedModel:
    timm = import_timm()
    if not name or not timm.is_model(name):
        raise unknown_name("timm", name, timm.list_models(), "python -c \"import timm; print(timm.list_models())\"")
    kw: dict = {}
    if num_classes is not None:
        kw["num_classes"] = num_classes
    if in_chans is not None:
        kw["in_chans"] = in_chans
    try:
        model = timm.create_model(name, pretrained=pretrained, **kw)
    except Exception as exc:
        if pretrained and is_download_error(exc):
            raise _download_failed(spec, exc) from exc
        raise
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size") or (3, 224, 224))
    c, h, w = (int(v) for v in size)
    if in_chans is not None:
        c = in_chans
    note = "pretrained weights (timm)" if pretrained else _RANDOM_NOTE
    return LoadedModel(model.eval(), spec, (c, h, w), pretrained, note)


def _load_torchvision(
    name: str, spec: str, pretrained: bool, num_classes: int | None, in_chans: int | None
) -> LoadedModel:
    torchvision = import_torchvision()
    names = torchvision.models.list_models()
    if name not in names:
        raise unknown_name(
            "torchvision", name, names, "python -c \"import torchvision; print(torchvision.models.list_models())\""
        )
    if in_chans not in (None, 3):
        raise UndiscardError(
            f"torchvision models take 3 input channels, not in_chans={in_chans}; "
            f"use a timm model (e.g. timm:{name}) for other channel counts"
        )
    kw: dict = {}
    if num_classes is not None:
        kw["num_classes"] = num_classes
    if not pretrained and "weights_backbone" in inspect.signature(torchvision.models.get_model_builder(name)).parameters:
        kw["weights_backbone"] = None  # random weights all through: no backbone download (segmentation, detection)
    try:
        model = torchvision.models.get_model(name, weights="DEFAULT" if pretrained else None, **kw)
    except Exception as exc:
        if pretrained and is_download_error(exc):
            raise _download_failed(spec, exc) from exc
        if pretrained and num_classes is not None and isinstance(exc, ValueError):
            raise UndiscardError(
                f"torchvision:{name} pretrained weights have a fixed number of classes ({exc}); "
                "omit num_classes or --pretrained"
            ) from exc
        raise
    size = (3, 299, 299) if name == "inception_v3" else (3, 224, 224)
    note = "pretrained weights (torchvision DEFAULT)" if pretrained else _RANDOM_NOTE
    return LoadedModel(model.eval(), spec, size, pretrained, note)


def _load_safetensors(path: Path, spec: str, num_classes: int | None, in_chans: int | None) -> LoadedModel:
    try:
        from safetensors import safe_open
        from safetensors.torch import load_file
    except ImportError as exc:
        raise UndiscardError(
            f"reading {path} needs safetensors ({exc}); install it with: pip install 'undiscard[zoo]'"
        ) from exc
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
    except Exception as exc:
        raise UndiscardError(f"{path} is not a readable safetensors file: {exc}") from exc
    arch = meta.get(META_ARCH)
    if not arch:
        raise UndiscardError(
            f"{path} has no '{META_ARCH}' metadata, so undiscard cannot tell which model to build. "
            f"Save it with undiscard.models.classifiers.save_checkpoint(model, path, arch='timm:NAME', ...), or add "
            f"metadata {{'{META_ARCH}': 'timm:NAME'}} (optionally '{META_NUM_CLASSES}', '{META_IN_CHANS}', "
            f"'{META_INPUT_SIZE}'='C,H,W') when writing it"
        )
    if arch.startswith("seg:"):  # a segmentation checkpoint (undiscard train-segmenter)
        from undiscard.models.segmenters import load_segmenter

        seg = load_segmenter(str(path))
        return LoadedModel(seg.model, spec, seg.input_size, seg.pretrained, seg.note)
    if arch.startswith(("timm:", "torchvision:", "zoo:")) is False:
        raise UndiscardError(f"{path}: metadata {META_ARCH}={arch!r} must be 'timm:NAME', 'torchvision:NAME' or "
                             "'zoo:NAME'")
    ck_classes = parse_int(meta, META_NUM_CLASSES, path)
    ck_chans = parse_int(meta, META_IN_CHANS, path)
    for given, stored, what in ((num_classes, ck_classes, "num_classes"), (in_chans, ck_chans, "in_chans")):
        if given is not None and stored is not None and given != stored:
            raise UndiscardError(f"{path} was saved with {what}={stored}, but {what}={given} was requested")
    loaded = load_model(arch, num_classes=ck_classes, in_chans=ck_chans)
    model = loaded.model
    state = load_file(str(path), device="cpu")
    own = model.state_dict()
    cast = {}
    for key, tensor in state.items():
        ref = own.get(key)
        if ref is not None and tensor.is_floating_point() and ref.is_floating_point() and tensor.dtype != ref.dtype:
            tensor = tensor.to(ref.dtype)
        cast[key] = tensor
    # Tied/shared tensors are stored once (safetensors.torch.save_model drops the aliases):
    # a key that is missing from the file but shares storage with a present key is fine.
    missing = [k for k in own if k not in cast]
    if missing:
        ptr_to_key = {own[k].untyped_storage().data_ptr(): k for k in cast if k in own}
        for k in missing:
            alias = ptr_to_key.get(own[k].untyped_storage().data_ptr())
            if alias is not None:
                cast[k] = cast[alias]
    try:
        model.load_state_dict(cast, strict=True)
    except RuntimeError as exc:
        raise UndiscardError(f"{path} does not match the architecture {arch} it names: {exc}") from exc
    size = parse_input_size(meta[META_INPUT_SIZE], path) if META_INPUT_SIZE in meta else loaded.input_size
    return LoadedModel(model.eval(), spec, size, True, f"weights from checkpoint {path} (arch {arch})")


def _first_conv_channels(model: nn.Module) -> int | None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    return None


def _pickle_refused(path: Path) -> FileTrustError:
    return FileTrustError(
        f"{path} is a pickle that needs Python code to load (e.g. a whole nn.Module saved with torch.save(model)); "
        "unpickling it can run any code the file holds, so it is not loaded without an explicit opt-in. If you "
        "trust the file, pass --trust-pickle (API: load_model(spec, trust_pickle=True)); otherwise load a safetensors "
        f"checkpoint (undiscard.models.classifiers.save_checkpoint(model, 'm.safetensors', arch='timm:NAME', ...) writes one, "
        f"with '{META_ARCH}' metadata naming the architecture) or a zoo spec (timm:NAME, torchvision:NAME)"
    )


def _load_pickle(path: Path, spec: str, trust_pickle: bool = False) -> LoadedModel:
    import pickle

    if trust_pickle:
        # The explicit opt-in: this unpickles arbitrary objects (and runs what they say), the
        # one unrestricted unpickling in undiscard.
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=False)
        except Exception as exc:
            raise UndiscardError(f"could not read {path} with torch.load: {type(exc).__name__}: {exc}") from exc
    else:
        # Tensors and plain containers only (torch's restricted unpickler): enough to tell a
        # state_dict, and it refuses, without running it, anything that names code.
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise _pickle_refused(path) from exc
        except Exception as exc:
            raise UndiscardError(f"could not read {path} with torch.load: {type(exc).__name__}: {exc}") from exc
    if not isinstance(obj, nn.Module):
        kind = "a state_dict" if isinstance(obj, dict) else f"a {type(obj).__name__}"
        raise UndiscardError(
            f"{path} holds {kind}, not a whole model. Save the weights with undiscard.models.classifiers.save_checkpoint(...) to "
            f"a .safetensors file carrying '{META_ARCH}' metadata (e.g. 'timm:resnet18'), or save the full module "
            "with torch.save(model, path) and load it with --trust-pickle"
        )
    cfg = getattr(obj, "pretrained_cfg", None) or {}
    if cfg.get("input_size"):
        c, h, w = (int(v) for v in cfg["input_size"])
    else:
        c, h, w = 3, 224, 224
    chans = _first_conv_channels(obj)
    if chans is not None:
        c = chans
    return LoadedModel(obj.eval(), spec, (c, h, w), True, f"whole module unpickled from {path}")


def load_model(
    spec: str,
    *,
    pretrained: bool = False,
    num_classes: int | None = None,
    in_chans: int | None = None,
    trust_pickle: bool = False,
) -> LoadedModel:
    """Build or load the model that ``spec`` names (see the module docstring).

    ``num_classes`` / ``in_chans`` change the zoo model's head / stem; for a
    checkpoint they come from its metadata. ``trust_pickle=True`` allows a
    ``.pt`` / ``.pth`` whole-module pickle (loading it can run code from the file:
    only for files you trust); without it such a file raises
    :class:`~undiscard.errors.FileTrustError`. Raises :class:`UnknownModelError`
    for a name no zoo knows or a path that does not exist, and
    :class:`UndiscardError` when pretrained weights cannot be downloaded or a
    checkpoint cannot be used. The model is returned in eval mode.
    """
    spec = spec.strip()
    if spec.startswith("timm:"):
        return _load_timm(spec[len("timm:") :], spec, pretrained, num_classes, in_chans)
    if spec.startswith("torchvision:"):
        return _load_torchvision(spec[len("torchvision:") :], spec, pretrained, num_classes, in_chans)
    if spec.startswith("zoo:"):
        return _load_zoo_arch(spec[len("zoo:") :], spec, pretrained, num_classes, in_chans)

    path = Path(os.path.expanduser(spec))
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".safetensors":
            return _load_safetensors(path, spec, num_classes, in_chans)
        if suffix in (".pt", ".pth"):
            return _load_pickle(path, spec, trust_pickle)
        raise UnknownModelError(f"{spec}: unsupported checkpoint extension {suffix!r}; {SPEC_FORMS}")

    looks_like_path = os.sep in spec or "/" in spec or Path(spec).suffix.lower() in (".safetensors", ".pt", ".pth")
    if looks_like_path:
        raise UnknownModelError(f"no such file: {spec}; {SPEC_FORMS}")
    prefix = spec.split(":", 1)[0] + ":" if ":" in spec else ""
    hint = ""
    if prefix:
        hint = f" Unknown prefix {prefix!r}."
    else:
        hint = f" {spec!r} is neither a zoo spec nor an existing file. Did you mean timm:{spec}?"
    raise UnknownModelError(f"cannot load model {spec!r}.{hint} {SPEC_FORMS}")


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    arch: str,
    num_classes: int,
    in_chans: int,
    input_size: tuple,
    extra_metadata: dict[str, str] | None = None,
    half: bool = False,
) -> Path:
    """Write ``model``'s weights to a ``.safetensors`` file that :func:`load_model` can read.

    ``arch`` is the zoo spec that rebuilds the model (e.g. ``'timm:resnet18'``);
    ``num_classes``, ``in_chans`` and ``input_size`` ``(C, H, W)`` are stored with
    it. ``half=True`` stores floating-point tensors as float16 (they are cast back
    to the model's dtype on load). Tied/shared tensors are stored once.
    """
    try:
        from safetensors.torch import save_model
    except ImportError as exc:
        raise UndiscardError(f"saving checkpoints needs safetensors ({exc}); pip install 'undiscard[zoo]'") from exc
    if not arch.startswith(("timm:", "torchvision:", "zoo:")):
        raise UndiscardError(f"arch must be 'timm:NAME', 'torchvision:NAME' or 'zoo:NAME', got {arch!r}")
    size = tuple(int(v) for v in input_size)
    if len(size) != 3:
        raise UndiscardError(f"input_size must be (C, H, W), got {input_size!r}")
    meta = {
        META_ARCH: arch,
        META_NUM_CLASSES: str(int(num_classes)),
        META_IN_CHANS: str(int(in_chans)),
        META_INPUT_SIZE: ",".join(str(v) for v in size),
    }
    for key, value in (extra_metadata or {}).items():
        meta[str(key)] = str(value)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    to_save = copy.deepcopy(model).half() if half else model
    save_model(to_save, str(out), metadata=meta)
    return out
