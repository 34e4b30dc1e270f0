"""Builds e2evlp and its compiled extension e2evlp._C (C++ CPU kernels always, CUDA kernels when it can).

Knobs (environment variables):
  E2EVLP_SKIP_CUDA=1      build the CPU kernels only, even where nvcc and a CUDA torch are present
  FORCE_CUDA=1            build the CUDA kernels even when no GPU is visible (the default anyway
                          whenever nvcc and a CUDA build of torch are found)
  TORCH_CUDA_ARCH_LIST    GPU architectures to compile for; default "8.0;9.0+PTX" (A100, H100/H200,
                          and PTX that newer GPUs compile when the extension loads)
  MAX_JOBS                parallel compile jobs (ninja)
  CUDA_HOME               the CUDA toolkit; found from the nvcc on PATH when unset
"""

import json
import os
import re
import shutil
import sys
from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).resolve().parent


def _toolkit_of(nvcc: str):
    """The toolkit root of an nvcc executable, also when PATH holds a shell wrapper around it."""
    real = Path(os.path.realpath(nvcc))
    if (real.parent.parent / "include" / "cuda_runtime.h").exists():
        return real.parent.parent
    try:
        text = real.read_text(errors="ignore")[:4096]
    except OSError:
        return None
    for target in re.findall(r"(/[^\s'\"]+/bin/nvcc)\b", text):
        root = Path(target).parent.parent
        if (root / "include" / "cuda_runtime.h").exists():
            return root
    return None


def _find_cuda_home():
    if os.environ.get("CUDA_HOME"):
        return os.environ["CUDA_HOME"]
    nvcc = shutil.which("nvcc")
    root = _toolkit_of(nvcc) if nvcc else None
    if root is None and Path("/usr/local/cuda/bin/nvcc").exists():
        root = Path("/usr/local/cuda")
    return str(root) if root else None


# torch.utils.cpp_extension reads CUDA_HOME when it is imported: settle it first.
_cuda_home = _find_cuda_home()
if _cuda_home:
    os.environ["CUDA_HOME"] = _cuda_home
    os.environ.setdefault("CUDA_PATH", _cuda_home)

import torch
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension


def _want_cuda() -> bool:
    if os.environ.get("E2EVLP_SKIP_CUDA", "0") == "1":
        return False
    if torch.version.cuda is None:
        if os.environ.get("FORCE_CUDA", "0") == "1":
            sys.exit("FORCE_CUDA=1 but the installed torch is a CPU-only build: install a CUDA build of torch.")
        return False
    if _cuda_home is None:
        if os.environ.get("FORCE_CUDA", "0") == "1":
            sys.exit("FORCE_CUDA=1 but no CUDA toolkit was found: set CUDA_HOME or put nvcc on PATH.")
        return False
    return True


WITH_CUDA = _want_cuda()
if WITH_CUDA:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX")
CUDA_ARCHS = os.environ.get("TORCH_CUDA_ARCH_LIST", "") if WITH_CUDA else ""

csrc = ROOT / "csrc"
sources = sorted(str(p.relative_to(ROOT)) for p in csrc.glob("*_cpu.cpp")) + ["csrc/ops.cpp"]
if WITH_CUDA:
    sources += sorted(str(p.relative_to(ROOT)) for p in csrc.glob("*_cuda.cpp"))
    sources += sorted(str(p.relative_to(ROOT)) for p in csrc.glob("*_kernel.cu"))

define_macros = [
    ("E2EVLP_WITH_CUDA", "1" if WITH_CUDA else "0"),
    ("E2EVLP_TORCH_VERSION", json.dumps(torch.__version__)),
    ("E2EVLP_CUDA_ARCHS", json.dumps(CUDA_ARCHS)),
]
# -fno-trapping-math lets the compiler vectorize guarded divisions (x > 0 ? y / x : 0); nothing here
# relies on floating-point exceptions.
cxx_flags = ["-O3", "-std=c++20", "-fopenmp", "-fno-trapping-math"]
extra_compile_args = {"cxx": cxx_flags}
if WITH_CUDA:
    extra_compile_args["nvcc"] = ["-O3", "-std=c++20", "-lineinfo"]
    Extension = CUDAExtension
else:
    Extension = CppExtension


class BuildWithInfo(BuildExtension):
    """Builds the extension and writes what was built beside it, for e2evlp._ext to read."""

    def run(self):
        super().run()
        target = Path(self.get_ext_fullpath("e2evlp._C")).parent / "_build_info.json"
        info = {
            "torch": torch.__version__,
            "torch_cuda": torch.version.cuda,
            "with_cuda": WITH_CUDA,
            "cuda_archs": CUDA_ARCHS,
            "cuda_home": _cuda_home if WITH_CUDA else None,
            "python": sys.version.split()[0],
        }
        tmp = target.with_suffix(".tmp")
        tmp.write_text(json.dumps(info, indent=2) + "\n")
        os.replace(tmp, target)


setup(
    packages=find_packages(include=["e2evlp", "e2evlp.*"]) + ["e2evlp.kernels"],
    package_dir={"e2evlp.kernels": "kernels"},
    package_data={"e2evlp.kernels": ["attention_spills.json"]},
    ext_modules=[
        Extension(
            "e2evlp._C",
            sources=sources,
            include_dirs=[str(csrc)],
            define_macros=define_macros,
            extra_compile_args=extra_compile_args,
            extra_link_args=["-fopenmp"],
        )
    ],
    cmdclass={"build_ext": BuildWithInfo.with_options(use_ninja=True)},
)
