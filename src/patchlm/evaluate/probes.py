"""Speed and memory probes shared by every benchmark.

On CPU, peak memory is the process's resident set size, sampled by a thread (torch's CPU allocator
reports nothing); on CUDA it is torch.cuda.max_memory_allocated. Compare numbers from the same run only.
"""

from __future__ import annotations

import os
import resource
import threading
import time

import torch


def rss_bytes() -> int:
    try:
        with open(f"/proc/{os.getpid()}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import psutil

        return psutil.Process().memory_info().rss


def peak_rss_bytes() -> int:
    """The process's lifetime peak RSS (ru_maxrss, kilobytes on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class MemoryProbe:
    """`with MemoryProbe() as m: ...` then m.peak_bytes (absolute peak) and m.delta_bytes (above the start)."""

    def __init__(self, interval: float = 0.005, device: str | torch.device = "cpu"):
        self.interval = interval
        self.device = torch.device(device)
        self.start_bytes = self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> MemoryProbe:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            return self
        self.start_bytes = self.peak_bytes = rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
            return
        self._stop.set()
        if self._thread:
            self._thread.join()
        self.peak_bytes = max(self.peak_bytes, rss_bytes())

    @property
    def delta_bytes(self) -> int:
        return max(0, self.peak_bytes - self.start_bytes)


class Timer:
    """`with Timer() as t: ...` then t.seconds; `rate(n)` gives n / seconds."""

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self.t0

    def rate(self, n: float) -> float:
        return n / self.seconds if self.seconds > 0 else float("inf")
