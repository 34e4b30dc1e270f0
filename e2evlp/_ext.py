"""Loads the compiled extension e2evlp._C and explains, in one sentence with the fix, why it is missing."""

from __future__ import annotations

import functools
import json
import re
from pathlib import Path

import torch

REBUILD = "rebuild it with `pip install --no-build-isolation -e .` (or `make install`) in the e2evlp checkout"


class ExtensionError(RuntimeError):
    """The compiled extension e2evlp._C is missing, stale, or lacks the requested device."""


def recorded_build() -> dict | None:
    """What setup.py recorded about the last build (torch version, CUDA archs), or None."""
    path = Path(__file__).with_name("_build_info.json")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


@functools.cache
def _load():
    """Returns (module, None) or (None, reason)."""
    built = recorded_build()
    try:
        from e2evlp import _C
    except ImportError as exc:
        if built is None:
            return None, f"the compiled extension e2evlp._C is not built; {REBUILD}."
        if built.get("torch") != torch.__version__:
            return None, (
                f"e2evlp._C was built against torch {built.get('torch')} but torch {torch.__version__} "
                f"is installed; {REBUILD}."
            )
        return None, f"e2evlp._C failed to load ({exc}); {REBUILD}."
    info = _C.build_info()
    if info["torch"] != torch.__version__:
        return None, (
            f"e2evlp._C was built against torch {info['torch']} but torch {torch.__version__} is installed; {REBUILD}."
        )
    return _C, None


@functools.cache
def _with_cuda(module) -> bool:
    return bool(module.build_info()["with_cuda"])


def runs_on(archs: str, capability: tuple[int, int]) -> bool | None:
    """Whether code built for TORCH_CUDA_ARCH_LIST `archs` runs on a GPU of compute `capability`: a cubin
    for sm_XY runs on X.Y and later minors of X, "+PTX" also on every later GPU (compiled when loaded).
    None when an entry is not numeric (a name such as "Hopper"), so the answer is unknown."""
    major, minor = capability
    fits = False
    for entry in archs.replace(",", ";").replace(" ", ";").split(";"):
        if not entry:
            continue
        arch, ptx = entry.removesuffix("+PTX"), entry.endswith("+PTX")
        found = re.fullmatch(r"(\d+)\.(\d+)a?", arch)
        if found is None:
            return None
        built = (int(found.group(1)), int(found.group(2)))
        fits |= (built[0] == major and built[1] <= minor) or (ptx and built <= capability)
    return fits


@functools.cache
def _check_arch(module, index: int) -> None:
    archs = module.build_info().get("cuda_archs", "")
    capability = torch.cuda.get_device_capability(index)
    if runs_on(archs, capability) is False:
        name = torch.cuda.get_device_name(index)
        raise ExtensionError(
            f"e2evlp._C has CUDA kernels for TORCH_CUDA_ARCH_LIST={archs!r} only, none of which runs on {name} "
            f"(compute capability {capability[0]}.{capability[1]}); set TORCH_CUDA_ARCH_LIST="
            f"\"{capability[0]}.{capability[1]}\" and {REBUILD}."
        )


def available() -> bool:
    return _load()[0] is not None


def unavailable_reason() -> str | None:
    return _load()[1]


def require(device: torch.device | str | None = None):
    """Returns e2evlp._C, raising ExtensionError with the fix when it (or its CUDA part) is unusable.

    Under torch.compile this is skipped (returns None): the check is host-side state, not graph work.
    """
    if torch.compiler.is_compiling():
        return None
    module, reason = _load()
    if module is None:
        raise ExtensionError(reason)
    device = None if device is None else torch.device(device)
    if device is not None and device.type == "cuda":
        if not _with_cuda(module):
            raise ExtensionError(
                "e2evlp._C was built without its CUDA kernels (CPU only); install a CUDA build of torch and the "
                f"CUDA toolkit (nvcc), then {REBUILD} (FORCE_CUDA=1 makes a missing toolkit an error)."
            )
        _check_arch(module, torch.cuda.current_device() if device.index is None else device.index)
    return module


def build_info() -> dict:
    """What the loaded extension was built with, or why it cannot be loaded."""
    module, reason = _load()
    if module is None:
        return {"built": False, "reason": reason, "recorded": recorded_build()}
    info = dict(module.build_info())
    info["built"] = True
    info["archs"] = [a for a in info.get("cuda_archs", "").replace(",", ";").replace(" ", ";").split(";") if a]
    return info
