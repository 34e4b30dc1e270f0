"""Fine-tuning models on the shared trunk: VQA v2, NLVR2 and image-text retrieval."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from e2evlp.models.config import E2EVLPConfig
from e2evlp.models.model import E2EVLPModel, ImageTokens, init_bert_weights
from e2evlp.models.pretrained import PretrainedModule


@dataclass
class ClassifierOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None


def classifier(in_dim: int, hidden_dim: int, out_dim: int, eps: float, std: float = 0.02) -> nn.Sequential:
    """The two-layer answer/label head of LXMERT and UNITER (Linear, GELU, LayerNorm, Linear)."""
    head = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(), nn.LayerNorm(hidden_dim, eps=eps),
                         nn.Linear(hidden_dim, out_dim))
    head.apply(partial(init_bert_weights, std=std))
    return head


class E2EVLPForVQA(PretrainedModule):
    """VQA v2 as multi-label classification over ``config.num_answers`` answers from the pooled [CLS]
    state; ``labels`` [B, num_answers] are soft VQA scores in [0, 1] (binary cross-entropy, scaled by the
    number of answers as in UNITER/LXMERT)."""

    task_heads = ("vqa_head",)

    def __init__(self, config: E2EVLPConfig):
        super().__init__()
        self.config = config
        self.model = E2EVLPModel(config)
        self.vqa_head = classifier(config.hidden_size, 2 * config.hidden_size, config.num_answers,
                                   config.layer_norm_eps, config.initializer_range)

    def forward(self, pixel_values, pixel_mask, input_ids, attention_mask=None, labels=None) -> ClassifierOutput:
        encoded = self.model.encode(input_ids, attention_mask, pixel_values, pixel_mask)
        logits = self.vqa_head(self.model.pooler(encoded.hidden))  # [B, num_answers]
        loss = None
        if labels is not None:
            loss = F.binary_cross_entropy_with_logits(logits.float(), labels.float()) * labels.shape[1]
        return ClassifierOutput(logits, loss)


class E2EVLPForNLVR2(PretrainedModule):
    """NLVR2: one sentence, two images. Each (image, sentence) pair is encoded; the two pooled [CLS]
    states, concatenated, give True/False. pixel_values [B, 2, 3, H, W], pixel_mask [B, 2, H, W]."""

    task_heads = ("nlvr2_head",)

    def __init__(self, config: E2EVLPConfig):
        super().__init__()
        self.config = config
        self.model = E2EVLPModel(config)
        self.nlvr2_head = classifier(2 * config.hidden_size, 2 * config.hidden_size, 2, config.layer_norm_eps,
                                     config.initializer_range)

    def forward(self, pixel_values, pixel_mask, input_ids, attention_mask=None, labels=None) -> ClassifierOutput:
        if pixel_values.dim() != 5 or pixel_values.shape[1] != 2:
            raise ValueError(f"pixel_values must be [B, 2, 3, H, W] (two images per sentence), got "
                             f"{tuple(pixel_values.shape)}")
        B = pixel_values.shape[0]
        pairs = lambda t: None if t is None else t.repeat_interleave(2, dim=0)  # noqa: E731
        encoded = self.model.encode(pairs(input_ids), pairs(attention_mask), pixel_values.flatten(0, 1),
                                    None if pixel_mask is None else pixel_mask.flatten(0, 1))
        pooled = self.model.pooler(encoded.hidden).view(B, -1)  # [B, 2C]
        logits = self.nlvr2_head(pooled)
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return ClassifierOutput(logits, loss)


class E2EVLPForRetrieval(PretrainedModule):
    """Image-text retrieval by the pre-trained ITM head: score(text, image) = logit(match) − logit(no match)."""

    task_heads = ("itm_head",)

    def __init__(self, config: E2EVLPConfig):
        super().__init__()
        self.config = config
        self.model = E2EVLPModel(config)
        self.itm_head = nn.Linear(config.hidden_size, 2)
        init_bert_weights(self.itm_head, config.initializer_range)

    def forward(self, pixel_values, pixel_mask, input_ids, attention_mask=None, labels=None) -> ClassifierOutput:
        """Scores aligned (image, text) pairs: logits [B, 2]; labels 1 = the text describes the image."""
        encoded = self.model.encode(input_ids, attention_mask, pixel_values, pixel_mask)
        logits = self.itm_head(self.model.pooler(encoded.hidden))
        loss = None if labels is None else F.cross_entropy(logits.float(), labels)
        return ClassifierOutput(logits, loss)

    @torch.no_grad()
    def embed_gallery(self, pixel_values, pixel_mask=None, device: torch.device | str | None = None
                      ) -> list[torch.Tensor]:
        """Each image's real encoder tokens [n_i, C], on `device` (default: where they were computed): the
        backbone runs once per image, however many texts it is scored against. Galleries of several batches
        concatenate; a large one belongs on the CPU (``device="cpu"``), each scored batch is moved over.
        Retrieval never decodes, so the image positions, already inside the tokens, are not kept."""
        image = self.model.embed_image(pixel_values, pixel_mask)
        real = ~image.padding_mask  # [B, N]
        return [image.tokens[b, real[b]].to(device or image.tokens.device) for b in range(real.shape[0])]

    @torch.no_grad()
    def score_gallery(self, gallery: list[torch.Tensor], input_ids, attention_mask=None,
                      batch_size: int = 64) -> torch.Tensor:
        """Scores every text against every image of ``embed_gallery``'s output: [num_texts, num_images], in
        batches of `batch_size` pairs, each padded only to its own longest image."""
        device = input_ids.device
        num_texts, num_images = input_ids.shape[0], len(gallery)
        text_index = torch.arange(num_texts).repeat_interleave(num_images)
        image_index = torch.arange(num_images).repeat(num_texts)
        scores = []
        for start in range(0, len(text_index), batch_size):
            t, i = text_index[start:start + batch_size], image_index[start:start + batch_size]
            images = [gallery[j] for j in i.tolist()]
            tokens = pad_sequence(images, batch_first=True).to(device, non_blocking=True)  # [b, N, C]
            lengths = torch.tensor([len(x) for x in images], device=device)
            padding = torch.arange(tokens.shape[1], device=device)[None] >= lengths[:, None]  # [b, N]
            image = ImageTokens(tokens, padding, torch.zeros_like(tokens))
            encoded = self.model.encode(input_ids[t], None if attention_mask is None else attention_mask[t],
                                        image=image)
            logits = self.itm_head(self.model.pooler(encoded.hidden))
            scores.append(logits[:, 1] - logits[:, 0])
        return torch.cat(scores).view(num_texts, num_images)

    def score_matrix(self, pixel_values, pixel_mask, input_ids, attention_mask=None, batch_size: int = 64):
        """Scores every text against every image: [num_texts, num_images], in batches of `batch_size` pairs."""
        gallery = []
        for start in range(0, pixel_values.shape[0], batch_size):
            gallery += self.embed_gallery(pixel_values[start:start + batch_size],
                                          None if pixel_mask is None else pixel_mask[start:start + batch_size])
        return self.score_gallery(gallery, input_ids, attention_mask, batch_size)
