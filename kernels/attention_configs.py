"""Autotuning configs of the attention kernels: candidates per GPU generation, pruned to fit shared memory and
to those that do not spill registers.

Each pass (forward, dK/dV, dQ) has candidate (BLOCK_M, BLOCK_N, num_warps, num_stages) per GPU generation
(compute capability major: 8 = Ampere and Ada, 9 = H100/H200). At a call, the autotuner keeps the running
GPU's candidates whose tiles fit its shared memory (the device's own opt-in limit: 227 KiB on H100, 163 KiB
on A100, 99 KiB on A10/A40/RTX 30-40) at this head dim and dtype, then times them once per shape bucket.
The shared-memory model below was fitted to what Triton's compiler allocates for these kernels on sm_80
and sm_90 (tests/test_attention_compile.py checks it); a fallback config that fits every supported GPU is
added whenever no candidate is sure to. Candidates that ptxas reports spilling registers at a head dim are not
offered there: attention_spills.json holds that report, made by compiling every candidate for sm_80 and sm_90
(`make kernels-inspect`; tests/test_attention_inspect.py recompiles a subset and checks it).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
import triton

from e2evlp.devices import triton_interpreting

# (BLOCK_M, BLOCK_N, num_warps, num_stages[, loads]): "tma" candidates load through tensor descriptors (sm_90's
# TMA; offered only when the tensors meet its 16-byte alignment, see tma_aligned), "tma-ws" ones also
# warp-specialize the key loop (only where that compiles, see warp_specialization_compiles). Warp
# specialization gives 8-warp tiles the same code as without it, so only 4-warp tiles have it.
# In the dK/dV pass BLOCK_N is the key block a program owns and BLOCK_M the query step it streams; in the
# forward and dQ passes a program owns BLOCK_M queries and streams BLOCK_N keys.
CANDIDATES = {
    "fwd": {8: [(128, 64, 4, 3), (128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2),
                (64, 32, 4, 3)],
            9: [(128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4), (64, 64, 4, 4), (128, 128, 8, 2),
                (64, 64, 4, 2), (128, 128, 8, 3, "tma"), (128, 64, 4, 3, "tma"), (128, 64, 8, 4, "tma"),
                (64, 64, 4, 4, "tma"), (128, 64, 4, 3, "tma-ws"), (64, 64, 4, 4, "tma-ws")]},
    "dkdv": {8: [(32, 128, 4, 2), (64, 64, 4, 3), (64, 128, 8, 2), (32, 64, 4, 3), (32, 64, 8, 3), (64, 32, 4, 3),
                 (32, 32, 4, 3)],
             9: [(32, 128, 4, 3), (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4), (32, 64, 8, 3), (16, 64, 4, 3)]},
    "dq": {8: [(128, 32, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 8, 3)],
           9: [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4), (128, 32, 8, 3)]},
}
# Small enough for head dim 256 in float32 within the smallest opt-in limit of the GPUs we support.
FALLBACK = {"fwd": (32, 16, 4, 1), "dkdv": (16, 16, 4, 1), "dq": (16, 16, 4, 1)}
WARP_SPECIALIZED_TRITON = (3, 8)  # the oldest Triton whose compiled forward was checked with warp specialization
SMALLEST_SHARED_MEMORY = 99 * 1024  # sm_86 / sm_89 (A10, A40, L4, RTX 30/40 series)
# [rows, D] tiles a program keeps resident and streams: forward q | k, v; dK/dV k, v | q, dO; dQ q, dO | k, v.
TILES = {"fwd": (1, 2), "dkdv": (2, 2), "dq": (2, 2)}
# Written by `e2evlp kernels inspect --update-spill-table` (make kernels-inspect) from Triton's compiled report.
SPILL_TABLE = Path(__file__).with_name("attention_spills.json")
INTERPRETER_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)


# id(config) → (pass, generation) of every candidate and fallback. Kept off the Config objects: Triton's
# autotuning disk cache rebuilds configs with Config(**config.__dict__), which extra attributes would break.
_ORIGIN: dict[int, tuple[str, int]] = {}


def _config(kernel_pass: str, major: int, block_m: int, block_n: int, warps: int, stages: int,
            loads: str = "cp.async") -> triton.Config:
    tiles = {"BLOCK_M": block_m, "BLOCK_N": block_n}
    if loads in ("tma", "tma-ws"):
        tiles["USE_TMA"] = True
    if loads == "tma-ws":
        tiles["WARP_SPECIALIZE"] = True
    config = triton.Config(tiles, num_warps=warps, num_stages=stages)
    _ORIGIN[id(config)] = (kernel_pass, major)
    return config


def origin(config: triton.Config) -> tuple[str, int]:
    """(pass, generation) a candidate or fallback config was made for."""
    return _ORIGIN[id(config)]


def generation_configs(kernel_pass: str, major: int) -> list[triton.Config]:
    """One generation's candidates for one pass, in order of preference."""
    return [_config(kernel_pass, major, *candidate) for candidate in CANDIDATES[kernel_pass][major]]


