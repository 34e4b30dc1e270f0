"""Autotuning configs of the attention kernels: candidates per GPU generation, pruned to fit shared memory.

Each pass (forward, dK/dV, dQ) has candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) per GPU generation
(compute capability major: 8 = Ampere and Ada, 9 = H100/H200). At a call, the autotuner keeps the running
GPU's candidates whose tiles fit its shared memory (the device's own opt-in limit: 227 KiB on H100, 163 KiB
on A100, 99 KiB on A10/A40/RTX 30-40) at this head dim and dtype, then times them once per shape bucket.
The shared-memory model below was fitted to what Triton's compiler allocates for these kernels on sm_80
and sm_90 (tests/test_attention_compile.py checks it); a fallback config that fits every supported GPU is
added whenever no candidate is sure to.
"""

from __future__ import annotations

import os

import torch
import triton

from e2evlp.devices import triton_interpreting

# In the dK/dV pass BLOCK_N is the key block a program owns and BLOCK_M the query step it streams; in the
# forward and dQ passes a program owns BLOCK_M queries and streams BLOCK_N keys.
CANDIDATES = {
    "fwd": {8: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2)],
            9: [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4), (64, 64, 4, 4), (128, 128, 8, 2),
                (64, 64, 4, 2)]},
    "dkdv": {8: [(32, 128, 4, 2), (64, 64, 4, 3), (64, 128, 8, 2), (32, 64, 4, 3)],
             9: [(32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4)]},
    "dq": {8: [(128, 32, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 3)],
           9: [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4)]},
}
# Small enough for head dim 256 in float32 within the smallest opt-in limit of the GPUs we support.
FALLBACK = {"fwd": (32, 16, 4, 1), "dkdv": (16, 16, 4, 1), "dq": (16, 16, 4, 1)}
SMALLEST_SHARED_MEMORY = 99 * 1024  # sm_86 / sm_89 (A10, A40, L4, RTX 30/40 series)
# [rows, D] tiles a program keeps resident and streams: forward q | k, v; dK/dV k, v | q, dO; dQ q, dO | k, v.
TILES = {"fwd": (1, 2), "dkdv": (2, 2), "dq": (2, 2)}
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)


# id(config) → (pass, generation) of every candidate and fallback. Kept off the Config objects: Triton's
# autotuning disk cache rebuilds configs with Config(**config.__dict__), which extra attributes would break.
_ORIGIN: dict[int, tuple[str, int]] = {}


def _config(kernel_pass: str, major: int, block_m: int, block_n: int, warps: int, stages: int) -> triton.Config:
    config = triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
    _ORIGIN[id(config)] = (kernel_pass, major)
    return config


def origin(config: triton.Config) -> tuple[str, int]:
    """(pass, generation) a candidate or fallback config was made for."""
    return _ORIGIN[id(config)]


def configs(kernel_pass: str) -> list[triton.Config]:
    """Every generation's candidates for one pass; prune keeps those of the GPU a call runs on."""
    if triton_interpreting():  # the interpreter runs programs one by one and cannot autotune
        return [INTERPRETER_CONFIG]
    return [_config(kernel_pass, major, *candidate) for major, candidates in CANDIDATES[kernel_pass].items()
            for candidate in candidates]


def fallback(kernel_pass: str, major: int) -> triton.Config:
    return _config(kernel_pass, major, *FALLBACK[kernel_pass])


def shared_bytes(kernel_pass: str, config: triton.Config, d_pad: int, element_size: int,
                 major: int) -> tuple[int, int]:
    """(estimate, bound) of the shared memory Triton allocates for a config: the resident tiles plus one
    buffer per pipeline stage of the streamed ones (Ampere's cp.async pipeline keeps num_stages - 1, Hopper's
    num_stages). The bound adds what the compiler sometimes needs on top: two [BLOCK_M, BLOCK_N] layout
    conversions (P and dS, transposed in the dK/dV pass), and 4 KiB for the float32 row statistics and
    barriers."""
    block_m, block_n = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    owned, streamed = (block_n, block_m) if kernel_pass == "dkdv" else (block_m, block_n)
    resident_tiles, streamed_tiles = TILES[kernel_pass]
    buffers = config.num_stages if major >= 9 else max(config.num_stages - 1, 1)
    estimate = (resident_tiles * owned + streamed_tiles * streamed * buffers) * d_pad * element_size
    return estimate, estimate + 2 * block_m * block_n * element_size + 4096


def device_budget(device: torch.device) -> tuple[int, int]:
    """(candidate set, shared memory per block in bytes) of a CUDA device: Hopper and data-centre Blackwell
    (sm_90, sm_100) use the sm_90 candidates; Ampere, Ada and consumer Blackwell (sm_120, whose shared
    memory is Ada's) the sm_80 ones."""
    props = torch.cuda.get_device_properties(device)
    return (9 if props.major in (9, 10) else 8), props.shared_memory_per_block_optin


def tuning_enabled() -> bool:
    """E2EVLP_ATTENTION_AUTOTUNE=0 runs each pass with one config that surely fits, without timing others:
    for correctness tests, where compiling and timing every candidate per shape is minutes of waste."""
    return os.environ.get("E2EVLP_ATTENTION_AUTOTUNE", "1") != "0"


def prune(configs: list, named_args: dict, **kwargs) -> list:
    """The running GPU's candidates that may fit, plus the fallback when none is sure to fit (only the first
    that is sure to fit, or the fallback, when tuning is off)."""
    if len(configs) == 1:
        return configs
    q = named_args["Q"]
    major, limit = device_budget(q.device)
    kernel_pass = origin(configs[0])[0]
    sizes = {id(c): shared_bytes(kernel_pass, c, kwargs["D_PAD"], q.element_size(), major) for c in configs}
    kept = [c for c in configs if origin(c)[1] == major and sizes[id(c)][0] <= limit]
    sure = [c for c in kept if sizes[id(c)][1] <= limit]
    if not tuning_enabled():
        return sure[:1] or [fallback(kernel_pass, major)]
    if not sure:
        kept.append(fallback(kernel_pass, major))
    return kept


def _bench(kernel_call, quantiles):
    # Triton's default (25 ms warm-up, 100 ms of repeats per config) is ~2 s per shape bucket for 14 configs;
    # a few milliseconds of each already rank these kernels.
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


def length_bucket(length: int) -> int:
    """Sequence lengths tune by power-of-two bucket: a training run whose batches vary in length tunes a
    handful of times, not once per distinct length."""
    return max(16, triton.next_power_of_2(max(int(length), 1)))


AUTOTUNE_KEY = ["TUNE_LQ", "TUNE_LK", "D_PAD", "IS_CAUSAL", "MASK_KIND", "HAS_KPM", "IS_VARLEN", "HAS_DROPOUT"]
PRUNE = {"early_config_prune": prune}
TUNING = {"key": AUTOTUNE_KEY, "prune_configs_by": PRUNE, "do_bench": _bench}
