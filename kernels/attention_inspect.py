"""Compiled evidence for the attention kernels without a GPU: each autotune candidate of each pass through
Triton's real compiler for sm_80 or sm_90, with its registers, spills, shared memory and Hopper instructions.

`e2evlp kernels inspect` prints these records as a table or JSON, and `--update-spill-table` turns a whole
sweep into kernels/attention_spills.json, which the autotuner prunes by. One record per (feature set, pass,
config, head dim, causal): the kernels are compiled with the constexpr flags of that feature set (FEATURES;
"kpm" is the padded VLP batch), with 16-divisible pointers and strides as the JIT sees for aligned tensors.
"""

from __future__ import annotations

import contextlib
import inspect as inspect_module
import io
import json
import os
import re
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

ARCHS = {80: 163 * 1024, 90: 227 * 1024}  # opt-in shared memory per block of A100 and H100/H200
HEAD_DIMS = (32, 64, 80, 96, 128)
DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32", "bfloat16": "bf16", "float16": "fp16",
          "float32": "fp32"}
ELEMENT_SIZE = {"bf16": 2, "fp16": 2, "fp32": 4}
PASSES = ("fwd", "delta", "dkdv", "dq")
# The kernels' flags per feature set; "kpm" is the padded encoder and decoder batch, the common case.
FEATURES = {"plain": {}, "kpm": {"HAS_KPM": True}, "kpm-dropout": {"HAS_KPM": True, "HAS_DROPOUT": True},
            "mask": {"MASK_KIND": 2}, "varlen": {"IS_VARLEN": True},
            "varlen-dropout": {"IS_VARLEN": True, "HAS_DROPOUT": True}}
# What the spill table is made of: the padded batch with and without dropout, the unpadded (varlen) encoder
# with and without dropout, and an additive mask.
SWEEP_FEATURES = ("kpm", "kpm-dropout", "varlen", "varlen-dropout", "mask")
POINTER = {"LSE": "*fp32", "DELTA": "*fp32", "CU_Q": "*i32", "CU_K": "*i32", "KPM": "*u8", "KEND": "*i32",
           "MASK": "*u8"}
TENSORS = {"Q", "K", "V", "O", "DO", "DQ", "DK", "DV"}
SCALARS = {"sm_scale": "fp32", "dropout_p": "fp32"}


@dataclass(frozen=True)
class Job:
    kernel_pass: str
    arch: int
    head_dim: int
    dtype: str
    causal: bool
    features: str
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    variant: str
    extra: tuple = ()


def offered(job: Job) -> bool:
    """Whether the autotuner on the job's arch tries this config at its head dim, dtype and features (the delta pass has
    one config, always run; a fallback is not a candidate: it runs only when no candidate surely fits)."""
    from e2evlp.kernels import attention_configs as C

    if job.kernel_pass == "delta":
        return True
    major = job.arch // 10
    flags = flags_of(job.features, job.head_dim, job.causal, job.dtype)
    # As for aligned tensors (what a padded VLP batch has): the TMA candidates are in the running.
    candidates = [c for c in C.generation_configs(job.kernel_pass, major) if C.usable(c, True, flags)]
    kept = C.admissible(candidates, job.kernel_pass, major, ARCHS[job.arch], flags["D_PAD"],
                        ELEMENT_SIZE[job.dtype], flags)
    return any(c.kwargs["BLOCK_M"] == job.block_m and c.kwargs["BLOCK_N"] == job.block_n
               and c.num_warps == job.num_warps and c.num_stages == job.num_stages and C.variant(c) == job.variant
               for c in kept)


@dataclass
class Record:
    """What one compiled job costs and uses."""

    job: Job
    registers: int
    spill_bytes: int
    stack_bytes: int
    shared_bytes: int
    wgmma: int
    mma_sync: int
    cp_async: int
    tma: int

    def as_json(self) -> dict:
        record = {**asdict(self.job), **{k: v for k, v in asdict(self).items() if k != "job"}}
        record["pass"] = record.pop("kernel_pass")
        record.pop("extra")
        record["offered"] = offered(self.job)
        return record


def kernels() -> dict:
    from e2evlp.kernels import attention as A
    from e2evlp.kernels import attention_backward as AB

    return {"fwd": A._attention_fwd, "delta": AB._attention_bwd_delta, "dkdv": AB._attention_bwd_dkdv,
            "dq": AB._attention_bwd_dq}


def d_pad_of(head_dim: int) -> int:
    return max(16, 1 << (head_dim - 1).bit_length())