def configs(kernel_pass: str) -> list[triton.Config]:
    """Every generation's candidates for one pass; prune keeps those of the GPU a call runs on."""
    if triton_interpreting():  # the interpreter runs programs one by one and cannot autotune
        return [INTERPRETER_CONFIG]
    return [config for major in CANDIDATES[kernel_pass] for config in generation_configs(kernel_pass, major)]


def variant(config: triton.Config) -> str:
    """How a config's kernel loads its tiles: "tma" (tensor descriptors, Hopper's bulk tensor copies), "tma-ws"
    (the same, with the key loop warp-specialized into loading and computing warps) or "cp.async" (pointer
    loads)."""
    if config.kwargs.get("WARP_SPECIALIZE"):
        return "tma-ws"
    return "tma" if config.kwargs.get("USE_TMA") else "cp.async"


def warp_specialization_compiles(flags: dict) -> bool:
    """Where Triton's warp specialization of the forward's key loop compiles: the padded batch (key padding,
    no attn_mask, not varlen), whose one loop it splits into producer and consumer warps. With the mask-free
    loop beside it, or an attn_mask, Triton 3.8's NVGPUWarpSpecialization pass fails; older Triton is
    unchecked, so it is not offered there."""
    return (WARP_SPECIALIZED_TRITON <= tuple(int(p) for p in triton.__version__.split(".")[:2])
            and flags.get("HAS_KPM") and flags.get("MASK_KIND") == 0 and not flags.get("IS_VARLEN"))


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


def candidate_key(kernel_pass: str, config: triton.Config) -> str:
    """A config's name in the spill table: "pass BLOCK_M,BLOCK_N,num_warps,num_stages[ variant]"."""
    tile = f"{config.kwargs['BLOCK_M']},{config.kwargs['BLOCK_N']},{config.num_warps},{config.num_stages}"
    key = f"{kernel_pass} {tile}"
    return key if variant(config) == "cp.async" else f"{key} {variant(config)}"


@functools.cache
def spill_table() -> dict:
    """What `e2evlp kernels inspect --update-spill-table` recorded: per generation and feature set, the spill
    stores ptxas reported for each candidate at each padded head dim (D_PAD) where it spilled, causal or not."""
    return json.loads(SPILL_TABLE.read_text())


def feature_set(flags: dict) -> str:
    """The swept feature set whose compiled kernels stand for a call with these constexpr flags: an attn_mask
    ("mask"), key padding ("kpm"), else the mask-free layouts ("varlen": varlen or no mask at all), with
    "-dropout" where dropout is on (a mask with dropout counts as "mask": not swept)."""
    if flags.get("MASK_KIND", 0):
        return "mask"
    base = "kpm" if flags.get("HAS_KPM") else "varlen"
    return f"{base}-dropout" if flags.get("HAS_DROPOUT") else base


def spill_bytes(kernel_pass: str, config: triton.Config, major: int, d_pad: int, flags: dict) -> int:
    """The spill stores the compiled report gives this candidate at this padded head dim and feature set. A head
    dim the sweep did not cover takes the most the candidate spilled at any swept one: register use is not
    monotone in the head dim (sm_80's dK/dV 32x64 8 warps spills at 64 and not at 128), so nothing better is
    known."""
    generation = spill_table()["generations"].get(str(major))
    if generation is None:
        return 0
    spilled = generation["spills"].get(feature_set(flags), {}).get(candidate_key(kernel_pass, config), {})
    if d_pad in generation["d_pads"]:
        return spilled.get(str(d_pad), 0)
    return max(spilled.values(), default=0)


