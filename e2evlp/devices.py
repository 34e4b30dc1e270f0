"""Human-readable device names for results files: the GPU as torch reports it, or the CPU model."""

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
