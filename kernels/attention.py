"""FlashAttention-2-style Triton attention: the forward kernel, the masking shared with the backward, launchers.

One program owns a block of queries (forward, dQ) or of keys (dK/dV) of one (sequence, head) and
walks the other side block by block with an online softmax in base 2. Masks: key padding [B, Lk],
bottom-right causal, a bool or additive mask with arbitrary (broadcast) strides, and varlen
sequences through cu_seqlens. Dropout keeps p's Philox stream by (seed, sequence, head) so the
backward (attention_backward.py) regenerates the forward's mask. Rows with no key get output 0,
LSE = +inf, gradient 0. Each walk runs in two loops: tiles whose keys are all real and visible skip
the mask arithmetic, the rest (the causal diagonal, the last partial block, any key padding or mask)
apply it; key blocks past a sequence's last real key are not visited at all. On sm_90 the forward's
"tma" configs load Q, K and V through tensor descriptors (whose bounds zero what lies past a sequence or
the head dim) instead of masked pointer loads.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from e2evlp.kernels.attention_configs import FORWARD_TUNING, configs, length_bucket, tma_aligned

# tl.constexpr values, so that @triton.jit code may read them (Triton rejects other globals); the
# launchers pass the mask kind as a plain int (MASK_BOOL.value), which the kernels compare with these.
LOG2E = tl.constexpr(1.4426950408889634)  # scores are scaled by log2(e) so that softmax runs on exp2
MASK_NONE = tl.constexpr(0)  # MASK_KIND: no attn_mask
MASK_BOOL = tl.constexpr(1)  # a bool attn_mask, True = may attend
MASK_ADD = tl.constexpr(2)  # an additive (float) attn_mask
MAX_GRID_YZ = 65535  # sequences go on grid axis 2, heads on axis 1; CUDA caps both at 65535


@triton.jit
def _program_sequence(CU_Q, CU_K, LQ, LK, IS_VARLEN: tl.constexpr):
    """This program's head and sequence (grid axes 1 and 2), and the sequence's start rows and lengths.

    b, h and the start rows are int64: b * stride and start * stride pass 2**31 on large batches."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    if IS_VARLEN:
        q_first = tl.load(CU_Q + b)
        k_first = tl.load(CU_K + b)
        q_len = tl.load(CU_Q + b + 1) - q_first
        k_len = tl.load(CU_K + b + 1) - k_first
        q_start = q_first.to(tl.int64)
        k_start = k_first.to(tl.int64)
    else:
        q_start = 0
        k_start = 0
        q_len = LQ
        k_len = LK
    return b, h, q_start, k_start, q_len, k_len


@triton.jit
def _key_stop(KEND, b, k_len, HAS_KPM: tl.constexpr):
    """End of the keys a sequence's queries read: with a key padding mask, one past its last unpadded key,
    so padding at the end of a sequence costs nothing."""
    stop = k_len
    if HAS_KPM:
        stop = tl.minimum(k_len, tl.load(KEND + b))
    return stop


