"""Attention modules on e2evlp.ops.attention: drop-in nn.MultiheadAttention, E2E-VLP's transformer layers."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from e2evlp import ops
from e2evlp.nn.packing import PackedSequences
from e2evlp.reference.attention import attention_weights


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, L, C] -> [B, H, L, C/H]."""
    B, L, C = x.shape
    return x.view(B, L, num_heads, C // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] -> [B, L, H*D]."""
    B, H, L, D = x.shape
    return x.transpose(1, 2).reshape(B, L, H * D)


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
    probs = attention_weights(q, k, key_padding_mask=key_padding_mask, attn_mask=attn_mask, causal=causal)
    probs = F.dropout(probs, dropout_p) if dropout_p > 0 else probs
    return torch.matmul(probs, v.to(probs.dtype)).to(q.dtype), probs.to(q.dtype)


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
    * ``is_causal=True`` applies the causal mask itself; ``attn_mask`` is optional with it (torch requires
      one and treats the flag as a hint). When both are given, both apply.
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

    def _project(self, query, key, value):
        """[B, Lq, E], [B, Lk, kdim], [B, Lk, vdim] -> q [B, Lq, E], k, v [B, Lk, E]."""
        E = self.embed_dim
        if self._qkv_same_embed_dim:
            w_q, w_k, w_v = self.in_proj_weight.split(E)
        else:
            w_q, w_k, w_v = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        b_q, b_k, b_v = self.in_proj_bias.split(E) if self.in_proj_bias is not None else (None, None, None)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _ops_masks(self, attn_mask, key_padding_mask, B, Lq, Lk, dtype):
        """torch's masks in ops.attention's conventions: (bool padding [B, Lk], attn_mask [.., Lq, Lk])."""
        for name, given in (("attn_mask", attn_mask), ("key_padding_mask", key_padding_mask)):
            if given is not None and given.dtype != torch.bool and not given.is_floating_point():
                raise TypeError(f"{name} must be bool or floating point, got {given.dtype}")
        mask = None
        if attn_mask is not None:
            if attn_mask.dim() not in (2, 3):
                raise ValueError(f"attn_mask must be 2-D or 3-D, got {attn_mask.dim()}-D")
            if attn_mask.dim() == 2 and attn_mask.shape != (Lq, Lk):
                raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)}: expected ({Lq}, {Lk})")
            if attn_mask.dim() == 3 and attn_mask.shape != (B * self.num_heads, Lq, Lk):
                raise ValueError(f"attn_mask of shape {tuple(attn_mask.shape)}: expected "
                                 f"({B * self.num_heads}, {Lq}, {Lk}) = (batch * num_heads, Lq, Lk)")
            if attn_mask.dim() == 3:  # rows are ordered batch-major, head-minor
                attn_mask = attn_mask.view(B, self.num_heads, Lq, Lk)
            # torch's bool mask is True where attending is NOT allowed: the opposite of ops.attention's
            mask = ~attn_mask if attn_mask.dtype == torch.bool else attn_mask.to(dtype)
        padding = None
        if key_padding_mask is not None:
            if key_padding_mask.shape != (B, Lk):
                raise ValueError(f"key_padding_mask of shape {tuple(key_padding_mask.shape)}: "
                                 f"expected ({B}, {Lk})")
            if key_padding_mask.dtype == torch.bool:
                padding = key_padding_mask
            else:  # additive: folded into a float attn_mask
                additive = key_padding_mask.to(dtype)[:, None, None, :]
                if mask is None:
                    mask = additive
                elif mask.dtype == torch.bool:
                    mask = _restrict(additive, mask)
                else:
                    mask = mask + additive
        return padding, mask

    def forward(self, query, key, value, key_padding_mask=None, need_weights=False, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        """Inputs [Lq, B, E], [Lk, B, kdim], [Lk, B, vdim] ([B, L, ·] with batch_first; [L, ·] unbatched).

        Returns (attn_output [Lq, B, E] in the input's layout, attn_weights or None): weights are
        [B, Lq, Lk'] averaged over heads, or [B, num_heads, Lq, Lk'] ([Lq, Lk'], [num_heads, Lq, Lk']
        unbatched), where Lk' counts the keys added by add_bias_kv and add_zero_attn.
        Note: need_weights defaults to False here (torch: True); True runs the plain, unfused path.
        """
        if query.dim() not in (2, 3):
            raise ValueError(f"query must be 3-D (batched) or 2-D (unbatched), got {query.dim()}-D")
        if key.dim() != query.dim() or value.dim() != query.dim():
            raise ValueError(f"key ({key.dim()}-D) and value ({value.dim()}-D) must have query's rank "
                             f"({query.dim()}-D)")
        batched = query.dim() == 3
        if not batched:
            query, key, value = query[None], key[None], value[None]
            key_padding_mask = key_padding_mask[None] if key_padding_mask is not None else None
        elif not self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        B, Lq, E = query.shape  # from here on batch first
        Lk = key.shape[1]
        if E != self.embed_dim:
            raise ValueError(f"query's last dimension is {E}, expected embed_dim={self.embed_dim}")
        if key.shape[:2] != value.shape[:2]:
            raise ValueError(f"key {tuple(key.shape)} and value {tuple(value.shape)} differ in batch or "
                             "length")

        q, k, v = self._project(query, key, value)
        padding, mask = self._ops_masks(attn_mask, key_padding_mask, B, Lq, Lk, q.dtype)
        causal = is_causal
        extra = [] if self.bias_k is None else [(self.bias_k, self.bias_v)]
        if self.add_zero_attn:
            extra.append((k.new_zeros(1, 1, E), v.new_zeros(1, 1, E)))
        if extra:
            if causal:  # bottom-right alignment would shift by the appended keys: mask the real keys only
                mask = _restrict(mask, torch.ones(Lq, Lk, dtype=torch.bool, device=q.device).tril(Lk - Lq))
                causal = False
            # appended keys are attended by every query, as in torch
            k = torch.cat([k] + [extra_k.expand(B, 1, E) for extra_k, _ in extra], dim=1)
            v = torch.cat([v] + [extra_v.expand(B, 1, E) for _, extra_v in extra], dim=1)
            padding = _pad_last(padding, len(extra), False)
            mask = _pad_last(mask, len(extra), True if mask is not None and mask.dtype == torch.bool else 0.0)

        q, k, v = (split_heads(x, self.num_heads) for x in (q, k, v))  # [B, H, L, D]
        dropout_p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            out, weights = _attention_with_weights(q, k, v, key_padding_mask=padding, attn_mask=mask,
                                                   causal=causal, dropout_p=dropout_p)
            weights = weights.mean(1) if average_attn_weights else weights
            weights = weights if batched else weights[0]
        else:
            out = ops.attention(q, k, v, key_padding_mask=padding, attn_mask=mask, causal=causal,
                                 dropout_p=dropout_p)
        out = self.out_proj(merge_heads(out))  # [B, Lq, E]
        if not batched:
            out = out[0]
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


_ACTIVATIONS = {"gelu": nn.GELU, "gelu_new": lambda: nn.GELU(approximate="tanh"), "relu": nn.ReLU}


def _activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]()


