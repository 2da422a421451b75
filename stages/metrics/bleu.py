"""Sentence BLEU, two exact variants.

- `bleu`: sacrebleu's `sentence_bleu` with its defaults (13a tokens, mixed case, exp smoothing,
  effective order, closest reference length), divided by 100.
- `bleu-paper`: what the BLEUBERI paper trained with, HF evaluate's "bleu" with smooth=True (a port of
  tensorflow/nmt `compute_bleu`): 13a tokens, add-one smoothing on every order, brevity penalty
  against the shortest reference, and 0 for a hypothesis without tokens.

Both count clipped n-gram matches against the per-n-gram maximum count over the references; the
reference side is computed once per reference set (`prepare`) and reused for every hypothesis.
The floating-point arithmetic repeats the originals operation for operation, so scores are equal to
theirs bit for bit, not merely close.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import version

from stages.metrics.base import Metric, _check_corpus
from stages.metrics.tokenize_13a import tokenize_13a

MAX_ORDER = 4


@dataclass(frozen=True)
class NgramReferences:
    """Per order n (index n-1): n-gram -> max count over the references. Unigrams are plain strings."""

    max_counts: tuple[dict, ...]
    lengths: tuple[int, ...]


def _ngrams(tokens: list[str], n: int):
    return tokens if n == 1 else zip(*(tokens[i:] for i in range(n)))


def prepare_ngrams(token_lists: Sequence[list[str]]) -> NgramReferences:
    max_counts: list[dict] = []
    for n in range(1, MAX_ORDER + 1):
        merged: dict = Counter(_ngrams(token_lists[0], n))
        for tokens in token_lists[1:]:
            for gram, count in Counter(_ngrams(tokens, n)).items():
                if count > merged.get(gram, 0):
                    merged[gram] = count
        max_counts.append(merged)
    return NgramReferences(tuple(max_counts), tuple(len(t) for t in token_lists))


def match_counts(tokens: list[str], refs: NgramReferences) -> tuple[list[int], list[int]]:
    """Clipped matches and totals per order for one tokenised hypothesis."""
    length = len(tokens)
    correct = [0] * MAX_ORDER
    total = [max(0, length - n + 1) for n in range(1, MAX_ORDER + 1)]
    for n in range(1, min(length, MAX_ORDER) + 1):
        ref_counts = refs.max_counts[n - 1]
        hyp_counts = Counter(_ngrams(tokens, n))
        matched = 0
        for gram in hyp_counts.keys() & ref_counts.keys():
            count, ref_count = hyp_counts[gram], ref_counts[gram]
            matched += count if count < ref_count else ref_count
        if not matched:
            break  # an n-gram that matches has a matching (n-1)-gram prefix, so higher orders match nothing
        correct[n - 1] = matched
    return correct, total


def closest_ref_length(hyp_len: int, ref_lens: Sequence[int]) -> int:
    """sacrebleu's choice: the reference length closest to the hypothesis, the shorter one on ties."""
    best_diff, best_len = -1, -1
    for ref_len in ref_lens:
        diff = abs(hyp_len - ref_len)
        if best_diff == -1 or diff < best_diff or (diff == best_diff and ref_len < best_len):
            best_diff, best_len = diff, ref_len
    return best_len


def sacrebleu_formula(correct: list[int], total: list[int], sys_len: int, ref_len: int) -> float:
    """sacrebleu's `compute_bleu` with exp smoothing and effective order, on the 0..100 scale."""
    bp = 1.0
    if sys_len < ref_len:
        bp = math.exp(1 - ref_len / sys_len) if sys_len > 0 else 0.0
    if not any(correct):
        return 0.0
    precisions = [0.0] * MAX_ORDER
    smooth_mteval = 1.0
    eff_order = MAX_ORDER
    for n in range(1, MAX_ORDER + 1):
        if total[n - 1] == 0:
            break
        eff_order = n
        if correct[n - 1] == 0:
            smooth_mteval *= 2
            precisions[n - 1] = 100.0 / (smooth_mteval * total[n - 1])
        else:
            precisions[n - 1] = 100.0 * correct[n - 1] / total[n - 1]
    # A list (not a generator) and the builtin sum: the same additions in the same order as sacrebleu.
    return bp * math.exp(sum([math.log(p) for p in precisions[:eff_order]]) / eff_order)


