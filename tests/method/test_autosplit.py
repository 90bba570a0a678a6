"""The automatic features / head split: torchvision, transformers and plain modules are
wrapped without ``split=``, keep their output type, and any rank (1-D, 3-D) works."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import undiscard
from undiscard.cli import main
from undiscard.errors import SplitError


def _perturbed(model: nn.Module) -> nn.Module:
    """Random weights everywhere (torchvision's ViT starts with a zero head: all logits 0)."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and not p.abs().sum():
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.eval()


def _logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


def _check_wrap(model, x):
    with torch.no_grad():
        ref = model(x)
        plain = undiscard.wrap(model, budget=1)(x)
        wrapped = undiscard.wrap(model, budget=4, return_details=True)
        out, details = wrapped(x)
    assert type(plain) is type(ref) and torch.equal(_logits(plain), _logits(ref))  # B=1: the model itself
    assert type(out) is type(ref) and _logits(out).shape == _logits(ref).shape
    assert torch.isfinite(_logits(out)).all() and details.states.shape[1] == 4
    sp = wrapped.split  # the split found reproduces the model
    with torch.no_grad():
        assert torch.allclose(_logits(sp.head(sp.features(x))), _logits(ref), rtol=1e-5, atol=1e-5)
    return wrapped, out, ref


@pytest.mark.parametrize("name,layout", [("resnet18", "NCHW"), ("mobilenet_v3_small", "NCHW"),
                                         ("convnext_tiny", "NCHW"), ("vit_b_16", "tokens")])
def test_torchvision_classifiers_wrap_without_split(name, layout):
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    kw = {"image_size": 64} if name.startswith("vit") else {}
    model = _perturbed(torchvision.models.get_model(name, weights=None, **kw))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    wrapped, out, ref = _check_wrap(model, x)
    assert wrapped.split.layout == layout
    assert not torch.equal(out, ref)  # other states were aggregated


def _hf(name: str):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if name == "resnet":
        cfg = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 32, 64], depths=[1, 1, 1, 1],
                                        num_labels=10)
        return transformers.ResNetForImageClassification(cfg).eval()
    cfg = transformers.ViTConfig(image_size=64, patch_size=8, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, num_labels=10)
    return transformers.ViTForImageClassification(cfg).eval()


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_transformers_classifiers_wrap_without_split_and_keep_their_output_type(name):
    model = _hf(name)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    _, out, ref = _check_wrap(model, x)
    assert type(out).__name__.endswith("ClassifierOutput") or "ClassifierOutput" in type(out).__name__
    assert out.logits.shape == (2, 10) and not torch.equal(out.logits, ref.logits)


class Audio1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv1d(1, 8, 5, 2, 2), nn.ReLU(), nn.Conv1d(8, 8, 3, 2, 1), nn.ReLU(),
                                  nn.MaxPool1d(2), nn.Conv1d(8, 16, 3, 2, 1))
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        return self.fc(self.body(x).mean(-1))


def test_a_1d_classifier_wraps_with_displacement_and_alignment_along_its_axis():
    torch.manual_seed(0)
    model = Audio1d().eval()
    x = torch.randn(3, 1, 64, generator=torch.Generator().manual_seed(1))
    wrapped, out, ref = _check_wrap(model, x)
    sites = wrapped.sites_for(x)
    assert sites.stride_total == (16,) and len(sites.searchable) == 2
    assert sites.displacement(torch.tensor([[1, 1]])).tolist() == [[2 + 4]]  # s * P per site: 1*2 + 1*4


def test_torchvision_video_r3d_18_wraps_in_three_axes():
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.video.r3d_18(num_classes=7).eval()
    x = torch.randn(2, 3, 8, 32, 32, generator=torch.Generator().manual_seed(1))
    wrapped, out, ref = _check_wrap(model, x)
    sites = wrapped.sites_for(x)
    assert len(sites.stride_total) == 3 and sites.displacement(sites.zero_state(1)).shape == (1, 3)


def test_cli_takes_a_video_input_size():
    assert main(["check", "torchvision:r3d_18", "--input-size", "3", "8", "32", "32"]) == 0


def test_a_head_that_reads_the_input_again_cannot_be_split_and_says_what_was_tried():
    class Peeking(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, 2, 1)
            self.conv2 = nn.Conv2d(8, 8, 3, 2, 1)
            self.fc = nn.Linear(8, 4)

        def forward(self, x):
            return self.fc(self.conv2(self.conv(x)).mean((2, 3))) + x.mean()  # the head reads x itself

    model = Peeking().eval()
    with pytest.raises(SplitError, match=r"cannot split Peeking .*tried .*split=\(features_fn, head_fn\)"):
        undiscard.wrap(model, budget=2)(torch.randn(2, 3, 16, 16))
