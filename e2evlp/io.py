"""File writing shared by checkpoints and save_pretrained: atomic writes, and tied tensors saved once."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def atomic_write(path: Path, write) -> None:
    """Calls write(tmp) on a temporary file beside `path`, flushes it to disk, then renames it over `path`,
    so that a reader (or a crash) only ever sees the old file or the complete new one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        # mkstemp (and safetensors, writing in place) leave it owner-only: give it the mode open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())  # the data must be on disk before the rename makes it visible
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


def without_tied_aliases(state: dict[str, torch.Tensor], prefer_prefix: str = "model.") -> dict[str, torch.Tensor]:
    """One entry per shared tensor (safetensors refuses tied tensors under two names), kept under a name
    starting with `prefer_prefix` when it has one (the trunk's, so that task models find it)."""
    chosen: dict[int, str] = {}
    for key in sorted(state, key=lambda k: (not k.startswith(prefer_prefix), k)):
        if state[key].numel():
            chosen.setdefault(state[key].data_ptr(), key)
    keep = set(chosen.values())
    return {k: v.contiguous() for k, v in state.items() if k in keep or not v.numel()}
