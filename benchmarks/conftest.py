"""pytest setup for the benchmark suite: without a GPU the Triton kernels run in the interpreter, as in tests/."""

import os

import torch

if not torch.cuda.is_available():
    # Before anything imports triton: the kernels are interpreted or not from their definition on.
    os.environ.setdefault("TRITON_INTERPRET", "1")
