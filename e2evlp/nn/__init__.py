"""Drop-in modules built on e2evlp's fast ops: HungarianMatcher, SetCriterion (and, later, attention layers)."""

from e2evlp.nn.criterion import SetCriterion
from e2evlp.nn.matcher import HungarianMatcher, Matching
from e2evlp.nn.targets import PaddedTargets, pad_targets

__all__ = ["HungarianMatcher", "Matching", "PaddedTargets", "SetCriterion", "pad_targets"]