def device_budget(device: torch.device) -> tuple[int, int]:
    """(candidate set, shared memory per block in bytes) of a CUDA device: Hopper and data-centre Blackwell
    (sm_90, sm_100) use the sm_90 candidates; Ampere, Ada and consumer Blackwell (sm_120, whose shared
    memory is Ada's) the sm_80 ones."""
    props = torch.cuda.get_device_properties(device)
    return (9 if props.major in (9, 10) else 8), props.shared_memory_per_block_optin


def tma_aligned(tensors: list[torch.Tensor], strides: list[int], head_dim: int) -> bool:
    """Whether TMA descriptors may address these tensors: 16-byte aligned data and strides (in elements here),
    rows of at least 16 bytes, a unit-stride head dim, and an sm_90 or newer GPU."""
    element_size = tensors[0].element_size()
    return (tensors[0].is_cuda and torch.cuda.get_device_capability(tensors[0].device)[0] >= 9
            and head_dim * element_size >= 16 and all(t.data_ptr() % 16 == 0 and t.stride(-1) == 1 for t in tensors)
            and all(stride * element_size % 16 == 0 for stride in strides))


def usable(config: triton.Config, tma_ok: bool, flags: dict) -> bool:
    """Whether a config's loads work for this call: descriptors need aligned tensors, warp specialization a
    feature set where it compiles."""
    loads = variant(config)
    return loads == "cp.async" or (tma_ok and (loads == "tma" or warp_specialization_compiles(flags)))


def tuning_enabled() -> bool:
    """E2EVLP_ATTENTION_AUTOTUNE=0 runs each pass with one config that surely fits, without timing others:
    for correctness tests, where compiling and timing every candidate per shape is minutes of waste."""
    return os.environ.get("E2EVLP_ATTENTION_AUTOTUNE", "1") != "0"


def admissible(configs: list, kernel_pass: str, major: int, limit: int, d_pad: int, element_size: int,
               flags: dict) -> list:
    """The configs of generation `major` that the autotuner may try at this head dim, dtype and feature set:
    those whose shared memory may fit within `limit` bytes and that the compiled report does not show
    spilling registers. Where every one that fits spills, the one that spills least (a 16x16 fallback would
    cost more than a few spilled registers). Those sure to fit come first."""
    fits = [c for c in configs if origin(c)[1] == major
            and shared_bytes(kernel_pass, c, d_pad, element_size, major)[0] <= limit]
    spilled = {id(c): spill_bytes(kernel_pass, c, major, d_pad, flags) for c in fits}
    kept = [c for c in fits if not spilled[id(c)]] or sorted(fits, key=lambda c: spilled[id(c)])[:1]
    sure = [c for c in kept if shared_bytes(kernel_pass, c, d_pad, element_size, major)[1] <= limit]
    return sure + [c for c in kept if c not in sure]


def prune(configs: list, named_args: dict, **kwargs) -> list:
    """The running GPU's admissible candidates, plus the fallback when none is sure to fit (only the first
    that is sure to fit, or the fallback, when tuning is off)."""
    if len(configs) == 1:
        return configs
    q = named_args["Q"]
    major, limit = device_budget(q.device)
    kernel_pass = origin(configs[0])[0]
    configs = [c for c in configs if usable(c, named_args.get("TMA_ALIGNED", 0), kwargs)]
    kept = admissible(configs, kernel_pass, major, limit, kwargs["D_PAD"], q.element_size(), kwargs)
    sure = [c for c in kept if shared_bytes(kernel_pass, c, kwargs["D_PAD"], q.element_size(), major)[1] <= limit]
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
# The forward also tunes by whether its tensors allow TMA: a bucket tuned on aligned tensors must not hand a
# descriptor config to misaligned ones.
FORWARD_TUNING = {**TUNING, "key": [*AUTOTUNE_KEY, "TMA_ALIGNED"]}
