"""Packed sequences: a padded batch's real tokens in one [total, C] tensor, for layers that skip padding."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PackedSequences:
    """Where the real tokens of a padded [B, L] batch go when packed (FlashAttention's varlen layout).

    Sequence b's tokens keep their order and fill rows cu_seqlens[b]:cu_seqlens[b + 1] of the packed tensor.
    Token-wise layers (Linear, LayerNorm, dropout) run on the packed tensor unchanged and attention runs
    through ops.attention_varlen, so no FLOP is spent on padding.
    """

    indices: torch.Tensor  # [total] int64: each packed row's position in the flattened [B * L] batch
    cu_seqlens: torch.Tensor  # [B + 1] int32
    max_seqlen: int
    batch: int
    length: int

    @classmethod
    def from_padding_mask(cls, padding_mask: torch.Tensor) -> PackedSequences:
        """padding_mask bool [B, L], True = padding (anywhere, not only at the end). One host sync: the lengths."""
        if padding_mask.dtype != torch.bool or padding_mask.dim() != 2:
            raise ValueError(f"padding_mask must be bool [B, L], got {padding_mask.dtype} "
                             f"{tuple(padding_mask.shape)}")
        B, L = padding_mask.shape
        lengths = (~padding_mask).sum(1)  # [B] int64
        max_seqlen, total = torch.stack([lengths.max(), lengths.sum()]).tolist() if B else (0, 0)
        # A stable sort of the flags lists the real positions first, in their order, without a second sync.
        indices = torch.sort(padding_mask.flatten().to(torch.uint8), stable=True).indices[:total]
        cu_seqlens = torch.zeros(B + 1, dtype=torch.int32, device=padding_mask.device)
        cu_seqlens[1:] = lengths.cumsum(0)
        return cls(indices, cu_seqlens, max_seqlen, B, L)

    @property
    def total(self) -> int:
        return self.indices.numel()

    def pack(self, padded: torch.Tensor) -> torch.Tensor:
        """[B, L, ...] -> [total, ...]: the real tokens only."""
        return padded.flatten(0, 1).index_select(0, self.indices)

    def unpack(self, packed: torch.Tensor) -> torch.Tensor:
        """[total, ...] -> [B, L, ...], zeros at the padding."""
        flat = packed.new_zeros(self.batch * self.length, *packed.shape[1:])
        return flat.index_copy(0, self.indices, packed).view(self.batch, self.length, *packed.shape[1:])
