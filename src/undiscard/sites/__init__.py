"""Where a model subsamples, and what an offset there means.

* :mod:`~undiscard.sites.ops`: the subsampling ops (conv, max/avg pool, pixel unshuffle, shifts) at any offset.
* :mod:`~undiscard.sites.calls`: torch calls bound to one description (:class:`~undiscard.sites.calls.OpCall`).
* :mod:`~undiscard.sites.sitemap`: :class:`Site`, :class:`SiteMap`, states and their displacement.
* :mod:`~undiscard.sites.discover`: :func:`find_sites`, one traced forward that finds every site.

Definitions: docs/method.md, "Sites, offsets, states".
"""

from undiscard.sites.discover import find_sites
from undiscard.sites.sitemap import Site, SiteMap, SiteOp

__all__ = ["find_sites", "Site", "SiteMap", "SiteOp"]
