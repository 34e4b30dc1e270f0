"""Fused attention (Triton kernels, in the interpreter on CPU) against the float64 reference, and bad inputs."""

import os

import pytest
import torch

from e2evlp import ops, reference
from tests.attention_helpers import attention_errors, same_dtype_math
from tests.helpers import DEVICE, needs_triton

pytestmark = needs_triton


def qkv(B, H, Lq, Lk, D, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, H, n, D, generator=g).to(DEVICE, dtype).requires_grad_() for n in (Lq, Lk, Lk)]


def errors_vs_fp64(fn, q, k, v, grad, **kwargs):
    """Max abs errors of fn's output and (dq, dk, dv) against the float64 reference."""
    return attention_errors(fn, reference.attention, torch.float64, q, k, v, grad, **kwargs)


def assert_close_to_reference(q, k, v, **kwargs):
    """FlashAttention's rule: our error vs float64 at most 2x that of PyTorch's math in the same dtype."""
    grad = torch.randn_like(q.detach()[..., : v.shape[-1]])
    ours = errors_vs_fp64(ops.attention, q, k, v, grad, **kwargs)
    if q.dtype == torch.float32:
        assert max(ours) < 2e-5, ours
        return
    math_errors = errors_vs_fp64(same_dtype_math, q, k, v, grad, **kwargs)
    for mine, math_err in zip(ours, math_errors):
        # +1e-5 as on the GPU: the most ours exceeded 2x math in the interpreter was 6.6e-7 (fp16, Lq = Lk = 1,
        # 50 grads), where math's dq/dk are exactly 0 and ours are float32 rounding of dP - delta.
        assert mine <= 2 * math_err + 1e-5, (ours, math_errors)


@pytest.mark.parametrize("Lq, Lk", [(1, 1), (5, 5), (17, 17), (97, 33), (5, 17)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_matches_reference_odd_lengths(Lq, Lk, dtype):
    assert_close_to_reference(*qkv(2, 2, Lq, Lk, 32, dtype, seed=Lq + Lk))


@pytest.mark.parametrize("Lq, Lk", [(17, 17), (5, 17), (17, 5), (1, 33)])
def test_causal_is_bottom_right(Lq, Lk):
    q, k, v = qkv(1, 2, Lq, Lk, 16, seed=3)
    assert_close_to_reference(q, k, v, causal=True)
    if Lq == 1:  # one new query (a KV cache step) sees every cached key
        torch.testing.assert_close(ops.attention(q, k, v, causal=True), ops.attention(q, k, v))


@pytest.mark.parametrize("head_dim", [16, 32, 40, 64, 80, 96, 128])
def test_head_dims(head_dim):
    assert_close_to_reference(*qkv(1, 1, 9, 13, head_dim, seed=head_dim))


@pytest.mark.parametrize("head_dim", [32, 40])
@pytest.mark.parametrize("scale", [-0.4, 0.0, 0.7])
@pytest.mark.parametrize("causal", [False, True])
def test_unmasked_tiles_any_scale(head_dim, scale, causal):
    """Whole key blocks take the mask-free loads (no column mask at a power-of-two head dim) and fold the
    scale into the row maxima, which a negative scale would break if the launcher did not flip it. Scores
    of a few hundred make a wrong row maximum overflow exp2."""
    q, k, v = qkv(1, 2, 40, 48, head_dim, torch.float16, seed=head_dim)
    q = (q.detach() * 30).requires_grad_()
    assert_close_to_reference(q, k, v, scale=scale, causal=causal)


def test_strided_inputs():
    """[B, L, H, D] projections viewed as [B, H, L, D], and a slice: gradients keep their strides right."""
    g = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(2, n, 3, 32, generator=g).to(DEVICE).transpose(1, 2).requires_grad_()
               for n in (9, 14, 14))
    assert_close_to_reference(q, k, v, causal=True)
    wide = torch.randn(2, 3, 14, 64, generator=g).to(DEVICE)
    assert_close_to_reference(q, wide[..., :32].requires_grad_(), wide[..., 32:].requires_grad_())


def test_key_padding_and_fully_padded_rows_give_zero():
    q, k, v = qkv(3, 2, 7, 11, 32, seed=4)
    kpm = torch.zeros(3, 11, dtype=torch.bool, device=DEVICE)
    kpm[0, 6:] = True
    kpm[2] = True  # every key of item 2 is padding
    assert_close_to_reference(q, k, v, key_padding_mask=kpm)
    out = ops.attention(q, k, v, key_padding_mask=kpm)
    assert (out[2] == 0).all()
    out.sum().backward()
    assert (q.grad[2] == 0).all() and torch.isfinite(k.grad).all() and (v.grad[2] == 0).all()


@pytest.mark.parametrize("causal", [False, True])
def test_key_blocks_past_the_last_unpadded_key_are_skipped_exactly(causal):
    """Key blocks after a sequence's last real key are never read; causal alignment still uses the full Lk."""
    from e2evlp.kernels.attention import key_end

    q, k, v = qkv(4, 2, 21, 50, 32, seed=11)
    kpm = torch.zeros(4, 50, dtype=torch.bool, device=DEVICE)
    kpm[0, 20:] = True  # trailing padding over several key blocks
    kpm[1, 5:45] = True  # padding in the middle and at the end
    kpm[2] = True
    assert key_end(kpm).tolist() == [20, 50, 0, 50]
    assert_close_to_reference(q, k, v, key_padding_mask=kpm, causal=causal)
    out = ops.attention(q, k, v, key_padding_mask=kpm, causal=causal)
    out.backward(torch.randn_like(out))
    assert (k.grad[0, :, 20:] == 0).all() and (v.grad[0, :, 20:] == 0).all() and (k.grad[2] == 0).all()


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="the interpreter's block size is known")
def test_padding_blocks_are_never_read():
    """NaN in key blocks wholly past the last real key cannot reach the output if they are never loaded
    (a masked read would give 0 · NaN = NaN)."""
    from e2evlp.kernels.attention_configs import INTERPRETER_CONFIG

    block = INTERPRETER_CONFIG.kwargs["BLOCK_N"]
    q, k, v = qkv(1, 2, 9, 4 * block, 32, seed=12)
    kpm = torch.zeros(1, 4 * block, dtype=torch.bool, device=DEVICE)
    kpm[0, block + 3:] = True
    clean = [t.detach().double().requires_grad_() for t in (q, k, v)]
    with torch.no_grad():
        k[:, :, 2 * block:] = float("nan")
        v[:, :, 2 * block:] = float("nan")
    out = ops.attention(q, k, v, key_padding_mask=kpm)
    ref = reference.attention(*clean, key_padding_mask=kpm)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref_grads = torch.autograd.grad(ref, clean, grad.double())
    for ours, theirs in zip(grads, ref_grads):
        torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(9, 13), (2, 1, 1, 13), (1, 2, 9, 13), (2, 2, 9, 13)])
