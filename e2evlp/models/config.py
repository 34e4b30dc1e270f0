"""E2EVLPConfig: every size and weight of the model, with the tiny / small / base presets."""

from __future__ import annotations

from transformers import PretrainedConfig

# Here rather than in models.backbone, which builds them, so the config validates without importing torchvision.
BACKBONES = ("resnet18", "resnet34", "resnet50", "resnet101", "tiny")
KERNELS = ("fused", "reference")


class E2EVLPConfig(PretrainedConfig):
    """Sizes the paper leaves open are fields (defaults: the ``base`` preset, BERT-base + ResNet-50).

    ``kernels="fused"`` runs e2evlp's fast ops (Triton attention, fused matcher and box losses);
    ``"reference"`` runs their plain twins from ``e2evlp.reference`` (SDPA-free attention math, DETR's
    scipy matcher and criterion) — same numbers, for checking and benchmarking. ``unpad_encoder`` runs the
    encoder on the real tokens only where the Triton kernels run attention (see ``Encoder``); False keeps
    the padded layout everywhere, with no host sync.
    """

    model_type = "e2evlp"

    def __init__(self, backbone: str = "resnet50", backbone_trainable_stages: int = 3,
                 backbone_weights: str | None = None, hidden_size: int = 768, num_attention_heads: int = 12,
                 num_encoder_layers: int = 12, num_decoder_layers: int = 6, intermediate_size: int = 3072,
                 hidden_act: str = "gelu", hidden_dropout_prob: float = 0.1, attention_dropout_prob: float = 0.1,
                 layer_norm_eps: float = 1e-12, vocab_size: int = 30522, max_position_embeddings: int = 512,
                 type_vocab_size: int = 2, max_text_length: int = 40, max_caption_length: int = 40,
                 pad_token_id: int = 0, cls_token_id: int = 101, sep_token_id: int = 102, mask_token_id: int = 103,
                 num_queries: int = 100, num_classes: int = 1600, num_attributes: int = 400,
                 num_answers: int = 3129, mlm_weight: float = 1.0, itm_weight: float = 1.0,
                 detection_weight: float = 1.0, caption_weight: float = 1.0, class_loss_coef: float = 1.0,
                 bbox_loss_coef: float = 5.0, giou_loss_coef: float = 2.0, attribute_loss_coef: float = 1.0,
                 eos_coef: float = 0.1, match_cost_class: float = 1.0, match_cost_bbox: float = 5.0,
                 match_cost_giou: float = 2.0, kernels: str = "fused", gradient_checkpointing: bool = False,
                 unpad_encoder: bool = True, initializer_range: float = 0.02, **kwargs):
        if backbone not in BACKBONES:
            raise ValueError(f"backbone must be one of {BACKBONES}, got {backbone!r}")
        if kernels not in KERNELS:
            raise ValueError(f"kernels must be one of {KERNELS}, got {kernels!r}")
        if hidden_size % num_attention_heads:
            raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_attention_heads "
                             f"({num_attention_heads})")
        if max(max_text_length, max_caption_length) > max_position_embeddings:
            raise ValueError(f"max_text_length and max_caption_length must fit max_position_embeddings "
                             f"({max_position_embeddings})")
        # The base class first: transformers 4.x's __init__ sets pad_token_id and sep_token_id from its kwargs
        # (None when absent), which would overwrite ours; 5.x leaves them alone.
        super().__init__(**kwargs)
        self.backbone, self.backbone_trainable_stages = backbone, backbone_trainable_stages
        self.backbone_weights = backbone_weights
        self.hidden_size, self.num_attention_heads = hidden_size, num_attention_heads
        self.num_encoder_layers, self.num_decoder_layers = num_encoder_layers, num_decoder_layers
        self.intermediate_size, self.hidden_act = intermediate_size, hidden_act
        self.hidden_dropout_prob, self.attention_dropout_prob = hidden_dropout_prob, attention_dropout_prob
        self.layer_norm_eps = layer_norm_eps
        self.vocab_size, self.max_position_embeddings = vocab_size, max_position_embeddings
        self.type_vocab_size = type_vocab_size
        self.max_text_length, self.max_caption_length = max_text_length, max_caption_length
        self.pad_token_id, self.cls_token_id = pad_token_id, cls_token_id
        self.sep_token_id, self.mask_token_id = sep_token_id, mask_token_id
        self.num_queries, self.num_classes, self.num_attributes = num_queries, num_classes, num_attributes
        self.num_answers = num_answers
        self.mlm_weight, self.itm_weight = mlm_weight, itm_weight
        self.detection_weight, self.caption_weight = detection_weight, caption_weight
        self.class_loss_coef, self.bbox_loss_coef = class_loss_coef, bbox_loss_coef
        self.giou_loss_coef, self.attribute_loss_coef, self.eos_coef = giou_loss_coef, attribute_loss_coef, eos_coef
        self.match_cost_class, self.match_cost_bbox = match_cost_class, match_cost_bbox
        self.match_cost_giou = match_cost_giou
        self.kernels, self.gradient_checkpointing = kernels, gradient_checkpointing
        self.unpad_encoder = unpad_encoder
        self.initializer_range = initializer_range

    @property
    def backbone_stride(self) -> int:
        """Pixels per visual token side: batches padded to a multiple of it waste no partial tokens."""
        return 16 if self.backbone == "tiny" else 32

    @classmethod
    def tiny(cls, **overrides) -> E2EVLPConfig:
        """A few hundred thousand parameters: tests and the demo, trains on 2 CPU cores in minutes.

        BERT's 0.02 initializer is sized for width 768; at width 64 it leaves every [CLS] state nearly the same
        across inputs (ITM sat at chance for over 1,000 steps in our runs), so the tiny model starts at 0.1."""
        fields = dict(backbone="tiny", backbone_trainable_stages=4, hidden_size=64, num_attention_heads=2,
                      num_encoder_layers=2, num_decoder_layers=2, intermediate_size=128, max_position_embeddings=64,
                      max_text_length=24, max_caption_length=24, num_queries=10, num_classes=20, num_attributes=8,
                      num_answers=16, initializer_range=0.1)
        return cls(**{**fields, **overrides})

    @classmethod
    def small(cls, **overrides) -> E2EVLPConfig:
        """A MiniLM-L6-H384-shaped encoder (6 × 384, 12 heads), so a MiniLM/BERT checkpoint loads into it."""
        fields = dict(backbone="resnet18", hidden_size=384, num_attention_heads=12, num_encoder_layers=6,
                      num_decoder_layers=3, intermediate_size=1536, num_queries=50)
        return cls(**{**fields, **overrides})

    @classmethod
    def base(cls, **overrides) -> E2EVLPConfig:
        """The paper's model: ResNet-50, BERT-base encoder (12 × 768, 12 heads), 6-layer decoder, 100 queries."""
        return cls(**overrides)
