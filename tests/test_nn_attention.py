"""e2evlp.nn.MultiheadAttention against torch.nn.MultiheadAttention, and the E2E-VLP transformer blocks."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from e2evlp import nn as enn
from tests.helpers import gen

E, H = 32, 2  # head dim 16: the smallest the fused kernels are built for
ATOL = 1e-5
LENGTHS = [(1, 1), (5, 5), (17, 17), (5, 17), (17, 1)]  # (Lq, Lk)


def pair(seed=0, **kwargs):
    """torch's MultiheadAttention with random weights (biases too), and ours loaded from its state_dict."""
    torch.manual_seed(seed)
    theirs = nn.MultiheadAttention(E, H, **kwargs)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=gen(seed + p.numel())) * 0.3)
    ours = enn.MultiheadAttention(E, H, **kwargs)
    ours.load_state_dict(theirs.state_dict())
    return theirs.eval(), ours.eval()


def inputs(B, Lq, Lk, *, batch_first=False, self_attention=False, kdim=E, vdim=E, seed=0):
    """query, key, value in torch's layout; self-attention passes the same tensor three times."""
    g = gen(seed)
    shape = (lambda L, C: (B, L, C)) if batch_first else (lambda L, C: (L, B, C))
    query = torch.randn(shape(Lq, E), generator=g)
    if self_attention:
        return query, query, query
    return query, torch.randn(shape(Lk, kdim), generator=g), torch.randn(shape(Lk, vdim), generator=g)


def padding(B, Lk, seed=0):
    """bool [B, Lk], True = padding, leaving every row at least one key."""
    mask = torch.rand(B, Lk, generator=gen(seed)) < 0.4
    mask[:, 0] = False
    return mask


def as_additive(bool_mask, seed=0, noise=0.5):
    """torch's float form of a bool 'True = masked' mask: -inf there, offsets of std `noise` elsewhere."""
    offsets = torch.randn(bool_mask.shape, generator=gen(seed)) * noise
    return offsets.masked_fill(bool_mask, float("-inf"))


def attention_mask(B, Lq, Lk, dims, seed=0):
    """torch's bool attn_mask (True = not allowed), [Lq, Lk] or [B*H, Lq, Lk], key 0 always allowed."""
    shape = (Lq, Lk) if dims == 2 else (B * H, Lq, Lk)
    mask = torch.rand(shape, generator=gen(seed)) < 0.4
    mask[..., 0] = False
    return mask


def causal_mask(L):
    return torch.ones(L, L, dtype=torch.bool).triu(1)  # torch's convention: True = may not attend


def assert_close(ours, theirs, atol=ATOL):
    torch.testing.assert_close(ours, theirs, atol=atol, rtol=1e-5)


def compare(theirs, ours, query, key, value, *, need_weights=False, **kwargs):
    """Outputs (and weights) of both modules on the same call."""
    out_t, w_t = theirs(query, key, value, need_weights=need_weights, **kwargs)
    out_o, w_o = ours(query, key, value, need_weights=need_weights, **kwargs)
    assert_close(out_o, out_t)
    if need_weights:
        assert_close(w_o, w_t)
    else:
        assert w_o is None


@pytest.mark.parametrize("kwargs", [{}, {"kdim": 12, "vdim": 20}, {"add_bias_kv": True}, {"bias": False}])
def test_state_dict_keys_and_shapes_match_torch(kwargs):
    theirs, ours = pair(**kwargs)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in theirs.state_dict().items()}
    assert isinstance(ours.out_proj, nn.Linear)
    for name in ("embed_dim", "num_heads", "head_dim", "kdim", "vdim", "dropout", "batch_first",
                 "add_zero_attn", "_qkv_same_embed_dim"):
        assert getattr(ours, name) == getattr(theirs, name), name


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("lengths", LENGTHS)
@pytest.mark.parametrize("need_weights", [False, True])
def test_cross_attention_matches_torch(batch_first, lengths, need_weights):
    theirs, ours = pair(batch_first=batch_first)
    compare(theirs, ours, *inputs(3, *lengths, batch_first=batch_first), need_weights=need_weights)


@pytest.mark.parametrize("batch_first", [False, True])
@pytest.mark.parametrize("L", [1, 5, 17])
def test_self_attention_matches_torch(batch_first, L):
    theirs, ours = pair(batch_first=batch_first)
    x = inputs(2, L, L, batch_first=batch_first, self_attention=True)
    compare(theirs, ours, *x, key_padding_mask=padding(2, L))
    compare(theirs, ours, *x, key_padding_mask=padding(2, L), need_weights=True)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("lengths", LENGTHS)
