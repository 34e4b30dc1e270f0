"""Attention: e2evlp (Triton on CUDA, SDPA on CPU) vs PyTorch SDPA's backends, xformers and plain PyTorch.

Two groups of cases, each timed for the forward pass, the backward pass and both ("fwd", "bwd", "fwd+bwd"):
  * E2E-VLP shapes (BERT-base: 12 heads of 64, batch 32). Encoder self-attention over 20–40 text tokens
    plus the stride-32 ResNet grid of a COCO-like 4:3 or 3:2 image under DETR's multi-scale resize
    (shorter side 480–800 in steps of 32; these aspects keep the longer side under 1333): 320–990 tokens
    per sample, padded to the batch maximum with a key padding mask (SDPA gets the equivalent boolean
    [B, 1, 1, Lk] attn_mask) or packed (e2evlp-varlen; xformers with a block-diagonal bias). The same
    with every sample at the batch maximum, unpadded. Decoder self-attention over 100 object queries;
    causal caption self-attention over 40 tokens; decoder cross-attention from 100 queries to the padded
    encoder tokens.
  * FlashAttention's sweep: L = 512 … 16k, head dim 64 and 128, causal or not, 16k tokens per batch
    (B = 16384 / L), hidden 2048 (H = 2048 / D).

TFLOP/s use FlashAttention's count: forward 4·B·H·Lq·Lk·D, backward 2.5× the forward, both halved when
causal. On padded cases only real query-key pairs count (Σ_b Lq_b·Lk_b over the unpadded lengths), so
dense implementations get no credit for the padding they compute. "fwd" runs with grad enabled (the
training forward, which saves what the backward needs). "bwd" times the backward alone: the forward runs
outside the timed region and each timed call is torch.autograd.grad(out, inputs, dout, retain_graph=True)
(grad rather than out.backward so nothing accumulates into .grad between calls).

Implementations: e2evlp (ops.attention), e2evlp-varlen (ops.attention_varlen, padded cases), sdpa-flash,
sdpa-efficient, sdpa-cudnn, sdpa-math (F.scaled_dot_product_attention pinned to one backend with
sdpa_kernel), xformers (memory_efficient_attention, when it imports) and naive (e2evlp.reference.attention,
only while its fp32 [B, H, Lq, Lk] scores fit in 2 GiB; sdpa-math, which also materialises them, up to
4 GiB). On CPU: e2evlp, e2evlp-varlen, sdpa-math and naive. Before timing, every implementation runs
forward and backward once and its output is compared with e2evlp.reference.attention on the same inputs:
the whole case when the reference fits in 2 GiB, else the last 256 query rows of the longest sample.
e2evlp raises on a mismatch; a peer that raises or mismatches is listed as skipped for that case, with why.

bf16 on CUDA, fp32 on the CPU. The full run is sized for an H100/H200; --quick on CUDA keeps the E2E-VLP
shapes and the sweep at L = 1024 and 4096. On the CPU, where e2evlp runs SDPA, a few tiny cases either way.

    python -m benchmarks.bench_attention [e2evlp bench options]   (the same as: e2evlp bench attention ...)
"""

from __future__ import annotations

import functools
import itertools
import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from benchmarks.common import environment, make_record, missing_module, skip_note, time_interleaved
from e2evlp import cli, ops, reference

BENCH = "attention"
BASELINE = ("sdpa-flash", "sdpa-math")  # the Markdown table's speed-ups are relative to the first that ran
TOLERANCE = {torch.bfloat16: 2e-2, torch.float16: 2e-2, torch.float32: 1e-4}  # max abs error vs the reference
SDPA_BACKENDS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}
NAIVE_SCORES_BYTES = 2 * 2**30
# sdpa-math keeps fp32 scores too (it upcasts fp16/bf16) and its backward holds several of them at once.
MATH_SCORES_BYTES = 4 * 2**30
CHECK_ROWS = 256
PASSES = ("fwd", "bwd", "fwd+bwd")
BWD_FLOPS = 2.5  # FlashAttention's backward-to-forward ratio


