"""Attention as torch custom ops: fused Triton kernels on CUDA (and in the interpreter), PyTorch SDPA on CPU."""

from __future__ import annotations

import math

import torch

from e2evlp import reference
from e2evlp.ops.attention_cpu import sdpa_attention, sdpa_attention_varlen
from e2evlp.ops.dispatch import attention_backend

ATTENTION_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
MAX_HEAD_DIM = 256


def _check_qkv(q, k, v, packed: bool) -> None:
    rank, layout = (3, "[total, H, D]") if packed else (4, "[B, H, L, D]")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != rank:
            raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} is {t.dtype} on {t.device} but q is {q.dtype} on {q.device}")
    if not q.dtype.is_floating_point:
        raise TypeError(f"q must be a floating-point tensor, got {q.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must share the head dim, got {q.shape[-1]} and {k.shape[-1]}")
    shared = (q.shape[1:2], k.shape[1:2]) if packed else (q.shape[:2], k.shape[:2])
    if shared[0] != shared[1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} must agree on " + ("heads" if packed else
                         "batch and heads"))


def _check_masks(q, k, key_padding_mask, attn_mask) -> None:
    B, H, Lq, Lk = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    if key_padding_mask is not None:
        if key_padding_mask.dtype != torch.bool:
            raise TypeError(f"key_padding_mask must be bool (True = ignore that key), got {key_padding_mask.dtype}")
        if tuple(key_padding_mask.shape) != (B, Lk):
            raise ValueError(f"key_padding_mask must be [B, Lk] = [{B}, {Lk}], got {tuple(key_padding_mask.shape)}")
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and not attn_mask.dtype.is_floating_point:
            raise TypeError(f"attn_mask must be bool (True = attend) or an additive float mask, got {attn_mask.dtype}")
        try:
            fits = torch.broadcast_shapes(attn_mask.shape, (B, H, Lq, Lk)) == (B, H, Lq, Lk)
        except RuntimeError:
            fits = False
        if not fits:
            raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                             f"[B, H, Lq, Lk] = {[B, H, Lq, Lk]}")
    for name, t in (("key_padding_mask", key_padding_mask), ("attn_mask", attn_mask)):
        if t is not None and t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")


def _check_cu_seqlens(cu, name: str, total: int, max_seqlen: int, exact: bool) -> None:
    cu = cu.tolist()
    if cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens_{name} must start at 0 and never decrease, got {cu}")
    if cu[-1] > total or (exact and cu[-1] != total):
        raise ValueError(f"cu_seqlens_{name} ends at {cu[-1]} but {name} has {total} rows")
    longest = max((b - a for a, b in zip(cu, cu[1:])), default=0)
    if longest > max_seqlen:
        raise ValueError(f"max_seqlen_{name} is {max_seqlen} but a sequence of {name} has {longest} rows")


def _triton_dtype_check(q) -> None:
    if q.dtype not in ATTENTION_DTYPES:
        raise TypeError(f"q must be float16, bfloat16 or float32 for the Triton attention kernels, got {q.dtype} "
                        "(E2EVLP_ATTENTION=reference runs any dtype)")
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise ValueError(f"head dim must be in [1, {MAX_HEAD_DIM}] for the Triton attention kernels, got {q.shape[-1]}")


def _dropout_seed(dropout_p: float) -> int:
    """A Philox seed from torch's default generator, so torch.manual_seed makes dropout reproducible."""
    return int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64)) if dropout_p > 0 else 0


