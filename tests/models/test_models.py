"""Tests for the torchvision compat guard and model loading (undiscard.models.classifiers)."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from undiscard import compat
from undiscard.errors import UndiscardError, UnknownModelError

pytest.importorskip("safetensors")

compat.ensure_torchvision()
timm = pytest.importorskip("timm")
torchvision = pytest.importorskip("torchvision")

from conftest import EPS16, assert_close_scaled, depth_and_width  # noqa: E402
from undiscard.models.classifiers import LoadedModel, load_model, save_checkpoint


def _has_schema(name: str) -> bool:
    try:
        torch._C._dispatch_find_schema_or_throw(f"torchvision::{name}", "")
        return True
    except RuntimeError:
        return False


# --- compat guard -------------------------------------------------------------


def test_compat_guard_makes_timm_and_torchvision_importable():
    assert "torchvision" in sys.modules and "timm" in sys.modules
    assert compat.ensure_torchvision() is True  # idempotent
    assert compat.ensure_torchvision() is True
    out = torchvision.models.resnet18().eval()(torch.randn(1, 3, 32, 32))
    assert out.shape == (1, 1000)


def test_compat_guard_state_is_consistent():
    # Every op torchvision's Python code needs has a schema, whichever branch ran.
    for name in ("nms", "qnms", "roi_align", "deform_conv2d"):
        assert _has_schema(name)
    if compat.TORCHVISION_EXTENSION_ERROR is None:
        # The real extension loaded: the guard must not have defined anything itself.
        assert compat.DEFINED_TORCHVISION_SCHEMAS == ()
        assert torchvision.extension._has_ops()
    else:
        # The extension failed: schemas were defined by us, and ops fail loudly.
        assert "nms" in compat.DEFINED_TORCHVISION_SCHEMAS
        assert "qnms" in compat.DEFINED_TORCHVISION_SCHEMAS
        assert not torchvision.extension._has_ops()
        with pytest.raises(Exception):
            torchvision.ops.nms(torch.rand(3, 4), torch.rand(3), 0.5)
        with pytest.raises(Exception):
            torch.ops.torchvision.nms(torch.rand(3, 4), torch.rand(3), 0.5)


# --- zoo models ---------------------------------------------------------------


def test_timm_model_with_classes_and_channels():
    lm = load_model("timm:resnet18", num_classes=10, in_chans=1)
    assert isinstance(lm, LoadedModel)
    assert not lm.model.training
    assert lm.input_size == (1, 224, 224)
    assert lm.pretrained is False
    assert "random weights" in lm.note
    with torch.no_grad():
        out = lm.model(torch.randn(2, 1, 32, 32))
    assert out.shape == (2, 10)


def test_torchvision_model():
    lm = load_model("torchvision:resnet18", num_classes=7)
    assert not lm.model.training
    assert lm.input_size == (3, 224, 224)
    with torch.no_grad():
        assert lm.model(torch.randn(1, 3, 32, 32)).shape == (1, 7)


def test_unknown_timm_name_suggests_close_match():
    with pytest.raises(UnknownModelError) as info:
        load_model("timm:resnet1800")
    msg = str(info.value)
    assert "timm" in msg and "resnet1800" in msg
    assert "timm:resnet18" in msg
    assert "list_models" in msg


def test_unknown_torchvision_name():
    with pytest.raises(UnknownModelError) as info:
        load_model("torchvision:resnet1800")
    assert "torchvision:resnet18" in str(info.value)


def test_unknown_prefix_lists_accepted_forms():
    with pytest.raises(UnknownModelError) as info:
        load_model("keras:resnet50")
    msg = str(info.value)
    assert "keras:" in msg
    assert "timm:NAME" in msg and "torchvision:NAME" in msg and ".safetensors" in msg


def test_bare_name_hints_at_timm():
    with pytest.raises(UnknownModelError) as info:
        load_model("resnet18")
    assert "timm:resnet18" in str(info.value)


def test_nonexistent_path(tmp_path):
    with pytest.raises(UnknownModelError) as info:
        load_model(str(tmp_path / "nope.safetensors"))
    assert "no such file" in str(info.value)


def test_pretrained_download_failure_is_clear(monkeypatch):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(UndiscardError) as info:
        load_model("torchvision:resnet18", pretrained=True)
    msg = str(info.value)
    assert "could not be downloaded" in msg and "--pretrained" in msg


@pytest.mark.parametrize("name", ["fcn_resnet50", "deeplabv3_mobilenet_v3_large"])
def test_torchvision_models_with_a_backbone_load_offline_with_random_weights(monkeypatch, name):
    import urllib.error

    def offline(*args, **kwargs):
        raise urllib.error.URLError("offline")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)  # any download attempt fails
    lm = load_model(f"torchvision:{name}")
    assert not lm.pretrained and "random weights" in lm.note
    with pytest.raises(UndiscardError, match="could not be downloaded"):
        load_model(f"torchvision:{name}", pretrained=True)


# --- checkpoints --------------------------------------------------------------


def _tiny_input(c=1):
    torch.manual_seed(0)
    return torch.randn(2, c, 32, 32)


def _perturb(model: nn.Module) -> nn.Module:
    # Make the weights differ from a fresh init, so a round trip must really load them.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
    return model


@pytest.mark.parametrize("half", [False, True])
def test_safetensors_round_trip(tmp_path, half):
    src = load_model("timm:resnet18", num_classes=10, in_chans=1)
    model = _perturb(src.model)
    path = tmp_path / "m.safetensors"
    save_checkpoint(
        model, path, arch="timm:resnet18", num_classes=10, in_chans=1, input_size=(1, 28, 28),
        extra_metadata={"note": "test"}, half=half,
    )
    lm = load_model(str(path))
    assert lm.input_size == (1, 28, 28)
    assert lm.pretrained is True
    assert not lm.model.training
    x = _tiny_input(1)
    with torch.no_grad():
        ref = model.eval()(x)
        got = lm.model(x)
    assert next(lm.model.parameters()).dtype == torch.float32
    if half:  # float16 weights: each rounded once, by <= eps16/2 of itself, moving each layer's output by about that
        assert_close_scaled(got, ref, ops=depth_and_width(model)[0], eps=EPS16)
    else:
        torch.testing.assert_close(got, ref, rtol=0, atol=0)


def test_safetensors_tied_weights_round_trip(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.Linear(4, 4)
            self.b.weight = self.a.weight

    model = Tied()
    path = tmp_path / "tied.safetensors"
    save_checkpoint(model, path, arch="timm:resnet18", num_classes=10, in_chans=1, input_size=(1, 8, 8))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert len(list(f.keys())) == 3  # the tied weight is stored once


def test_safetensors_without_metadata_is_explained(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(UndiscardError) as info:
        load_model(str(path))
    assert "undiscard.arch" in str(info.value)


def test_safetensors_conflicting_num_classes(tmp_path):
    src = load_model("timm:resnet18", num_classes=10, in_chans=1)
    path = tmp_path / "m.safetensors"
    save_checkpoint(src.model, path, arch="timm:resnet18", num_classes=10, in_chans=1, input_size=(1, 28, 28))
    with pytest.raises(UndiscardError, match="num_classes"):
        load_model(str(path), num_classes=5)


def test_pt_full_module_round_trip(tmp_path):
    model = _perturb(load_model("timm:resnet18", num_classes=10, in_chans=1).model)
    path = tmp_path / "m.pt"
    torch.save(model, path)
    lm = load_model(str(path), trust_pickle=True)  # a whole-module pickle loads only with the opt-in
    assert not lm.model.training
    assert lm.input_size[0] == 1
    x = _tiny_input(1)
    with torch.no_grad():
        torch.testing.assert_close(lm.model(x), model.eval()(x), rtol=0, atol=0)


def test_pt_state_dict_is_explained(tmp_path):
    model = nn.Sequential(nn.Conv2d(1, 2, 3, stride=2))
    path = tmp_path / "sd.pth"
    torch.save(model.state_dict(), path)
    with pytest.raises(UndiscardError) as info:
        load_model(str(path))
    msg = str(info.value)
    assert "state_dict" in msg and "torch.save(model" in msg and "undiscard.arch" in msg