@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_attn_masks_broadcast(shape, kind):
    q, k, v = qkv(2, 2, 9, 13, 32, seed=5)
    g = torch.Generator().manual_seed(6)
    if kind == "bool":
        mask = (torch.rand(shape, generator=g) > 0.4).to(DEVICE)
    else:
        mask = torch.randn(shape, generator=g).to(DEVICE)
        mask[..., 0, :] = float("-inf")  # a row masked out entirely by the additive mask
    assert_close_to_reference(q, k, v, attn_mask=mask)


def test_masks_combine_with_causal_and_padding():
    q, k, v = qkv(2, 2, 12, 12, 32, seed=7)
    kpm = torch.zeros(2, 12, dtype=torch.bool, device=DEVICE)
    kpm[1, 8:] = True
    mask = (torch.rand(12, 12, generator=torch.Generator().manual_seed(8)) > 0.3).to(DEVICE)
    assert_close_to_reference(q, k, v, key_padding_mask=kpm, attn_mask=mask, causal=True, scale=0.3)


@pytest.mark.parametrize("causal", [False, True])
def test_varlen_equals_padded(causal):
    lengths_q, lengths_k, H, D = [5, 0, 17, 3], [7, 4, 17, 1], 2, 32
    g = torch.Generator().manual_seed(9)
    q = torch.randn(sum(lengths_q), H, D, generator=g).to(DEVICE).requires_grad_()
    k = torch.randn(sum(lengths_k), H, D, generator=g).to(DEVICE).requires_grad_()
    v = torch.randn(sum(lengths_k), H, D, generator=g).to(DEVICE).requires_grad_()
    cu_q = torch.tensor([0, 5, 5, 22, 25], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 7, 11, 28, 29], dtype=torch.int32, device=DEVICE)
    out = ops.attention_varlen(q, k, v, cu_q, cu_k, 17, 17, causal=causal)
    ref = reference.attention_varlen(q.double(), k.double(), v.double(), cu_q, cu_k, 17, 17, causal=causal)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), grad)
    ref_grads = torch.autograd.grad(ref, (q, k, v), grad.double())
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-5)


def test_dropout_statistics_determinism_and_gradients():
    from e2evlp.kernels.attention import dropout_keep_mask

    p = 0.1
    keep = dropout_keep_mask(2, 4, 64, 64, p, seed=1234, device=DEVICE)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.01
    assert not torch.equal(keep[0, 0], keep[0, 1]), "heads must draw different masks"
    q, k, v = qkv(2, 2, 13, 21, 32, seed=10)
    torch.manual_seed(5)
    out = ops.attention(q, k, v, dropout_p=0.3)
    torch.manual_seed(5)
    again = ops.attention(q, k, v, dropout_p=0.3)
    assert torch.equal(out, again)
    torch.manual_seed(5)
    seed = int(torch.randint(0, 2**31 - 1, (), dtype=torch.int64))
    keep = dropout_keep_mask(2, 2, 13, 21, 0.3, seed=seed, device=DEVICE)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference.attention(q64, k64, v64, dropout_p=0.3, dropout_mask=keep)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(out)
    ref_grads = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    for a, b in zip(torch.autograd.grad(out, (q, k, v), grad), ref_grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-5, atol=1e-5)


