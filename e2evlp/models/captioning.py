"""E2EVLPForCaptioning: the decoder as a captioner, with greedy and beam-search generation over a KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from e2evlp import ops
from e2evlp.models.config import E2EVLPConfig
from e2evlp.models.heads import LMHead
from e2evlp.models.model import E2EVLPModel, EncoderOutput, kernels_context
from e2evlp.models.pretrained import PretrainedModule
from e2evlp.models.pretraining import token_cross_entropy
from e2evlp.nn.attention import merge_heads, split_heads


@dataclass
class CaptioningOutput:
    logits: torch.Tensor  # [B, T-1, vocab]: predictions of caption_ids[:, 1:]
    loss: torch.Tensor | None = None


@dataclass
class LayerCache:
    """One decoder layer's keys and values: the tokens generated so far, and the (fixed) image memory."""

    self_k: torch.Tensor  # [N, H, t, D]
    self_v: torch.Tensor
    cross_k: torch.Tensor  # [N, H, S, D]
    cross_v: torch.Tensor

    def reorder(self, index: torch.Tensor) -> None:
        """Follows beam search: row i now continues hypothesis index[i]."""
        self.self_k, self.self_v = self.self_k[index], self.self_v[index]
        self.cross_k, self.cross_v = self.cross_k[index], self.cross_v[index]