def test_key_padding_mask_matches_torch(kind, lengths):
    batch_first = kind == "bool"  # both layouts, without doubling the cases
    theirs, ours = pair(batch_first=batch_first)
    mask = padding(3, lengths[1])
    mask = mask if kind == "bool" else as_additive(mask)
    for need_weights in (False, True):
        compare(theirs, ours, *inputs(3, *lengths, batch_first=batch_first), key_padding_mask=mask,
                need_weights=need_weights)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("lengths", [(1, 1), (5, 17), (17, 17)])
def test_attn_mask_matches_torch(kind, dims, lengths):
    theirs, ours = pair()
    B, (Lq, Lk) = 2, lengths
    mask, keys = attention_mask(B, Lq, Lk, dims), padding(B, Lk, seed=1)
    if kind == "float":
        mask, keys = as_additive(mask), as_additive(keys, seed=1)
    for need_weights in (False, True):
        compare(theirs, ours, *inputs(B, Lq, Lk), attn_mask=mask, need_weights=need_weights)
        compare(theirs, ours, *inputs(B, Lq, Lk), attn_mask=mask, key_padding_mask=keys,
                need_weights=need_weights)


@pytest.mark.filterwarnings("ignore:Support for mismatched")
def test_mixed_mask_types_match_torch():
    theirs, ours = pair()
    B, Lq, Lk = 2, 5, 7
    bool_mask, bool_keys = attention_mask(B, Lq, Lk, 3), padding(B, Lk)
    compare(theirs, ours, *inputs(B, Lq, Lk), attn_mask=bool_mask, key_padding_mask=as_additive(bool_keys))
    compare(theirs, ours, *inputs(B, Lq, Lk), attn_mask=as_additive(bool_mask), key_padding_mask=bool_keys)


@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("with_padding", [False, True])
@pytest.mark.parametrize("need_weights", [False, True])
def test_is_causal_matches_torch(kind, with_padding, need_weights):
    theirs, ours = pair(batch_first=True)
    B, L = 3, 17
    mask = causal_mask(L) if kind == "bool" else as_additive(causal_mask(L), noise=0)
    keys = padding(B, L) if with_padding else None
    keys = keys if keys is None or kind == "bool" else as_additive(keys, noise=0)
    x = inputs(B, L, L, batch_first=True, self_attention=True)
    kwargs = {"attn_mask": mask, "key_padding_mask": keys, "need_weights": need_weights}
    expected, _ = theirs(*x, **kwargs, is_causal=True)
    assert_close(ours(*x, **kwargs, is_causal=True)[0], expected)
    # ours needs no mask to go with the flag
    assert_close(ours(*x, key_padding_mask=keys, need_weights=need_weights, is_causal=True)[0], expected)


@pytest.mark.parametrize("lengths", [(1, 1), (5, 17), (17, 5)])
@pytest.mark.parametrize("batch_first", [False, True])
def test_kdim_vdim_match_torch(lengths, batch_first):
    theirs, ours = pair(kdim=12, vdim=20, batch_first=batch_first)
    x = inputs(2, *lengths, kdim=12, vdim=20, batch_first=batch_first)
    compare(theirs, ours, *x, key_padding_mask=padding(2, lengths[1]))
    compare(theirs, ours, *x, attn_mask=attention_mask(2, *lengths, 3), need_weights=True,
            average_attn_weights=False)


@pytest.mark.parametrize("extra", [{"add_bias_kv": True}, {"add_zero_attn": True},
                                   {"add_bias_kv": True, "add_zero_attn": True}])
@pytest.mark.parametrize("lengths", [(1, 1), (5, 17)])
@pytest.mark.parametrize("need_weights", [False, True])
def test_bias_kv_and_zero_attn_match_torch(extra, lengths, need_weights):
    theirs, ours = pair(**extra)
    B, (Lq, Lk) = 2, lengths
    x = inputs(B, Lq, Lk)
    compare(theirs, ours, *x, need_weights=need_weights)
    compare(theirs, ours, *x, key_padding_mask=padding(B, Lk), attn_mask=attention_mask(B, Lq, Lk, 3),
            need_weights=need_weights, average_attn_weights=False)
    compare(theirs, ours, *x, key_padding_mask=as_additive(padding(B, Lk)),
            attn_mask=as_additive(attention_mask(B, Lq, Lk, 2)), need_weights=need_weights)