@dataclass(frozen=True)
class Case:
    """One comparison: per-sample query and key lengths (padded to their maxima in the dense layout)."""

    name: str
    heads: int
    head_dim: int
    lens_q: tuple[int, ...]
    lens_k: tuple[int, ...]
    causal: bool = False
    sweep: bool = False  # part of the standard sweep (plotted)

    @property
    def batch(self) -> int:
        return len(self.lens_q)

    @property
    def max_q(self) -> int:
        return max(self.lens_q)

    @property
    def max_k(self) -> int:
        return max(self.lens_k)

    @property
    def padded(self) -> bool:
        return min(self.lens_q) < self.max_q or min(self.lens_k) < self.max_k

    def scores_bytes(self) -> int:
        """Size of fp32 [B, H, Lq, Lk] scores."""
        return 4 * self.batch * self.heads * self.max_q * self.max_k

    def flops(self, pass_: str) -> float:
        forward = 4 * self.heads * self.head_dim * sum(q * k for q, k in zip(self.lens_q, self.lens_k))
        forward /= 2 if self.causal else 1
        return forward * {"fwd": 1.0, "bwd": BWD_FLOPS, "fwd+bwd": 1.0 + BWD_FLOPS}[pass_]


def encoder_lengths(batch: int, gen: torch.Generator) -> tuple[int, ...]:
    """Text + image tokens per sample (see the module docstring)."""
    lens = []
    for _ in range(batch):
        text = int(torch.randint(20, 41, (1,), generator=gen))
        short = 480 + 32 * int(torch.randint(0, 11, (1,), generator=gen))
        aspect = (4 / 3, 3 / 2)[int(torch.randint(0, 2, (1,), generator=gen))]
        lens.append(text + math.ceil(short / 32) * math.ceil(short * aspect / 32))
    return tuple(lens)


def vlp_cases(batch: int, heads: int, head_dim: int, encoder: tuple[int, ...], queries: int,
              caption: int) -> list[Case]:
    shape = f"B={batch} H={heads} D={head_dim}"
    span = f"{min(encoder)}..{max(encoder)}"
    full = (max(encoder),) * batch
    objects, words = (queries,) * batch, (caption,) * batch
    return [
        Case(f"vlp enc-self {shape} L={span} padded", heads, head_dim, encoder, encoder),
        Case(f"vlp enc-self {shape} L={max(encoder)}", heads, head_dim, full, full),
        Case(f"vlp dec-self {shape} L={queries}", heads, head_dim, objects, objects),
        Case(f"vlp cap-self {shape} L={caption} causal", heads, head_dim, words, words, causal=True),
        Case(f"vlp dec-cross {shape} Lq={queries} Lk={span} padded", heads, head_dim, objects, encoder),
    ]


def sweep_cases(lengths: tuple[int, ...], head_dims: tuple[int, ...], hidden: int, tokens: int) -> list[Case]:
    cases = []
    for causal, head_dim, length in itertools.product((False, True), head_dims, lengths):
        batch, heads = tokens // length, hidden // head_dim
        name = f"sweep B={batch} H={heads} D={head_dim} L={length}" + (" causal" if causal else "")
        cases.append(Case(name, heads, head_dim, (length,) * batch, (length,) * batch, causal, sweep=True))
    return cases


def all_cases(device: str, quick: bool) -> list[Case]:
    """On the CPU a few tiny cases, quick or not (e2evlp runs SDPA there: the run checks, it does not race).
    On CUDA, quick keeps the real E2E-VLP shapes and trims the sweep to two lengths (each shape autotunes)."""
    if device != "cuda":
        tiny = vlp_cases(3, 2, 32, (45, 70, 23), queries=10, caption=8)
        return [c for c in tiny if c.padded] + sweep_cases((128, 256), (64,), hidden=128, tokens=512)
    encoder = encoder_lengths(32, torch.Generator().manual_seed(0))
    lengths = (1024, 4096) if quick else (512, 1024, 2048, 4096, 8192, 16384)
    return vlp_cases(32, 12, 64, encoder, queries=100, caption=40) + sweep_cases(lengths, (64, 128), hidden=2048,
                                                                                 tokens=16384)


