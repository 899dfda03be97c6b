"""The seed's memory block: before training, consumed (end - begin), peak consumed, total peak.

On a GPU it reads the CUDA caching allocator; on a CPU, the process's resident memory.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import psutil
import torch

GIB = 1024 ** 3


def _process_peak_bytes() -> int:
    info = psutil.Process(os.getpid()).memory_info()
    if sys.platform != "win32":
        import resource
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak * (1 if sys.platform == "darwin" else 1024)  # macOS reports bytes, Linux KiB
    return getattr(info, "peak_wset", info.rss)


@dataclass
class MemorySnapshot:
    device: str
    begin: int
    end: int
    peak: int

    def to_dict(self) -> dict:
        return {"device": self.device, "before_training_gib": self.begin / GIB, "consumed_gib": (self.end - self.begin) / GIB,
                "peak_consumed_gib": (self.peak - self.begin) / GIB, "total_peak_gib": self.peak / GIB}

    def lines(self) -> list[str]:
        kind = "GPU" if self.device.startswith("cuda") else "Process (CPU)"
        return [f"{kind} memory:",
                f"  Memory before training: {self.begin / GIB:.3f} GiB",
                f"  Memory consumed (end - begin): {(self.end - self.begin) / GIB:.3f} GiB",
                f"  Peak memory consumed (peak - begin): {(self.peak - self.begin) / GIB:.3f} GiB",
                f"  Total peak memory: {self.peak / GIB:.3f} GiB"]


class MemoryTracker:
    def __init__(self, device: torch.device):
        self.device = device
        self.begin = self.current()

    def current(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.memory_allocated(self.device)
        return psutil.Process(os.getpid()).memory_info().rss

    def peak(self) -> int:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device)
        return _process_peak_bytes()

    def snapshot(self) -> MemorySnapshot:
        return MemorySnapshot(str(self.device), self.begin, self.current(), max(self.peak(), self.begin))
