"""A tiny E2E-VLP batch for the model tests: images with padding, text, MLM/ITM labels, boxes, captions."""

import torch


def tiny_batch(B: int = 2, seed: int = 0, H: int = 64, W: int = 96, text_len: int = 10, num_classes: int = 20,
               num_attributes: int = 8):
    g = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(B, 3, H, W, generator=g)
    pixel_mask = torch.ones(B, H, W, dtype=torch.bool)
    pixel_mask[-1, :, W - 32:] = False  # the last image is narrower: padded on the right
    input_ids = torch.randint(1000, 2000, (B, text_len), generator=g)
    input_ids[:, 0], input_ids[:, -1] = 101, 102
    attention_mask = torch.ones(B, text_len, dtype=torch.long)
    attention_mask[0, text_len - 3:] = 0
    mlm_labels = torch.full((B, text_len), -100)
    mlm_labels[:, 2] = input_ids[:, 2]
    input_ids[:, 2] = 103
    sizes = [3, 0, 5, 1][:B]
    targets = [{"labels": torch.randint(0, num_classes, (n,), generator=g),
                "boxes": torch.cat([torch.rand(n, 2, generator=g) * 0.5 + 0.25,
                                    torch.rand(n, 2, generator=g) * 0.3 + 0.1], 1),
                "attributes": torch.randint(-1, num_attributes, (n,), generator=g)} for n in sizes]
    caption_ids = torch.randint(1000, 2000, (B, 8), generator=g)
    caption_ids[:, 0], caption_ids[:, -1] = 101, 102
    caption_mask = torch.ones(B, 8, dtype=torch.long)
    return dict(pixel_values=pixel_values, pixel_mask=pixel_mask, input_ids=input_ids, attention_mask=attention_mask,
                mlm_labels=mlm_labels, itm_labels=torch.tensor([1, 0, 1, 1][:B]), targets=targets,
                caption_ids=caption_ids, caption_mask=caption_mask)


def reference_beam_search(next_log_probs, num_beams: int, max_length: int, length_penalty: float, sep: int) -> list:
    """Hugging Face's beam search for one image in plain Python: `next_log_probs(prefix)` gives the log-probs
    of the token after the generated `prefix` (a list). K live beams refilled from the best continuations,
    [SEP]-ended ones among the top K to a pool of K scored sum / length ** length_penalty, stop when the pool
    is full and no live beam can beat its worst (or at max_length); the best finished, else the best live."""
    live, finished = [(0.0, [])], []
    for step in range(max_length):
        candidates = sorted(((score + value, tokens + [token]) for score, tokens in live
                             for token, value in enumerate(next_log_probs(tokens))), key=lambda c: -c[0])
        live = []
        for rank, (score, tokens) in enumerate(candidates):
            if tokens[-1] != sep:
                live.append((score, tokens))
            elif rank < num_beams:
                finished.append((score / len(tokens) ** length_penalty, tokens))
            if len(live) == num_beams:
                break
        finished = sorted(finished, key=lambda f: -f[0])[:num_beams]
        best_length = max_length if length_penalty > 0 else step + 2
        if len(finished) == num_beams and max(s for s, _ in live) / best_length ** length_penalty <= finished[-1][0]:
            break
    return max(finished or live, key=lambda c: c[0])[1]