class QKVAttention(nn.Module):
    """Multi-head attention with separate query/key/value Linear layers (BERT's layout), no output dense."""

    def __init__(self, hidden_size: int, num_heads: int, attention_dropout: float = 0.0):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.attention_dropout = num_heads, attention_dropout
        self.query = nn.Linear(hidden_size, hidden_size)
        self.key = nn.Linear(hidden_size, hidden_size)
        self.value = nn.Linear(hidden_size, hidden_size)

    def forward(self, query, key, value, key_padding_mask=None, causal=False, packed: PackedSequences | None = None):
        """query [B, Lq, C], key/value [B, Lk, C], key_padding_mask bool [B, Lk] (True = ignore) -> the
        heads' outputs concatenated, [B, Lq, C], before any output dense. With ``packed`` (self-attention
        only), query/key/value are the packed real tokens [total, C] and so is the result."""
        dropout_p = self.attention_dropout if self.training else 0.0
        if packed is not None:
            total, C = query.shape
            q, k, v = (proj(x).view(total, self.num_heads, C // self.num_heads)
                       for proj, x in ((self.query, query), (self.key, key), (self.value, value)))
            out = ops.attention_varlen(q, k, v, packed.cu_seqlens, packed.cu_seqlens, packed.max_seqlen,
                                       packed.max_seqlen, causal=causal, dropout_p=dropout_p,
                                       validate=False)  # [total, H, D]; PackedSequences built the offsets
            return out.reshape(total, C)
        q, k, v = (split_heads(proj(x), self.num_heads)
                   for proj, x in ((self.query, query), (self.key, key), (self.value, value)))
        out = ops.attention(q, k, v, key_padding_mask=key_padding_mask, causal=causal,
                            dropout_p=dropout_p)  # [B, H, Lq, D]
        return merge_heads(out)


class SelfAttentionBlock(nn.Module):
    """BERT-style post-LN transformer layer: self-attention, then a feed-forward network, each with
    dropout, residual and LayerNorm. [B, L, C] -> [B, L, C].

    Parameters map one-to-one onto a Hugging Face ``BertLayer``'s (ours <- theirs):

    ====================================  ===================================
    ``attention.query|key|value.*``       ``attention.self.query|key|value.*``
    ``attention_output.*``                ``attention.output.dense.*``
    ``attention_norm.*``                  ``attention.output.LayerNorm.*``
    ``intermediate.*``                    ``intermediate.dense.*``
    ``output.*``                          ``output.dense.*``
    ``output_norm.*``                     ``output.LayerNorm.*``
    ====================================  ===================================
    """

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, dropout: float = 0.1,
                 attention_dropout: float = 0.1, layer_norm_eps: float = 1e-12, activation: str = "gelu"):
        super().__init__()
        self.attention = QKVAttention(hidden_size, num_heads, attention_dropout)
        self.attention_output = nn.Linear(hidden_size, hidden_size)
        self.attention_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.intermediate = nn.Linear(hidden_size, intermediate_size)
        self.activation = _activation(activation)
        self.output = nn.Linear(intermediate_size, hidden_size)
        self.output_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden, key_padding_mask=None, packed: PackedSequences | None = None):
        """hidden [B, L, C], key_padding_mask bool [B, L] (True = padding) -> [B, L, C]; or hidden [total, C]
        holding only the real tokens, laid out by ``packed`` -> [total, C]."""
        attended = self.attention(hidden, hidden, hidden, key_padding_mask=key_padding_mask, packed=packed)
        hidden = self.attention_norm(hidden + self.dropout(self.attention_output(attended)))
        ffn = self.output(self.activation(self.intermediate(hidden)))  # [B, L, C]
        return self.output_norm(hidden + self.dropout(ffn))


