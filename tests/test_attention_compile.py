"""The attention kernels through Triton's real compiler for sm_90 and sm_80, on a machine without a GPU.

The CPU tests run the kernels in Triton's interpreter, which accepts code the GPU compiler rejects;
compiling ahead of time for Hopper and Ampere catches that here rather than on the first GPU run. The
autotuning candidates are compiled too: what each allocates in shared memory must stay within the bound
that the pruning relies on, and the fallback must fit at head dim 256 in float32.
"""

import json
import os
import subprocess
import sys

import pytest

SCRIPT = r"""
import json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from e2evlp.kernels import attention as A
from e2evlp.kernels import attention_backward as AB
from e2evlp.kernels import attention_configs as C

POINTER = {"LSE": "*fp32", "DELTA": "*fp32", "CU_Q": "*i32", "CU_K": "*i32", "KPM": "*u8", "KEND": "*i32",
           "MASK": "*u8"}
TENSORS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
KERNELS = {"fwd": A._attention_fwd, "dkdv": AB._attention_bwd_dkdv, "dq": AB._attention_bwd_dq}
KERNEL_PASS = {kernel: kernel_pass for kernel_pass, kernel in KERNELS.items()}


def compile_pass(kernel_pass, arch, dtype, config, **flags):
    fn = KERNELS[kernel_pass].fn
    consts = dict(IS_CAUSAL=False, HAS_KPM=True, MASK_KIND=0, IS_VARLEN=False, HAS_DROPOUT=False, HEAD_DIM=64,
                  D_PAD=64, FP32_DOT=dtype == "fp32", **config.kwargs)
    consts.update(flags)
    signature = {name: "constexpr" if name in consts else POINTER.get(name, "*" + dtype if name in TENSORS else
                 "fp32" if name in ("sm_scale", "dropout_p") else "i32") for name in fn.arg_names}
    # As at run time for aligned tensors and strides that are multiples of 16, which is what lets the
    # compiler pipeline the streamed loads (cp.async).
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name].startswith("*") or name.startswith("s_")}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                          target=GPUTarget("cuda", arch, 32),
                          options={"num_warps": config.num_warps, "num_stages": config.num_stages})


def compile_launch(kernel, args, kwargs, config, arch):
    # As Triton's JIT compiles for these very arguments: an int equal to 1 becomes a constant, and
    # 16-divisible pointers and ints are marked so, which reaches code that a synthetic signature does not.
    from triton.backends.compiler import BaseBackend
    from triton._C.libtriton import native_specialize_impl

    jit = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    bound = {**dict(zip(jit.arg_names, args)), **kwargs, **(config.kwargs if config else {})}
    signature, consts, attrs = {}, {}, {}
    for i, (name, param) in enumerate(zip(jit.arg_names, jit.params)):
        if param.is_constexpr:
            signature[name], consts[name] = "constexpr", bound[name]
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
    import torch

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
    import torch

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


arch, dtype, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
major = arch // 10
if mode == "calls":
    compile_calls(arch, dtype)
elif mode == "features":
    # Every mask kind at once; then causal varlen with no mask, where the mask-free loops do the work.
    for flags in (dict(IS_CAUSAL=True, HAS_KPM=True, MASK_KIND=1, HAS_DROPOUT=True, HEAD_DIM=80, D_PAD=128),
                  dict(IS_CAUSAL=True, HAS_KPM=False, IS_VARLEN=True)):
        for kernel_pass in KERNELS:
            config = C._config(kernel_pass, major, 64, 64, 4, 2)
            kernel = compile_pass(kernel_pass, arch, dtype, config, **flags)
            print(json.dumps({"pass": kernel_pass, "cp_async": kernel.asm["ptx"].count("cp.async")}))
else:
    d_pad = {"candidates": 128, "candidates-fp32": 64, "fallback": 256}[mode]
    element_size = 2 if dtype == "bf16" else 4
    configs = ([C._config(p, major, *c) for p in KERNELS for c in C.CANDIDATES[p][major]]
               if mode.startswith("candidates") else [C.fallback(p, major) for p in KERNELS])
    for config in configs:
        kernel_pass = C.origin(config)[0]
        kernel = compile_pass(kernel_pass, arch, dtype, config, HEAD_DIM=d_pad, D_PAD=d_pad)
        estimate, bound = C.shared_bytes(kernel_pass, config, d_pad, element_size, major)
        print(json.dumps({"pass": kernel_pass, "config": str(config), "shared": kernel.metadata.shared,
                          "bound": bound, "limit": C.SMALLEST_SHARED_MEMORY}))
"""


def _compile(arch, dtype, mode):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler, not the interpreter
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(arch), dtype, mode], env=env, capture_output=True,
                            text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("arch, dtype", [(90, "bf16"), (80, "fp32")])