@triton.jit
def _unmasked_end(first_row, q_len, k_len, hi, BLOCK_N: tl.constexpr, IS_CAUSAL: tl.constexpr,
                  HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr):
    """For a block of queries starting at first_row: the keys before this (a multiple of BLOCK_N, at most hi)
    are real and visible to every query of the block, so their tiles need no mask. Queries past q_len read
    zeros and are never stored, so they need none either."""
    end = 0
    if not HAS_KPM and MASK_KIND == MASK_NONE:
        end = k_len // BLOCK_N * BLOCK_N
        if IS_CAUSAL:  # the block's first query sees keys up to first_row + (k_len - q_len)
            end = tl.minimum(end, tl.maximum(first_row + k_len - q_len + 1, 0) // BLOCK_N * BLOCK_N)
        end = tl.minimum(end, hi)
    return end


@triton.jit
def _dot(a, b, FP32_DOT: tl.constexpr):
    """a @ b accumulated in float32; float32 inputs stay IEEE (no TF32)."""
    if FP32_DOT:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _load_tile(ptrs, rows_ok, cols_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """A tile load that checks only the bounds that may fail: the unmasked loops' key blocks are whole, and
    a head dim that is a power of two has no padding columns. A load with no mask is also what lets the
    compiler vectorize and pipeline it at full width."""
    if CHECK_ROWS and CHECK_COLS:
        return tl.load(ptrs, mask=rows_ok & cols_ok, other=0.0)
    if CHECK_ROWS:
        return tl.load(ptrs, mask=rows_ok, other=0.0)
    if CHECK_COLS:
        return tl.load(ptrs, mask=cols_ok, other=0.0)
    return tl.load(ptrs)


@triton.jit
def _scores(q, k, offs_m, offs_n, b, h, q_len, k_len, qk_scale, KPM, s_kpm_b, MASK, s_mb, s_mh, s_mm, s_mn,
            IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr, MASK_KIND: tl.constexpr, FP32_DOT: tl.constexpr,
            MASKED: tl.constexpr):
    """Base-2 scaled scores [BLOCK_M, BLOCK_N] with every mask applied (-inf where not allowed); a tile
    that _unmasked_end vouches for (every key real and visible) skips the masks."""
    s = _dot(q, k, FP32_DOT) * qk_scale
    if not MASKED:
        return s
    valid = (offs_m[:, None] < q_len) & (offs_n[None, :] < k_len)
    if IS_CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + (k_len - q_len))
    if HAS_KPM:
        padding = tl.load(KPM + b * s_kpm_b + offs_n, mask=offs_n < k_len, other=1)
        valid = valid & (padding == 0)[None, :]
    if MASK_KIND != MASK_NONE:
        mask_ptrs = MASK + b * s_mb + h * s_mh + offs_m[:, None] * s_mm + offs_n[None, :] * s_mn
        in_range = (offs_m[:, None] < q_len) & (offs_n[None, :] < k_len)
        if MASK_KIND == MASK_BOOL:
            valid = valid & (tl.load(mask_ptrs, mask=in_range, other=0) != 0)
        else:
            bias = tl.load(mask_ptrs, mask=in_range, other=0.0).to(tl.float32)
            # finfo.min (how Hugging Face masks) would overflow to -inf in base 2 and make the key vanish,
            # unlike in SDPA and the reference; -inf itself stays -inf.
            bias = tl.where(bias == float("-inf"), bias, tl.maximum(bias, -1e38))
            s = s + bias * LOG2E
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _keep(seed, b, h, H, offs_m, offs_n, rng_cols, dropout_p):
    """Dropout keep mask: a Philox stream per (sequence, head), one number per (query, key) of the sequence,
    so a varlen batch and its padded twin drop the same entries. The stream key is int64 in every kernel."""
    offsets = offs_m[:, None] * rng_cols + offs_n[None, :]
    return tl.rand(seed + (b * H + h).to(tl.int64) * 1000003, offsets) >= dropout_p


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n, offs_d, b, h, H, q_len, k_len,
              qk_scale, KPM, s_kpm_b, MASK, s_mb, s_mh, s_mm, s_mn, s_kn, s_vn, seed, rng_cols, dropout_p,
              HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
              MASK_KIND: tl.constexpr, HAS_DROPOUT: tl.constexpr, FP32_DOT: tl.constexpr, MASKED: tl.constexpr,
              USE_TMA: tl.constexpr):
    """One key block of the forward: scores, online-softmax update of (m_i, l_i), and acc += P V."""
    cols = start_n + offs_n
    if USE_TMA:  # k_base and v_base are descriptors; rows past k_len and columns past HEAD_DIM come as zeros
        k = tl.trans(k_base.load([start_n, 0]))  # [D, N]
    else:
        k = _load_tile(k_base + cols[None, :] * s_kn + offs_d[:, None], cols[None, :] < k_len,
                       offs_d[:, None] < HEAD_DIM, MASKED, HEAD_DIM != D_PAD)  # [D, N]
    if MASKED:
        s = _scores(q, k, offs_m, cols, b, h, q_len, k_len, qk_scale, KPM, s_kpm_b, MASK, s_mb, s_mh, s_mm, s_mn,
                    IS_CAUSAL, HAS_KPM, MASK_KIND, FP32_DOT, MASKED)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
    else:
        # Scale the row maxima, not the tile: the shift then folds into one multiply-add per score. The
        # launcher makes qk_scale >= 0, so the maximum of the scaled scores is the scaled maximum.
        s = _dot(q, k, FP32_DOT)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s * qk_scale - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if HAS_DROPOUT:
        keep = _keep(seed, b, h, H, offs_m, cols, rng_cols, dropout_p)
        p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
    if USE_TMA:
        v = v_base.load([start_n, 0])  # [N, D]
    else:
        v = _load_tile(v_base + cols[:, None] * s_vn + offs_d[None, :], cols[:, None] < k_len,
                       offs_d[None, :] < HEAD_DIM, MASKED, HEAD_DIM != D_PAD)  # [N, D]
    acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, FP32_DOT)
    return acc, l_i, m_new


