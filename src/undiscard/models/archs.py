"""The project's own small architectures (``zoo:NAME`` model specs).

Each is a stock timm model class with small widths, sized for Fashion-MNIST at 64 x 64
pixels: four stride-2 subsampling sites on the main path (so the default search space,
every main-path site but the first and the last, has two), a final feature map of
4 x 4 cells, and a training cost of a couple of CPU minutes per epoch. They are the
three families of the method's experiments:

* ``fmnist-resnet``: ResNet with a 7x7 stride-2 stem and a stride-2 max-pool, basic
  blocks (16, 32, 64, 96 channels), the last stage dilated instead of strided
  (timm ``output_stride=16``) so the final map is 4 x 4;
* ``fmnist-mobilenet``: MobileNetV2-style inverted residuals (timm ``EfficientNet``
  class), 3x3 stride-2 stem and three stride-2 depthwise convolutions;
* ``fmnist-pvt``: PVT-v2 (overlapping strided-conv patch embeddings, spatial-reduction
  attention), four one-block stages of 16-128 dims; its first patch embedding is 3x3
  stride 2 instead of 7x7 stride 4 so that 64-pixel inputs end at 4 x 4 tokens.

They have timm's ``forward_features`` / ``forward_head``, so the wrappers need no
``split=``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn as nn

from undiscard.errors import UnknownModelError

__all__ = ["ARCHS", "build", "names"]


def _resnet(num_classes: int, in_chans: int) -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, layers=(1, 1, 1, 1), channels=(24, 48, 96, 128), stem_width=24, in_chans=in_chans,
                  num_classes=num_classes, output_stride=16)


def _mobilenet(num_classes: int, in_chans: int) -> nn.Module:
    from timm.models._efficientnet_builder import decode_arch_def
    from timm.models.efficientnet import EfficientNet

    blocks = decode_arch_def([["ds_r1_k3_s1_c16"], ["ir_r1_k3_s2_e4_c24"], ["ir_r2_k3_s2_e4_c48"],
                              ["ir_r2_k3_s2_e4_c96"]])
    return EfficientNet(blocks, num_features=256, stem_size=16, in_chans=in_chans, num_classes=num_classes)


def _pvt(num_classes: int, in_chans: int) -> nn.Module:
    from timm.models.pvt_v2 import OverlapPatchEmbed, PyramidVisionTransformerV2

    model = PyramidVisionTransformerV2(in_chans=in_chans, num_classes=num_classes, depths=(1, 1, 1, 1),
                                       embed_dims=(16, 32, 64, 128), num_heads=(1, 1, 2, 4), sr_ratios=(8, 4, 2, 1),
                                       mlp_ratios=(2.0, 2.0, 4.0, 4.0))
    model.patch_embed = OverlapPatchEmbed(patch_size=3, stride=2, in_chans=in_chans, embed_dim=16)
    return model


#: name -> builder(num_classes, in_chans)
ARCHS: dict[str, Callable[[int, int], nn.Module]] = {
    "fmnist-resnet": _resnet,
    "fmnist-mobilenet": _mobilenet,
    "fmnist-pvt": _pvt,
}

#: the input size each was designed for (C is the builder's in_chans)
INPUT_SIZE = 64


def names() -> list[str]:
    return sorted(ARCHS)


def build(name: str, num_classes: int = 10, in_chans: int = 1) -> nn.Module:
    """A freshly initialised ``name`` (seeded by torch's global RNG), in eval mode."""
    if name not in ARCHS:
        raise UnknownModelError(f"unknown zoo architecture {name!r}; the zoo has: {', '.join(names())}")
    from undiscard.models.spec import import_timm

    import_timm()
    return ARCHS[name](int(num_classes), int(in_chans)).eval()