def flags_of(features: str, head_dim: int, causal: bool, dtype: str) -> dict:
    """The constexpr flags every pass takes, for one feature set."""
    flags = dict(IS_CAUSAL=causal, HAS_KPM=False, MASK_KIND=0, IS_VARLEN=False, HAS_DROPOUT=False,
                 HEAD_DIM=head_dim, D_PAD=d_pad_of(head_dim), FP32_DOT=dtype == "fp32")
    flags.update(FEATURES[features])
    return flags


def compile_kernel(kernel_pass: str, arch: int, dtype: str, constants: dict, num_warps: int, num_stages: int):
    """Triton's compiled kernel for `arch` (the GPU need not be here), and ptxas's report on it."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    kernel = kernels()[kernel_pass]
    fn = kernel.fn if isinstance(kernel, triton.runtime.Autotuner) else kernel
    unset = inspect_module.Parameter.empty
    defaults = {p.name: p.default for p in fn.params if p.is_constexpr and p.default is not unset}
    consts = {**defaults, **{name: value for name, value in constants.items() if name in fn.arg_names}}
    signature = {name: "constexpr" if name in consts else POINTER.get(name, "*" + dtype if name in TENSORS else
                 SCALARS.get(name, "i32")) for name in fn.arg_names}
    # As at run time for aligned tensors and strides that are multiples of 16: what lets the compiler
    # pipeline the streamed loads.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature[name].startswith("*") or name.startswith("s_")}
    knobs = getattr(triton, "knobs", None)
    if knobs is None or not hasattr(knobs.nvidia, "dump_ptxas_log"):
        raise RuntimeError(f"kernels inspect reads ptxas's report through triton.knobs.nvidia.dump_ptxas_log, "
                           f"which triton {triton.__version__} lacks")
    log = io.StringIO()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True
        knobs.compilation.always_compile = True  # a cached kernel would skip ptxas and its report
        compiled = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs),
                                  target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": num_warps, "num_stages": num_stages})
    return compiled, log.getvalue()


def ptxas_report(log: str) -> dict:
    """Registers, spill stores and stack frame from ptxas -v's report of one kernel."""
    def number(pattern):
        found = re.search(pattern, log)
        return int(found.group(1)) if found else 0

    registers = number(r"Used (\d+) registers")
    if not registers:
        raise RuntimeError(f"no register count in ptxas's report:\n{log[-2000:]}")
    return dict(registers=registers, spill_bytes=number(r"(\d+) bytes spill stores"),
                stack_bytes=number(r"(\d+) bytes stack frame"))


def ptx_counts(ptx: str) -> dict:
    """How often the PTX issues Hopper's warpgroup MMA and tensor-memory copies, Ampere's MMA and cp.async."""
    return dict(wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)), mma_sync=len(re.findall(r"\bmma\.sync", ptx)),
                cp_async=len(re.findall(r"\bcp\.async\.c[ag]\b", ptx)),
                tma=len(re.findall(r"\bcp\.async\.bulk\.tensor", ptx)))


def jobs(arch: int, head_dims=HEAD_DIMS, dtype: str = "bf16", causal_modes=(False, True), features=("kpm",),
         passes=PASSES, fallbacks: bool = True) -> list[Job]:
    """Every candidate (and, with `fallbacks`, the fallback) of the arch's generation for each feature set,
    head dim, causal mode and pass."""
    from e2evlp.kernels import attention_configs as C
    from e2evlp.kernels.attention_backward import DELTA_BLOCK_M

    major = arch // 10
    dtype = DTYPES[dtype]
    found = []
    for feature_set in (features,) if isinstance(features, str) else features:
        for head_dim in head_dims:
            for causal in causal_modes:
                for kernel_pass in passes:
                    if kernel_pass == "delta":
                        found.append(Job("delta", arch, head_dim, dtype, causal, feature_set, DELTA_BLOCK_M, 0, 4,
                                         3, "cp.async"))
                        continue
                    flags = flags_of(feature_set, head_dim, causal, dtype)
                    # Warp specialization only where it compiles: elsewhere the autotuner never tries it.
                    candidates = [c for c in C.generation_configs(kernel_pass, major) if C.usable(c, True, flags)]
                    for config in candidates + [C.fallback(kernel_pass, major)] * fallbacks:
                        extra = tuple(sorted((k, v) for k, v in config.kwargs.items()
                                             if k not in ("BLOCK_M", "BLOCK_N")))
                        found.append(Job(kernel_pass, arch, head_dim, dtype, causal, feature_set,
                                         config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps,
                                         config.num_stages, C.variant(config), extra))
    return found


def run_job(job: Job) -> Record:
    constants = flags_of(job.features, job.head_dim, job.causal, job.dtype)
    constants.update(BLOCK_M=job.block_m, BLOCK_N=job.block_n, **dict(job.extra))
    compiled, log = compile_kernel(job.kernel_pass, job.arch, job.dtype, constants, job.num_warps, job.num_stages)
    return Record(job, **ptxas_report(log), shared_bytes=compiled.metadata.shared,
                  **ptx_counts(compiled.asm["ptx"]))


