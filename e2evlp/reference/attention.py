"""Reference twin of e2evlp.ops.attention: plain PyTorch math in float32 (float64 for float64 inputs)."""

from __future__ import annotations

import math

import torch


def allowed_keys(B: int, H: int, Lq: int, Lk: int, *, key_padding_mask=None, attn_mask=None, causal=False,
                 device=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The [B|1, H|1, Lq, Lk] boolean "may attend" mask and the additive float mask (or None)."""
    allowed = torch.ones(1, 1, Lq, Lk, dtype=torch.bool, device=device)
    if causal:  # aligned to the bottom-right corner: query i sees keys j <= i + Lk - Lq
        rows = torch.arange(Lq, device=device)[:, None]
        cols = torch.arange(Lk, device=device)[None, :]
        allowed = allowed & (cols <= rows + (Lk - Lq))
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask.to(torch.bool)[:, None, None, :]
    additive = None
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            additive = attn_mask
    return allowed, additive


def attention_weights(q, k, *, key_padding_mask=None, attn_mask=None, causal=False, scale=None) -> torch.Tensor:
    """softmax(q kᵀ · scale + masks) [B, H, Lq, Lk] in float32 (float64 for float64 inputs); rows of a
    query with no key left are 0."""
    B, H, Lq, D = q.shape
    compute = torch.float64 if q.dtype == torch.float64 else torch.float32
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    allowed, additive = allowed_keys(B, H, Lq, k.shape[-2], key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                     causal=causal, device=q.device)
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale
    if additive is not None:
        scores = scores + additive.to(compute)
    scores = scores.masked_fill(~allowed, float("-inf"))
    empty = torch.isneginf(scores).all(-1, keepdim=True)  # [.., Lq, 1]: no key to attend to
    return torch.softmax(scores.masked_fill(empty, 0.0), dim=-1).masked_fill(empty, 0.0)


def attention(q, k, v, *, key_padding_mask=None, attn_mask=None, causal=False, scale=None, dropout_p=0.0,
              dropout_mask=None) -> torch.Tensor:
    """softmax(q kᵀ · scale + masks) v over [B, H, L, D]; a query with no key left gets 0.

    `dropout_mask` (bool, True = keep, broadcastable to [B, H, Lq, Lk]) makes dropout reproducible;
    without it, dropout draws from torch's generator.
    """
    probs = attention_weights(q, k, key_padding_mask=key_padding_mask, attn_mask=attn_mask, causal=causal,
                              scale=scale)
    if dropout_p > 0:
        keep = dropout_mask if dropout_mask is not None else torch.rand_like(probs) >= dropout_p
        probs = probs * keep / (1 - dropout_p)
    return torch.matmul(probs, v.to(probs.dtype)).to(q.dtype)


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal=False, scale=None,
                     dropout_p=0.0) -> torch.Tensor:
    """Packed [total, H, D] sequences (int32 cu_seqlens), one reference call per sequence."""
    out = torch.empty_like(q)
    starts_q, starts_k = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    for b in range(len(starts_q) - 1):
        q0, q1, k0, k1 = starts_q[b], starts_q[b + 1], starts_k[b], starts_k[b + 1]
        part = attention(q[q0:q1].transpose(0, 1)[None], k[k0:k1].transpose(0, 1)[None],
                         v[k0:k1].transpose(0, 1)[None], causal=causal, scale=scale, dropout_p=dropout_p)
        out[q0:q1] = part[0].transpose(0, 1)
    return out
