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
from pathlib import Path

import pytest

WORKER = Path(__file__).with_name("attention_compile_worker.py")  # run as a script: see its docstring


def _compile(arch, dtype, mode):
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the real compiler, not the interpreter
    result = subprocess.run([sys.executable, str(WORKER), str(arch), dtype, mode], env=env, capture_output=True,
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
        padded_batch = dict(D_PAD=d_pad, HAS_KPM=True, MASK_KIND=0, IS_VARLEN=False)
        kept = C.prune(candidates, {"Q": q, "TMA_ALIGNED": 1}, **padded_batch)
        assert kept and all(C.origin(c) == (kernel_pass, generation) for c in kept)
        sizes = [C.shared_bytes(kernel_pass, c, d_pad, q.element_size(), generation) for c in kept]
        assert any(bound <= limit for _, bound in sizes)
        if d_pad <= 64 and dtype == "bfloat16" and shared == "full":  # every candidate that does not spill is timed
            usable = [c for c in C.generation_configs(kernel_pass, generation) if C.usable(c, True, padded_batch)]
            expected = [c for c in usable if not C.spill_bytes(kernel_pass, c, generation, d_pad, padded_batch)]
            assert [C.candidate_key(kernel_pass, c) for c in kept] == [C.candidate_key(kernel_pass, c) for c in expected]
        misaligned = C.prune(candidates, {"Q": q, "TMA_ALIGNED": 0}, **padded_batch)
        assert misaligned and all(C.variant(c) == "cp.async" for c in misaligned)


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
