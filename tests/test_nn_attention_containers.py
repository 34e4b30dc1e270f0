"""e2evlp.nn.MultiheadAttention inside torch's transformer layers, and at the dtypes and sizes torch's module takes."""

import contextlib
import copy

import pytest
import torch
from torch import nn

from e2evlp import nn as enn
from tests.helpers import gen

E, H, FFN = 32, 2, 64
B, L, S = 3, 7, 9  # batch, target length, memory length
ATOL = 1e-5
GRAD_MODES = {"grad": contextlib.nullcontext, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}


def with_ours(layer: nn.Module, names=("self_attn",)) -> nn.Module:
    """A copy of torch's layer whose attention modules are ours, loaded with the same weights."""
    layer = copy.deepcopy(layer)
    for name in names:
        theirs = getattr(layer, name)
        ours = enn.MultiheadAttention(theirs.embed_dim, theirs.num_heads, dropout=theirs.dropout,
                                      batch_first=theirs.batch_first)
        ours.load_state_dict(theirs.state_dict())
        setattr(layer, name, ours)
    return layer


def sequences(length, batch_first, seed):
    shape = (B, length, E) if batch_first else (length, B, E)
    return torch.randn(shape, generator=gen(seed))


def key_padding(length, seed):
    """bool [B, length], True = padding: right-aligned, as torch's nested-tensor path requires."""
    lengths = torch.randint(1, length + 1, (B,), generator=gen(seed))
    lengths[0] = length
    return torch.arange(length)[None, :] >= lengths[:, None]


def real_positions(out, padding, batch_first):
    """out with the padded positions zeroed: torch's nested-tensor path leaves zeros there."""
    keep = ~padding if batch_first else ~padding.T
    return out * keep[..., None]


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("grad_mode", list(GRAD_MODES))
@pytest.mark.parametrize("masks", ["padding", "causal"])
def test_inside_torch_encoder_layer(batch_first, training, grad_mode, masks):
    torch.manual_seed(0)
    theirs = nn.TransformerEncoderLayer(E, H, FFN, dropout=0.0, batch_first=batch_first).train(training)
    ours = with_ours(theirs)
    src, padding = sequences(L, batch_first, 1), key_padding(L, 2)
    kwargs = ({"src_key_padding_mask": padding} if masks == "padding" else
              {"src_mask": nn.Transformer.generate_square_subsequent_mask(L), "is_causal": True})
    with GRAD_MODES[grad_mode]():
        expected, got = theirs(src, **kwargs), ours(src, **kwargs)
    if masks == "padding":  # eval without grad runs torch's fast path, which may leave padded positions as they are
        expected, got = real_positions(expected, padding, batch_first), real_positions(got, padding, batch_first)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype stage")
@pytest.mark.parametrize("grad_mode", list(GRAD_MODES))
def test_inside_torch_encoder_with_nested_tensors(grad_mode):
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(E, H, FFN, dropout=0.0, batch_first=True)
    theirs = nn.TransformerEncoder(layer, 2, enable_nested_tensor=True).eval()
    ours = copy.deepcopy(theirs)
    ours.layers = nn.ModuleList(with_ours(block) for block in ours.layers)
    src, padding = sequences(L, True, 3), key_padding(L, 4)
    with GRAD_MODES[grad_mode]():
        expected, got = theirs(src, src_key_padding_mask=padding), ours(src, src_key_padding_mask=padding)
    torch.testing.assert_close(real_positions(got, padding, True), real_positions(expected, padding, True),
                               atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("grad_mode", ["grad", "no_grad"])
def test_inside_torch_decoder_layer(batch_first, training, grad_mode):
    torch.manual_seed(0)
    theirs = nn.TransformerDecoderLayer(E, H, FFN, dropout=0.0, batch_first=batch_first).train(training)
    ours = with_ours(theirs, ("self_attn", "multihead_attn"))
    tgt, memory = sequences(L, batch_first, 5), sequences(S, batch_first, 6)
    causal = torch.ones(L, L, dtype=torch.bool).triu(1)  # bool like the padding masks (torch warns on a mix)
    kwargs = {"tgt_mask": causal, "tgt_is_causal": True,
              "tgt_key_padding_mask": key_padding(L, 7), "memory_key_padding_mask": key_padding(S, 8)}
    with GRAD_MODES[grad_mode]():
        expected, got = theirs(tgt, memory, **kwargs), ours(tgt, memory, **kwargs)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)


def test_encoder_layer_gradients_match_torch():
    torch.manual_seed(0)
    theirs = nn.TransformerEncoderLayer(E, H, FFN, dropout=0.0)
    ours = with_ours(theirs)
    src, padding = sequences(L, False, 9), key_padding(L, 10)
    weights = torch.randn(L, B, E, generator=gen(11))
    for layer in (theirs, ours):
        (layer(src, src_key_padding_mask=padding) * weights).sum().backward()
    for (name, p_theirs), p_ours in zip(theirs.named_parameters(), ours.parameters()):
        torch.testing.assert_close(p_ours.grad, p_theirs.grad, atol=ATOL, rtol=1e-4, msg=name)


def test_merge_masks_equals_torchs():
    theirs, ours = nn.MultiheadAttention(E, H, batch_first=True), enn.MultiheadAttention(E, H, batch_first=True)
    query = torch.randn(B, L, E)
    attn_masks = [None, torch.rand(L, L, generator=gen(1)) < 0.3, torch.randn(L, L, generator=gen(2)),
                  torch.rand(B * H, L, L, generator=gen(3)) < 0.3]
    paddings = [None, key_padding(L, 4), torch.randn(B, L, generator=gen(5))]
    for attn_mask in attn_masks:
        for padding in paddings:
            (merged_t, kind_t), (merged_o, kind_o) = (module.merge_masks(attn_mask, padding, query)
                                                      for module in (theirs, ours))
            assert kind_o == kind_t
            assert (merged_o is None and merged_t is None) or (merged_o.dtype == merged_t.dtype
                                                               and torch.equal(merged_o, merged_t))


@pytest.mark.parametrize("embed_dim, heads, dtype", [(32, 2, torch.float64), (544, 2, torch.float32)])
def test_dtypes_and_head_dims_the_kernels_do_not_take(embed_dim, heads, dtype):
    """float64 and a head dim of 272 (> 256) run, as in torch's module, and give its values."""
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(embed_dim, heads, batch_first=True, dtype=dtype).train()
    ours = enn.MultiheadAttention(embed_dim, heads, batch_first=True, dtype=dtype).train()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(B, L, embed_dim, generator=gen(12), dtype=dtype, requires_grad=True)
    padding = key_padding(L, 13)
    results = []
    for module in (theirs, ours):
        out = module(x, x, x, key_padding_mask=padding, need_weights=False)[0]
        results.append((out, *torch.autograd.grad(out.sum(), (x, module.in_proj_weight))))
    for got, expected in zip(results[1], results[0]):
        torch.testing.assert_close(got, expected, atol=ATOL, rtol=1e-5)
