"""Drop-in for torch.nn.MultiheadAttention running e2evlp.ops.attention (fused kernels on GPU)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from e2evlp import ops
from e2evlp.nn.attention import merge_heads, split_heads
from e2evlp.ops.attention import ATTENTION_DTYPES, MAX_HEAD_DIM
from e2evlp.ops.attention_cpu import attention_probs, sdpa_attention
from e2evlp.ops.dispatch import attention_backend


def _restrict(mask: torch.Tensor | None, allowed: torch.Tensor) -> torch.Tensor:
    """An ops attn_mask (None, bool True = attend, or additive float) restricted to bool `allowed`."""
    if mask is None:
        return allowed
    if mask.dtype == torch.bool:
        return mask & allowed
    return mask.masked_fill(~allowed, float("-inf"))


def _pad_last(mask: torch.Tensor | None, extra: int, value) -> torch.Tensor | None:
    """The mask with `extra` columns holding `value` appended to its last (key) dimension."""
    if mask is None or extra == 0:
        return mask
    return F.pad(mask, (0, extra), value=value)


def _attention_with_weights(q, k, v, *, key_padding_mask, attn_mask, causal, dropout_p):
    """The plain path: the same math as ops.attention, also returning the probabilities [B, H, Lq, Lk]."""
    probs = attention_probs(q, k, key_padding_mask=key_padding_mask, attn_mask=attn_mask, causal=causal)
    probs = F.dropout(probs, dropout_p) if dropout_p > 0 else probs
    return torch.matmul(probs, v.to(probs.dtype)).to(q.dtype), probs.to(q.dtype)


def _fused_runs(q: torch.Tensor) -> bool:
    """Whether ops.attention takes q [B, H, L, D] where it is: its Triton kernels run float16, bfloat16 and float32
    at head dims up to 256; torch's module also runs float64 (on CUDA too) and any head dim."""
    return attention_backend(q.device) != "triton" or (q.dtype in ATTENTION_DTYPES and q.shape[-1] <= MAX_HEAD_DIM)


_TORCH_FORWARD = nn.MultiheadAttention.forward  # bound at import: code that swaps torch's class for ours


def _linear(x, weight, bias):
    """F.linear, but a bias of another dtype is added with type promotion, as torch's module allows."""
    if bias is None or bias.dtype == x.dtype:
        return F.linear(x, weight, bias)
    return F.linear(x, weight) + bias


class MultiheadAttentionInputError(ValueError, AssertionError):
    """A bad input to MultiheadAttention. A ValueError, and also an AssertionError with torch's wording,
    because torch's module asserts on these inputs and code written for it catches AssertionError."""


def _check_inputs(query, key, value, key_padding_mask, attn_mask) -> bool:
    """Whether the inputs are batched (3-D query); the ranks of key, value and the masks must agree."""
    if query.dim() not in (2, 3):
        raise MultiheadAttentionInputError(
            f"query should be unbatched 2D or batched 3D tensor but received {query.dim()}-D query tensor")
    rank = query.dim()
    if key.dim() != rank or value.dim() != rank:
        raise MultiheadAttentionInputError(
            f"For {'batched' if rank == 3 else 'unbatched'} {rank}-D `query`, expected `key` and `value` to be "
            f"{rank}-D but found {key.dim()}-D and {value.dim()}-D tensors respectively")
    if key_padding_mask is not None and key_padding_mask.dim() != rank - 1:
        raise MultiheadAttentionInputError(
            f"For {'batched' if rank == 3 else 'unbatched'} {rank}-D `query`, expected `key_padding_mask` to be "
            f"`None` or {rank - 1}-D but found {key_padding_mask.dim()}-D tensor instead")
    if attn_mask is not None and attn_mask.dim() not in (2, 3):
        raise MultiheadAttentionInputError(
            f"For {'batched' if rank == 3 else 'unbatched'} {rank}-D `query`, expected `attn_mask` to be `None`, "
            f"2-D or 3-D but found {attn_mask.dim()}-D tensor instead")
    return rank == 3