@dataclass
class Inputs:
    """Dense [B, H, L, D] inputs and upstream gradient, with the real-token masks ([B, L], True = real)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    valid_q: torch.Tensor
    valid_k: torch.Tensor

    @property
    def key_padding_mask(self) -> torch.Tensor | None:
        return None if bool(self.valid_k.all()) else ~self.valid_k


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Inputs:
    gen = torch.Generator(device).manual_seed(seed)

    def randn(length):
        shape = (case.batch, case.heads, length, case.head_dim)
        return torch.randn(shape, generator=gen, device=device, dtype=dtype)

    def valid(lens, length):
        return torch.arange(length, device=device) < torch.tensor(lens, device=device)[:, None]

    return Inputs(randn(case.max_q), randn(case.max_k), randn(case.max_k), randn(case.max_q),
                  valid(case.lens_q, case.max_q), valid(case.lens_k, case.max_k))


def pack(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] → the real tokens, packed [total, H, D]."""
    return x.transpose(1, 2)[valid]


def unpack(x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Packed [total, H, D] → [B, H, L, D] with zeros at padding."""
    out = x.new_zeros(*valid.shape, *x.shape[1:])
    out[valid] = x
    return out.transpose(1, 2)


# A layout: (dense [B, H, L, D] → what an implementation takes, its output → dense), both given valid [B, L].
DENSE = (lambda x, valid: x, lambda out, valid: out)
BLHD = (lambda x, valid: x.transpose(1, 2).contiguous(), lambda out, valid: out.transpose(1, 2))
PACKED = (pack, unpack)
PACKED_B1 = (lambda x, valid: pack(x, valid)[None], lambda out, valid: unpack(out[0], valid))


@dataclass
class Runner:
    """One implementation with its own leaf copies of the case's inputs, in the layout it takes."""

    forward: Callable[..., torch.Tensor]
    leaves: tuple[torch.Tensor, ...]
    dout: torch.Tensor
    to_dense: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self) -> torch.Tensor:
        return self.forward(*self.leaves)


def make_runner(forward: Callable[..., torch.Tensor], inp: Inputs, layout) -> Runner:
    to, back = layout
    leaves = tuple(to(x, valid).detach().requires_grad_()
                   for x, valid in ((inp.q, inp.valid_q), (inp.k, inp.valid_k), (inp.v, inp.valid_k)))
    return Runner(forward, leaves, to(inp.dout, inp.valid_q), lambda out: back(out, inp.valid_q))


def cu_seqlens(lens: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lens)], dtype=torch.int32, device=device)


def sdpa(backend: SDPBackend, attn_mask: torch.Tensor | None, causal: bool) -> Callable[..., torch.Tensor]:
    def forward(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=causal)

    return forward


def xformers_ops():
    """(xformers.ops, None), or (None, why) where xformers is missing or does not load against this torch."""
    why = missing_module("xformers", "xformers")
    if why:
        return None, why
    try:
        import xformers.ops
    except Exception as exc:  # a build for another torch fails in many ways: skip it, never the whole run
        return None, f"does not load: {type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]}"
    return xformers.ops, None


def xformers_runner(xops, case: Case, inp: Inputs) -> Runner:
    """Padded cases run packed as one sequence with a block-diagonal bias: xformers' own varlen path."""
    biases = xops.fmha.attn_bias
    if case.padded:
        bias, layout = biases.BlockDiagonalMask.from_seqlens(list(case.lens_q), list(case.lens_k)), PACKED_B1
    else:
        bias, layout = (biases.LowerTriangularFromBottomRightMask() if case.causal else None), BLHD
    return make_runner(lambda q, k, v: xops.memory_efficient_attention(q, k, v, attn_bias=bias), inp, layout)


def too_big(case: Case, limit: int) -> str:
    return f"fp32 scores {case.scores_bytes() / 2**30:.1f} GiB > {limit / 2**30:.0f} GiB"


