"""chrF (character n-gram F-score, beta 2, orders 1..6, whitespace removed), sacrebleu's defaults, 0..1.

Equal to `sacrebleu.sentence_chrf(h, refs).score / 100`: each reference is scored on its own and the
best F wins. Reference n-gram counts are computed once per reference set.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from importlib.metadata import version

from stages.metrics.base import Metric, _check_corpus

CHAR_ORDER = 6
BETA = 2
_EPS = 1e-16


def _char_ngrams(text: str) -> list[Counter[str]]:
    text = "".join(text.split())
    return [Counter([text[i : i + n] for i in range(len(text) - n + 1)]) for n in range(1, CHAR_ORDER + 1)]


def _f_score(stats: Sequence[int]) -> float:
    """sacrebleu's `CHRF._compute_f_score` (effective-order averaging), on the 0..100 scale."""
    factor = BETA**2
    avg_prec, avg_rec, effective_order = 0.0, 0.0, 0
    for i in range(CHAR_ORDER):
        n_hyp, n_ref, n_match = stats[3 * i : 3 * i + 3]
        prec = n_match / n_hyp if n_hyp > 0 else _EPS
        rec = n_match / n_ref if n_ref > 0 else _EPS
        if n_hyp > 0 and n_ref > 0:
            avg_prec += prec
            avg_rec += rec
            effective_order += 1
    if effective_order == 0:
        avg_prec = avg_rec = 0.0
    else:
        avg_prec /= effective_order
        avg_rec /= effective_order
    if avg_prec + avg_rec:
        score = (1 + factor) * avg_prec * avg_rec
        score /= (factor * avg_prec) + avg_rec
        return 100 * score
    return 0.0


def _match_stats(hyp: list[Counter[str]], ref: list[tuple[Counter[str], int]]) -> list[int]:
    stats: list[int] = []
    for hyp_counts, (ref_counts, ref_total) in zip(hyp, ref):
        matched, hyp_total = 0, 0
        for gram, count in hyp_counts.items():
            hyp_total += count
            ref_count = ref_counts.get(gram)
            if ref_count:
                matched += count if count < ref_count else ref_count
        stats += [hyp_total if ref_counts else 0, ref_total, matched]
    return stats


class ChrF(Metric):
    name = "chrf"
    description = "sacrebleu chrF (char 6-grams, beta 2), best reference"
    scale = (0.0, 1.0)

    def prepare(self, references: Sequence[str]) -> list[list[tuple[Counter[str], int]]]:
        return [[(counts, sum(counts.values())) for counts in _char_ngrams(r)] for r in references]

    def _best_stats(self, hypothesis: str, prepared: list[list[tuple[Counter[str], int]]]) -> list[int]:
        hyp = _char_ngrams(hypothesis)
        best_stats: list[int] = []
        best_f = -1.0
        for ref in prepared:
            stats = _match_stats(hyp, ref)
            f = _f_score(stats)
            if f > best_f:
                best_f, best_stats = f, stats
        return best_stats

    def score_prepared(self, hypothesis: str, prepared: list[list[tuple[Counter[str], int]]]) -> float:
        return _f_score(self._best_stats(hypothesis, prepared)) / 100

    def corpus_score(self, hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
        """Pooled best-reference statistics; equals sacrebleu `CHRF().corpus_score(...)` / 100."""
        _check_corpus(hypotheses, references)
        pooled = [0] * (3 * CHAR_ORDER)
        for hypothesis, refs in zip(hypotheses, references):
            pooled = [a + b for a, b in zip(pooled, self._best_stats(hypothesis, self.prepare(refs)))]
        return _f_score(pooled) / 100

    def signature(self) -> str:
        return f"chrf|nc:6|nw:0|beta:2|space:no|case:mixed|sacrebleu:{version('sacrebleu')}"