def _check_batch_first(query, key, value, embed_dim: int) -> None:
    """[B, Lq, E] query; key and value [B, Lk, ·] of one batch and length."""
    if query.shape[-1] != embed_dim:
        raise MultiheadAttentionInputError(
            f"was expecting embedding dimension of {embed_dim}, but got {query.shape[-1]} (query's last dimension "
            f"must be embed_dim={embed_dim})")
    if key.shape[:2] != value.shape[:2]:
        raise MultiheadAttentionInputError(
            f"key {tuple(key.shape)} and value {tuple(value.shape)} differ in batch or length")


class MultiheadAttention(nn.Module):
    """Drop-in for torch.nn.MultiheadAttention running e2evlp.ops.attention (fused kernels on GPU).

    Same constructor, attributes, parameters and state_dict keys as torch's module, so
    ``ours.load_state_dict(theirs.state_dict())`` works and gives the same outputs. Masks follow torch's
    conventions: a bool ``attn_mask`` is True where attending is NOT allowed, a float one is added to the
    scores; its shape is ``[Lq, Lk]`` or ``[B*num_heads, Lq, Lk]``. ``key_padding_mask`` ``[B, Lk]`` is
    bool (True = ignore that key) or float (added). Differences from torch:

    * ``need_weights`` defaults to False (torch: True), so the fused kernel runs unless weights are asked for.
      ``need_weights=True`` takes a plain path that computes the weights explicitly with the same math
      (averaged over heads when ``average_attn_weights``; with dropout applied in training, as torch does).
    * a query with no key left to attend to (e.g. a fully padded batch row) gets a zero attention output
      (so the module returns ``out_proj.bias`` there) and zero weights, where torch can return NaN.
    * bad ranks and mask shapes raise ``MultiheadAttentionInputError``: a ValueError, and torch's AssertionError
      with torch's wording. Nested-tensor inputs go to torch's own forward (its native kernel, eval without grad).
    * ``is_causal=True`` applies the causal mask itself; ``attn_mask`` is optional with it (torch requires
      one and treats the flag as a hint). When both are given, both apply.

    The fused kernels take float16, bfloat16 and float32 at head dims up to 256; other inputs (float64, larger
    head dims) run PyTorch SDPA. In torch's encoder layers in eval without grad, torch's inference fast path
    runs its own kernel on this module's weights (see ``merge_masks``).
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be > 0, got {embed_dim} and {num_heads}")
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        factory = {"device": device, "dtype": dtype}
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.kdim = kdim if kdim is not None else embed_dim
        self.vdim = vdim if vdim is not None else embed_dim
        # torch's Transformer layers read this name
        self._qkv_same_embed_dim = self.kdim == embed_dim and self.vdim == embed_dim
        self.dropout, self.batch_first, self.add_zero_attn = dropout, batch_first, add_zero_attn

        if self._qkv_same_embed_dim:
            self.in_proj_weight = nn.Parameter(torch.empty(3 * embed_dim, embed_dim, **factory))
            self.register_parameter("q_proj_weight", None)
            self.register_parameter("k_proj_weight", None)
            self.register_parameter("v_proj_weight", None)
        else:
            self.register_parameter("in_proj_weight", None)
            self.q_proj_weight = nn.Parameter(torch.empty(embed_dim, embed_dim, **factory))
            self.k_proj_weight = nn.Parameter(torch.empty(embed_dim, self.kdim, **factory))
            self.v_proj_weight = nn.Parameter(torch.empty(embed_dim, self.vdim, **factory))
        if bias:
            self.in_proj_bias = nn.Parameter(torch.empty(3 * embed_dim, **factory))
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **factory)
        if add_bias_kv:
            self.bias_k = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
            self.bias_v = nn.Parameter(torch.empty(1, 1, embed_dim, **factory))
        else:
            self.bias_k = self.bias_v = None
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # torch's initialisation, so freshly built modules train alike
        for weight in (self.in_proj_weight, self.q_proj_weight, self.k_proj_weight, self.v_proj_weight):
            if weight is not None:
                nn.init.xavier_uniform_(weight)
        if self.in_proj_bias is not None:
            nn.init.zeros_(self.in_proj_bias)
            nn.init.zeros_(self.out_proj.bias)
        if self.bias_k is not None:
            nn.init.xavier_normal_(self.bias_k)
            nn.init.xavier_normal_(self.bias_v)

    def _batch_first(self, query, key, value, key_padding_mask, batched: bool):
        """torch's layouts ([L, B, ·], [B, L, ·] with batch_first, or unbatched [L, ·]) as [B, L, ·]."""
        if not batched:
            key_padding_mask = key_padding_mask[None] if key_padding_mask is not None else None
            return query[None], key[None], value[None], key_padding_mask
        if not self.batch_first:
            return query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1), key_padding_mask
        return query, key, value, key_padding_mask

    def _input_layout(self, out, batched: bool):
        """[B, Lq, E] back in the layout the inputs came in."""
        if not batched:
            return out[0]
        return out if self.batch_first else out.transpose(0, 1)

    def _project(self, query, key, value):
        """[B, Lq, E], [B, Lk, kdim], [B, Lk, vdim] -> q [B, Lq, E], k, v [B, Lk, E]."""
        E = self.embed_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.split(E)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.split(E) if self.in_proj_bias is not None else (None, None, None)
        return _linear(query, w_q, b_q), _linear(key, w_k, b_k), _linear(value, w_v, b_v)

    def _ops_attn_mask(self, attn_mask, B, Lq, Lk, dtype):
        """torch's attn_mask ([Lq, Lk] or [B*num_heads, Lq, Lk]; bool True = may NOT attend, or additive) in
        ops.attention's conventions: bool True = may attend, or additive float."""
        expected = (Lq, Lk) if attn_mask.dim() == 2 else (B * self.num_heads, Lq, Lk)
        if attn_mask.shape != expected:
            raise MultiheadAttentionInputError(
                f"Expected `attn_mask` shape to be {expected} but got {tuple(attn_mask.shape)} "
                f"({'(Lq, Lk)' if attn_mask.dim() == 2 else '(batch * num_heads, Lq, Lk)'})")
        if attn_mask.dim() == 3:  # rows are ordered batch-major, head-minor
            attn_mask = attn_mask.view(B, self.num_heads, Lq, Lk)
        return ~attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(dtype)

    def _ops_masks(self, attn_mask, key_padding_mask, B, Lq, Lk, dtype):
        """torch's masks in ops.attention's conventions: (bool padding [B, Lk] or None, attn_mask or None).
        A float key_padding_mask is additive, so it joins the attn_mask."""
        for name, given in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)):
            if given is not None and given.dtype != torch.bool and not given.is_floating_point():
                raise TypeError(f"{name} must be bool or floating point, got {given.dtype}")
        mask = None if attn_mask is None else self._ops_attn_mask(attn_mask, B, Lq, Lk, dtype)
        if key_padding_mask is None:
            return None, mask
        if key_padding_mask.shape != (B, Lk):
            raise MultiheadAttentionInputError(
                f"Expected `key_padding_mask` shape to be {(B, Lk)} but got {tuple(key_padding_mask.shape)}")
        if key_padding_mask.dtype == torch.bool:
            return key_padding_mask, mask
        additive = key_padding_mask.to(dtype)[:, None, None, :]
        if mask is None:
            return None, additive
        return None, (_restrict(additive, mask) if mask.dtype == torch.bool else mask + additive)

    def _append_extra_keys(self, q, k, v, padding, mask, causal: bool):
        """Appends add_bias_kv's learned key and value and add_zero_attn's zeros to k, v [B, Lk, E], keys every
        query attends to, as in torch. Returns (k, v, padding, mask, causal) over the Lk' keys."""
        extra = [] if self.bias_k is None else [(self.bias_k, self.bias_v)]
        if self.add_zero_attn:
            extra.append((k.new_zeros(1, 1, self.embed_dim), v.new_zeros(1, 1, self.embed_dim)))
        if not extra:
            return k, v, padding, mask, causal
        (B, Lq, E), Lk = q.shape, k.shape[1]
        if causal:  # bottom-right alignment would shift by the appended keys: mask the real keys only
            mask = _restrict(mask, torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq))
        k = torch.cat([k] + [extra_k.expand(B, 1, E) for extra_k, _ in extra], dim=1)
        v = torch.cat([v] + [extra_v.expand(B, 1, E) for _, extra_v in extra], dim=1)
        padding = _pad_last(padding, len(extra), False)
        mask = _pad_last(mask, len(extra), True if mask is not None and mask.dtype == torch.bool else 0.0)
        return k, v, padding, mask, False

    def _attend(self, q, k, v, padding, mask, causal: bool, need_weights: bool, average_attn_weights: bool):
        """Heads of q [B, Lq, E] over k, v [B, Lk, E] -> ([B, H, Lq, D], weights or None): the fused op, or the
        plain path when the weights are asked for."""
        q, k, v = (split_heads(x, self.num_heads) for x in (q, k, v))  # [B, H, L, D]
        dropout_p = self.dropout if self.training else 0.0
        if not need_weights and _fused_runs(q):
            return ops.attention(q, k, v, key_padding_mask=padding, attn_mask=mask, causal=causal,
                                 dropout_p=dropout_p), None
        if not need_weights:  # a dtype or head dim the kernels do not take: PyTorch SDPA, as torch's module runs
            return sdpa_attention(q, k, v, padding, mask, causal, self.head_dim**-0.5, dropout_p), None
        out, weights = _attention_with_weights(q, k, v, key_padding_mask=padding, attn_mask=mask, causal=causal,
                                               dropout_p=dropout_p)
        return out, (weights.mean(1) if average_attn_weights else weights)

    def merge_masks(self, attn_mask, key_padding_mask, query) -> tuple[torch.Tensor | None, int | None]:
        """torch's masks merged as torch's own module merges them, for torch's inference fast path: in eval
        without grad, nn.TransformerEncoderLayer and nn.TransformerEncoder call this and then run torch's native
        kernel on this module's weights, so their outputs there are torch's.

        Returns (None, None) without masks; (key_padding_mask [B, L], 1); or (attn_mask [L, L] or [B*H, L, L],
        with key_padding_mask if given, as [B, H, L, L], 2). The sum of two bool masks is their logical or."""
        if attn_mask is None:
            return (None, None) if key_padding_mask is None else (key_padding_mask, 1)
        B, L = query.shape[0], query.shape[1]  # [B, L, E]: torch passes no nested query with an attn_mask
        merged = attn_mask.view(B, -1, L, L) if attn_mask.dim() == 3 else attn_mask.expand(B, self.num_heads, L, L)
        if key_padding_mask is not None:
            merged = merged + key_padding_mask.view(B, 1, 1, L).expand(B, self.num_heads, 1, L)
        return merged, 2

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        """Inputs [Lq, B, E], [Lk, B, kdim], [Lk, B, vdim] ([B, L, ·] with batch_first; [L, ·] unbatched).

        Returns (attn_output [Lq, B, E] in the input's layout, attn_weights or None): weights are
        [B, Lq, Lk'] averaged over heads, or [B, num_heads, Lq, Lk'] ([Lq, Lk'], [num_heads, Lq, Lk']
        unbatched), where Lk' counts the keys added by add_bias_kv and add_zero_attn.
        Note: need_weights defaults to False here (torch: True); True runs the plain, unfused path.
        """
        if query.is_nested or key.is_nested or value.is_nested:  # torch's own forward: its native fast path
            return _TORCH_FORWARD(self, query, key, value, key_padding_mask, need_weights,
                                                 attn_mask, average_attn_weights, is_causal)
        batched = _check_inputs(query, key, value, key_padding_mask, attn_mask)
        query, key, value, key_padding_mask = self._batch_first(query, key, value, key_padding_mask, batched)
        _check_batch_first(query, key, value, self.embed_dim)
        q, k, v = self._project(query, key, value)  # [B, Lq, E], [B, Lk, E], [B, Lk, E]
        padding, mask = self._ops_masks(attn_mask, key_padding_mask, q.shape[0], q.shape[1], k.shape[1], q.dtype)
        k, v, padding, mask, causal = self._append_extra_keys(q, k, v, padding, mask, is_causal)
        out, weights = self._attend(q, k, v, padding, mask, causal, need_weights, average_attn_weights)
        out = self.out_proj(merge_heads(out))  # [B, Lq, E]
        if weights is not None and not batched:
            weights = weights[0]
        return self._input_layout(out, batched), weights
