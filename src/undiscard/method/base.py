"""What every task wrapper shares: its options checked once, the sites found once per input size.

:class:`~undiscard.method.classify.Undiscard` (classification) and
:class:`~undiscard.method.segment.SegmentationUndiscard` (dense prediction) differ in what they
accept as input, how they align the states' outputs and how they combine them; the options
they share (budget, criterion, aggregation, searchable sites, engine, width, fill, seed) are
validated here with one wording, and :meth:`StateWrapper.sites_for` caches the site map of
each input size (docs/method.md, "What the wrapper checks").
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from undiscard.method.options import check_choice, check_positive_int
from undiscard.sites.discover import find_sites
from undiscard.sites.sitemap import SiteMap

__all__ = ["ENGINES", "StateWrapper"]

#: ``trie``: the shared-prefix engine, intercepting every call (default); ``segments``: the same
#: engine on a graph captured once, plain code between the searchable sites (falls back to
#: ``trie`` with a warning where the capture is refused); ``rerun``: one full forward per state.
ENGINES = ("trie", "segments", "rerun")


class StateWrapper(nn.Module):
    """The shared part of a task wrapper (subclasses set the class attributes and the two hooks)."""

    #: the criteria, aggregations and border fills the task accepts
    criteria: tuple[str, ...] = ()
    aggregates: tuple[str, ...] = ()
    fills: tuple[str, ...] = ()
    #: appended to an option error (" for segmentation")
    task_note: str = ""

    def __init__(self, model: nn.Module, budget: int, criterion: str, aggregate: str, *, searchable: Any,
                 max_batch: int, engine: str, seed: int, width: int | None, fill: str, return_details: bool) -> None:
        super().__init__()
        check_positive_int("budget", budget, hint=" (1 = the plain model)")
        check_choice("criterion", criterion, self.criteria, what=self.task_note)
        check_choice("aggregate", aggregate, self.aggregates, what=self.task_note)
        check_positive_int("max_batch", max_batch)
        check_choice("engine", engine, ENGINES)
        check_choice("fill", fill, self.fills)
        if width is not None:
            check_positive_int("width", width, hint=" or None (all neighbours of the chosen state)")
        self.model = model
        self.budget, self.criterion, self.aggregate = budget, criterion, aggregate
        self.searchable, self.max_batch, self.engine = searchable, int(max_batch), engine
        self.seed, self.width, self.fill = seed, width, fill
        self.return_details = return_details
        self.last_rows: list[int] = []  # rows computed per searchable site by the last search
        self._sites: dict[tuple, SiteMap] = {}

    def check_input(self, x: Any) -> None:
        """Refuse an input the task cannot take (before any site is looked for)."""
        raise NotImplementedError

    def check_sites(self, x: torch.Tensor, sites: SiteMap) -> None:
        """Refuse a model whose sites at ``x``'s size the task cannot use (once per input size)."""

    def sites_for(self, x: torch.Tensor) -> SiteMap:
        """The sites of the model at ``x``'s size (found once per input size, then checked by the task)."""
        self.check_input(x)
        key = tuple(x.shape[1:])
        if key not in self._sites:
            sites = find_sites(self.model, x[:1], searchable=self.searchable)  # clear errors for a bad input
            self.check_sites(x, sites)
            self._sites[key] = sites
        return self._sites[key]
