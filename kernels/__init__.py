"""Triton kernels of e2evlp, installed as the subpackage ``e2evlp.kernels``."""
