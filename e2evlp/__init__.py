"""e2evlp: E2E-VLP (end-to-end vision-language pre-training) with fused attention and a batched Hungarian matcher."""

__version__ = "0.1.0"
