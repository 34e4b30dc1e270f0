"""Prediction heads: DETR's box MLP, BERT's pooler and tied LM head, and the detection head set."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class MLP(nn.Module):
    """`num_layers` Linear layers with ReLU between them (DETR's box head has 3)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, num_layers: int):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [out_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


class Pooler(nn.Module):
    """BERT's pooler: dense + tanh on the first ([CLS]) token."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)

    def forward(self, hidden):  # [B, L, C] -> [B, C]
        return torch.tanh(self.dense(hidden[:, 0]))


class LMHead(nn.Module):
    """BERT's prediction head (dense, activation, LayerNorm, then a decoder tied to the word embeddings)."""

    def __init__(self, hidden_size: int, word_embeddings: nn.Embedding, layer_norm_eps: float):
        super().__init__()
        self.dense = nn.Linear(hidden_size, hidden_size)
        self.LayerNorm = nn.LayerNorm(hidden_size, eps=layer_norm_eps)
        self.decoder = nn.Linear(hidden_size, word_embeddings.num_embeddings)
        self.decoder.weight = word_embeddings.weight  # tied
        self.dense.weight.data.normal_(0.0, 0.02)  # BERT's init; the tied table keeps its own
        self.dense.bias.data.zero_()
        self.decoder.bias.data.zero_()

    def forward(self, hidden):  # [.., C] -> [.., vocab]
        return self.decoder(self.LayerNorm(F.gelu(self.dense(hidden))))


class DetectionHeads(nn.Module):
    """Class (C+1 with no-object), attribute and box (sigmoid cxcywh) heads over every decoder layer."""

    def __init__(self, hidden_size: int, num_classes: int, num_attributes: int):
        super().__init__()
        self.class_head = nn.Linear(hidden_size, num_classes + 1)
        self.attribute_head = nn.Linear(hidden_size, num_attributes)
        self.box_head = MLP(hidden_size, hidden_size, 4, 3)

    def forward(self, layer_states: list[torch.Tensor]) -> dict:
        """DETR's output dict from each decoder layer's [B, Q, C] states: the last layer's predictions
        and the earlier layers' as `aux_outputs`."""
        outputs = [{"pred_logits": self.class_head(h), "pred_boxes": self.box_head(h).sigmoid(),
                    "pred_attributes": self.attribute_head(h)} for h in layer_states]
        return {**outputs[-1], "aux_outputs": outputs[:-1]}