def runners(case: Case, inp: Inputs, device: torch.device) -> tuple[dict[str, Runner], dict[str, str]]:
    """The implementations to run on this case, and {name: why} for those left out up front."""
    kpm = inp.key_padding_mask
    causal = case.causal
    found = {"e2evlp": make_runner(
        lambda q, k, v: ops.attention(q, k, v, key_padding_mask=kpm, causal=causal), inp, DENSE)}
    if case.padded:
        cu_q, cu_k = cu_seqlens(case.lens_q, device), cu_seqlens(case.lens_k, device)
        found["e2evlp-varlen"] = make_runner(
            lambda q, k, v: ops.attention_varlen(q, k, v, cu_q, cu_k, case.max_q, case.max_k, causal=causal),
            inp, PACKED)
    skipped = {}
    attn_mask = None if kpm is None else ~kpm[:, None, None, :]
    for name, backend in SDPA_BACKENDS.items():
        if device.type != "cuda" and name != "sdpa-math":
            skipped[name] = "CUDA only"
        elif name == "sdpa-math" and case.scores_bytes() > MATH_SCORES_BYTES:
            skipped[name] = too_big(case, MATH_SCORES_BYTES)
        else:
            found[name] = make_runner(sdpa(backend, attn_mask, causal), inp, DENSE)
    xops, why = xformers_ops() if device.type == "cuda" else (None, "CUDA only")
    if xops is None:
        skipped["xformers"] = why
    else:
        found["xformers"] = xformers_runner(xops, case, inp)
    if case.scores_bytes() > NAIVE_SCORES_BYTES:
        skipped["naive"] = too_big(case, NAIVE_SCORES_BYTES)
    else:
        found["naive"] = make_runner(
            lambda q, k, v: reference.attention(q, k, v, key_padding_mask=kpm, causal=causal), inp, DENSE)
    return found, skipped


def check_slice(case: Case) -> tuple[slice, slice]:
    """Batch and query rows the check covers: all when the reference fits, else the longest sample's last rows
    (bottom-right causal alignment keeps a reference over those rows alone exact)."""
    if case.scores_bytes() <= NAIVE_SCORES_BYTES:
        return slice(None), slice(None)
    b = max(range(case.batch), key=case.lens_q.__getitem__)
    return slice(b, b + 1), slice(max(case.max_q - CHECK_ROWS, 0), None)


def forward_backward(run: Runner) -> torch.Tensor:
    out = run()
    torch.autograd.grad(out, run.leaves, run.dout)
    return out


def reason(caught: list[warnings.WarningMessage], exc: Exception) -> str:
    """Why a backend refused a case: its warnings, less headers and the other backends' "disabled" notes."""
    said = [str(w.message).strip() for w in caught]
    said = [m for m in said if m and not m.endswith(":") and "disabled" not in m]
    return ("; ".join(dict.fromkeys(said)) or str(exc)).splitlines()[0][:200]


def check(case: Case, inp: Inputs, found: dict[str, Runner], dtype: torch.dtype) -> dict[str, str]:
    """Runs each implementation forward and backward once and compares its output with the reference.

    Drops from `found` the peers that raise or disagree and returns {name: why}; raises if e2evlp's do.
    """
    batch, rows = check_slice(case)
    kpm = inp.key_padding_mask
    want = reference.attention(inp.q[batch, :, rows], inp.k[batch], inp.v[batch], causal=case.causal,
                               key_padding_mask=None if kpm is None else kpm[batch]).float()
    real = inp.valid_q[batch, rows]
    skipped = {}
    for name, run in list(found.items()):
        ours = name.startswith("e2evlp")
        if ours:
            out = forward_backward(run)
        else:
            try:
                # A backend that cannot take a case warns why, then raises "No available kernel".
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    out = forward_backward(run)
            except (RuntimeError, ValueError) as exc:
                skipped[name] = reason(caught, exc)
                del found[name]
                continue
        got = run.to_dense(out.detach())[batch, :, rows].float()
        error = (got - want).abs().transpose(1, 2)[real].max().item()
        if not error <= TOLERANCE[dtype]:  # also catches NaN
            message = f"max abs error {error:.2e} > {TOLERANCE[dtype]:.0e}"
            if ours:
                raise AssertionError(f"{name} disagrees with reference.attention on {case.name}: {message}")
            skipped[name] = message
            del found[name]
    return skipped


