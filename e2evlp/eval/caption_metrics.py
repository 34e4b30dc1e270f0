"""Caption metrics as the COCO caption toolkit computes them: corpus BLEU-1..4 and CIDEr-D."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Hashable, Mapping, Sequence

# Penn-Treebank-style clitics become tokens of their own ("don't" -> "do n't"), as in the toolkit's tokenizer.
_CLITIC = re.compile(r"(n't|'s|'re|'ve|'ll|'d|'m)\b")
# Words keep inner hyphens, apostrophes and decimal points; every other punctuation mark is dropped.
_TOKEN = re.compile(r"n't|'(?:s|re|ve|ll|d|m)\b|[a-z0-9]+(?:[-.'][a-z0-9]+)*")
_CIDER_SIGMA = 6.0
_CIDER_MAX_N = 4


def tokenize_caption(caption: str) -> list[str]:
    """Lowercase, split off clitics and drop punctuation (approximating the toolkit's PTB tokenizer)."""
    return _TOKEN.findall(_CLITIC.sub(r" \1", caption.lower()))


def _ngrams(tokens: list[str], max_n: int) -> Counter:
    return Counter(tuple(tokens[i : i + n]) for n in range(1, max_n + 1) for i in range(len(tokens) - n + 1))


def _tokenized(
    references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str]
) -> list[tuple[list[str], list[list[str]]]]:
    """(hypothesis tokens, reference token lists) per image, after checking both inputs agree."""
    if not references:
        raise ValueError("references is empty")
    if set(references) != set(hypotheses):
        raise ValueError("hypotheses must have exactly the image ids of references")
    pairs = []
    for image_id, refs in references.items():
        if not refs:
            raise ValueError(f"references[{image_id!r}] has no caption")
        pairs.append((tokenize_caption(hypotheses[image_id]), [tokenize_caption(ref) for ref in refs]))
    return pairs


def _closest_length(hyp_len: int, ref_lens: list[int]) -> int:
    # The toolkit's "closest" option; on a tie the shorter reference wins.
    return min(ref_lens, key=lambda length: (abs(length - hyp_len), length))


def bleu(
    references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str], max_n: int = 4
) -> list[float]:
    """Corpus-level BLEU-1..max_n: clipped n-gram counts pooled over images, closest-length brevity penalty."""
    correct, guessed = [0] * max_n, [0] * max_n
    hyp_total = ref_total = 0
    for hyp, refs in _tokenized(references, hypotheses):
        hyp_counts = _ngrams(hyp, max_n)
        max_ref_counts = Counter()
        for ref in refs:
            max_ref_counts |= _ngrams(ref, max_n)  # | keeps the maximum count of each n-gram
        for gram, count in hyp_counts.items():
            correct[len(gram) - 1] += min(count, max_ref_counts[gram])
        for n in range(1, max_n + 1):
            guessed[n - 1] += max(len(hyp) - n + 1, 0)
        hyp_total += len(hyp)
        ref_total += _closest_length(len(hyp), [len(ref) for ref in refs])
    if hyp_total == 0:
        return [0.0] * max_n
    brevity = 1.0 if hyp_total >= ref_total else math.exp(1 - ref_total / hyp_total)
    scores, log_sum = [], 0.0
    for n in range(max_n):
        if correct[n] == 0:
            # A zero precision zeroes this and every higher order's geometric mean.
            scores.extend([0.0] * (max_n - n))
            break
        log_sum += math.log(correct[n] / guessed[n])
        scores.append(brevity * math.exp(log_sum / (n + 1)))
    return scores


def _tfidf(counts: Counter, doc_freq: Counter, log_num_images: float) -> tuple[list[dict], list[float]]:
    """Per-order TF-IDF vectors and their L2 norms; unseen n-grams get the largest IDF, log(num_images)."""
    vectors = [{} for _ in range(_CIDER_MAX_N)]
    for gram, count in counts.items():
        vectors[len(gram) - 1][gram] = count * (log_num_images - math.log(max(1.0, doc_freq[gram])))
    norms = [math.sqrt(sum(v * v for v in vec.values())) for vec in vectors]
    return vectors, norms


def _cider_similarity(hyp: tuple, ref: tuple, length_delta: int) -> float:
    (hyp_vecs, hyp_norms), (ref_vecs, ref_norms) = hyp, ref
    total = 0.0
    for hyp_vec, ref_vec, hyp_norm, ref_norm in zip(hyp_vecs, ref_vecs, hyp_norms, ref_norms):
        if hyp_norm == 0 or ref_norm == 0:
            continue
        # CIDEr-D clips the candidate's weight by the reference's, so repeating an n-gram gains nothing.
        dot = sum(min(weight, ref_vec.get(gram, 0.0)) * ref_vec.get(gram, 0.0) for gram, weight in hyp_vec.items())
        total += dot / (hyp_norm * ref_norm)
    return total / _CIDER_MAX_N * math.exp(-(length_delta**2) / (2 * _CIDER_SIGMA**2))


def cider(references: Mapping[Hashable, Sequence[str]], hypotheses: Mapping[Hashable, str]) -> float:
    """CIDEr-D (x10 scale) averaged over images; document frequencies come from this set's references."""
    pairs = _tokenized(references, hypotheses)
    doc_freq = Counter()
    for _, refs in pairs:
        doc_freq.update(set().union(*(_ngrams(ref, _CIDER_MAX_N) for ref in refs)))
    log_num_images = math.log(len(pairs))
    total = 0.0
    for hyp, refs in pairs:
        hyp_vec = _tfidf(_ngrams(hyp, _CIDER_MAX_N), doc_freq, log_num_images)
        ref_vecs = [_tfidf(_ngrams(ref, _CIDER_MAX_N), doc_freq, log_num_images) for ref in refs]
        sims = [_cider_similarity(hyp_vec, ref_vec, len(hyp) - len(ref)) for ref_vec, ref in zip(ref_vecs, refs)]
        total += 10.0 * sum(sims) / len(sims)
    return total / len(pairs)
