"""E2EVLPForCaptioning: the decoder as a captioner, with greedy and beam-search generation over a KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from e2evlp import ops
from e2evlp.models.config import E2EVLPConfig
from e2evlp.models.heads import LMHead
from e2evlp.models.losses import token_cross_entropy
from e2evlp.models.model import E2EVLPModel, EncoderOutput, kernels_context
from e2evlp.models.pretrained import PretrainedModule
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


def teacher_forced_captions(model: E2EVLPModel, caption_head: LMHead, memory: EncoderOutput, caption_ids,
                            caption_mask=None) -> CaptioningOutput:
    """The decoder's predictions of caption_ids[:, 1:] [B, T-1] from the tokens before each, and their mean
    cross-entropy over the real (caption_mask 1) tokens: the captioning loss of pre-training and fine-tuning."""
    input_mask = None if caption_mask is None else caption_mask[:, :-1]
    logits = caption_head(model.decode(memory, caption_ids[:, :-1], input_mask))
    labels = caption_ids[:, 1:]
    if caption_mask is not None:
        labels = labels.masked_fill(caption_mask[:, 1:] == 0, -100)
    return CaptioningOutput(logits, token_cross_entropy(logits, labels))


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
        return teacher_forced_captions(self.model, self.caption_head, memory, caption_ids, caption_mask)

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
        [PAD]-filled. ``num_beams=1`` is greedy; otherwise beam search (``_beam_search``) ranks captions by
        total log-probability / length ** length_penalty, the length counting [SEP]. Call it in eval mode
        (dropout would make the cache disagree with teacher forcing)."""
        config = self.config
        max_length = max_length or config.max_caption_length - 1
        if max_length >= config.max_position_embeddings:
            raise ValueError(f"max_length must be below max_position_embeddings ({config.max_position_embeddings}), "
                             f"got {max_length}")
        if num_beams < 1:
            raise ValueError(f"num_beams must be >= 1, got {num_beams}")
        with kernels_context(config):
            memory = self.model.encode(pixel_values=pixel_values, pixel_mask=pixel_mask)
            if num_beams == 1:
                return self._greedy(memory, max_length)
            return self._beam_search(memory, num_beams, max_length, length_penalty)

    def _greedy(self, memory: EncoderOutput, max_length: int) -> torch.Tensor:
        caches = self._start_cache(memory)
        B, device = memory.hidden.shape[0], memory.hidden.device
        pad, eos = self.config.pad_token_id, self.config.sep_token_id
        tokens = torch.full((B,), self.config.cls_token_id, dtype=torch.long, device=device)
        finished = torch.zeros(B, dtype=torch.bool, device=device)
        generated = []
        for position in range(max_length):
            tokens = self._step(tokens, position, caches, memory.padding_mask).argmax(dim=-1).masked_fill(finished, pad)
            generated.append(tokens)
            finished = finished | (tokens == eos)
            if bool(finished.all()):
                break
        return torch.stack(generated, dim=1)

    def _beam_search(self, memory: EncoderOutput, K: int, max_length: int, length_penalty: float) -> torch.Tensor:
        """Hugging Face's beam search: per image, K live beams, refilled every step from the top 2K
        continuations; a continuation ending in [SEP] among the top K goes to the image's pool of K finished
        captions, scored with the length penalty. An image is done once its pool is full and no live beam
        can still beat the pool's worst (log-probabilities only lower a sum, so a bound is exact); the
        search ends when every image is done or at max_length. Returns each image's best finished caption,
        or its best live beam when none finished."""
        B, device = memory.hidden.shape[0], memory.hidden.device
        N, pad, eos = B * K, self.config.pad_token_id, self.config.sep_token_id
        memory = EncoderOutput(memory.hidden.repeat_interleave(K, 0), memory.padding_mask.repeat_interleave(K, 0),
                               memory.position.repeat_interleave(K, 0), 0)
        caches = self._start_cache(memory)
        tokens = torch.full((N,), self.config.cls_token_id, dtype=torch.long, device=device)
        live = torch.empty(B, K, 0, dtype=torch.long, device=device)  # [B, K, t]: the live beams' tokens
        scores = torch.zeros(B, K, device=device)  # their summed log-probabilities
        scores[:, 1:] = float("-inf")  # all beams start identical: expand only the first
        pool = torch.full((B, K, max_length), pad, dtype=torch.long, device=device)  # finished, best first
        pool_scores = torch.full((B, K), float("-inf"), device=device)
        pool_lengths = torch.zeros(B, K, dtype=torch.long, device=device)
        done = torch.zeros(B, dtype=torch.bool, device=device)
        first_beam = torch.arange(B, device=device)[:, None] * K
        for position in range(max_length):
            log_probs = F.log_softmax(self._step(tokens, position, caches, memory.padding_mask).float(), dim=-1)
            vocab = log_probs.shape[-1]
            candidates = (scores[..., None] + log_probs.view(B, K, vocab)).view(B, K * vocab)
            top_scores, top = candidates.topk(2 * K, dim=1)  # [B, 2K], best first
            top_beams, top_tokens = top // vocab, top % vocab
            top_seqs = torch.cat([live.gather(1, top_beams[..., None].expand(-1, -1, position)), top_tokens[..., None]],
                                 dim=2)  # [B, 2K, t+1]
            is_eos = top_tokens == eos
            # Only the top K may finish (a finished caption gives up its live slot); done images stay as they are.
            finishing = is_eos[:, :K] & top_scores[:, :K].isfinite() & ~done[:, None]
            length = position + 1
            new_scores = torch.where(finishing, top_scores[:, :K] / length ** length_penalty, float("-inf"))
            pool_scores, best = torch.cat([pool_scores, new_scores], dim=1).topk(K, dim=1)
            new_seqs = F.pad(top_seqs[:, :K], (0, max_length - length), value=pad)
            pool = torch.cat([pool, new_seqs], dim=1).gather(1, best[..., None].expand(-1, -1, max_length))
            pool_lengths = torch.cat([pool_lengths, torch.full_like(pool_lengths, length)], dim=1).gather(1, best)
            # The K best continuations that do not end in [SEP] (there are at least K among the 2K: each live
            # beam ends in [SEP] one way only) stay live, in score order.
            keep = is_eos.to(torch.uint8).argsort(dim=1, stable=True)[:, :K]  # [B, K]
            scores, live = top_scores.gather(1, keep), top_seqs.gather(1, keep[..., None].expand(-1, -1, length))
            tokens = live[:, :, -1].reshape(N)
            source = (first_beam + top_beams.gather(1, keep)).view(N)
            for cache in caches:
                cache.reorder(source)
            # A live beam ends at a length in [length + 1, max_length] with a sum no higher than its current one.
            best_length = max_length if length_penalty > 0 else length + 1
            can_beat = scores.max(dim=1).values / best_length ** length_penalty > pool_scores[:, -1]
            done = done | (pool_scores[:, -1].isfinite() & ~can_beat)
            if bool(done.all()):
                break
        found = pool_scores[:, 0].isfinite()
        best_live = F.pad(live.gather(1, scores.argmax(dim=1)[:, None, None].expand(-1, 1, live.shape[2]))[:, 0],
                          (0, max_length - live.shape[2]), value=pad)
        captions = torch.where(found[:, None], pool[:, 0], best_live)
        lengths = torch.where(found, pool_lengths[:, 0], live.shape[2])
        return captions[:, : int(lengths.max())]