def nmt_formula(matches: list[int], possible: list[int], translation_length: int, reference_length: int) -> float:
    """tensorflow/nmt `compute_bleu` with smooth=True (as HF evaluate runs it), on the 0..1 scale."""
    precisions = [(matches[i] + 1.0) / (possible[i] + 1.0) for i in range(MAX_ORDER)]
    geo_mean = math.exp(sum((1.0 / MAX_ORDER) * math.log(p) for p in precisions))
    if reference_length == 0 or translation_length == 0:
        return 0.0
    ratio = float(translation_length) / reference_length
    bp = 1.0 if ratio > 1.0 else math.exp(1 - 1.0 / ratio)
    return geo_mean * bp


class _NgramBleu(Metric):
    """A BLEU from n-gram statistics: `_stats` counts one hypothesis against prepared references, `_formula`
    turns counts into a score. A sentence scores its own counts; the corpus scores the pooled counts."""

    def _stats(self, hypothesis: str, refs: NgramReferences) -> tuple[list[int], list[int], int, int]:
        raise NotImplementedError

    def _formula(self, correct: list[int], total: list[int], hyp_len: int, ref_len: int) -> float:
        raise NotImplementedError

    def score_prepared(self, hypothesis: str, prepared: NgramReferences) -> float:
        return self._formula(*self._stats(hypothesis, prepared))

    def corpus_score(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        _check_corpus(hypotheses, references)
        correct, total, hyp_len, ref_len = [0] * MAX_ORDER, [0] * MAX_ORDER, 0, 0
        for hypothesis, refs in zip(hypotheses, references):
            c, t, h, r = self._stats(hypothesis, self.prepare(refs))
            correct = [a + b for a, b in zip(correct, c)]
            total = [a + b for a, b in zip(total, t)]
            hyp_len, ref_len = hyp_len + h, ref_len + r
        return self._formula(correct, total, hyp_len, ref_len)


class Bleu(_NgramBleu):
    """sacrebleu sentence BLEU (defaults), 0..1. Equals `sacrebleu.sentence_bleu(h, refs).score / 100`; the
    corpus score equals sacrebleu `BLEU(effective_order=True).corpus_score(...)` / 100."""

    name = "bleu"
    description = "sacrebleu sentence BLEU: 13a tokens, exp smoothing, effective order"
    scale = (0.0, 1.0)

    def prepare(self, references: Sequence[str]) -> NgramReferences:
        return prepare_ngrams([tokenize_13a(r.rstrip()) for r in references])

    def _stats(self, hypothesis: str, refs: NgramReferences) -> tuple[list[int], list[int], int, int]:
        tokens = tokenize_13a(hypothesis.rstrip())
        correct, total = match_counts(tokens, refs)
        return correct, total, len(tokens), closest_ref_length(len(tokens), refs.lengths)

    def _formula(self, correct: list[int], total: list[int], hyp_len: int, ref_len: int) -> float:
        return sacrebleu_formula(correct, total, hyp_len, ref_len) / 100

    def signature(self) -> str:
        return f"bleu|case:mixed|eff:yes|tok:13a|smooth:exp|sacrebleu:{version('sacrebleu')}"


class PaperBleu(_NgramBleu):
    """HF evaluate "bleu" with smooth=True, as the BLEUBERI paper's reward (0..1); the corpus score is
    compute_bleu over the whole corpus (pooled counts and lengths), as evaluate reports it."""

    name = "bleu-paper"
    description = "BLEUBERI's reward: HF evaluate bleu, smooth=True, shortest-reference brevity penalty"
    scale = (0.0, 1.0)

    def prepare(self, references: Sequence[str]) -> NgramReferences:
        return prepare_ngrams([tokenize_13a(r) for r in references])

    def _stats(self, hypothesis: str, refs: NgramReferences) -> tuple[list[int], list[int], int, int]:
        tokens = tokenize_13a(hypothesis)
        matches, possible = match_counts(tokens, refs)
        return matches, possible, len(tokens), min(refs.lengths)

    def _formula(self, correct: list[int], total: list[int], hyp_len: int, ref_len: int) -> float:
        return nmt_formula(correct, total, hyp_len, ref_len)

    def signature(self) -> str:
        return "bleu-paper|case:mixed|tok:13a|smooth:add-one|bp:shortest-ref|max-order:4"