@triton.autotune(configs=configs("fwd"), **FORWARD_TUNING)
@triton.jit(do_not_specialize=["seed"])  # a seed divisible by 16 must not compile another variant
def _attention_fwd(Q, K, V, O, LSE, KPM, KEND, MASK, CU_Q, CU_K,
                   s_qb, s_qh, s_qm, s_kb, s_kh, s_kn, s_vb, s_vh, s_vn, s_ob, s_oh, s_om, s_lb, s_lh, s_lm,
                   s_kpm_b, s_mb, s_mh, s_mm, s_mn,
                   H, LQ, LK, sm_scale, dropout_p, seed, rng_cols, TUNE_LQ, TUNE_LK, TMA_ALIGNED,
                   HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, IS_CAUSAL: tl.constexpr, HAS_KPM: tl.constexpr,
                   MASK_KIND: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                   FP32_DOT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   USE_TMA: tl.constexpr = False, WARP_SPECIALIZE: tl.constexpr = False):
    start_m = tl.program_id(0)
    b, h, q_start, k_start, q_len, k_len = _program_sequence(CU_Q, CU_K, LQ, LK, IS_VARLEN)
    if start_m * BLOCK_M < q_len:
        offs_m = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, D_PAD)
        k_rows = K + b * s_kb + h * s_kh + k_start * s_kn
        v_rows = V + b * s_vb + h * s_vh + k_start * s_vn
        if USE_TMA:
            # One descriptor per sequence and head: its [length, HEAD_DIM] bounds do the masking that the
            # pointer loads do by hand (the sequence's own rows in a varlen batch; zeros past them).
            q_desc = tl.make_tensor_descriptor(Q + b * s_qb + h * s_qh + q_start * s_qm, shape=[q_len, HEAD_DIM],
                                               strides=[s_qm, 1], block_shape=[BLOCK_M, D_PAD])
            q = q_desc.load([start_m * BLOCK_M, 0])
            k_base = tl.make_tensor_descriptor(k_rows, shape=[k_len, HEAD_DIM], strides=[s_kn, 1],
                                               block_shape=[BLOCK_N, D_PAD])
            v_base = tl.make_tensor_descriptor(v_rows, shape=[k_len, HEAD_DIM], strides=[s_vn, 1],
                                               block_shape=[BLOCK_N, D_PAD])
        else:
            q = tl.load(Q + b * s_qb + h * s_qh + (q_start + offs_m)[:, None] * s_qm + offs_d[None, :],
                        mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < HEAD_DIM), other=0.0)
            k_base = k_rows
            v_base = v_rows
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
        qk_scale = sm_scale * LOG2E
        hi = _key_stop(KEND, b, k_len, HAS_KPM)
        if IS_CAUSAL:  # keys beyond the block's last query (bottom-right) are never seen
            hi = tl.minimum(hi, tl.maximum((start_m + 1) * BLOCK_M + k_len - q_len, 0))
        mid = _unmasked_end(start_m * BLOCK_M, q_len, k_len, hi, BLOCK_N, IS_CAUSAL, HAS_KPM, MASK_KIND)
        for start_n in range(0, mid, BLOCK_N):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n, offs_d, b, h, H,
                                      q_len, k_len, qk_scale, KPM, s_kpm_b, MASK, s_mb, s_mh, s_mm, s_mn,
                                      s_kn, s_vn, seed, rng_cols, dropout_p, HEAD_DIM, D_PAD, IS_CAUSAL, HAS_KPM,
                                      MASK_KIND, HAS_DROPOUT, FP32_DOT, False, USE_TMA)
        for start_n in tl.range(mid, hi, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
            acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, start_n, offs_m, offs_n, offs_d, b, h, H,
                                      q_len, k_len, qk_scale, KPM, s_kpm_b, MASK, s_mb, s_mh, s_mm, s_mn,
                                      s_kn, s_vn, seed, rng_cols, dropout_p, HEAD_DIM, D_PAD, IS_CAUSAL, HAS_KPM,
                                      MASK_KIND, HAS_DROPOUT, FP32_DOT, True, USE_TMA)
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        row_ok = offs_m < q_len
        tl.store(O + b * s_ob + h * s_oh + (q_start + offs_m)[:, None] * s_om + offs_d[None, :],
                 out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
        tl.store(LSE + b * s_lb + h * s_lh + (q_start + offs_m) * s_lm, lse, mask=row_ok)


@triton.jit
def _dropout_keep_kernel(OUT, H, LQ, LK, seed, rng_cols, dropout_p, BLOCK: tl.constexpr):
    """Writes the forward's keep mask for a padded [B, H, LQ, LK] problem (tests and the reference)."""
    m = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_n = tl.arange(0, BLOCK)
    for start_n in range(0, LK, BLOCK):
        cols = start_n + offs_n
        keep = _keep(seed, b, h, H, tl.full([1], m, tl.int32), cols, rng_cols, dropout_p)
        tl.store(OUT + ((b * H + h) * LQ + m) * LK + cols[None, :], keep.to(tl.int8), mask=cols[None, :] < LK)


def key_end(key_padding_mask: torch.Tensor) -> torch.Tensor:
    """One past each sequence's last unpadded key, int32 [B]; computed on the device, no host sync."""
    B, LK = key_padding_mask.shape
    if LK == 0:
        return torch.zeros(B, dtype=torch.int32, device=key_padding_mask.device)
    positions = torch.arange(1, LK + 1, dtype=torch.int32, device=key_padding_mask.device)
    return torch.where(key_padding_mask, 0, positions).amax(1)


class Problem:
    """Tensors, strides and flags of one attention call, padded ([B, H, L, D]) or varlen ([total, H, D])."""

    def __init__(self, q, k, v, key_padding_mask, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 causal, scale, dropout_p, seed):
        self.varlen = cu_seqlens_q is not None
        # Rows may have any stride, but the head dim must be unit-stride and nothing may overlap.
        self.q, self.k, self.v = (t if t.stride(-1) == 1 and 0 not in t.stride() else t.contiguous()
                                  for t in (q, k, v))
        if self.varlen:
            self.B, self.H = len(cu_seqlens_q) - 1, q.shape[1]
            self.cu_q, self.cu_k = cu_seqlens_q, cu_seqlens_k
        else:
            self.B, self.H = q.shape[0], q.shape[1]
            self.cu_q = self.cu_k = q  # unused pointers
        self.LQ, self.LK, self.D = int(max_seqlen_q), int(max_seqlen_k), q.shape[-1]
        self.d_pad = max(16, triton.next_power_of_2(self.D))
        self.causal, self.scale, self.dropout_p, self.seed = bool(causal), float(scale), float(dropout_p), int(seed)
        # The kernels read a row of keys at unit stride; bool and uint8 share a layout, so view, not copy.
        self.kpm = key_padding_mask.contiguous().view(torch.uint8) if key_padding_mask is not None else None
        self.key_end = None if key_padding_mask is None else key_end(key_padding_mask)
        if attn_mask is None:
            self.mask, self.mask_kind = None, MASK_NONE.value
        else:
            is_bool = attn_mask.dtype == torch.bool
            # Convert before expanding: a broadcast mask stays a stride-0 view, never materialized.
            self.mask = (attn_mask.view(torch.uint8) if is_bool else attn_mask).expand(self.B, self.H, self.LQ, self.LK)
            self.mask_kind = (MASK_BOOL if is_bool else MASK_ADD).value
        for name, count in (("sequences", self.B), ("heads", self.H)):
            if count > MAX_GRID_YZ:
                raise ValueError(f"attention takes at most {MAX_GRID_YZ} {name} per call (a CUDA grid limit), "
                                 f"got {count}: split the call")

    def grid(self, length, block):
        """Launch grid of a pass whose programs own `block` rows of `length`: (blocks, heads, sequences)."""
        return lambda meta: (triton.cdiv(length, meta[block]), self.H, self.B)

    def strides(self, t):
        """(batch, head, row) strides of q/k/v-shaped tensors; batch is 0 for varlen (rows carry it)."""
        if self.varlen:
            return 0, t.stride(1), t.stride(0)
        return t.stride(0), t.stride(1), t.stride(2)

    def lse_strides(self, lse):
        return (0, lse.stride(1), lse.stride(0)) if self.varlen else (lse.stride(0), lse.stride(1), lse.stride(2))

    def new_lse(self):
        shape = (self.q.shape[0], self.H) if self.varlen else (self.B, self.H, self.LQ)
        return torch.empty(shape, dtype=torch.float32, device=self.q.device)

    def common_args(self, o_like, lse):
        kpm = self.kpm if self.kpm is not None else self.q
        key_end = self.key_end if self.key_end is not None else self.q
        mask = self.mask if self.mask is not None else self.q
        mask_strides = tuple(self.mask.stride()) if self.mask is not None else (0, 0, 0, 0)
        return dict(
            KPM=kpm, KEND=key_end, MASK=mask, CU_Q=self.cu_q, CU_K=self.cu_k,
            s_qb=self.strides(self.q)[0], s_qh=self.strides(self.q)[1], s_qm=self.strides(self.q)[2],
            s_kb=self.strides(self.k)[0], s_kh=self.strides(self.k)[1], s_kn=self.strides(self.k)[2],
            s_vb=self.strides(self.v)[0], s_vh=self.strides(self.v)[1], s_vn=self.strides(self.v)[2],
            s_ob=self.strides(o_like)[0], s_oh=self.strides(o_like)[1], s_om=self.strides(o_like)[2],
            s_lb=self.lse_strides(lse)[0], s_lh=self.lse_strides(lse)[1], s_lm=self.lse_strides(lse)[2],
            s_kpm_b=self.kpm.stride(0) if self.kpm is not None else 0,
            s_mb=mask_strides[0], s_mh=mask_strides[1], s_mm=mask_strides[2], s_mn=mask_strides[3],
            H=self.H, LQ=self.LQ, LK=self.LK, sm_scale=self.scale, dropout_p=self.dropout_p, seed=self.seed,
            rng_cols=max(self.LK, 1), TUNE_LQ=length_bucket(self.LQ), TUNE_LK=length_bucket(self.LK),
            HEAD_DIM=self.D, D_PAD=self.d_pad, IS_CAUSAL=self.causal,
            HAS_KPM=self.kpm is not None, MASK_KIND=self.mask_kind, IS_VARLEN=self.varlen,
            HAS_DROPOUT=self.dropout_p > 0, FP32_DOT=self.q.dtype == torch.float32,
        )


def forward(q, k, v, key_padding_mask, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal,
            scale, dropout_p, seed):
    """Returns (out like q, lse float32: [B, H, Lq] padded or [total_q, H] varlen; base-2 of scaled scores)."""
    if scale < 0:  # the kernel's row maxima need a non-negative scale; (-q)·k·(-scale) is the same score
        q, scale = -q, -scale
    problem = Problem(q, k, v, key_padding_mask, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                      causal, scale, dropout_p, seed)
    out = torch.empty(problem.q.shape, dtype=q.dtype, device=q.device)
    lse = problem.new_lse()
    if out.numel() == 0 or problem.LQ == 0:
        return out, lse.fill_(float("inf"))
    kernel, grid, args, kwargs = forward_launch(problem, out, lse)
    kernel[grid](*args, **kwargs)
    return out, lse


def forward_launch(problem, out, lse):
    """(kernel, grid, args, kwargs) of the forward; the compile tests build the same launch."""
    tensors = (problem.q, problem.k, problem.v)
    aligned = tma_aligned(list(tensors), [s for t in tensors for s in problem.strides(t)], problem.D)
    if aligned:
        _ensure_allocator()
    return (_attention_fwd, problem.grid(problem.LQ, "BLOCK_M"), (*tensors, out, lse),
            {**problem.common_args(out, lse), "TMA_ALIGNED": int(aligned)})


def _descriptor_scratch(size: int, alignment: int, stream) -> torch.Tensor:
    return torch.empty(size, dtype=torch.int8, device="cuda")


def _ensure_allocator() -> None:
    """Device-side tensor descriptors are written to global scratch memory, which Triton takes from the
    allocator set in the launching thread (a context variable). Ours, unless the caller set one of their own."""
    from triton.runtime import _allocation

    allocator = getattr(_allocation, "_allocator", None)
    current = allocator.get() if allocator is not None else None
    if current is None or isinstance(current, getattr(_allocation, "NullAllocator", ())):
        triton.set_allocator(_descriptor_scratch)


def dropout_keep_mask(B, H, Lq, Lk, dropout_p, seed, device) -> torch.Tensor:
    """The bool keep mask [B, H, Lq, Lk] that padded forward/backward use for (dropout_p, seed)."""
    out = torch.empty(B, H, Lq, Lk, dtype=torch.int8, device=device)
    if out.numel():
        _dropout_keep_kernel[(Lq, H, B)](out, H, Lq, Lk, seed, max(Lk, 1), dropout_p, BLOCK=16)
    return out.bool()
