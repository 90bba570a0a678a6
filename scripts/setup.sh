#!/usr/bin/env bash
# Set up this checkout on a fresh machine: .venv with the pinned stack (constraints.txt),
# undiscard installed editable with all extras, and the Fashion-MNIST Debian package.
# Idempotent: a second run only checks that everything is in place.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

if [ ! -x .venv/bin/python ]; then
    echo "setup: creating .venv"
    python3 -m venv .venv
fi

pip_args=(-q -c constraints.txt)
if [ -d /opt/wheels ]; then
    pip_args+=(--find-links /opt/wheels)   # local CPU torch wheel
fi
echo "setup: installing undiscard[all,dev] with pinned dependencies"
# pip's stderr minus the harmless "Location ... is ignored" lines that a machine-wide
# extra-index-url pointing at missing folders produces; pip's exit status is kept.
{ .venv/bin/python -m pip install "${pip_args[@]}" -e ".[all,dev]" 2>&1 1>&3 \
    | { grep -v "^WARNING: Location '.*' is ignored: it is neither a file nor a directory" || true; } >&2; } 3>&1

# Fashion-MNIST, as Debian packages it (optional: the tests make their own data).
if [ ! -d /usr/share/datasets/fashion-mnist ]; then
    if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing dataset-fashion-mnist (apt)"
        if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; } >/tmp/undiscard-apt.log 2>&1; then
            echo "setup: notice: could not install dataset-fashion-mnist (see /tmp/undiscard-apt.log); continuing without it"
        fi
    else
        echo "setup: notice: not root or no apt-get; skipping dataset-fashion-mnist (/usr/share/datasets/fashion-mnist)"
    fi
fi

# torch, torchvision and timm import (through the torchvision compat guard).
.venv/bin/python -W ignore -c "import undiscard.compat as c; c.ensure_torchvision(); import torch, torchvision, timm"
echo "setup: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
