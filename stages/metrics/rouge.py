"""ROUGE-L F-measure, max over references, 0..1; and its harmonic mean with BLEU.

Tokenisation is rouge-score's default, which HF evaluate's "rouge" (the paper's) uses: lowercase,
every run of characters outside [a-z0-9] becomes a separator, no stemming. Letters outside ASCII are
therefore dropped, as in rouge-score. Equal to `RougeScorer(["rougeL"]).score_multi(refs, h)["rougeL"].fmeasure`.

The longest common subsequence is computed with a bit-parallel algorithm (Allison-Dix / Hyyrö) on
Python integers: one pass over the hypothesis, with the reference's per-token position masks
prepared once.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from stages.metrics.base import Metric
from stages.metrics.bleu import Bleu

_NON_ALPHANUMERIC = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    return _NON_ALPHANUMERIC.sub(" ", text.lower()).split()


def _position_masks(tokens: list[str]) -> dict[str, int]:
    masks: dict[str, int] = {}
    for i, token in enumerate(tokens):
        masks[token] = masks.get(token, 0) | (1 << i)
    return masks


def lcs_length(masks: dict[str, int], ref_len: int, hypothesis: list[str]) -> int:
    """Length of the longest common subsequence of the reference (as masks) and the hypothesis."""
    full = (1 << ref_len) - 1
    v = full
    for token in hypothesis:
        match = masks.get(token)
        if match:
            u = v & match
            v = ((v + u) | (v - u)) & full
    return ref_len - v.bit_count()


def _f_measure(lcs: int, hyp_len: int, ref_len: int) -> float:
    if not hyp_len or not ref_len:
        return 0.0
    precision = lcs / hyp_len
    recall = lcs / ref_len
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0


class RougeL(Metric):
    name = "rouge-l"
    description = "ROUGE-L F-measure, rouge-score tokens (lowercase ASCII alphanumerics), best reference"
    scale = (0.0, 1.0)

    def prepare(self, references: Sequence[str]) -> list[tuple[dict[str, int], int]]:
        prepared = []
        for reference in references:
            tokens = rouge_tokens(reference)
            prepared.append((_position_masks(tokens), len(tokens)))
        return prepared

    def score_prepared(self, hypothesis: str, prepared: list[tuple[dict[str, int], int]]) -> float:
        tokens = rouge_tokens(hypothesis)
        return max(_f_measure(lcs_length(masks, n, tokens), len(tokens), n) for masks, n in prepared)

    def signature(self) -> str:
        return "rouge-l|f-measure|tok:rouge-score-default|stem:no|multi-ref:max"


class BleuRougeF1(Metric):
    """Harmonic mean of `bleu` and `rouge-l` (0 when both are 0), one of the paper's rewards."""

    name = "bleu-rouge-f1"
    description = "harmonic mean of bleu and rouge-l"
    scale = (0.0, 1.0)

    def __init__(self) -> None:
        self._bleu = Bleu()
        self._rouge = RougeL()

    def prepare(self, references: Sequence[str]) -> tuple[object, object]:
        return self._bleu.prepare(references), self._rouge.prepare(references)

    def score_prepared(self, hypothesis: str, prepared: tuple[object, object]) -> float:
        bleu = self._bleu.score_prepared(hypothesis, prepared[0])
        rouge = self._rouge.score_prepared(hypothesis, prepared[1])
        return 2 * bleu * rouge / (bleu + rouge) if bleu + rouge > 0 else 0.0

    def signature(self) -> str:
        return f"bleu-rouge-f1|{self._bleu.signature()}|{self._rouge.signature()}"
