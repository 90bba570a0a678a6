"""Quick check of the shared-prefix engine against one forward per state (issue 4 groundwork).

    .venv/bin/python benchmarks/trie_vs_per_state.py

Shipped Fashion-MNIST resnet18, 16 images at 128x128: all 64 states per image, then 16
random states per image. Prints the rows computed per searchable site, both wall times
(one run each, so noisy: the issue-4 benchmark will interleave repeats) and the max diff.
"""

import time
import warnings

import torch

warnings.filterwarnings("ignore")

from undiscard import find_sites, run_states  # noqa: E402
from undiscard.models import load_model  # noqa: E402
from undiscard.trie import run_trie  # noqa: E402

m = load_model("zoo/fmnist_resnet18.safetensors").model
x = torch.randn(16, 1, 128, 128, generator=torch.Generator().manual_seed(0))
sites = find_sites(m, x[:1])
g = torch.Generator().manual_seed(0)
full = torch.cartesian_prod(torch.arange(4), torch.arange(4), torch.arange(4))
cases = [
    ("full lattice (64)", full[None].expand(16, -1, -1)),
    ("16 random", torch.stack([full[torch.randperm(64, generator=g)[:16]] for _ in range(16)])),
]
for name, st in cases:
    n, b, L = st.shape
    img, flat = torch.arange(n).repeat_interleave(b), st.reshape(n * b, L)
    with torch.no_grad():
        t = time.perf_counter()
        ref = torch.cat([run_states(m, x[img[s : s + 64]], flat[s : s + 64], sites) for s in range(0, n * b, 64)])
        t_per_state = time.perf_counter() - t
        t = time.perf_counter()
        res = run_trie(m, x, st, sites)
        t_trie = time.perf_counter() - t
    diff = (ref.reshape(res.outputs.shape) - res.outputs).abs().max()
    print(f"{name}: rows {res.rows}  per-state {t_per_state:.2f} s  trie {t_trie:.2f} s  "
          f"ratio {t_per_state / t_trie:.2f}  max diff {diff:.2e}")
