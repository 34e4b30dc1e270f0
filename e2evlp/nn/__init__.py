"""Drop-in modules on e2evlp's fast ops: matcher, set criterion, MultiheadAttention, transformer layers."""

from e2evlp.nn.attention import DecoderBlock, SelfAttentionBlock
from e2evlp.nn.criterion import SetCriterion, weighted_total
from e2evlp.nn.matcher import HungarianMatcher, Matching
from e2evlp.nn.multihead_attention import MultiheadAttention, MultiheadAttentionInputError
from e2evlp.nn.targets import PaddedTargets, pad_targets, validate_targets

__all__ = [
    "DecoderBlock",
    "HungarianMatcher",
    "Matching",
    "MultiheadAttention",
    "MultiheadAttentionInputError",
    "PaddedTargets",
    "SelfAttentionBlock",
    "SetCriterion",
    "pad_targets",
    "validate_targets",
    "weighted_total",
]