def test_empty_inputs():
    q, k, v = qkv(2, 2, 0, 5, 32)
    assert ops.attention(q, k, v).shape == (2, 2, 0, 32)
    q, k, v = qkv(2, 2, 3, 0, 32)
    out = ops.attention(q, k, v)
    assert (out == 0).all()
    out.sum().backward()
    assert (q.grad == 0).all()


def test_opcheck_and_compile():
    q, k, v = (t.detach() for t in qkv(1, 2, 5, 7, 16, seed=11))
    kpm = torch.zeros(1, 7, dtype=torch.bool, device=DEVICE)
    kpm[0, 5:] = True
    torch.library.opcheck(torch.ops.e2evlp.attention_forward.default,
                          (q, k, v, kpm, None, None, None, 5, 7, True, 0.25, 0.0, 0),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    compiled = torch.compile(lambda a, b, c: ops.attention(a, b, c, key_padding_mask=kpm), fullgraph=True,
                             backend="aot_eager")
    torch.testing.assert_close(compiled(q, k, v), ops.attention(q, k, v, key_padding_mask=kpm))


@pytest.mark.parametrize("make_args, error, match", [
    (lambda q, k, v: (q[0], k, v), ValueError, r"q must be \[B, H, L, D\]"),
    (lambda q, k, v: (q, k.double(), v), ValueError, "k is torch.float64"),
    (lambda q, k, v: (q, k[..., :16], v[..., :16]), ValueError, "share the head dim"),
    (lambda q, k, v: (q, k, v[:, :1]), ValueError, "k and v must have the same shape"),
    (lambda q, k, v: (q, k[:1], v[:1]), ValueError, "must agree on batch and heads"),
])
def test_bad_tensors_name_the_argument(make_args, error, match):
    with pytest.raises(error, match=match):
        ops.attention(*make_args(*qkv(2, 2, 3, 4, 32)))


def test_bad_masks_and_options_name_the_argument():
    q, k, v = qkv(2, 2, 3, 4, 32)
    with pytest.raises(TypeError, match="key_padding_mask must be bool"):
        ops.attention(q, k, v, key_padding_mask=torch.zeros(2, 4, device=DEVICE))
    with pytest.raises(ValueError, match=r"key_padding_mask must be \[B, Lk\]"):
        ops.attention(q, k, v, key_padding_mask=torch.zeros(2, 3, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="attn_mask of shape"):
        ops.attention(q, k, v, attn_mask=torch.zeros(3, 3, dtype=torch.bool, device=DEVICE))
    with pytest.raises(ValueError, match="dropout_p must be in"):
        ops.attention(q, k, v, dropout_p=1.0)
    with pytest.raises(TypeError, match="Triton attention kernels, got torch.float64"):
        ops.attention(*(t.double() for t in (q, k, v)))
    with pytest.raises(ValueError, match="head dim must be in"):
        ops.attention(*qkv(1, 1, 2, 2, 257))
    with pytest.raises(TypeError, match="cu_seqlens_q must be an int32"):
        ops.attention_varlen(*(t[0].transpose(0, 1) for t in (q, k, v)), torch.tensor([0, 3]),
                             torch.tensor([0, 4], dtype=torch.int32), 3, 4)


@pytest.mark.parametrize("backend", ["sdpa", "reference"])
def test_other_backends_share_the_semantics(backend, monkeypatch):
    monkeypatch.setenv("E2EVLP_ATTENTION", backend)
    q, k, v = (t.detach().cpu().requires_grad_() for t in qkv(2, 2, 7, 11, 32, seed=12))
    kpm = torch.zeros(2, 11, dtype=torch.bool)
    kpm[1] = True
    out = ops.attention(q, k, v, key_padding_mask=kpm, causal=True)
    ref = reference.attention(q.double(), k.double(), v.double(), key_padding_mask=kpm, causal=True)
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert torch.isfinite(q.grad).all() and (q.grad[1] == 0).all()
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    packed = [torch.randn(7, 2, 16) for _ in range(3)]
    torch.testing.assert_close(ops.attention_varlen(*packed, cu, cu, 4, 4, causal=True),
                               reference.attention_varlen(*packed, cu, cu, 4, 4, causal=True), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("triton_version, numpy_version, broken", [
    ("3.6.0", "2.4.6", True), ("3.6.0", "2.3.5", False), ("3.7.0", "2.4.6", False), ("3.8.0+git1", "2.5.0", False),
])
def test_interpreter_check_names_the_incompatible_numpy(monkeypatch, triton_version, numpy_version, broken):
    import numpy
    import triton

    from e2evlp.ops.dispatch import check_interpreter

    monkeypatch.setattr(triton, "__version__", triton_version)
    monkeypatch.setattr(numpy, "__version__", numpy_version)
    check_interpreter.cache_clear()
    try:
        if broken:
            with pytest.raises(RuntimeError, match=r"install 'numpy<2.4' or Triton 3.7 or later"):
                check_interpreter()
        else:
            check_interpreter()
    finally:
        check_interpreter.cache_clear()
