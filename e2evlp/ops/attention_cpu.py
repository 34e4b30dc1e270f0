"""Attention without the Triton kernels: PyTorch SDPA under e2evlp's mask conventions, and explicit probabilities."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def visible_keys(q: torch.Tensor, k: torch.Tensor, key_padding_mask=None, attn_mask=None,
                 causal: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(bool [B|1, H|1, Lq, Lk], True = the query may see the key; the additive float mask or None).

    Keys that an additive mask sets to -inf count as not visible, so a row without any visible key is
    known before the softmax."""
    Lq, Lk = q.shape[-2], k.shape[-2]
    visible = torch.ones(1, 1, Lq, Lk, dtype=torch.bool, device=q.device)
    if causal:  # bottom-right aligned: query i sees keys j - i <= Lk - Lq
        visible = visible.tril(Lk - Lq)
    if key_padding_mask is not None:
        visible = visible & key_padding_mask.logical_not()[:, None, None, :]
    additive = None
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        visible = visible & attn_mask
    elif attn_mask is not None:
        additive = attn_mask
        visible = visible & (attn_mask != float("-inf"))
    return visible, additive


def sdpa_attention(q, k, v, key_padding_mask, attn_mask, causal, scale, dropout_p):
    """PyTorch SDPA with our mask conventions; queries with no key are zeroed without NaN."""
    Lq, Lk = q.shape[2], k.shape[2]
    if key_padding_mask is None and attn_mask is None and (not causal or Lq == Lk):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal and Lq > 0, scale=scale)
    visible, additive = visible_keys(q, k, key_padding_mask, attn_mask, causal)
    empty = ~visible.any(-1, keepdim=True)  # [.., Lq, 1]
    visible = visible | empty  # let empty rows attend anywhere, then zero them: no NaN in either pass
    mask = visible if additive is None else additive.to(q.dtype).masked_fill(~visible, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
    return out.masked_fill(empty, 0.0)


def sdpa_attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *, causal, scale,
                          dropout_p):
    """Unpacks into padded [B, H, L, D] with a key padding mask, runs SDPA, packs the result back."""
    lengths_q = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).long()
    lengths_k = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).long()
    B = len(lengths_q)
    rows_q = torch.arange(max_seqlen_q, device=q.device)[None, :] < lengths_q[:, None]  # [B, Lq]
    rows_k = torch.arange(max_seqlen_k, device=q.device)[None, :] < lengths_k[:, None]
    padded_q = q.new_zeros(B, max_seqlen_q, *q.shape[1:])
    padded_k = k.new_zeros(B, max_seqlen_k, *k.shape[1:])
    padded_v = v.new_zeros(B, max_seqlen_k, *v.shape[1:])
    padded_q[rows_q], padded_k[rows_k], padded_v[rows_k] = q, k, v
    if causal:  # bottom-right per sequence: shift each query by its own Lk - Lq
        shift = (lengths_k - lengths_q)[:, None, None]
        rows = torch.arange(max_seqlen_q, device=q.device)[None, :, None]
        cols = torch.arange(max_seqlen_k, device=q.device)[None, None, :]
        attn_mask = (cols <= rows + shift)[:, None]  # [B, 1, Lq, Lk]
    else:
        attn_mask = None
    out = sdpa_attention(padded_q.transpose(1, 2), padded_k.transpose(1, 2), padded_v.transpose(1, 2), ~rows_k,
                         attn_mask, False, scale, dropout_p)
    return out.transpose(1, 2)[rows_q]


def attention_probs(q, k, *, key_padding_mask=None, attn_mask=None, causal=False, scale=None) -> torch.Tensor:
    """softmax(q kᵀ·scale + masks) [B, H, Lq, Lk], computed explicitly in float32 (float64 stays float64) for
    callers that need the weights themselves; a query with no visible key gets all-zero weights."""
    compute = torch.promote_types(q.dtype, torch.float32)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    visible, additive = visible_keys(q, k, key_padding_mask, attn_mask, causal)
    scores = torch.matmul(q.to(compute), k.to(compute).transpose(-1, -2)) * scale  # [B, H, Lq, Lk]
    if additive is not None:
        scores = scores + additive.to(compute)
    empty = ~visible.any(-1, keepdim=True)  # [.., Lq, 1]
    scores = scores.masked_fill(~visible, float("-inf")).masked_fill(empty, 0.0)  # no NaN in either pass
    return torch.softmax(scores, dim=-1).masked_fill(empty, 0.0)
