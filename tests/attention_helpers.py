"""Attention oracles for the kernel tests: math in the inputs' own dtype, and errors against a wider oracle."""

import math

import torch

from e2evlp.reference.attention import allowed_keys


def same_dtype_math(q, k, v, **kwargs):
    """Attention computed entirely in q's dtype (what PyTorch's math path does)."""
    B, H, Lq, D = q.shape
    allowed, additive = allowed_keys(B, H, Lq, k.shape[2], device=q.device, **{
        key: kwargs[key] for key in ("key_padding_mask", "attn_mask", "causal") if key in kwargs})
    scores = (q @ k.transpose(-1, -2)) * (kwargs.get("scale") or 1 / math.sqrt(D))
    if additive is not None:
        scores = scores + additive.to(q.dtype)
    scores = scores.masked_fill(~allowed, float("-inf"))
    empty = torch.isneginf(scores).all(-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(empty, 0), -1).masked_fill(empty, 0)
    return probs @ v


def attention_errors(fn, oracle, dtype, q, k, v, grad, **kwargs):
    """Max abs errors of fn's output and (dq, dk, dv) against `oracle` run on the same inputs cast to `dtype`."""
    out = fn(q, k, v, **kwargs)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    assert torch.isfinite(out).all() and all(torch.isfinite(g).all() for g in grads)
    wide = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
    ref = oracle(*wide, **kwargs)
    ref_grads = torch.autograd.grad(ref, wide, grad.to(dtype))
    return [(a.to(dtype) - b).abs().max().item() for a, b in zip((out, *grads), (ref, *ref_grads))]
