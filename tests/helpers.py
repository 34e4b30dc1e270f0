"""Helpers shared by many test files: seeded generators and the skip for tests that need Triton's kernels."""

import os

import pytest
import torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# The Triton kernels run on a GPU, or on the CPU in Triton's interpreter (conftest turns it on without a GPU).
needs_triton = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                                  reason="needs the Triton interpreter (TRITON_INTERPRET=1) or a GPU")


def gen(seed: int = 0) -> torch.Generator:
    """A CPU generator seeded with `seed`: each test draws its own reproducible inputs."""
    return torch.Generator().manual_seed(seed)
