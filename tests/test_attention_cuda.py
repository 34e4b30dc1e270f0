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


def first_offered(kernel, kernel_pass, d_pad, dtype, flags, loads):
    """The first candidate the autotuner would try on this GPU for a pass, with the given kind of loads."""
    from e2evlp.kernels import attention_configs as C

    major, limit = C.device_budget(torch.device("cuda"))
    candidates = [c for c in kernel.configs if C.origin(c)[1] == major and C.variant(c) == loads
                  and C.usable(c, True, flags)]
    kept = C.admissible(candidates, kernel_pass, major, limit, d_pad, torch.empty((), dtype=dtype).element_size(),
                        flags)
    return kept[0] if kept else None


@pytest.mark.parametrize("D", [32, 64, 80, 96, 128])
@pytest.mark.parametrize("loads", ["cp.async", "tma", "tma-ws"])
def test_first_offered_candidates_on_gpu(monkeypatch, D, loads):
    """The tiles users run, not only the fallback: each pass forced to its first offered candidate (the
    forward also to its first TMA and warp-specialized one on sm_90) on a padded batch with dropout off."""
    from e2evlp.kernels import attention as A
    from e2evlp.kernels import attention_backward as AB

    d_pad = max(16, 1 << (D - 1).bit_length())
    flags = dict(HAS_KPM=True, MASK_KIND=0, IS_VARLEN=False, HAS_DROPOUT=False, D_PAD=d_pad)
    forced = {}
    for kernel, kernel_pass in ((A._attention_fwd, "fwd"), (AB._attention_bwd_dkdv, "dkdv"),
                                (AB._attention_bwd_dq, "dq")):
        config = first_offered(kernel, kernel_pass, d_pad, torch.bfloat16, flags,
                               loads if kernel_pass == "fwd" else "cp.async")
        if config is None:
            pytest.skip(f"no {loads} candidate for {kernel_pass} on this GPU")
        monkeypatch.setattr(kernel, "configs", [config])  # one config: the autotuner runs it untimed
        forced[kernel_pass] = config
    g = torch.Generator(device="cuda").manual_seed(D)
    q, k, v = (torch.randn(2, 4, 300, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    kpm = torch.zeros(2, 300, dtype=torch.bool, device="cuda")
    kpm[1, 170:] = True
    grad = torch.randn(2, 4, 300, D, device="cuda", dtype=torch.bfloat16, generator=g)
    ours = errors(ops.attention, q, k, v, grad, key_padding_mask=kpm)
    pytorch = errors(same_dtype_math, q, k, v, grad, key_padding_mask=kpm)
    for mine, theirs in zip(ours, pytorch):
        assert mine <= 2 * theirs + 1e-5, (forced, ours, pytorch)
