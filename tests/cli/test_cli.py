"""The command line: sites table / JSON, check exit status, clear errors."""

from __future__ import annotations

import json
import subprocess
import sys

import torch
import torch.nn as nn

import undiscard.models.classifiers
from undiscard.evaluation.checks import run_checks
from undiscard.cli.app import main
from undiscard.models.classifiers import LoadedModel


def test_sites_json_for_timm_resnet50_from_the_installed_command():
    # the console entry point as a user runs it after the README's set-up command
    out = subprocess.run(
        [sys.executable, "-m", "undiscard", "sites", "timm:resnet50", "--json"],
        capture_output=True, text=True, timeout=300, check=True,
    )
    sites = json.loads(out.stdout)
    assert [s["index"] for s in sites] == [0, 1, 2, 3, 4]
    for key in ("index", "name", "kind", "stride", "cum_stride", "num_offsets", "searchable"):
        assert key in sites[0]
    assert [s["searchable"] for s in sites] == [False, True, True, True, False]
    assert sites[2]["name"] == "layer2.0.conv2 + layer2.0.downsample.0"
    assert sites[4]["cum_stride"] == [16, 16] and sites[4]["num_offsets"] == 4


def test_sites_table_names_weights_and_search_space(capsys):
    assert main(["sites", "timm:resnet18", "--input-size", "3", "64", "96"]) == 0
    text = capsys.readouterr().out
    assert "random weights" in text and "input 3x64x96" in text
    assert "layer2.0.conv1 + layer2.0.downsample.0" in text
    assert "5 sites, 3 searchable, search space 64 states, total stride 32x32" in text


def test_check_passes_on_a_zoo_model(capsys):
    assert main(["check", "torchvision:resnet18", "--input-size", "3", "64", "64"]) == 0
    text = capsys.readouterr().out
    assert text.count("PASS") == 4 and "4 passed, 0 failed" in text and "sites_cover_every_subsampling" in text


class _MixesBatch(nn.Module):
    """Subsamples, then leaks information across the batch: per-sample states must differ."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 2, 1)
        self.conv2 = nn.Conv2d(4, 4, 3, 2, 1)

    def forward(self, x):
        y = self.conv2(torch.relu(self.conv(x)))
        return y + y.mean(0, keepdim=True)


def test_check_fails_with_nonzero_exit_when_an_invariant_breaks(monkeypatch, capsys):
    model = _MixesBatch().eval()
    results = {r.name: r for r in run_checks(model, __import__("undiscard").find_sites(model, torch.randn(1, 3, 16, 16)),
                                             torch.randn(1, 3, 16, 16))}
    assert results["offset_zero_is_identity"].passed
    assert not results["per_sample_states_match_one_by_one"].passed

    def fake_load(spec, **kw):
        return LoadedModel(model, spec, (3, 16, 16), False, "test model")

    monkeypatch.setattr(undiscard.models.classifiers, "load_model", fake_load)
    assert main(["check", "custom"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_unknown_model_name_is_a_clear_error(capsys):
    assert main(["sites", "timm:resnet1800"]) == 2
    err = capsys.readouterr().err
    assert "undiscard: error: timm has no model named 'resnet1800'" in err and "timm:resnet18" in err


def test_unknown_model_form_is_a_clear_error(capsys):
    assert main(["sites", "resnet18"]) == 2
    assert "timm:resnet18" in capsys.readouterr().err


def test_input_too_small_is_a_clear_error_not_a_traceback(capsys):
    assert main(["sites", "torchvision:inception_v3", "--input-size", "3", "32", "32"]) == 2
    err = capsys.readouterr().err
    assert "undiscard: error:" in err and "--input-size" in err and "Traceback" not in err


def test_bad_searchable_is_a_clear_error(capsys):
    assert main(["sites", "timm:resnet18", "--input-size", "3", "64", "64", "--searchable", "1,9"]) == 2
    assert "site indices [9] out of range" in capsys.readouterr().err


def test_sites_and_check_accept_a_segmentation_checkpoint():
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "undiscard", "sites", "zoo/fmnist_seg_deeplabv3.safetensors"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "4 sites, 2 searchable, search space 16 states" in r.stdout
