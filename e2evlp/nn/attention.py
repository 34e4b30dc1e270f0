"""E2E-VLP's transformer layers on e2evlp.ops.attention: BERT-layout attention, encoder and decoder blocks."""

from __future__ import annotations

import torch
from torch import nn

from e2evlp import ops
from e2evlp.nn.packing import PackedSequences


def split_heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """[B, L, C] -> [B, H, L, C/H]."""
    B, L, C = x.shape
    return x.view(B, L, num_heads, C // num_heads).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, L, D] -> [B, L, H*D]."""
    B, H, L, D = x.shape
    return x.transpose(1, 2).reshape(B, L, H * D)


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