def backward_only(run: Runner) -> Callable[[], object]:
    """Runs the forward now, untimed; the callable repeats the backward over the retained graph."""
    out = run()
    return lambda: torch.autograd.grad(out, run.leaves, run.dout, retain_graph=True)


def tuned_configs(run: Runner) -> dict[str, str]:
    """The block sizes, warps and stages autotuning chose for each Triton kernel on this case's shapes."""
    from e2evlp.kernels.attention import _attention_fwd
    from e2evlp.kernels.attention_backward import _attention_bwd_dkdv, _attention_bwd_dq
    from e2evlp.kernels.attention_configs import variant

    forward_backward(run)  # the kernels' best_config is the one of their latest call
    chosen = {}
    for kernel_pass, kernel in (("fwd", _attention_fwd), ("dkdv", _attention_bwd_dkdv), ("dq", _attention_bwd_dq)):
        config = kernel.best_config
        chosen[kernel_pass] = (f"{config.kwargs['BLOCK_M']}x{config.kwargs['BLOCK_N']} w{config.num_warps} "
                               f"s{config.num_stages} {variant(config)}")
    return chosen


def time_passes(case: Case, found: dict[str, Runner], device: torch.device, dtype: torch.dtype, env: dict,
                warmup: int, repeat: int) -> list[dict]:
    records = []
    # On CUDA, e2evlp's records name the configs its kernels were tuned to (checked on a new GPU generation).
    configs = {name: tuned_configs(run) for name, run in found.items()
               if name.startswith("e2evlp") and device.type == "cuda"}

    def record(pass_: str, timing: dict[str, dict]) -> None:
        for name, t in timing.items():
            tflops = float(f"{case.flops(pass_) / t['ms'] / 1e9:.4g}")
            extra = {"kernel_configs": configs[name]} if name in configs else {}
            records.append(make_record(BENCH, name, case.name, t, device=device, pass_=pass_,
                                       tflops=tflops, dtype=str(dtype).removeprefix("torch."), env=env, **extra))

    record("fwd", time_interleaved(dict(found), device, warmup=warmup, repeat=repeat))
    backward = {name: backward_only(run) for name, run in found.items()}
    record("bwd", time_interleaved(backward, device, warmup=warmup, repeat=repeat))
    del backward  # frees the retained graphs
    both = {name: functools.partial(forward_backward, run) for name, run in found.items()}
    record("fwd+bwd", time_interleaved(both, device, warmup=warmup, repeat=repeat))
    return records


def run(device: str, quick: bool, repeat: int | None = None) -> tuple[list[dict], list[dict]]:
    """Checks, then times every implementation on every case (bf16 on CUDA, fp32 on the CPU); returns the
    records and the skip notes (peers missing, unfit for a case, or disagreeing with the reference)."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    repeat = repeat or (10 if on_gpu else 5)
    warmup = 3 if on_gpu else 1
    env = environment()
    records, skipped = [], []
    for case in all_cases(device.type, quick):
        try:
            inp = make_inputs(case, device, dtype)
            found, left_out = runners(case, inp, device)
            left_out |= check(case, inp, found, dtype)
            skipped += [skip_note(BENCH, name, why, case.name) for name, why in left_out.items()]
            records += time_passes(case, found, device, dtype, env, warmup, repeat)
        except Exception as exc:  # one failing case (out of memory, a peer's error) must not cost the others
            skipped.append(skip_note(BENCH, "e2evlp", f"the case failed: {type(exc).__name__}: {exc}", case.name))
            print(f"attention case {case.name} failed: {type(exc).__name__}: {exc}", flush=True)
        inp = found = None
        if on_gpu:  # shapes change every case: return cached blocks so peaks stay comparable
            torch.cuda.empty_cache()
    return records, skipped


if __name__ == "__main__":
    sys.exit(cli.main(["bench", "attention", *sys.argv[1:]]))
