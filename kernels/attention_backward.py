"""The attention backward in Triton: a dK/dV pass and a dQ pass over recomputed probabilities, without atomics.

The dK/dV pass gives each program a block of keys and walks the queries that see them; the dQ pass gives
each a block of queries and walks their keys. Both recompute P from the forward's log-sum-exp, regenerate
the forward's dropout mask, and split their walk like the forward (unmasked tiles, then masked ones).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from e2evlp.kernels.attention import (
    LOG2E,
    MASK_NONE,
    Problem,
    _keep,
    _key_stop,
    _dot,
    _load_tile,
    _program_sequence,
    _scores,
    _unmasked_end,
)
from e2evlp.kernels.attention_configs import TUNING, configs

DELTA_BLOCK_M = 32  # the preprocess reads two [32, D] tiles per program: memory-bound, no tuning needed


@triton.jit
def _attention_bwd_delta(O, DO, DELTA, CU_Q, CU_K, s_ob, s_oh, s_om, s_dob, s_doh, s_dom, s_lb, s_lh, s_lm, LQ, LK,
                         HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, IS_VARLEN: tl.constexpr,
                         BLOCK_M: tl.constexpr):
    """The preprocess: delta = rowsum(dO ∘ O) in float32 per (query, head), laid out like the LSE."""
    start_m = tl.program_id(0)
    b, h, q_start, _, q_len, _ = _program_sequence(CU_Q, CU_K, LQ, LK, IS_VARLEN)
    offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    rows = q_start + offs_m
    mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b * s_ob + h * s_oh + rows[:, None] * s_om + offs_d[None, :], mask=mask, other=0.0)
    do = tl.load(DO + b * s_dob + h * s_doh + rows[:, None] * s_dom + offs_d[None, :], mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + b * s_lb + h * s_lh + rows * s_lm, delta, mask=offs_m < q_len)


@triton.jit
def _probs_and_dscores(q, k, v, do, lse, delta, offs_m, offs_n, b, h, H, q_len, k_len, qk_scale, KPM,
                       s_kpm_b, MASK, s_mb, s_mh, s_mm, s_mn, seed, rng_cols, dropout_p,
                       IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr,
                       HAS_DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr, MASKED: tl.constexpr):
    """Recomputes the (dropped) probabilities [M, N] and dS = P ∘ (dP − delta) for one tile."""
    s = _scores(q, k, offs_m, offs_n, b, h, q_len, k_len, qk_scale, KPM, s_kpm_b, MASK, s_mb, s_mh, s_mm, s_mn,
                IS_CAUSAL, HAS_KPM, MASK_KIND, FP32_DOT, MASKED)
    p = tl.exp2(s - lse[:, None])
    dp = _dot(do, tl.trans(v), FP32_DOT)
    p_dropped = p
    if HAS_DROPOUT:
        keep = _keep(seed, b, h, H, offs_m, offs_n, rng_cols, dropout_p)
        p_dropped = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
    ds = p * (dp - delta[:, None])
    return p_dropped, ds


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_base, do_base, l_base, start_m, offs_m, offs_n, offs_d, b, h, H, q_len, k_len,
               qk_scale, KPM, s_kpm_b, MASK, s_mb, s_mh, s_mm, s_mn, s_qm, s_om, s_lm, LSE, DELTA, seed, rng_cols,
               dropout_p, HEAD_DIM: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
               MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr, MASKED: tl.constexpr):
    """One query block of the dK/dV pass: dV += Pᵀ dO, dK += dSᵀ Q."""
    rows = start_m + offs_m
    row_mask = (rows[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_base + rows[:, None] * s_qm + offs_d[None, :], mask=row_mask, other=0.0)
    do = tl.load(do_base + rows[:, None] * s_om + offs_d[None, :], mask=row_mask, other=0.0)
    lse = tl.load(LSE + l_base + rows * s_lm, mask=rows < q_len, other=float("inf"))
    delta = tl.load(DELTA + l_base + rows * s_lm, mask=rows < q_len, other=0.0)
    p, ds = _probs_and_dscores(q, tl.trans(k), v, do, lse, delta, rows, offs_n, b, h, H, q_len, k_len,
                               qk_scale, KPM, s_kpm_b, MASK, s_mb, s_mh, s_mm, s_mn, seed, rng_cols, dropout_p,
                               IS_CAUSAL, HAS_KPM, MASK_KIND, HAS_DROPOUT, FP32_DOT, MASKED)
    dv += _dot(tl.trans(p.to(do.dtype)), do, FP32_DOT)
    dk += _dot(tl.trans(ds.to(q.dtype)), q, FP32_DOT)
    return dk, dv


@triton.autotune(configs=configs("dkdv"), **TUNING)
@triton.jit(do_not_specialize=["seed"])  # a seed divisible by 16 must not compile another variant
def _attention_bwd_dkdv(Q, K, V, DO, LSE, DELTA, DK, DV, KPM, KEND, MASK, CU_Q, CU_K,
                        s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om, s_lb, s_lh, s_lm,
                        s_dkb, s_dkh, s_dkn, s_dvb, s_dvh, s_dvn, s_kpm_b, s_mb, s_mh, s_mm, s_mn,
                        H, LQ, LK, sm_scale, dropout_p, seed, rng_cols, TUNE_LQ, TUNE_LK,
                        HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, IS_CAUSAL: tl.constexpr,
                        HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr, IS_VARLEN: tl.constexpr,
                        HAS_DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr):
    start_n = tl.program_id(0)
    b, h, q_start, k_start, q_len, k_len = _program_sequence(CU_Q, CU_K, LQ, LK, IS_VARLEN)
    if start_n * BLOCK_N < k_len:
        offs_n = start_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, D_PAD)
        kv_mask = (offs_n[:, None] < k_len) & (offs_d[None, :] < HEAD_DIM)
        k = tl.load(K + b * s_kb + h * s_kh + (k_start + offs_n)[:, None] * s_kn + offs_d[None, :], mask=kv_mask,
                    other=0.0)  # [N, D]
        v = tl.load(V + b * s_vb + h * s_vh + (k_start + offs_n)[:, None] * s_vn + offs_d[None, :], mask=kv_mask,
                    other=0.0)
        dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
        dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
        qk_scale = sm_scale * LOG2E
        lo = 0
        if IS_CAUSAL:  # queries before the first one that sees this block's first key contribute nothing
            lo = tl.maximum(start_n * BLOCK_N - (k_len - q_len), 0) // BLOCK_M * BLOCK_M
        # A block of padding keys only: no query reads it, so its dK and dV stay 0.
        hi = tl.where(start_n * BLOCK_N < _key_stop(KEND, b, k_len, HAS_KPM), q_len, lo)
        q_base = Q + b * s_qb + h * s_qh + q_start * s_qm
        do_base = DO + b * s_ob + h * s_oh + q_start * s_om
        l_base = b * s_lb + h * s_lh + q_start * s_lm
        # Query blocks from mid on see every key of this block (all real): their tiles need no mask.
        mid = hi
        if not HAS_KPM and MASK_KIND == MASK_NONE:
            if (start_n + 1) * BLOCK_N <= k_len:
                mid = lo
                if IS_CAUSAL:  # the first query that sees this block's last key
                    first = tl.maximum((start_n + 1) * BLOCK_N - 1 - (k_len - q_len), 0)
                    mid = tl.minimum(tl.maximum(tl.cdiv(first, BLOCK_M) * BLOCK_M, lo), hi)
        for start_m in range(lo, mid, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, l_base, start_m, offs_m, offs_n, offs_d, b, h, H,
                                q_len, k_len, qk_scale, KPM, s_kpm_b, MASK, s_mb, s_mh, s_mm, s_mn, s_qm,
                                s_om, s_lm, LSE, DELTA, seed, rng_cols, dropout_p, HEAD_DIM, IS_CAUSAL, HAS_KPM,
                                MASK_KIND, HAS_DROPOUT, FP32_DOT, True)
        for start_m in range(mid, hi, BLOCK_M):
            dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, l_base, start_m, offs_m, offs_n, offs_d, b, h, H,
                                q_len, k_len, qk_scale, KPM, s_kpm_b, MASK, s_mb, s_mh, s_mm, s_mn, s_qm,
                                s_om, s_lm, LSE, DELTA, seed, rng_cols, dropout_p, HEAD_DIM, IS_CAUSAL, HAS_KPM,
                                MASK_KIND, HAS_DROPOUT, FP32_DOT, False)
        out_mask = (offs_n[:, None] < k_len) & (offs_d[None, :] < HEAD_DIM)
        tl.store(DK + b * s_dkb + h * s_dkh + (k_start + offs_n)[:, None] * s_dkn + offs_d[None, :],
                 (dk * sm_scale).to(DK.dtype.element_ty), mask=out_mask)
        tl.store(DV + b * s_dvb + h * s_dvh + (k_start + offs_n)[:, None] * s_dvn + offs_d[None, :],
                 dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _dq_tile(dq, q, do, lse, delta, k_base, v_base, start_n, offs_m, offs_n, offs_d, b, h, H, q_len, k_len,
             qk_scale, KPM, s_kpm_b, MASK, s_mb, s_mh, s_mm, s_mn, s_kn, s_vn, seed, rng_cols, dropout_p,
             HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr,
             HAS_DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr, MASKED: tl.constexpr):
    """One key block of the dQ pass: dQ += dS K."""
    cols = start_n + offs_n
    k = _load_tile(k_base + cols[:, None] * s_kn + offs_d[None, :], cols[:, None] < k_len,
                   offs_d[None, :] < HEAD_DIM, MASKED, HEAD_DIM != D_PAD)  # [N, D]
    v = _load_tile(v_base + cols[:, None] * s_vn + offs_d[None, :], cols[:, None] < k_len,
                   offs_d[None, :] < HEAD_DIM, MASKED, HEAD_DIM != D_PAD)
    _, ds = _probs_and_dscores(q, tl.trans(k), v, do, lse, delta, offs_m, cols, b, h, H, q_len, k_len,
                               qk_scale, KPM, s_kpm_b, MASK, s_mb, s_mh, s_mm, s_mn, seed, rng_cols, dropout_p,
                               IS_CAUSAL, HAS_KPM, MASK_KIND, HAS_DROPOUT, FP32_DOT, MASKED)
    dq += _dot(ds.to(k.dtype), k, FP32_DOT)
    return dq


@triton.autotune(configs=configs("dq"), **TUNING)
@triton.jit(do_not_specialize=["seed"])  # a seed divisible by 16 must not compile another variant
def _attention_bwd_dq(Q, K, V, DO, LSE, DELTA, DQ, KPM, KEND, MASK, CU_Q, CU_K,
                      s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om, s_lb, s_lh, s_lm,
                      s_dqb, s_dqh, s_dqm, s_kpm_b, s_mb, s_mh, s_mm, s_mn,
                      H, LQ, LK, sm_scale, dropout_p, seed, rng_cols, TUNE_LQ, TUNE_LK,
                      HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                      MASK_KIND: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                      FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0)
    b, h, q_start, k_start, q_len, k_len = _program_sequence(CU_Q, CU_K, LQ, LK, IS_VARLEN)
    if start_m * BLOCK_M < q_len:
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D_PAD)
        row_mask = (offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM)
        q = tl.load(Q + b * s_qb + h * s_qh + (q_start + offs_m)[:, None] * s_qm + offs_d[None, :], mask=row_mask,
                    other=0.0)
        do = tl.load(DO + b * s_ob + h * s_oh + (q_start + offs_m)[:, None] * s_om + offs_d[None, :],
                     mask=row_mask, other=0.0)
        l_ptrs = b * s_lb + h * s_lh + (q_start + offs_m) * s_lm
        lse = tl.load(LSE + l_ptrs, mask=offs_m < q_len, other=float("inf"))
        delta = tl.load(DELTA + l_ptrs, mask=offs_m < q_len, other=0.0)
        dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        qk_scale = sm_scale * LOG2E
        hi = _key_stop(KEND, b, k_len, HAS_KPM)
        if IS_CAUSAL:
            hi = tl.minimum(hi, tl.maximum((start_m + 1) * BLOCK_M + k_len - q_len, 0))
        k_base = K + b * s_kb + h * s_kh + k_start * s_kn
        v_base = V + b * s_vb + h * s_vh + k_start * s_vn
        mid = _unmasked_end(start_m * BLOCK_M, q_len, k_len, hi, BLOCK_N, IS_CAUSAL, HAS_KPM, MASK_KIND)
        for start_n in range(0, mid, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, start_n, offs_m, offs_n, offs_d, b, h, H,
                          q_len, k_len, qk_scale, KPM, s_kpm_b, MASK, s_mb, s_mh, s_mm, s_mn, s_kn, s_vn, seed,
                          rng_cols, dropout_p, HEAD_DIM, D_PAD, IS_CAUSAL, HAS_KPM, MASK_KIND, HAS_DROPOUT, FP32_DOT,
                          False)
        for start_n in range(mid, hi, BLOCK_N):
            dq = _dq_tile(dq, q, do, lse, delta, k_base, v_base, start_n, offs_m, offs_n, offs_d, b, h, H,
                          q_len, k_len, qk_scale, KPM, s_kpm_b, MASK, s_mb, s_mh, s_mm, s_mn, s_kn, s_vn, seed,
                          rng_cols, dropout_p, HEAD_DIM, D_PAD, IS_CAUSAL, HAS_KPM, MASK_KIND, HAS_DROPOUT, FP32_DOT,
                          True)
        tl.store(DQ + b * s_dqb + h * s_dqh + (q_start + offs_m)[:, None] * s_dqm + offs_d[None, :],
                 (dq * sm_scale).to(DQ.dtype.element_ty), mask=row_mask)


def backward(do, q, k, v, out, lse, key_padding_mask, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
             max_seqlen_k, causal, scale, dropout_p, seed):
    """Returns (dq, dk, dv): a delta preprocess, then a dK/dV pass and a dQ pass, without atomics."""
    problem = Problem(q, k, v, key_padding_mask, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      causal, scale, dropout_p, seed)
    do, out = (t if t.stride(-1) == 1 else t.contiguous() for t in (do, out))
    # Contiguous gradients, a layout from the shape alone (the op's fake promises it to torch.compile): q, k and
    # v may be views of one packed qkv tensor, whose strides would make each gradient span the whole of it.
    dq, dk, dv = (torch.empty(t.shape, dtype=t.dtype, device=t.device) for t in (problem.q, problem.k, problem.v))
    if problem.q.numel() == 0 or problem.k.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty_like(lse)  # [B, H, Lq] or [total_q, H]
    for kernel, grid, args, kwargs in backward_launches(problem, out, do, lse, delta, dq, dk, dv):
        kernel[grid](*args, **kwargs)
    return dq, dk, dv


def backward_launches(problem, out, do, lse, delta, dq, dk, dv):
    """(kernel, grid, args, kwargs) of the delta preprocess, the dK/dV pass and the dQ pass, in launch order;
    the compile tests build the same launches."""
    p = problem
    delta_args = (out, do, delta, p.cu_q, p.cu_k, *p.strides(out), *p.strides(do), *p.lse_strides(lse), p.LQ, p.LK)
    delta_kwargs = dict(HEAD_DIM=p.D, D_PAD=p.d_pad, IS_VARLEN=p.varlen, BLOCK_M=DELTA_BLOCK_M)
    args = p.common_args(do, lse)
    dkdv_strides = dict(zip(("s_dkb", "s_dkh", "s_dkn", "s_dvb", "s_dvh", "s_dvn"), p.strides(dk) + p.strides(dv)))
    dq_strides = dict(zip(("s_dqb", "s_dqh", "s_dqm"), p.strides(dq)))
    return [
        (_attention_bwd_delta, p.grid(p.LQ, "BLOCK_M"), delta_args, delta_kwargs),
        (_attention_bwd_dkdv, p.grid(p.LK, "BLOCK_N"), (p.q, p.k, p.v, do, lse, delta, dk, dv),
         {**dkdv_strides, **args}),
        (_attention_bwd_dq, p.grid(p.LQ, "BLOCK_M"), (p.q, p.k, p.v, do, lse, delta, dq), {**dq_strides, **args}),
    ]