class E2EVLPForCaptioning(PretrainedModule):
    """Image captioning (COCO fine-tuning) with the pre-trained decoder and caption head.

    ``forward`` is teacher-forced (``caption_ids`` start with [CLS], end with [SEP], padded with
    [PAD]); ``generate`` decodes greedily (``num_beams=1``) or by beam search, one token per decoder
    call with cached keys and values, batched over images and beams.
    """

    task_heads = ("caption_head",)

    def __init__(self, config: E2EVLPConfig):
        super().__init__()
        self.config = config
        self.model = E2EVLPModel(config)
        self.caption_head = LMHead(config.hidden_size, self.model.embeddings.word_embeddings, config.layer_norm_eps)

    @classmethod
    def sharing(cls, model: E2EVLPModel, caption_head: LMHead) -> E2EVLPForCaptioning:
        """A captioner over existing modules (e.g. a pre-training model's trunk and caption head), no copy."""
        captioner = cls.__new__(cls)
        nn.Module.__init__(captioner)
        captioner.config, captioner.model, captioner.caption_head = model.config, model, caption_head
        return captioner

    def forward(self, pixel_values, pixel_mask=None, caption_ids=None, caption_mask=None) -> CaptioningOutput:
        memory = self.model.encode(pixel_values=pixel_values, pixel_mask=pixel_mask)
        hidden = self.model.decode(memory, caption_ids[:, :-1], None if caption_mask is None else caption_mask[:, :-1])
        logits = self.caption_head(hidden)
        labels = caption_ids[:, 1:]
        if caption_mask is not None:
            labels = labels.masked_fill(caption_mask[:, 1:] == 0, -100)
        return CaptioningOutput(logits, token_cross_entropy(logits, labels))

    def _start_cache(self, memory: EncoderOutput) -> list[LayerCache]:
        heads = self.config.num_attention_heads
        keys_in = memory.hidden + memory.position  # DecoderBlock adds the memory positions to keys only
        caches = []
        for layer in self.model.decoder.layers:
            cross_k = split_heads(layer.cross_attention.key(keys_in), heads)
            cross_v = split_heads(layer.cross_attention.value(memory.hidden), heads)
            empty = cross_k[:, :, :0]
            caches.append(LayerCache(empty, empty, cross_k, cross_v))
        return caches

    def _step(self, tokens: torch.Tensor, position: int, caches: list[LayerCache], memory_padding) -> torch.Tensor:
        """Logits [N, vocab] for the next token after `tokens` [N] at `position`; extends the caches.
        The same arithmetic as DecoderBlock.forward in eval mode, for one new query."""
        heads = self.config.num_attention_heads
        positions = torch.full((tokens.shape[0], 1), position, dtype=torch.long, device=tokens.device)
        hidden = self.model.embeddings(tokens[:, None], position_ids=positions)  # [N, 1, C]
        for layer, cache in zip(self.model.decoder.layers, caches):
            attn = layer.self_attention
            cache.self_k = torch.cat([cache.self_k, split_heads(attn.key(hidden), heads)], dim=2)
            cache.self_v = torch.cat([cache.self_v, split_heads(attn.value(hidden), heads)], dim=2)
            attended = ops.attention(split_heads(attn.query(hidden), heads), cache.self_k, cache.self_v)
            hidden = layer.self_attention_norm(hidden + layer.self_attention_output(merge_heads(attended)))
            query = split_heads(layer.cross_attention.query(hidden), heads)
            attended = ops.attention(query, cache.cross_k, cache.cross_v, key_padding_mask=memory_padding)
            hidden = layer.cross_attention_norm(hidden + layer.cross_attention_output(merge_heads(attended)))
            hidden = layer.output_norm(hidden + layer.output(layer.activation(layer.intermediate(hidden))))
        return self.caption_head(hidden[:, 0])

    @torch.no_grad()
    def generate(self, pixel_values, pixel_mask=None, num_beams: int = 1, max_length: int | None = None,
                 length_penalty: float = 1.0) -> torch.Tensor:
        """Caption token ids [B, ≤ max_length] after the [CLS] start token, [SEP]-terminated and
        [PAD]-filled. Beams are ranked by total log-probability / length ** length_penalty. Call it in
        eval mode (dropout would make the cache disagree with teacher forcing)."""
        config = self.config
        max_length = max_length or config.max_caption_length - 1
        if max_length >= config.max_position_embeddings:
            raise ValueError(f"max_length must be below max_position_embeddings ({config.max_position_embeddings}), "
                             f"got {max_length}")
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        with kernels_context(config):
            return self._beam_search(pixel_values, pixel_mask, num_beams, max_length, length_penalty)

    def _beam_search(self, pixel_values, pixel_mask, K: int, max_length: int, length_penalty: float):
        memory = self.model.encode(pixel_values=pixel_values, pixel_mask=pixel_mask)
        B = memory.hidden.shape[0]
        N, device = B * K, memory.hidden.device
        memory = EncoderOutput(memory.hidden.repeat_interleave(K, 0), memory.padding_mask.repeat_interleave(K, 0),
                               memory.position.repeat_interleave(K, 0), 0)
        caches = self._start_cache(memory)
        tokens = torch.full((N,), self.config.cls_token_id, dtype=torch.long, device=device)
        sequences = torch.empty(N, 0, dtype=torch.long, device=device)
        scores = torch.zeros(B, K, device=device)
        scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
        finished = torch.zeros(N, dtype=torch.bool, device=device)
        lengths = torch.zeros(N, device=device)
        pad, eos = self.config.pad_token_id, self.config.sep_token_id
        for position in range(max_length):
            log_probs = F.log_softmax(self._step(tokens, position, caches, memory.padding_mask).float(), dim=-1)
            vocab = log_probs.shape[-1]
            # A finished hypothesis continues only with [PAD], at no cost, so its score is final.
            only_pad = torch.full_like(log_probs, float("-inf"))
            only_pad[:, pad] = 0.0
            log_probs = torch.where(finished[:, None], only_pad, log_probs)
            candidates = (scores.view(N, 1) + log_probs).view(B, K * vocab)
            scores, best = candidates.topk(K, dim=1)  # [B, K]
            source = (torch.arange(B, device=device)[:, None] * K + best // vocab).view(N)
            tokens = (best % vocab).view(N)
            for cache in caches:
                cache.reorder(source)
            sequences = torch.cat([sequences[source], tokens[:, None]], dim=1)
            finished, lengths = finished[source], lengths[source]
            lengths = lengths + (~finished).float()
            finished = finished | (tokens == eos)
            if bool(finished.all()):
                break
        normalized = scores / lengths.view(B, K).clamp(min=1) ** length_penalty
        choice = normalized.argmax(dim=1) + torch.arange(B, device=device) * K
        return sequences[choice]
