"""Run by tests/test_attention_compile.py in a subprocess without TRITON_INTERPRET: compiles the attention kernels
with Triton's real compiler for a GPU architecture this machine need not have, and prints one JSON record per
compiled kernel.

    python tests/attention_compile_worker.py ARCH DTYPE MODE

ARCH is 90 or 80; MODE is "features" (every feature at once, DTYPE bf16 or fp32), "calls" (the launches the
JIT builds for real calls, DTYPE a torch dtype name), or "candidates", "candidates-fp32", "fallback" (the
autotuning configs, with their shared memory against the pruning's bound).
"""

import json
import sys

import torch
import triton
from e2evlp.kernels import attention as A
from e2evlp.kernels import attention_backward as AB
from e2evlp.kernels import attention_configs as C
from e2evlp.kernels import attention_inspect as AI
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

KERNELS = {"fwd": A._attention_fwd, "dkdv": AB._attention_bwd_dkdv, "dq": AB._attention_bwd_dq}
KERNEL_PASS = {kernel: kernel_pass for kernel_pass, kernel in KERNELS.items()}


def compile_pass(kernel_pass, arch, dtype, config, **flags):
    constants = dict(AI.flags_of("kpm", 64, False, dtype), **config.kwargs)
    constants.update(flags)
    compiled, _ = AI.compile_kernel(kernel_pass, arch, dtype, constants, config.num_warps, config.num_stages)
    return compiled


def compile_launch(kernel, args, kwargs, config, arch):
    # As Triton's JIT compiles for these very arguments: an int equal to 1 becomes a constant, and
    # 16-divisible pointers and ints are marked so, which reaches code that a synthetic signature does not.
    # Imported here: only the "calls" mode needs them (the test skips it on a Triton without them).
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    jit = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    bound = {**dict(zip(jit.arg_names, args)), **kwargs, **(config.kwargs if config else {})}
    signature, consts, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(jit.arg_names, jit.params)):
        if param.is_constexpr:
            signature[name], consts[name] = "constexpr", bound.get(name, param.default)
            continue
        kind, spec = native_specialize_impl(BaseBackend, bound[name], False, not param.do_not_specialize,
                                            not getattr(param, "do_not_specialize_on_alignment", False))
        if kind == "constexpr":
            signature[name], consts[name] = "constexpr", spec
        else:
            signature[name] = kind
            if spec == "D":
                attrs[(i,)] = [["tt.divisibility", 16]]
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages} if config else {}
    return triton.compile(ASTSource(fn=jit, signature=signature, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32), options=options)


def calls(dtype):
    # Calls that the JIT specializes in ways a synthetic signature does not: decoding (Lq = 1), one
    # head, seed 1, a contiguous [Lq, Lk] bool mask (unit key stride), one key, varlen.
    def t(*shape):
        return torch.zeros(*shape, dtype=getattr(torch, dtype))

    yield "decode", dict(q=t(8, 4, 1, 64), k=t(8, 4, 300, 64), causal=True)
    yield "one head", dict(q=t(2, 1, 128, 64), k=t(2, 1, 128, 64), causal=True)
    yield "seed 1", dict(q=t(2, 4, 128, 64), k=t(2, 4, 128, 64), dropout_p=0.1, seed=1,
                         key_padding_mask=torch.zeros(2, 128, dtype=torch.bool))
    yield "bool mask", dict(q=t(2, 4, 128, 40), k=t(2, 4, 128, 40), attn_mask=torch.ones(128, 128, dtype=torch.bool))
    yield "one key", dict(q=t(2, 4, 64, 64), k=t(2, 4, 1, 64))
    cu = torch.tensor([0, 40, 100], dtype=torch.int32)
    yield "varlen", dict(q=t(100, 4, 64), k=t(100, 4, 64), cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=60,
                         max_seqlen_k=60, causal=True)


def compile_calls(arch, dtype):
    for name, call in calls(dtype):
        q, k = call.pop("q"), call.pop("k")
        varlen = "cu_seqlens_q" in call
        problem = A.Problem(q, k, k, call.get("key_padding_mask"), call.get("attn_mask"), call.get("cu_seqlens_q"),
                            call.get("cu_seqlens_k"), call.get("max_seqlen_q", 0 if varlen else q.shape[2]),
                            call.get("max_seqlen_k", 0 if varlen else k.shape[2]), call.get("causal", False), 0.125,
                            call.get("dropout_p", 0.0), call.get("seed", 12345))
        out, lse = torch.zeros_like(problem.q), problem.new_lse()
        launches = [A.forward_launch(problem, out, lse)]
        launches += AB.backward_launches(problem, out, torch.zeros_like(out), lse, torch.zeros_like(lse),
                                         torch.zeros_like(problem.q), torch.zeros_like(problem.k),
                                         torch.zeros_like(problem.v))
        for kernel, _, args, kwargs in launches:
            autotuned = isinstance(kernel, triton.runtime.Autotuner)
            config = C._config(KERNEL_PASS[kernel], arch // 10, 64, 64, 4, 2) if autotuned else None
            compile_launch(kernel, args, kwargs, config, arch)
            print(json.dumps({"call": name, "kernel": (kernel.fn if autotuned else kernel).fn.__name__}))


def compile_features(arch, dtype):
    # Every mask kind at once; then causal varlen with no mask, where the mask-free loops do the work.
    major = arch // 10
    for flags in (dict(IS_CAUSAL=True, HAS_KPM=True, MASK_KIND=A.MASK_BOOL.value, HAS_DROPOUT=True, HEAD_DIM=80,
                       D_PAD=128),
                  dict(IS_CAUSAL=True, HAS_KPM=False, IS_VARLEN=True)):
        for kernel_pass in KERNELS:
            config = C._config(kernel_pass, major, 64, 64, 4, 2)
            kernel = compile_pass(kernel_pass, arch, dtype, config, **flags)
            print(json.dumps({"pass": kernel_pass, "cp_async": kernel.asm["ptx"].count("cp.async")}))


def compile_configs(arch, dtype, mode):
    major = arch // 10
    d_pad = {"candidates": 128, "candidates-fp32": 64, "fallback": 256}[mode]
    element_size = 2 if dtype == "bf16" else 4
    configs = ([C._config(p, major, *c) for p in KERNELS for c in C.CANDIDATES[p][major]]
               if mode.startswith("candidates") else [C.fallback(p, major) for p in KERNELS])
    for config in configs:
        kernel_pass = C.origin(config)[0]
        kernel = compile_pass(kernel_pass, arch, dtype, config, HEAD_DIM=d_pad, D_PAD=d_pad)
        _, bound = C.shared_bytes(kernel_pass, config, d_pad, element_size, major)
        print(json.dumps({"pass": kernel_pass, "config": str(config), "shared": kernel.metadata.shared,
                          "bound": bound, "limit": C.SMALLEST_SHARED_MEMORY}))


def main(argv):
    arch, dtype, mode = int(argv[0]), argv[1], argv[2]
    if mode == "calls":
        compile_calls(arch, dtype)
    elif mode == "features":
        compile_features(arch, dtype)
    else:
        compile_configs(arch, dtype, mode)


if __name__ == "__main__":
    main(sys.argv[1:])
