"""Caption generation: the KV cache against teacher forcing, and beam search against a plain search."""

import math

import pytest
import torch

from e2evlp.models import E2EVLPConfig, E2EVLPForCaptioning
from e2evlp.models.model import EncoderOutput
from tests.model_helpers import reference_beam_search, tiny_batch


def test_kv_cache_generation_matches_teacher_forcing():
    torch.manual_seed(0)
    model = E2EVLPForCaptioning(E2EVLPConfig.tiny()).eval()
    batch = tiny_batch()
    pixels, mask = batch["pixel_values"], batch["pixel_mask"]
    caption = batch["caption_ids"]
    logits = model(pixels, mask, caption).logits  # predictions after each prefix
    memory = model.model.encode(pixel_values=pixels, pixel_mask=mask)
    caches = model._start_cache(memory)
    for t in range(caption.shape[1] - 1):
        step = model._step(caption[:, t], t, caches, memory.padding_mask)
        torch.testing.assert_close(step, logits[:, t], rtol=1e-4, atol=1e-4)
    greedy = model.generate(pixels, mask, num_beams=1, max_length=6)
    assert greedy.shape[0] == 2 and greedy.shape[1] <= 6
    expected = logits.new_zeros(0)
    first = model._step(torch.full((2,), 101), 0, model._start_cache(memory), memory.padding_mask).argmax(-1)
    assert torch.equal(greedy[:, 0], first), expected
    beams = model.generate(pixels, mask, num_beams=3, max_length=6, length_penalty=0.6)
    assert beams.shape[0] == 2 and beams.dtype == torch.long
    with pytest.raises(ValueError, match="max_length must be below"):
        model.generate(pixels, mask, max_length=64)


def test_beam_search_keeps_live_beams_and_applies_the_length_penalty_while_pruning():
    """A hand-written language model (next token from the previous one only) where the best caption by
    sum / length, [A, C, D, SEP], is neither the best by sum ([SEP]) nor among the first K to finish."""
    pad, cls, sep, a, c, d = range(6)
    model = E2EVLPForCaptioning(E2EVLPConfig.tiny(vocab_size=8, pad_token_id=pad, cls_token_id=cls,
                                                  sep_token_id=sep, mask_token_id=6)).eval()
    table = {cls: {sep: 0.50, a: 0.45}, a: {sep: 0.55, c: 0.45}, c: {d: 0.98}, d: {sep: 0.98}}

    def step(tokens, position, caches, padding):
        logits = torch.full((tokens.shape[0], 8), -30.0)
        for row, token in enumerate(tokens.tolist()):
            for nxt, p in table.get(token, {sep: 1.0}).items():
                logits[row, nxt] = math.log(p)
        return logits

    model._step = step
    batch = tiny_batch(B=1)
    assert model.generate(batch["pixel_values"], batch["pixel_mask"], num_beams=2, max_length=6,
                          length_penalty=1.0).tolist() == [[a, c, d, sep]]
    assert model.generate(batch["pixel_values"], batch["pixel_mask"], num_beams=2, max_length=6,
                          length_penalty=0.0).tolist() == [[sep]]  # by sum alone


@pytest.mark.parametrize("sep_bias", [0.0, 2.0, 4.0])
def test_beam_search_equals_the_plain_search_over_recomputed_decoding(sep_bias, monkeypatch):
    monkeypatch.setenv("E2EVLP_ATTENTION", "sdpa")  # the interpreted kernels would take minutes
    torch.manual_seed(0)
    model = E2EVLPForCaptioning(E2EVLPConfig.tiny(vocab_size=50, pad_token_id=0, cls_token_id=1, sep_token_id=2,
                                                  mask_token_id=3)).eval()
    with torch.no_grad():
        model.caption_head.decoder.bias[2] = sep_bias  # more [SEP]: images finish at different steps
    batch = tiny_batch(B=3)
    pixels, mask = batch["pixel_values"], batch["pixel_mask"]
    mask[1, 40:] = False
    memory = model.model.encode(pixel_values=pixels, pixel_mask=mask)

    def next_log_probs(image):
        one = EncoderOutput(memory.hidden[image:image + 1], memory.padding_mask[image:image + 1],
                            memory.position[image:image + 1], 0)
        with torch.no_grad():
            return lambda prefix: torch.log_softmax(model.caption_head(
                model.model.decode(one, torch.tensor([[1] + prefix])))[0, -1], -1).tolist()

    for num_beams, length_penalty in ((2, 1.0), (3, 0.0), (4, 0.6), (3, -1.0), (5, 2.0)):
        got = model.generate(pixels, mask, num_beams=num_beams, max_length=6, length_penalty=length_penalty)
        for image in range(3):
            expected = reference_beam_search(next_log_probs(image), num_beams, 6, length_penalty, sep=2)
            assert got[image].tolist() == expected + [0] * (got.shape[1] - len(expected)), (num_beams, image)
