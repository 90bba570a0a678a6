"""Devices, dtypes and autocast through the engines, the search and the aggregation.

Every tensor the library makes follows the input's device and dtype; under ``autocast``
the network runs in the low precision and the search's scores stay in float32 or wider.
The devices checked are the CPU and, where one is present, CUDA (``scripts/gpu_check.sh``
runs this file on a GPU machine).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

import undiscard
from conftest import assert_close_scaled, cached, depth_and_width, rounding_ops
from undiscard.method.segment import wrap_segmentation

ENGINES = ("trie", "segments", "rerun")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BF16 = torch.finfo(torch.bfloat16).eps
#: (device, autocast dtype): bfloat16 on CPU; float16 and bfloat16 on CUDA where present
AUTOCAST = [("cpu", torch.bfloat16)] + ([("cuda", torch.float16), ("cuda", torch.bfloat16)]
                                        if torch.cuda.is_available() else [])


def _model(name="resnet18", device="cpu", dtype=torch.float32):
    # a copy: the cached model is shared with other tests
    return copy.deepcopy(cached("timm", name, (("num_classes", 5),))).to(device=device, dtype=dtype)


def _x(n=3, device="cpu", dtype=torch.float32, seed=0):
    return torch.randn(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed)).to(device=device, dtype=dtype)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("device,dtype", AUTOCAST, ids=[f"{d}-{str(t)[6:]}" for d, t in AUTOCAST])
@pytest.mark.parametrize("engine", ENGINES)
def test_autocast_runs_and_stays_close_to_float32(engine, device, dtype):
    model = _model(device=device)
    x = _x(device=device)
    # displacement order: the states do not depend on the logits, so both runs aggregate the same ones
    w = undiscard.wrap(model, 4, "displacement", "entropy", engine=engine, return_details=True)
    with torch.no_grad():
        ref, d_ref = w(x)
        with torch.autocast(device, dtype=dtype):
            out, d = w(x)
    assert torch.equal(d.states, d_ref.states)
    assert torch.isfinite(out.float()).all() and out.device == x.device
    assert d.weights.dtype in (torch.float32, torch.float64)  # entropy weights are computed in float32 or wider
    # each weight layer rounds its output to the low precision once: relative error at most one eps per layer
    depth, _ = depth_and_width(model)
    assert _rel(out, ref) <= depth * torch.finfo(dtype).eps


def test_bfloat16_autocast_entropy_search_stays_close_to_float32():
    model = _model()
    x = _x(seed=1)
    w = undiscard.wrap(model, 4, "entropy", "entropy")
    with torch.no_grad():
        ref = w(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = w(x)
    depth, _ = depth_and_width(model)
    # the search may pick other states where two entropies are within bfloat16 rounding; the
    # prediction still may not move further than the states' own spread
    assert torch.isfinite(out.float()).all()
    assert _rel(out, ref) <= 4 * depth * BF16


@pytest.mark.parametrize("engine", ENGINES)
def test_a_float64_model_and_input_stay_float64(engine):
    model32, x32 = _model(), _x(seed=2)
    model64 = _model(dtype=torch.float64)
    w32 = undiscard.wrap(model32, 5, "entropy", "mean", engine=engine, return_details=True)
    w64 = undiscard.wrap(model64, 5, "entropy", "mean", engine=engine, return_details=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        a, da = w32(x32)
        b, db = w64(x32.double())
    assert b.dtype == torch.float64 and db.delta.dtype in (torch.float64, torch.long, torch.int64)
    if torch.equal(da.states, db.states):
        assert_close_scaled(b.float(), a, ops=rounding_ops(model32))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("engine", ENGINES)
def test_outputs_stay_on_the_inputs_device_and_match_the_cpu(device, engine):
    model, x = _model(device=device), _x(device=device, seed=3)
    w = undiscard.wrap(model, 4, "displacement", "entropy", engine=engine, return_details=True)
    with torch.no_grad():
        out, d = w(x)
        ref = undiscard.wrap(_model(), 4, "displacement", "entropy", engine=engine)(x.cpu())
    assert out.device.type == device and d.weights.device.type == device
    assert_close_scaled(out.cpu(), ref, ops=rounding_ops(model))


@pytest.mark.parametrize("device", DEVICES)
def test_segmentation_under_bfloat16_autocast_stays_close(device):
    import torchvision

    torch.manual_seed(0)
    seg = torchvision.models.segmentation.lraspp_mobilenet_v3_large(weights=None, weights_backbone=None,
                                                                     num_classes=3).eval().to(device)
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4)).to(device)
    w = wrap_segmentation(seg, budget=3, criterion="displacement", aggregate="mean")
    with torch.no_grad():
        ref = w(x)
        with torch.autocast(device, dtype=torch.bfloat16):
            out = w(x)
    assert out.device.type == device and torch.isfinite(out.float()).all()
    depth, _ = depth_and_width(seg)
    assert _rel(out, ref) <= depth * BF16
