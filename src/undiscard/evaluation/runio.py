"""What every long evaluation needs, once: progress, atomic writes, resume checks, timing.

Timing is a median of repeated, interleaved runs after a warm-up: timings on shared machines
are noisy, medians and ratios measured side by side are not (docs/benchmarks.md).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["PeakMemory", "progress", "median_time", "ratios_to_plain", "config_diff",
           "mtime", "vm_hwm_mb"]


def progress(total: int, desc: str):
    """A progress bar on stderr (tqdm if installed, else a plain counter) with ``update(k)`` and ``close()``."""
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="img", file=sys.stderr, dynamic_ncols=True)
    except ImportError:
        return _PlainProgress(total, desc)


class _PlainProgress:
    def __init__(self, total: int, desc: str) -> None:
        self.n, self.total, self.desc = 0, total, desc

    def update(self, k: int) -> None:
        self.n += k
        print(f"\r{self.desc}: {self.n}/{self.total}", end="", file=sys.stderr, flush=True)

    def close(self) -> None:
        print(file=sys.stderr)


def median_time(fn: Callable[[], Any], repeats: int) -> float:
    """Seconds per call of ``fn``: one warm-up call, then the median of ``repeats`` timed calls."""
    fn()
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def ratios_to_plain(plain: Callable[[], Any], fns: dict, repeats: int) -> dict:
    """Median time of each ``fns[k]`` / median time of ``plain``: one warm-up each, then
    ``repeats`` rounds in which every function runs once (interleaved, so drifts in the
    machine's speed hit all of them alike)."""
    fns = {"plain": plain, **fns}
    for fn in fns.values():
        fn()
    times: dict = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    base = statistics.median(times["plain"])
    return {k: statistics.median(v) / base for k, v in times.items() if k != "plain"}



def config_diff(saved: dict, now: dict) -> str:
    """``"key: saved X, now Y; ..."`` for every key whose value differs (missing keys read ``<unset>``)."""
    keys = [k for k in dict.fromkeys([*saved, *now]) if saved.get(k, "<unset>") != now.get(k, "<unset>")]
    return "; ".join(f"{k}: saved {saved.get(k, '<unset>')!r}, now {now.get(k, '<unset>')!r}" for k in keys)


def mtime(path: str | os.PathLike | None) -> int | None:
    """``path``'s modification time in ns, or None (no path, or no file)."""
    try:
        return Path(path).stat().st_mtime_ns if path else None
    except OSError:
        return None


class PeakMemory:
    """The peak memory, in MB, of what runs inside ``with PeakMemory(device) as pm:`` (``pm.mb``).

    On a CUDA device: the peak of ``torch.cuda.max_memory_allocated`` (reset on entry). On
    CPU: the peak resident set of the whole process (Linux ``VmHWM``, reset on entry through
    ``/proc/self/clear_refs``), so it includes the model and the data already in memory;
    ``None`` where the kernel offers neither.
    """

    def __init__(self, device: Any = "cpu") -> None:
        import torch

        self.device = torch.device(device)
        self.mb: float | None = None
        self._reset = False

    def __enter__(self) -> "PeakMemory":
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._reset = True
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
                self._reset = True
            except OSError:
                self._reset = False
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.mb = torch.cuda.max_memory_allocated(self.device) / 2**20
        elif self._reset:
            self.mb = vm_hwm_mb()


def vm_hwm_mb() -> float | None:
    """This process's peak resident set in MB (Linux ``VmHWM``), or None where it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        return None
    return None
