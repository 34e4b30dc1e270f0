"""E2E-VLP models: config, the shared trunk, and the pre-training and task models."""

from e2evlp.models.captioning import CaptioningOutput, E2EVLPForCaptioning
from e2evlp.models.config import E2EVLPConfig
from e2evlp.models.model import E2EVLPModel, EncoderOutput
from e2evlp.models.pretraining import E2EVLPForPretraining, PretrainingOutput
from e2evlp.models.tasks import ClassifierOutput, E2EVLPForNLVR2, E2EVLPForRetrieval, E2EVLPForVQA

__all__ = [
    "CaptioningOutput",
    "ClassifierOutput",
    "E2EVLPConfig",
    "E2EVLPForCaptioning",
    "E2EVLPForNLVR2",
    "E2EVLPForPretraining",
    "E2EVLPForRetrieval",
    "E2EVLPForVQA",
    "E2EVLPModel",
    "EncoderOutput",
    "PretrainingOutput",
]
