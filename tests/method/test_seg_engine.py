"""The segmentation wrapper remembers that a model crosses its searched sites (no wasted trie pass)."""

from __future__ import annotations

import torch

from undiscard.method.segment import wrap_segmentation
from undiscard.models.segmenters import build_segmenter


def test_a_model_seen_to_cross_sites_skips_the_trie_attempt_on_the_next_search_with_the_same_results():
    torch.manual_seed(0)
    model = build_segmenter("segformer-tiny", num_classes=5, in_chans=1).eval()
    calls = []
    model.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    x = torch.randn(3, 1, 64, 64)
    w = wrap_segmentation(model, budget=3, max_batch=64)
    w.sites_for(x)  # finding the sites runs one forward of its own
    calls.clear()
    first = w.search(x)
    n_first = len(calls)
    assert w.last_engine == "rerun (fallback)"
    calls.clear()
    second = w.search(x)
    assert w.last_engine == "rerun (fallback)"
    # the first search spent one aborted trie pass; the second runs the per-state forwards only
    assert len(calls) == n_first - 1 == 3  # one batched forward per search step (3 steps, width 1)
    assert torch.equal(first.states, second.states) and torch.equal(first.logits, second.logits)
    assert torch.equal(w.combine(first), w.combine(second))
    # another input size is found out afresh
    calls.clear()
    w.search(torch.randn(2, 1, 96, 96))
    assert len(calls) == 1 + 1 + 3  # its sites, the trie attempt, the 3 steps