@pytest.mark.parametrize("extra", [{"add_bias_kv": True}, {"add_zero_attn": True}])
def test_is_causal_with_appended_keys_masks_real_keys_only(extra):
    # torch applies the (padded) attn_mask here: the appended keys stay visible to every query
    theirs, ours = pair(batch_first=True, **extra)
    x = inputs(2, 9, 9, batch_first=True, self_attention=True)
    expected, _ = theirs(*x, attn_mask=causal_mask(9), need_weights=True)
    assert_close(ours(*x, is_causal=True)[0], expected)


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("average", [False, True])
@pytest.mark.parametrize("lengths", [(1, 1), (5, 17)])
def test_unbatched_matches_torch(need_weights, average, lengths):
    theirs, ours = pair(add_bias_kv=True)
    Lq, Lk = lengths
    query, key, value = (t[:, 0] for t in inputs(1, Lq, Lk))  # [L, E]
    kwargs = {"need_weights": need_weights, "average_attn_weights": average}
    compare(theirs, ours, query, key, value, key_padding_mask=padding(1, Lk)[0], **kwargs)
    compare(theirs, ours, query, key, value, attn_mask=attention_mask(1, Lq, Lk, 3), **kwargs)  # [H, Lq, Lk]
    compare(theirs, ours, query, key, value, attn_mask=as_additive(attention_mask(1, Lq, Lk, 2)), **kwargs)


@pytest.mark.parametrize("average", [False, True])
def test_weights_match_torch(average):
    theirs, ours = pair()
    B, Lq, Lk = 3, 5, 17
    x = inputs(B, Lq, Lk)
    kwargs = {"key_padding_mask": padding(B, Lk), "attn_mask": attention_mask(B, Lq, Lk, 2),
              "need_weights": True, "average_attn_weights": average}
    weights_t = theirs(*x, **kwargs)[1]
    weights_o = ours(*x, **kwargs)[1]
    assert weights_o.shape == ((B, Lq, Lk) if average else (B, H, Lq, Lk))
    assert_close(weights_o, weights_t)


def grads(module, tensors, **kwargs):
    """Output, and gradients of a fixed random projection of it w.r.t. the inputs and every parameter."""
    tensors = [t.clone().requires_grad_() for t in tensors]
    out = module(*tensors, **kwargs)[0]
    (out * torch.randn(out.shape, generator=gen(7)).to(out)).sum().backward()
    return out, [t.grad for t in tensors], {name: p.grad for name, p in module.named_parameters()}


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("extra", [{}, {"kdim": 12, "vdim": 20},
                                   {"add_bias_kv": True, "add_zero_attn": True}])
def test_gradients_match_torch(need_weights, extra):
    theirs, ours = pair(**extra)
    theirs.train(), ours.train()  # dropout is 0: training only turns torch's fused inference path off
    B, Lq, Lk = 2, 5, 17
    x = inputs(B, Lq, Lk, kdim=extra.get("kdim", E), vdim=extra.get("vdim", E))
    kwargs = {"key_padding_mask": as_additive(padding(B, Lk)), "need_weights": need_weights,
              "attn_mask": as_additive(attention_mask(B, Lq, Lk, 3)).clamp(min=-3)}
    out_t, input_grads_t, param_grads_t = grads(theirs, x, **kwargs)
    out_o, input_grads_o, param_grads_o = grads(ours, x, **kwargs)
    assert_close(out_o, out_t)
    # gradients reach ~25 in size here: float32 sums in another order differ by ~1e-5 at that scale
    for ours_grad, theirs_grad in zip(input_grads_o, input_grads_t):
        torch.testing.assert_close(ours_grad, theirs_grad, atol=ATOL, rtol=1e-4)
    assert param_grads_o.keys() == param_grads_t.keys()
    for name in param_grads_t:
        torch.testing.assert_close(param_grads_o[name], param_grads_t[name], atol=ATOL, rtol=1e-4)


