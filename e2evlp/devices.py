"""Device helpers below every layer: readable device names, moving batches, whether Triton interprets."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import torch


def device_name(device: torch.device | str) -> str:
    """The GPU name as torch reports it, or the CPU model with its core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cores)"
    except OSError:
        pass
    return platform.processor() or "cpu"


def triton_interpreting() -> bool:
    """True under TRITON_INTERPRET=1, where Triton kernels run on the CPU (one program at a time)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def batch_to_device(batch, device: torch.device):
    """`batch` with every tensor in it (nested in dicts, lists and tuples) moved to `device`."""
    if isinstance(batch, torch.Tensor) or callable(getattr(batch, "to", None)):  # tensors, PaddedTargets
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: batch_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(batch_to_device(v, device) for v in batch)
    return batch