def _worker_init() -> None:
    os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, never the interpreter


def inspect(arch: int, head_dims=HEAD_DIMS, dtype: str = "bf16", causal_modes=(False, True), features=("kpm",),
            passes=PASSES, fallbacks: bool = True, workers: int | None = None) -> list[Record]:
    """Compiles every job in `workers` processes (default: the machine's cores) and returns their records in
    job order."""
    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {sorted(ARCHS)}, got {arch}")
    features = (features,) if isinstance(features, str) else tuple(features)
    unknown = [f for f in features if f not in FEATURES]
    if unknown:
        raise ValueError(f"features must be among {sorted(FEATURES)}, got {unknown}")
    unknown = [p for p in passes if p not in PASSES]
    if unknown:
        raise ValueError(f"passes must be among {list(PASSES)}, got {unknown}")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    todo = jobs(arch, head_dims, dtype, causal_modes, features, passes, fallbacks)
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(todo) == 1:
        _worker_init()
        return [run_job(job) for job in todo]
    import multiprocessing

    # spawn: a forked child would inherit the parent's Triton and CUDA state; chunks keep the imports per
    # worker to one.
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_worker_init) as pool:
        return list(pool.map(run_job, todo, chunksize=max(1, len(todo) // (4 * workers))))


COLUMNS = ("pass", "head_dim", "causal", "variant", "block_m", "block_n", "num_warps", "num_stages", "registers",
           "spill_bytes", "shared_bytes", "wgmma", "mma_sync", "cp_async", "tma", "offered")


def table(records: list[Record]) -> str:
    """The records as an aligned text table, one row each."""
    rows = [[str(record.as_json()[column]) for column in COLUMNS] for record in records]
    heads = list(COLUMNS)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)] if rows else [len(h) for h in heads]
    lines = ["  ".join(h.ljust(w) for h, w in zip(heads, widths))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def spilling_offers(rows: list[dict]) -> list[dict]:
    """The records (as_json rows) of offered candidates that spill: what the pruning must never let through."""
    return [row for row in rows if row["offered"] and row["spill_bytes"] > 0]


def update_spill_table(rows: list[dict], path=None) -> dict:
    """Writes one arch's entry of the spill table from a sweep's rows (every candidate of its generation,
    bf16, the head dims and feature sets swept); other arches' entries are kept. Atomic."""
    import triton

    from e2evlp.io import atomic_write
    from e2evlp.kernels import attention_configs as C

    path = path or C.SPILL_TABLE
    arches = {row["arch"] for row in rows}
    if len(arches) != 1:
        raise ValueError(f"a spill table entry is made from one arch's sweep, got arches {sorted(arches)}")
    arch = arches.pop()
    major = arch // 10
    flag_sets = [flags_of(features, 64, False, "bf16") for features in {row["features"] for row in rows}]
    keys = {C.candidate_key(p, c) for p in ("fwd", "dkdv", "dq") for c in C.generation_configs(p, major)
            if any(C.usable(c, True, flags) for flags in flag_sets)}
    swept, spills = set(), {}
    for row in rows:
        key = f"{row['pass']} {row['block_m']},{row['block_n']},{row['num_warps']},{row['num_stages']}"
        key = key if row["variant"] == "cp.async" else f"{key} {row['variant']}"
        if key not in keys:
            continue
        swept.add(key)
        if row["spill_bytes"] > 0:
            per_d_pad = spills.setdefault(row["features"], {}).setdefault(key, {})
            d_pad = str(d_pad_of(row["head_dim"]))
            per_d_pad[d_pad] = max(per_d_pad.get(d_pad, 0), row["spill_bytes"])
    missing = sorted(keys - swept)
    if missing:
        raise ValueError(f"the sweep did not compile these sm_{arch} candidates: {missing}")
    table = json.loads(path.read_text()) if path.exists() else {"generations": {}}
    table["generations"][str(major)] = {
        "arch": arch, "triton": triton.__version__, "dtype": sorted({row["dtype"] for row in rows}),
        "features": sorted({row["features"] for row in rows}), "head_dims": sorted({row["head_dim"] for row in rows}),
        "d_pads": sorted({d_pad_of(row["head_dim"]) for row in rows}), "candidates": sorted(swept),
        "spills": {features: dict(sorted(per_key.items())) for features, per_key in sorted(spills.items())},
    }
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(json.dumps(table, indent=1) + "\n"))
    C.spill_table.cache_clear()
    return table
