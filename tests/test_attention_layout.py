"""Fused attention at the edges of memory layout and scale: 64-bit offsets, grid limits, strided masks,
Hugging Face-style additive masks, packed qkv views, varlen offsets and varlen dropout."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from e2evlp import ops, reference
from tests.helpers import DEVICE, needs_triton

pytestmark = [needs_triton, pytest.mark.gpu_check]

# q's third sequence starts 2**31 elements into its storage: an int32 offset would wrap to a negative
# address (a crash or a silent read of other memory), so the check runs in a process of its own.
FAR_OFFSETS = Path(__file__).with_name("far_offsets_worker.py")


def test_offsets_past_two_to_the_31_elements():
    if DEVICE == "cuda" and torch.cuda.get_device_properties(0).total_memory < 8 * 2**30:
        pytest.skip("needs 4 GiB of GPU memory")
    result = subprocess.run([sys.executable, str(FAR_OFFSETS), DEVICE], capture_output=True, text=True, timeout=600,
                            env=os.environ.copy())
    assert result.returncode == 0 and result.stdout.strip() == "ok", (result.returncode, result.stderr[-3000:])


def test_launch_grid_keeps_heads_and_sequences_off_the_limited_axes():
    from e2evlp.kernels.attention import MAX_GRID_YZ, Problem

    def problem(B, H):
        q = torch.empty(B, H, 1, 16)
        return Problem(q, q, q, None, None, None, None, 1, 1, False, 0.25, 0.0, 0)

    grid = problem(6000, 12).grid(1, "BLOCK_M")({"BLOCK_M": 16})  # B * H = 72000 > 65535
    assert grid == (1, 12, 6000)
    with pytest.raises(ValueError, match=f"at most {MAX_GRID_YZ} sequences per call"):
        problem(MAX_GRID_YZ + 1, 1)


def test_transposed_key_padding_mask():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(3, 2, n, 16, generator=g).to(DEVICE) for n in (5, 9, 9))
    kpm = torch.rand(9, 3, generator=g).to(DEVICE).t() > 0.6  # strides (1, 3): keys are not unit-stride
    assert kpm.stride() == (1, 3)
    torch.testing.assert_close(ops.attention(q, k, v, key_padding_mask=kpm),
                               ops.attention(q, k, v, key_padding_mask=kpm.contiguous()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_additive_mask_of_finfo_min_matches_the_reference(dtype):
    """Hugging Face masks with finfo(dtype).min, not -inf: a row masked that way is softmax over equal
    scores in the reference and in SDPA, not an empty row."""
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(1, 1, n, 16, generator=g).to(DEVICE) for n in (4, 6, 6))
    mask = torch.zeros(1, 1, 4, 6, device=DEVICE)
    mask[..., 0, :] = torch.finfo(dtype).min  # query 0: every key masked
    mask[..., 1, 3:] = torch.finfo(dtype).min
    out = ops.attention(q, k, v, attn_mask=mask)
    ref = reference.attention(q.double(), k.double(), v.double(), attn_mask=mask.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert out[0, 0, 0].abs().sum() > 0


def test_gradients_of_packed_qkv_views_are_dense():
    """q, k and v sliced out of one [B, L, 3, H, D] projection: each gradient holds only its own elements."""
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(2, 7, 3, 2, 16, generator=g).to(DEVICE).requires_grad_()
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, L, D], with gaps
    out = ops.attention(q, k, v, causal=True)
    *grads, qkv_grad = torch.autograd.grad(out, (q, k, v, qkv), torch.ones_like(out))
    for grad in grads:
        assert grad.untyped_storage().nbytes() == grad.numel() * grad.element_size()
    qkv64 = qkv.detach().double().requires_grad_()
    ref = reference.attention(*qkv64.permute(2, 0, 3, 1, 4).unbind(0), causal=True)
    torch.testing.assert_close(qkv_grad.double(), torch.autograd.grad(ref, qkv64, torch.ones_like(ref))[0],
                               rtol=1e-5, atol=1e-5)


def test_varlen_dropout_drops_what_its_padded_twin_drops():
    lengths, H, D, p = [5, 9, 2], 2, 16, 0.3
    g = torch.Generator().manual_seed(4)
    padded = [torch.randn(3, H, 9, D, generator=g).to(DEVICE) for _ in range(3)]
    kpm = torch.arange(9, device=DEVICE)[None, :] >= torch.tensor(lengths, device=DEVICE)[:, None]
    rows = ~kpm
    packed = [t.transpose(1, 2)[rows] for t in padded]  # [total, H, D]
    cu = torch.tensor([0, 5, 14, 16], dtype=torch.int32, device=DEVICE)
    torch.manual_seed(7)
    out_padded = ops.attention(*padded, key_padding_mask=kpm, dropout_p=p)
    torch.manual_seed(7)
    out_packed = ops.attention_varlen(*packed, cu, cu, 9, 9, dropout_p=p)
    torch.testing.assert_close(out_packed, out_padded.transpose(1, 2)[rows])


def test_varlen_offsets_are_checked():
    q = torch.randn(6, 1, 16, device=DEVICE)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32, device=DEVICE)
    bad = [(torch.tensor([1, 2, 6], dtype=torch.int32), "must start at 0 and never decrease"),
           (torch.tensor([0, 4, 3], dtype=torch.int32), "must start at 0 and never decrease"),
           (torch.tensor([0, 2, 7], dtype=torch.int32), "ends at 7 but q has 6 rows")]
    for cu_q, match in bad:
        with pytest.raises(ValueError, match=f"cu_seqlens_q {match}"):
            ops.attention_varlen(q, q, q, cu_q.to(DEVICE), cu, 4, 4, validate=True)
    with pytest.raises(ValueError, match="max_seqlen_k is 3 but a sequence of k has 4 rows"):
        ops.attention_varlen(q, q, q, cu, cu, 4, 3, validate=True)
    short_k = torch.tensor([0, 2, 5], dtype=torch.int32, device=DEVICE)  # k's last row unused: allowed
    assert ops.attention_varlen(q, q, q, cu, short_k, 4, 4, validate=True).shape == q.shape