@pytest.mark.cuda
def test_fused_kernels_match_torch_on_cuda():
    theirs, ours = pair(batch_first=True)
    theirs, ours = theirs.cuda().train(), ours.cuda().train()
    exact = copy.deepcopy(theirs).double()
    B, Lq, Lk = 3, 17, 40
    x = [t.cuda() for t in inputs(B, Lq, Lk, batch_first=True)]
    keys = padding(B, Lk).cuda()

    def values(module, tensors):
        out, input_grads, param_grads = grads(module, tensors, key_padding_mask=keys)
        return [out, *input_grads, *param_grads.values()]

    ours_values, theirs_values = values(ours, x), values(theirs, x)
    exact_values = values(exact, [t.double() for t in x])
    # Both run float32 with IEEE dots (the kernels ask for input_precision="ieee", cuBLAS has TF32 off by default):
    # ours may differ from float64 by little more than torch's own float32 error does.
    for ours_value, theirs_value, exact_value in zip(ours_values, theirs_values, exact_values):
        ours_error = (ours_value.double() - exact_value).abs().max().item()
        torch_error = (theirs_value.double() - exact_value).abs().max().item()
        assert ours_error <= 2 * torch_error + 1e-6, (ours_error, torch_error)


@pytest.mark.parametrize("need_weights", [False, True])
def test_fully_padded_row_gives_zero_attention_not_nan(need_weights):
    theirs, ours = pair(batch_first=True)
    B, Lq, Lk = 3, 5, 7
    keys = padding(B, Lk)
    keys[1] = True  # batch row 1 has no key at all: torch's explicit-weights path gives NaN there
    x = inputs(B, Lq, Lk, batch_first=True)
    out_t, _ = theirs(*x, key_padding_mask=keys, need_weights=need_weights)
    out_o, input_grads, param_grads = grads(ours, x, key_padding_mask=keys, need_weights=need_weights)
    assert_close(out_o[[0, 2]], out_t[[0, 2]])
    assert_close(out_o[1], ours.out_proj.bias.detach().expand(Lq, E))  # zero attention, then out_proj
    assert all(g.isfinite().all() for g in input_grads + list(param_grads.values()))
    if need_weights:
        weights = ours(*x, key_padding_mask=keys, need_weights=True)[1]
        assert (weights[1] == 0).all() and torch.allclose(weights[[0, 2]].sum(-1), torch.ones(2, Lq))


@pytest.mark.parametrize("need_weights", [False, True])
def test_dropout_in_training_only(need_weights):
    _, ours = pair(dropout=0.5)
    x = inputs(2, 5, 17)
    eval_out = ours(*x, need_weights=need_weights)[0]
    assert torch.equal(ours(*x, need_weights=need_weights)[0], eval_out)
    ours.train()
    first, second = ours(*x, need_weights=need_weights)[0], ours(*x, need_weights=need_weights)[0]
    assert not torch.allclose(first, eval_out) and not torch.allclose(first, second)


def test_bad_inputs_name_the_argument():
    _, ours = pair()
    x = inputs(2, 5, 7)
    with pytest.raises(ValueError, match="attn_mask"):
        ours(*x, attn_mask=torch.zeros(5, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="attn_mask"):
        ours(*x, attn_mask=torch.zeros(2, 5, 7, dtype=torch.bool))  # must be [B*H, Lq, Lk]
    with pytest.raises(TypeError, match="key_padding_mask"):
        ours(*x, key_padding_mask=torch.zeros(2, 7, dtype=torch.int64))
    with pytest.raises(ValueError, match="key_padding_mask"):
        ours(*x, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="embed_dim"):
        ours(torch.randn(5, 2, E + 1), x[1], x[2])
    with pytest.raises(ValueError, match="divisible"):
        enn.MultiheadAttention(E, 3)



@pytest.mark.parametrize("batched", [True, False])
def test_rank_errors_are_torchs_assertion_errors_too(batched):
    """Code written for torch's module catches AssertionError with torch's wording; ours raises a ValueError
    that is also one, in train and in eval without grad."""
    ours = enn.MultiheadAttention(4, 4)
    lead = (4, 4) if batched else (4,)
    q = torch.randn(*lead, 4)
    other_rank = torch.randn(4, 4, 4) if not batched else torch.randn(4, 4)
    cases = [((q, other_rank, q), {}, "expected `key` and `value` to be"),
             ((q, q, other_rank), {}, "expected `key` and `value` to be"),
             ((q, q, q), {"key_padding_mask": torch.zeros((4,) * (1 if batched else 2), dtype=torch.bool)},
              "expected `key_padding_mask` to be `None` or"),
             ((q, q, q), {"attn_mask": torch.zeros(4, dtype=torch.bool)}, "expected `attn_mask` to be `None`, 2-D")]
    if not batched:
        cases.append(((q, q, q), {"attn_mask": torch.zeros(5, 4, 4, dtype=torch.bool)},
                      r"Expected `attn_mask` shape to be \(4, 4, 4\)"))
    for module, grad in ((ours.train(), True), (ours.eval(), False)):
        with torch.set_grad_enabled(grad):
            for args, kwargs, message in cases:
                with pytest.raises(AssertionError, match=message):
                    module(*args, **kwargs)
                with pytest.raises(ValueError, match=message):
                    module(*args, **kwargs)


def test_bias_of_another_dtype_is_promoted_as_in_torch():
    torch.manual_seed(0)
    theirs = nn.MultiheadAttention(4, 4, batch_first=True, dtype=torch.float64).eval()
    theirs.in_proj_bias = nn.Parameter(theirs.in_proj_bias.to(torch.half))
    ours = enn.MultiheadAttention(4, 4, batch_first=True, dtype=torch.float64).eval()
    ours.in_proj_bias = nn.Parameter(ours.in_proj_bias.to(torch.half))
    ours.load_state_dict(theirs.state_dict())
    query = torch.randn(4, 4, 4, dtype=torch.float64)
    with torch.no_grad():
        expected, _ = theirs(query, query, query, need_weights=False)
        got, _ = ours(query, query, query)
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, expected)


