"""The zoo trainer: a short seeded run writes a loadable checkpoint; resume is safe."""

from __future__ import annotations

import json

import pytest
import torch

import undiscard
from undiscard.models.classifiers import load_model
from undiscard.statefile import save_state
from undiscard.models.train_classifier import RESUME_KIND, Recipe, train_backbone


def _recipe(**kw):
    base = dict(arch="timm:resnet18", size=32, epochs=3 * 128 / 55000, batch_size=128, lr=1e-3, seed=0)
    base.update(kw)
    return Recipe(**base)


def test_a_short_run_writes_a_checkpoint_load_model_rebuilds(tmp_path):
    out = tmp_path / "m.safetensors"
    logs = []
    summary = train_backbone(_recipe(), out, log=logs.append)
    assert summary["steps"] == 3 and 0.0 <= summary["val_top1"] <= 1.0
    loaded = load_model(str(out))
    assert loaded.input_size == (1, 32, 32)
    from safetensors import safe_open

    with safe_open(str(out), "pt") as fh:
        meta = fh.metadata()
    assert json.loads(meta["undiscard.recipe"])["seed"] == 0 and meta["undiscard.dataset"] == "fashion-mnist"
    assert not out.with_name(out.name + ".resume.safetensors").exists()
    with torch.no_grad():
        assert torch.isfinite(loaded.model(torch.randn(2, 1, 32, 32))).all()


def test_a_resume_file_from_another_recipe_is_refused(tmp_path):
    out = tmp_path / "m.safetensors"
    save_state({"recipe": {"arch": "timm:other"}}, out.with_name(out.name + ".resume.safetensors"), RESUME_KIND)
    with pytest.raises(undiscard.UndiscardError, match="another recipe"):
        train_backbone(_recipe(), out, log=lambda m: None)


def test_bad_recipe_and_output_are_clear_errors(tmp_path):
    with pytest.raises(undiscard.UndiscardError, match=".safetensors"):
        train_backbone(_recipe(), tmp_path / "m.pt")
    with pytest.raises(undiscard.UndiscardError, match="positive"):
        train_backbone(_recipe(epochs=0), tmp_path / "m.safetensors")