def test_attention_kernels_compile_for_gpus_with_every_feature(arch, dtype):
    compiled = _compile(arch, dtype, "features")
    assert [c["pass"] for c in compiled] == ["fwd", "dkdv", "dq"] * 2
    assert all(c["cp_async"] > 0 for c in compiled), compiled  # the streamed tiles are pipelined


@pytest.mark.slow
@pytest.mark.parametrize("arch, dtype", [(90, "bfloat16"), (80, "float32")])
def test_attention_launches_compile_as_the_jit_specializes_them(arch, dtype):
    try:
        from triton._C.libtriton import native_specialize_impl  # noqa: F401
    except ImportError:
        pytest.skip("this Triton has no native_specialize_impl to mimic its JIT with")
    compiled = _compile(arch, dtype, "calls")
    assert len(compiled) == 6 * 4 and {c["kernel"] for c in compiled} == {
        "_attention_fwd", "_attention_bwd_delta", "_attention_bwd_dkdv", "_attention_bwd_dq"}


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
def test_candidate_configs_stay_within_the_pruning_bound(arch):
    for mode, dtype in (("candidates", "bf16"), ("candidates-fp32", "fp32"), ("fallback", "fp32")):
        for record in _compile(arch, dtype, mode):
            assert record["shared"] <= record["bound"], record
            if mode == "fallback":
                assert record["shared"] <= record["limit"], record


@pytest.mark.parametrize("major, shared", [(8, "full"), (8, "small"), (9, "full"), (10, "full")])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("d_pad", [16, 64, 128, 256])
def test_pruning_keeps_the_gpus_own_candidates_and_always_one_that_fits(monkeypatch, major, shared, dtype, d_pad):
    import torch
    from e2evlp.kernels import attention_configs as C

    generation = 9 if major >= 9 else 8
    limit = {8: 163 * 1024, 9: 227 * 1024, 10: 227 * 1024}[major] if shared == "full" else C.SMALLEST_SHARED_MEMORY
    monkeypatch.setattr(C, "device_budget", lambda device: (generation, limit))
    for kernel_pass in C.CANDIDATES:
        candidates = [C._config(kernel_pass, g, *c) for g in (8, 9) for c in C.CANDIDATES[kernel_pass][g]]
        q = torch.empty(1, dtype=getattr(torch, dtype))
        kept = C.prune(candidates, {"Q": q}, D_PAD=d_pad)
        assert kept and all(C.origin(c) == (kernel_pass, generation) for c in kept)
        sizes = [C.shared_bytes(kernel_pass, c, d_pad, q.element_size(), generation) for c in kept]
        assert any(bound <= limit for _, bound in sizes)
        if d_pad <= 64 and dtype == "bfloat16" and shared == "full":  # every candidate of the generation is timed
            assert len(kept) == len(C.CANDIDATES[kernel_pass][generation])


def test_configs_survive_tritons_autotuning_disk_cache():
    """Triton rebuilds cached configs with Config(**config.__dict__): nothing of ours may ride on them."""
    import triton
    from e2evlp.kernels import attention_configs as C

    config = C._config("fwd", 9, 128, 64, 4, 3)
    rebuilt = triton.Config(**json.loads(json.dumps(config.__dict__)))
    assert (rebuilt.kwargs, rebuilt.num_warps, rebuilt.num_stages) == ({"BLOCK_M": 128, "BLOCK_N": 64}, 4, 3)


def test_lengths_tune_by_power_of_two_bucket():
    from e2evlp.kernels.attention_configs import length_bucket

    assert [length_bucket(n) for n in (0, 1, 16, 17, 300, 512, 513, 990)] == [16, 16, 16, 32, 512, 512, 1024, 1024]


@pytest.mark.parametrize("major, limit", [(9, 227 * 1024), (8, 163 * 1024), (8, 99 * 1024)])
@pytest.mark.parametrize("d_pad", [64, 256])
def test_pruning_with_tuning_off_keeps_one_config_that_fits(monkeypatch, major, limit, d_pad):
    import torch
    from e2evlp.kernels import attention_configs as C

    monkeypatch.setattr(C, "device_budget", lambda device: (major, limit))
    monkeypatch.setenv("E2EVLP_ATTENTION_AUTOTUNE", "0")
    q = torch.empty(1, dtype=torch.float32)
    for kernel_pass in C.CANDIDATES:
        candidates = [C._config(kernel_pass, g, *c) for g in (8, 9) for c in C.CANDIDATES[kernel_pass][g]]
        kept = C.prune(candidates, {"Q": q}, D_PAD=d_pad)
        assert len(kept) == 1 and C.origin(kept[0]) == (kernel_pass, major)
        assert C.shared_bytes(kernel_pass, kept[0], d_pad, 4, major)[1] <= limit
