"""Fused attention on a GPU at real sizes: FlashAttention's rule against float32 math, for outputs and grads."""

import pytest
import torch

from e2evlp import ops
from tests.attention_helpers import attention_errors, same_dtype_math

pytestmark = pytest.mark.cuda


def errors(fn, q, k, v, grad, **kwargs):
    """Max abs errors of fn's output and gradients against float32 math on the same inputs."""
    return attention_errors(fn, same_dtype_math, torch.float32, q, k, v, grad, **kwargs)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("padded", [True, False])  # without a mask, interior tiles take the mask-free loop
@pytest.mark.parametrize("Lq, Lk, D, causal", [(512, 512, 64, False), (512, 512, 128, True), (100, 777, 64, False),
                                              (40, 40, 64, True), (333, 1000, 80, True), (1000, 1000, 64, True)])
def test_flash_attention_rule(dtype, padded, Lq, Lk, D, causal):
    g = torch.Generator(device="cuda").manual_seed(Lq + Lk + D)
    q, k, v = (torch.randn(2, 4, n, D, device="cuda", dtype=dtype, generator=g).requires_grad_()
               for n in (Lq, Lk, Lk))
    kpm = torch.zeros(2, Lk, dtype=torch.bool, device="cuda")
    kpm[1, Lk // 2:] = True
    grad = torch.randn(2, 4, Lq, D, device="cuda", dtype=dtype, generator=g)
    kwargs = dict(causal=causal, key_padding_mask=kpm if padded else None)
    ours = errors(ops.attention, q, k, v, grad, **kwargs)
    pytorch = errors(same_dtype_math, q, k, v, grad, **kwargs)
    for mine, theirs in zip(ours, pytorch):
        assert mine <= 2 * theirs + 1e-5, (ours, pytorch)


def test_varlen_equals_padded_on_gpu():
    lengths = [300, 17, 800, 1]
    H, D = 12, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    packed = [torch.randn(sum(lengths), H, D, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(3)]
    cu = torch.tensor([0, 300, 317, 1117, 1118], dtype=torch.int32, device="cuda")
    out = ops.attention_varlen(*packed, cu, cu, 800, 800)
    padded = [torch.zeros(4, 800, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3)]
    kpm = torch.ones(4, 800, dtype=torch.bool, device="cuda")
    for b, n in enumerate(lengths):
        start = int(cu[b])
        for dst, src in zip(padded, packed):
            dst[b, :n] = src[start:start + n]
        kpm[b, :n] = False
    dense = ops.attention(*(t.transpose(1, 2) for t in padded), key_padding_mask=kpm).transpose(1, 2)
    for b, n in enumerate(lengths):
        start = int(cu[b])
        torch.testing.assert_close(out[start:start + n], dense[b, :n], rtol=2e-2, atol=2e-2)


def test_dropout_keep_fraction_on_gpu():
    from e2evlp.kernels.attention import dropout_keep_mask

    keep = dropout_keep_mask(4, 12, 256, 256, 0.1, seed=7, device="cuda")
    assert abs(keep.float().mean().item() - 0.9) < 0.01
