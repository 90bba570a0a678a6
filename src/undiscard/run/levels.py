"""The attribute a shared-prefix pass sets on a tensor: the index of the last searchable site it
has passed (-1 before the first). The intercepting engine (:mod:`~undiscard.run.trie`) and the
captured graph (:mod:`~undiscard.run.segments`) read and write the same tag, so a pass can
switch between them at a site (docs/method.md, "The shared-prefix engine")."""

from __future__ import annotations

__all__ = ["LEVEL_TAG"]

LEVEL_TAG = "_undiscard_trie_level"
