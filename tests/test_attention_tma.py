"""The attention semantics tests again, with the forward loading through TMA tensor descriptors.

The interpreter runs `tl.make_tensor_descriptor` loads (zeros outside the descriptor's bounds, and the
16-byte alignment checks of the hardware), so masking, varlen, dropout and empty rows are proven on the
descriptor path here as on the pointer path; the sm_90 PTX of these candidates is checked by
tests/test_attention_inspect.py.
"""

import pytest
import torch
import triton

from e2evlp import ops
from tests.helpers import DEVICE, needs_triton
from tests.test_attention import *  # noqa: F403  (the same tests, collected again under the TMA forward)
from tests.test_attention import assert_close_to_reference, qkv

pytestmark = needs_triton


@pytest.fixture(autouse=True)
def tma_forward(monkeypatch):
    from e2evlp.kernels import attention as A
    from e2evlp.kernels.attention_configs import INTERPRETER_CONFIG, triton_interpreting

    if not triton_interpreting():
        pytest.skip("forces the interpreter's one config to its TMA twin; on a GPU the autotuner picks")
    tma = triton.Config({**INTERPRETER_CONFIG.kwargs, "USE_TMA": True}, num_warps=INTERPRETER_CONFIG.num_warps,
                        num_stages=INTERPRETER_CONFIG.num_stages)
    monkeypatch.setattr(A._attention_fwd, "configs", [tma])


def test_descriptor_path_is_the_one_running(monkeypatch):
    """The fixture's config reaches the kernel: a descriptor load over a misaligned row stride fails."""
    q, k, v = qkv(1, 1, 5, 5, 12, torch.float16)  # 24-byte rows: not a multiple of 16
    with pytest.raises(Exception, match="16-byte aligned"):
        ops.attention(q, k, v)


@pytest.mark.parametrize("head_dim", [16, 24, 64])
@pytest.mark.parametrize("Lq, Lk", [(1, 40), (33, 17), (40, 48)])
def test_tma_bounds_do_the_masking(head_dim, Lq, Lk):
    """Rows past each length and columns past the head dim come back as zeros from the descriptor."""
    torch.manual_seed(head_dim + Lq)
    assert_close_to_reference(*qkv(2, 2, Lq, Lk, head_dim, torch.float16, seed=Lq * Lk), causal=Lq <= Lk)
    kpm = torch.zeros(2, Lk, dtype=torch.bool, device=DEVICE)
    kpm[1, Lk // 2:] = True
    assert_close_to_reference(*qkv(2, 2, Lq, Lk, head_dim, torch.float16, seed=head_dim), key_padding_mask=kpm)