def attention(q, k, v, *, key_padding_mask=None, attn_mask=None, causal: bool = False, scale: float | None = None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """softmax(q kᵀ·scale + masks) v for q [B, H, Lq, D], k and v [B, H, Lk, D] (Lq may differ from Lk).

    key_padding_mask: bool [B, Lk], True = ignore that key. attn_mask: bool (True = attend) or additive
    float, broadcastable to [B, H, Lq, Lk] (no gradient flows to it). causal: query i sees keys
    j <= i + Lk - Lq (bottom-right aligned; SDPA's is_causal when Lq == Lk). A query with no key left
    gets output 0 and gradient 0. Backend by device: CUDA → fused Triton kernels, CPU → PyTorch SDPA,
    TRITON_INTERPRET=1 → the Triton kernels on CPU; E2EVLP_ATTENTION=triton|sdpa|reference overrides.
    """
    _check_qkv(q, k, v, packed=False)
    _check_masks(q, k, key_padding_mask, attn_mask)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    backend = attention_backend(q.device)
    if backend == "reference":
        return reference.attention(q, k, v, key_padding_mask=key_padding_mask, attn_mask=attn_mask, causal=causal,
                                   scale=scale, dropout_p=dropout_p)
    if backend == "sdpa":
        return sdpa_attention(q, k, v, key_padding_mask, attn_mask, causal, scale, dropout_p)
    _triton_dtype_check(q)
    out, _ = torch.ops.e2evlp.attention_forward(q, k, v, key_padding_mask, attn_mask, None, None, q.shape[2],
                                                k.shape[2], causal, scale, dropout_p, _dropout_seed(dropout_p))
    return out


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q: int, max_seqlen_k: int, *,
                     causal: bool = False, scale: float | None = None, dropout_p: float = 0.0,
                     validate: bool | None = None) -> torch.Tensor:
    """Attention over packed sequences: q [total_q, H, D], k and v [total_k, H, D]; sequence b spans
    rows cu_seqlens[b]:cu_seqlens[b+1] (int32 [B+1], FlashAttention's convention). No padding is read.

    validate: check that cu_seqlens start at 0, never decrease, cover q's rows (and at most k's) and
    respect max_seqlen; wrong offsets would make the kernels read and write out of bounds. Default: on
    for CPU tensors; on CUDA it costs a host sync, so it is off unless asked for (as in FlashAttention)."""
    _check_qkv(q, k, v, packed=True)
    for name, cu in (("cu_seqlens_q", cu_seqlens_q), ("cu_seqlens_k", cu_seqlens_k)):
        if not isinstance(cu, torch.Tensor) or cu.dtype != torch.int32 or cu.dim() != 1 or len(cu) < 1:
            raise TypeError(f"{name} must be an int32 tensor [B + 1]")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
    if len(cu_seqlens_q) != len(cu_seqlens_k):
        raise ValueError(f"cu_seqlens_q and cu_seqlens_k must both be [B + 1], got {len(cu_seqlens_q)} and "
                         f"{len(cu_seqlens_k)}")
    if validate or (validate is None and q.device.type == "cpu"):
        _check_cu_seqlens(cu_seqlens_q, "q", q.shape[0], max_seqlen_q, exact=True)
        _check_cu_seqlens(cu_seqlens_k, "k", k.shape[0], max_seqlen_k, exact=False)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    backend = attention_backend(q.device)
    if backend != "triton":
        padded = reference.attention_varlen if backend == "reference" else sdpa_attention_varlen
        return padded(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal=causal, scale=scale,
                      dropout_p=dropout_p)
    _triton_dtype_check(q)
    out, _ = torch.ops.e2evlp.attention_forward(q, k, v, None, None, cu_seqlens_q, cu_seqlens_k, int(max_seqlen_q),
                                                int(max_seqlen_k), causal, scale, dropout_p,
                                                _dropout_seed(dropout_p))
    return out


@torch.library.custom_op("e2evlp::attention_forward", mutates_args=())
def _attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_padding_mask: torch.Tensor | None,
                       attn_mask: torch.Tensor | None, cu_seqlens_q: torch.Tensor | None,
                       cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int, max_seqlen_k: int, causal: bool,
                       scale: float, dropout_p: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from e2evlp.kernels import attention as kernels

    return kernels.forward(q, k, v, key_padding_mask, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                           max_seqlen_k, causal, scale, dropout_p, seed)


@_attention_forward.register_fake
def _(q, k, v, key_padding_mask, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, causal, scale,
      dropout_p, seed):
    lse_shape = (q.shape[0], q.shape[1]) if cu_seqlens_q is not None else (q.shape[0], q.shape[1], q.shape[2])
    return q.new_empty(q.shape), q.new_empty(lse_shape, dtype=torch.float32)


@torch.library.custom_op("e2evlp::attention_backward", mutates_args=())
def _attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                        lse: torch.Tensor, key_padding_mask: torch.Tensor | None, attn_mask: torch.Tensor | None,
                        cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None, max_seqlen_q: int,
                        max_seqlen_k: int, causal: bool, scale: float, dropout_p: float,
                        seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    from e2evlp.kernels.attention_backward import backward

    return backward(grad_out, q, k, v, out, lse, key_padding_mask, attn_mask, cu_seqlens_q, cu_seqlens_k,
                            max_seqlen_q, max_seqlen_k, causal, scale, dropout_p, seed)


@_attention_backward.register_fake
def _(grad_out, q, k, v, out, lse, key_padding_mask, attn_mask, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
      max_seqlen_k, causal, scale, dropout_p, seed):
    # Contiguous, as the kernel allocates them: a layout from the shape alone, whatever strides Inductor gives
    # q, k and v at run time (it checks the real outputs against these).
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _attention_setup_context(ctx, inputs, output):
    q, k, v, kpm, attn_mask, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, kpm, attn_mask, cu_q, cu_k)
    ctx.params = (max_q, max_k, causal, scale, dropout_p, seed)


def _attention_backward_rule(ctx, grad_out, grad_lse):
    q, k, v, out, lse, kpm, attn_mask, cu_q, cu_k = ctx.saved_tensors
    dq, dk, dv = torch.ops.e2evlp.attention_backward(grad_out, q, k, v, out, lse, kpm, attn_mask, cu_q, cu_k,
                                                     *ctx.params)
    return (dq, dk, dv) + (None,) * 10


torch.library.register_autograd("e2evlp::attention_forward", _attention_backward_rule,
                                setup_context=_attention_setup_context)