def test_nested_tensors_take_torchs_own_path():
    """torch runs nested inputs only on its native fast path (eval, no grad) and refuses them elsewhere with an
    AssertionError; ours hands them to torch's forward, so both behave alike."""
    theirs, ours = pair(batch_first=True)
    nested = torch.nested.nested_tensor([torch.randn(3, E), torch.randn(5, E)])
    with pytest.raises(AssertionError, match="NestedTensor"):
        ours(nested, nested, nested)
    with torch.inference_mode():
        got = ours(nested, nested, nested, need_weights=False)[0]
        expected = theirs(nested, nested, nested, need_weights=False)[0]
    for g, e in zip(got.unbind(), expected.unbind()):
        torch.testing.assert_close(g, e)

# ---- transformer blocks -------------------------------------------------------------------------------

C, HEADS, FFN = 32, 2, 64


def seeded(module_class, *args, **kwargs):
    torch.manual_seed(0)
    return module_class(C, HEADS, FFN, *args, **kwargs)


def split_heads(x):
    return x.unflatten(-1, (HEADS, -1)).transpose(1, 2)  # [B, L, C] -> [B, H, L, D]


def plain_attention(attention, query, key, value, allowed):
    """What QKVAttention computes, with SDPA: `allowed` is bool [B|1, 1, Lq, Lk], True = attend."""
    out = F.scaled_dot_product_attention(split_heads(attention.query(query)), split_heads(attention.key(key)),
                                         split_heads(attention.value(value)), attn_mask=allowed)
    return out.transpose(1, 2).flatten(2)


def test_self_attention_block_is_a_bert_layer():
    transformers = pytest.importorskip("transformers")
    from transformers.models.bert.modeling_bert import BertLayer

    config = transformers.BertConfig(hidden_size=C, num_attention_heads=HEADS, intermediate_size=FFN,
                                     attn_implementation="eager")
    torch.manual_seed(0)
    bert = BertLayer(config).eval()
    hf_to_ours = {"attention.self.": "attention.", "attention.output.dense.": "attention_output.",
                  "attention.output.LayerNorm.": "attention_norm.", "intermediate.dense.": "intermediate.",
                  "output.dense.": "output.", "output.LayerNorm.": "output_norm."}
    state = {}
    for name, tensor in bert.state_dict().items():
        prefix = next(p for p in hf_to_ours if name.startswith(p))
        state[hf_to_ours[prefix] + name[len(prefix):]] = tensor
    block = seeded(enn.SelfAttentionBlock).eval()
    block.load_state_dict(state)

    B, L = 3, 17
    hidden, keys = torch.randn(B, L, C, generator=gen(0)), padding(B, L)
    additive = torch.zeros(B, 1, 1, L).masked_fill(keys[:, None, None], torch.finfo(torch.float32).min)
    assert_close(block(hidden, key_padding_mask=keys), bert(hidden, attention_mask=additive))


def test_self_attention_block_shapes_and_padding():
    block = seeded(enn.SelfAttentionBlock).eval()
    B, L = 3, 17
    hidden, keys = torch.randn(B, L, C, generator=gen(0)), padding(B, L)
    out = block(hidden, key_padding_mask=keys)
    assert out.shape == (B, L, C)
    changed = torch.where(keys[..., None], torch.randn(B, L, C, generator=gen(1)), hidden)
    out_changed = block(changed, key_padding_mask=keys)
    assert_close(out_changed[~keys], out[~keys])  # padded tokens' content reaches only their own outputs
    assert not torch.allclose(out_changed[keys], out[keys])


