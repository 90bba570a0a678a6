"""Fitted configurations: the JSON file ``undiscard fit`` writes and ``wrap(model, config=PATH)`` applies.

A configuration names everything the wrapper needs (searchable sites, budget,
criterion, width, neighbour prior, aggregation, or a fixed list of states) plus the
fingerprint of the model it was fitted for and the validation evidence that chose it.
A configuration is refused for any other model: what helps one model's offsets says
nothing about another's.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch.nn as nn

from undiscard.statefile import write_json_atomic
from undiscard.errors import ConfigError

__all__ = ["CONFIG_KIND", "model_fingerprint", "save_config", "load_config", "wrap_kwargs"]

CONFIG_KIND = "undiscard.config/1"

#: the keys of a configuration that become :func:`undiscard.wrap` arguments
WRAP_KEYS = ("budget", "criterion", "aggregate", "searchable", "width", "prior", "policy", "align", "fill", "seed")


def model_fingerprint(model: nn.Module) -> str:
    """SHA-256 of the model's class, parameter and buffer names, shapes and float32 values.

    Two models get the same fingerprint only if they compute the same function (same
    architecture and weights); a weight stored in float16 and loaded back as float32
    gives the same fingerprint as the float32 original it was rounded from only if the
    values are equal, so fingerprint the model you evaluate.
    """
    model = getattr(model, "_orig_mod", model)
    h = hashlib.sha256(type(model).__name__.encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        if t.is_floating_point() or t.is_complex():
            t = t.detach().float()
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def save_config(path: str | os.PathLike, config: dict, model: nn.Module) -> Path:
    """Write ``config`` (its wrap arguments under ``"wrap"``) for ``model`` to ``path`` (atomically)."""
    body = {"kind": CONFIG_KIND, "model_fingerprint": model_fingerprint(model), **config}
    return write_json_atomic(body, path)


def load_config(path: str | os.PathLike, model: nn.Module | None = None) -> dict:
    """The configuration at ``path``; with ``model``, refused unless it was fitted for ``model``."""
    p = Path(path)
    try:
        body = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"no such configuration file: {p}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise ConfigError(f"{p} is not a configuration written by `undiscard fit` ({exc})") from None
    if not isinstance(body, dict) or body.get("kind") != CONFIG_KIND or not isinstance(body.get("wrap"), dict):
        raise ConfigError(f"{p} is not a configuration written by `undiscard fit` (kind {CONFIG_KIND!r} with a "
                          "'wrap' section)")
    unknown = sorted(set(body["wrap"]) - set(WRAP_KEYS))
    if unknown:
        raise ConfigError(f"{p}: unknown wrap settings {unknown}; known: {', '.join(WRAP_KEYS)}")
    if model is not None:
        got = model_fingerprint(model)
        if body.get("model_fingerprint") != got:
            raise ConfigError(
                f"{p} was fitted for another model (fingerprint {str(body.get('model_fingerprint'))[:12]}..., this "
                f"model's is {got[:12]}...): a configuration is valid only for the weights it was fitted on. Run "
                "`undiscard fit` on this model's validation data"
            )
    return body


def wrap_kwargs(path: str | os.PathLike, model: nn.Module) -> dict[str, Any]:
    """The :func:`undiscard.wrap` arguments of the configuration at ``path``, checked against ``model``."""
    return dict(load_config(path, model)["wrap"])