class DecoderBlock(nn.Module):
    """Post-LN transformer decoder layer: self-attention (optionally causal), cross-attention to the
    encoder's memory, feed-forward network; each followed by dropout, residual and LayerNorm.

    ``query_pos`` / ``memory_pos`` are positional embeddings added to the queries and keys (not the
    values) of each attention, as in DETR (the object queries' embeddings, the image's positions).
    Names follow :class:`SelfAttentionBlock`, with ``self_attention*`` and ``cross_attention*`` mapping
    onto a ``BertLayer``'s ``attention.*`` and ``crossattention.*`` (``add_cross_attention=True``).
    """

    def __init__(self, hidden_size: int, num_heads: int, intermediate_size: int, dropout: float = 0.1,
                 attention_dropout: float = 0.1, layer_norm_eps: float = 1e-12, activation: str = "gelu"):
        super().__init__()
        self.self_attention = QKVAttention(hidden_size, num_heads, attention_dropout)
        self.self_attention_output = nn.Linear(hidden_size, hidden_size)
        self.self_attention_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.cross_attention = QKVAttention(hidden_size, num_heads, attention_dropout)
        self.cross_attention_output = nn.Linear(hidden_size, hidden_size)
        self.cross_attention_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.intermediate = nn.Linear(hidden_size, intermediate_size)
        self.activation = _activation(activation)
        self.output = nn.Linear(intermediate_size, hidden_size)
        self.output_norm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.dropout = nn.Dropout(dropout)

    def forward(self, hidden, memory, *, self_key_padding_mask=None, memory_key_padding_mask=None,
                causal=False, query_pos=None, memory_pos=None):
        """hidden [B, T, C], memory [B, S, C]; masks bool [B, T] / [B, S] (True = padding);
        query_pos [B|1, T, C], memory_pos [B|1, S, C] -> [B, T, C]."""
        with_pos = hidden if query_pos is None else hidden + query_pos
        attended = self.self_attention(with_pos, with_pos, hidden, key_padding_mask=self_key_padding_mask,
                                       causal=causal)
        hidden = self.self_attention_norm(hidden + self.dropout(self.self_attention_output(attended)))

        query = hidden if query_pos is None else hidden + query_pos
        memory_keys = memory if memory_pos is None else memory + memory_pos
        attended = self.cross_attention(query, memory_keys, memory, key_padding_mask=memory_key_padding_mask)
        hidden = self.cross_attention_norm(hidden + self.dropout(self.cross_attention_output(attended)))

        ffn = self.output(self.activation(self.intermediate(hidden)))  # [B, T, C]
        return self.output_norm(hidden + self.dropout(ffn))
