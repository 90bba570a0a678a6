"""undiscard: recover the activations that subsampling layers throw away.

Subsampling layers (strided convs, pooling, patch embeddings, patch merging) keep one
offset of every stride grid. undiscard finds every such site in any PyTorch model and
runs the network under other offsets ("states"), per sample, exactly (docs/method.md;
after Yang et al., "Deep Nets with Subsampling Layers Unwittingly Discard Useful
Activations at Test-Time", ECCV 2024, arXiv 2410.01083).

    >>> sites = undiscard.find_sites(model, x[:1])          # doctest: +SKIP
    >>> y = undiscard.run_states(model, x, states, sites)     # doctest: +SKIP
    >>> better = undiscard.wrap(model, budget=8)               # doctest: +SKIP
"""

# First: a CUDA torchvision next to a CPU torch cannot be imported (``operator torchvision::nms
# does not exist``); the guard makes ``import undiscard, timm`` work. It loads nothing now, it
# runs when torchvision is first imported, and only acts if torchvision's extension fails to load.
from undiscard import compat

compat.install_torchvision_guard()

from undiscard.method.learned import AttentionAggregator, load_aggregator
from undiscard.tta.compose import ImageTTA
from undiscard.run.engine import run_states, use_states
from undiscard.errors import (
    ConfigError,
    FileTrustError,
    InputError,
    MissedSubsamplingWarning,
    ModelModeError,
    NoSubsamplingSiteError,
    OptionError,
    SiteMismatchError,
    SplitError,
    StateError,
    UndiscardError,
    UnknownModelError,
)
from undiscard.method.classify import Undiscard, wrap
from undiscard.method.segment import SegmentationUndiscard, wrap_segmentation
from undiscard.sites.sitemap import Site, SiteMap, SiteOp
from undiscard.sites.discover import find_sites

__version__ = "0.1.0"

__all__ = [
    "find_sites",
    "run_states",
    "use_states",
    "wrap",
    "Undiscard",
    "ImageTTA",
    "wrap_segmentation",
    "SegmentationUndiscard",
    "AttentionAggregator",
    "load_aggregator",
    "Site",
    "SiteMap",
    "SiteOp",
    "UndiscardError",
    "ConfigError",
    "FileTrustError",
    "InputError",
    "MissedSubsamplingWarning",
    "ModelModeError",
    "OptionError",
    "SplitError",
    "NoSubsamplingSiteError",
    "SiteMismatchError",
    "StateError",
    "UnknownModelError",
]
