"""Attention on a q whose third sequence starts 2**31 elements into its storage; run in its own process by
tests/test_attention_layout.py, since an int32 offset there would crash the process or read other memory."""

import sys

import torch

from e2evlp import ops, reference


def main(device: str) -> None:
    stride = 2**30
    # 4 GiB of address space, of which only the pages holding q's rows are ever touched
    storage = torch.empty(2 * stride + 4096, dtype=torch.float16, device=device)
    q = storage.as_strided((3, 1, 16, 16), (stride, 256, 16, 1))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        q.copy_(torch.randn(3, 1, 16, 16, generator=g).half())
    k, v = (torch.randn(3, 1, 16, 16, generator=g).half().to(device).requires_grad_() for _ in range(2))
    q.requires_grad_()
    out = ops.attention(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference.attention(q64, k64, v64)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), torch.ones_like(ref))
    errors = [(a.double() - b).abs().max().item() for a, b in zip((out, *grads), (ref, *ref_grads))]
    assert max(errors) < 2e-2, errors
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1])
