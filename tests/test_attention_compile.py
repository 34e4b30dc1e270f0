"""The attention kernels through Triton's real compiler for sm_90 and sm_80, on a machine without a GPU.

The CPU tests run the kernels in Triton's interpreter, which accepts code the GPU compiler rejects;
compiling ahead of time for Hopper and Ampere catches that here rather than on the first GPU run.
"""

import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from e2evlp.kernels import attention as A

POINTER = {"LSE": "*fp32", "DELTA": "*fp32", "CU_Q": "*i32", "CU_K": "*i32", "KPM": "*u8", "MASK": "*u8"}
TENSORS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
arch, dtype = int(ARCH), DTYPE
consts = dict(IS_CAUSAL=True, HAS_KPM=True, MASK_KIND=1, IS_VARLEN=False, HAS_DROPOUT=True, HEAD_DIM=80, D_PAD=128,
              FP32_DOT=dtype == "fp32", BLOCK_M=64, BLOCK_N=64)
for kernel in (A._attention_fwd, A._attention_bwd_dkdv, A._attention_bwd_dq):
    fn = kernel.fn
    signature = {name: "constexpr" if name in consts else POINTER.get(name, "*" + dtype if name in TENSORS else
                 "fp32" if name in ("sm_scale", "dropout_p") else "i32") for name in fn.arg_names}
    triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                   options={"num_warps": 4, "num_stages": 2})
    print("compiled", fn.__name__, arch, dtype)
"""


@pytest.mark.slow
@pytest.mark.parametrize("arch, dtype", [(90, "bf16"), (80, "fp32")])
def test_attention_kernels_compile_for_gpus(arch, dtype):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler, not the interpreter
    code = SCRIPT.replace("ARCH", str(arch)).replace("DTYPE", repr(dtype))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count("compiled") == 3
