"""E2EVLPModel: ResNet grid tokens and BERT text in one encoder; one decoder for detection and captioning."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from e2evlp.models.backbone import VisualBackbone
from e2evlp.models.config import E2EVLPConfig
from e2evlp.models.heads import DetectionHeads, Pooler
from e2evlp.models.pretrained import PretrainedModule
from e2evlp.models.text import (
    IGNORED_BERT_KEYS,
    TextEmbeddings,
    bert_config_fields,
    bert_config_mismatches,
    bert_to_e2evlp_state_dict,
    load_bert_checkpoint,
)
from e2evlp.nn.attention import DecoderBlock, SelfAttentionBlock
from e2evlp.nn.packing import PackedSequences
from e2evlp.ops.dispatch import attention_backend, attention_backend_override


@dataclass
class EncoderOutput:
    hidden: torch.Tensor  # [B, L, C]: text tokens first, then image tokens
    padding_mask: torch.Tensor  # [B, L] bool, True = padding
    position: torch.Tensor  # [B, L, C]: the image tokens' 2-D sine positions, 0 for text
    num_text: int  # how many of the L positions are text


@dataclass
class ImageTokens:
    """Images as encoder input: grid tokens with their positions and the image-type embedding applied."""

    tokens: torch.Tensor  # [B, N, C]
    padding_mask: torch.Tensor  # [B, N] bool, True = padding
    position: torch.Tensor  # [B, N, C]: 2-D sine positions (also the decoder's memory positions)


def kernels_context(config: E2EVLPConfig):
    """Attention through the reference twin for kernels="reference"; the default dispatch otherwise."""
    return attention_backend_override("reference") if config.kernels == "reference" else contextlib.nullcontext()


class Encoder(nn.Module):
    """BERT-style post-LN layers over the concatenated tokens.

    With ``config.unpad_encoder`` (the default), where attention runs the fused Triton kernels (CUDA), a
    batch with padding runs packed: only its real tokens go through the layers (attention through
    ops.attention_varlen), so padded image grids and text cost no FLOPs; padding positions of the output
    are 0. That costs one host sync per call (the lengths); set it False for torch.compile(fullgraph=True)
    or CUDA graphs, which then compute the padding too. Other attention backends (CPU SDPA, the reference)
    have no varlen kernel and would re-pad in every layer, so there the padded layout is kept.
    """

    def __init__(self, config: E2EVLPConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            SelfAttentionBlock(config.hidden_size, config.num_attention_heads, config.intermediate_size,
                               config.hidden_dropout_prob, config.attention_dropout_prob, config.layer_norm_eps,
                               config.hidden_act)
            for _ in range(config.num_encoder_layers))
        self.gradient_checkpointing = config.gradient_checkpointing
        self.unpad = config.unpad_encoder

    def forward(self, hidden, padding_mask):  # [B, L, C], [B, L] -> [B, L, C]
        if not self.unpad or attention_backend(hidden.device) != "triton":
            return self._layers(hidden, padding_mask, None)
        packed = PackedSequences.from_padding_mask(padding_mask)
        if packed.total == padding_mask.numel():  # no padding: the dense layout is already packed
            return self._layers(hidden, None, None)
        return packed.unpack(self._layers(packed.pack(hidden), None, packed))  # [total, C] inside

    def _layers(self, hidden, padding_mask, packed):
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                hidden = checkpoint(layer, hidden, padding_mask, packed, use_reentrant=False)
            else:
                hidden = layer(hidden, padding_mask, packed)
        return hidden


class Decoder(nn.Module):
    """Post-LN decoder layers shared by detection (object queries) and captioning (causal tokens)."""

    def __init__(self, config: E2EVLPConfig):
        super().__init__()
        self.layers = nn.ModuleList(
            DecoderBlock(config.hidden_size, config.num_attention_heads, config.intermediate_size,
                         config.hidden_dropout_prob, config.attention_dropout_prob, config.layer_norm_eps,
                         config.hidden_act)
            for _ in range(config.num_decoder_layers))
        self.gradient_checkpointing = config.gradient_checkpointing

    def forward(self, hidden, memory: EncoderOutput, *, self_padding_mask=None, causal=False, query_pos=None):
        """hidden [B, T, C] -> every layer's output [B, T, C] (DETR's auxiliary losses use them all)."""
        states = []
        for layer in self.layers:
            # Bound now: checkpoint calls it again in backward, after the loop has moved on.
            run_layer = partial(layer, self_key_padding_mask=self_padding_mask,
                                memory_key_padding_mask=memory.padding_mask, causal=causal, query_pos=query_pos,
                                memory_pos=memory.position)
            if self.gradient_checkpointing and self.training:
                hidden = checkpoint(run_layer, hidden, memory.hidden, use_reentrant=False)
            else:
                hidden = run_layer(hidden, memory.hidden)
            states.append(hidden)
        return states


def init_bert_weights(module: nn.Module, std: float = 0.02) -> None:
    """BERT's initialization: normal(0, std) weights (BERT's initializer_range, 0.02), zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        module.weight.data.normal_(0.0, std)
        if isinstance(module, nn.Linear) and module.bias is not None:
            module.bias.data.zero_()