def plain_decoder(block, hidden, memory, self_allowed, memory_allowed, query_pos, memory_pos):
    """DETR's post-LN decoder layer written out, with positions added to queries and keys only."""
    q = hidden + query_pos
    attended = plain_attention(block.self_attention, q, q, hidden, self_allowed)
    hidden = block.self_attention_norm(hidden + block.self_attention_output(attended))
    attended = plain_attention(block.cross_attention, hidden + query_pos, memory + memory_pos, memory,
                               memory_allowed)
    hidden = block.cross_attention_norm(hidden + block.cross_attention_output(attended))
    return block.output_norm(hidden + block.output(block.activation(block.intermediate(hidden))))


@pytest.mark.parametrize("causal", [False, True])
def test_decoder_block_matches_plain_computation(causal):
    block = seeded(enn.DecoderBlock).eval()
    B, T, S = 3, 5, 17
    g = gen(0)
    hidden, memory = torch.randn(B, T, C, generator=g), torch.randn(B, S, C, generator=g)
    query_pos, memory_pos = torch.randn(1, T, C, generator=g), torch.randn(B, S, C, generator=g)
    self_keys, memory_keys = padding(B, T, seed=1), padding(B, S, seed=2)
    self_allowed = ~self_keys[:, None, None, :]
    if causal:
        self_allowed = self_allowed & torch.ones(T, T, dtype=torch.bool).tril()
    expected = plain_decoder(block, hidden, memory, self_allowed, ~memory_keys[:, None, None, :], query_pos,
                             memory_pos)
    out = block(hidden, memory, self_key_padding_mask=self_keys, memory_key_padding_mask=memory_keys,
                causal=causal, query_pos=query_pos, memory_pos=memory_pos)
    assert out.shape == (B, T, C)
    assert_close(out, expected)


def test_decoder_block_ignores_padded_keys():
    block = seeded(enn.DecoderBlock).eval()
    B, T, S = 3, 5, 17
    hidden, memory = torch.randn(B, T, C, generator=gen(0)), torch.randn(B, S, C, generator=gen(1))
    self_keys, memory_keys = padding(B, T, seed=2), padding(B, S, seed=3)
    masks = {"self_key_padding_mask": self_keys, "memory_key_padding_mask": memory_keys}
    out = block(hidden, memory, **masks)
    new_memory = torch.where(memory_keys[..., None], torch.randn(B, S, C, generator=gen(4)), memory)
    assert_close(block(hidden, new_memory, **masks), out)  # padded memory changes nothing
    new_hidden = torch.where(self_keys[..., None], torch.randn(B, T, C, generator=gen(5)), hidden)
    assert_close(block(new_hidden, memory, **masks)[~self_keys], out[~self_keys])


def test_causal_decoder_does_not_look_ahead():
    block = seeded(enn.DecoderBlock).eval()
    B, T, S = 2, 9, 7
    hidden, memory = torch.randn(B, T, C, generator=gen(0)), torch.randn(B, S, C, generator=gen(1))
    out = block(hidden, memory, causal=True)
    for i in range(T - 1):
        future = hidden.clone()
        future[:, i + 1:] = torch.randn(B, T - i - 1, C, generator=gen(i + 2))
        changed = block(future, memory, causal=True)
        assert_close(changed[:, :i + 1], out[:, :i + 1])
        assert not torch.allclose(changed[:, i + 1:], out[:, i + 1:])


def test_blocks_train_with_finite_gradients():
    encoder, decoder = seeded(enn.SelfAttentionBlock).train(), seeded(enn.DecoderBlock).train()
    B, T, S = 3, 5, 17
    tokens = torch.randn(B, S, C, generator=gen(0), requires_grad=True)
    queries = torch.randn(B, T, C, generator=gen(1), requires_grad=True)
    memory_keys = padding(B, S)
    memory_keys[2] = True  # a fully padded row must not poison the batch with NaN
    memory = encoder(tokens, key_padding_mask=memory_keys)
    out = decoder(queries, memory, memory_key_padding_mask=memory_keys, causal=True,
                  query_pos=torch.randn(1, T, C, generator=gen(2)))
    out.square().mean().backward()
    grads = [tokens.grad, queries.grad] + [p.grad for p in [*encoder.parameters(), *decoder.parameters()]]
    assert out.isfinite().all()
    assert all(g is not None and g.isfinite().all() for g in grads)


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="activation"):
        seeded(enn.SelfAttentionBlock, activation="swishy")