class E2EVLPModel(PretrainedModule):
    """The shared trunk of every E2E-VLP model (``.model`` of the task classes).

    ``encode`` embeds text (BERT embeddings) and pixels (ResNet grid → 1×1 projection, 2-D sine
    positions, a modality embedding) and runs the single-stream encoder over ``[text; image]``;
    ``detect`` runs the object queries through the decoder and the detection heads (DETR's output
    dict, with ``pred_attributes``); ``decode`` runs caption tokens (causal) through the same decoder.
    """

    def __init__(self, config: E2EVLPConfig):
        super().__init__()
        self.config = config
        self.embeddings = TextEmbeddings(config.vocab_size, config.hidden_size, config.max_position_embeddings,
                                         config.type_vocab_size, config.layer_norm_eps, config.hidden_dropout_prob,
                                         config.pad_token_id)
        self.backbone = VisualBackbone(config.backbone, config.hidden_size, config.backbone_trainable_stages,
                                       config.backbone_weights)
        self.image_type_embedding = nn.Parameter(torch.zeros(config.hidden_size))
        self.image_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = Encoder(config)
        self.pooler = Pooler(config.hidden_size)
        self.query_embeddings = nn.Embedding(config.num_queries, config.hidden_size)
        self.decoder = Decoder(config)
        self.detection = DetectionHeads(config.hidden_size, config.num_classes, config.num_attributes)
        for name, child in self.named_children():
            if name != "backbone":  # the backbone keeps torchvision's initialization
                child.apply(partial(init_bert_weights, std=config.initializer_range))

    def load_bert(self, path) -> list[str]:
        """Loads a local Hugging Face BERT checkpoint (a directory, or a weights file with config.json beside
        it) into the embeddings and encoder; returns the checkpoint keys it ignores (pooler.*, cls.*).

        A checkpoint that does not fit is a ValueError, never a partial load: its config.json differing from
        this model's config (layers, heads, sizes, layer_norm_eps, hidden_act), an embedding or encoder weight
        it lacks (left random), or a weight the model has no place for (a layer dropped)."""
        path = Path(path)
        mismatches = bert_config_mismatches(bert_config_fields(path if path.is_dir() else path.parent), self.config)
        if mismatches:
            raise ValueError(f"BERT checkpoint {path} does not fit the model: {'; '.join(mismatches)}")
        mapped, unused = bert_to_e2evlp_state_dict(load_bert_checkpoint(path))
        own = self.state_dict()
        missing = [k for k in own if k.startswith(("embeddings.", "encoder.layers.")) and k not in mapped]
        extra = [k for k in mapped if k not in own]
        extra += [k for k in unused if not k.removeprefix("bert.").startswith(IGNORED_BERT_KEYS)]
        for what, keys in (("lacks model weights", missing), ("has weights the model does not use", extra)):
            if keys:
                raise ValueError(f"BERT checkpoint {path} {what}: {keys[:8]}" + (" ..." if len(keys) > 8 else ""))
        for key, value in mapped.items():
            if own[key].shape != value.shape:
                raise ValueError(f"checkpoint {key} has shape {tuple(value.shape)}, the model expects "
                                 f"{tuple(own[key].shape)}: the checkpoint's weights do not match its config.json")
        self.load_state_dict(mapped, strict=False)
        return unused

    def embed_image(self, pixel_values, pixel_mask=None) -> ImageTokens:
        """Pixels [B, 3, H, W] (pixel_mask [B, H, W], True = real pixel) → the image's encoder tokens."""
        visual = self.backbone(pixel_values, pixel_mask)
        # Image tokens get a learned modality embedding; text keeps BERT's embeddings unchanged, so a
        # BERT checkpoint encodes text-only input exactly as BERT does.
        tokens = self.image_norm(visual.tokens + visual.position + self.image_type_embedding)
        return ImageTokens(tokens, visual.padding_mask, visual.position)

    def encode(self, input_ids=None, attention_mask=None, pixel_values=None, pixel_mask=None,
               token_type_ids=None, image: ImageTokens | None = None) -> EncoderOutput:
        """Text [B, Lt] and/or pixels [B, 3, H, W] → encoder states [B, Lt + h·w, C], text first.

        attention_mask: [B, Lt], 1 = real token (BERT's convention); pixel_mask: [B, H, W], True = real
        pixel (DETR's). Either modality may be absent. ``image`` (from ``embed_image``) replaces
        pixel_values when one image is encoded with many texts.
        """
        if pixel_values is not None and image is not None:
            raise ValueError("encode takes pixel_values or image tokens, not both")
        if pixel_values is not None:
            image = self.embed_image(pixel_values, pixel_mask)
        if input_ids is None and image is None:
            raise ValueError("encode needs input_ids, pixel_values or both")
        parts, masks, positions = [], [], []
        num_text = 0
        if input_ids is not None:
            if attention_mask is not None and attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask must match input_ids {tuple(input_ids.shape)}, got "
                                 f"{tuple(attention_mask.shape)}")
            text = self.embeddings(input_ids, token_type_ids=token_type_ids)  # [B, Lt, C], BERT's own embedding
            parts.append(text)
            masks.append(torch.zeros(input_ids.shape, dtype=torch.bool, device=text.device) if attention_mask is None
                         else attention_mask == 0)
            positions.append(torch.zeros_like(text))
            num_text = input_ids.shape[1]
        if image is not None:
            if input_ids is not None and image.tokens.shape[0] != input_ids.shape[0]:
                raise ValueError(f"pixel_values has {image.tokens.shape[0]} images but input_ids has "
                                 f"{input_ids.shape[0]} texts: the batch sizes must match")
            parts.append(image.tokens)
            masks.append(image.padding_mask)
            positions.append(image.position)
        hidden = torch.cat(parts, dim=1)
        padding_mask = torch.cat(masks, dim=1)
        with kernels_context(self.config):
            hidden = self.encoder(hidden, padding_mask)
        return EncoderOutput(hidden, padding_mask, torch.cat(positions, dim=1), num_text)

    def detect(self, memory: EncoderOutput) -> dict:
        """Object queries through the decoder → pred_logits [B, Q, C+1], pred_boxes [B, Q, 4] (cxcywh in
        [0, 1]), pred_attributes [B, Q, A], and aux_outputs for every earlier decoder layer."""
        B = memory.hidden.shape[0]
        query_pos = self.query_embeddings.weight[None].expand(B, -1, -1)  # [B, Q, C]
        with kernels_context(self.config):
            states = self.decoder(torch.zeros_like(query_pos), memory, query_pos=query_pos)
        return self.detection(states)

    def decode(self, memory: EncoderOutput, caption_ids, caption_mask=None) -> torch.Tensor:
        """Caption tokens [B, T] (causal, right-shifted by the caller) → last decoder layer states [B, T, C]."""
        if caption_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"caption has {caption_ids.shape[1]} tokens but the position table holds only "
                             f"{self.config.max_position_embeddings}")
        hidden = self.embeddings(caption_ids)
        padding = None if caption_mask is None else caption_mask == 0
        with kernels_context(self.config):
            return self.decoder(hidden, memory, self_padding_mask=padding, causal=True)[-1]
