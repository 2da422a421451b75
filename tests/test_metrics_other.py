"""chrF and ROUGE-L parity with their reference implementations; the combined metric; the registry."""

from __future__ import annotations

import pytest
import sacrebleu
from hypothesis import given, settings
from hypothesis import strategies as st
from rouge_score import rouge_scorer
from sacrebleu.metrics import CHRF

from stages.core.errors import UsageError
from stages.metrics import STRING_METRICS, get_metric

WORDS = st.sampled_from(
    ["the", "The", "cat", "sat", "on", "mat", "a", "dog", "ran", "naïve", "東京", "3.5", ",", ".", "-", "ünï"]
)
TEXT = st.one_of(st.lists(WORDS, max_size=30).map(" ".join), st.text(max_size=50))
REFS = st.lists(TEXT, min_size=1, max_size=4)

chrf = get_metric("chrf")
rouge = get_metric("rouge-l")
combo = get_metric("bleu-rouge-f1")
bleu = get_metric("bleu")
_rouge_ref = rouge_scorer.RougeScorer(["rougeL"])


# Each metric's reference implementation, on the 0..1 scale.
REFERENCE_SCORES = {
    "chrf": lambda hypothesis, references: sacrebleu.sentence_chrf(hypothesis, references).score / 100,
    "rouge-l": lambda hypothesis, references: _rouge_ref.score_multi(references, hypothesis)["rougeL"].fmeasure,
}


@pytest.mark.parametrize("name", list(REFERENCE_SCORES))
@settings(max_examples=1500, deadline=None)
@given(TEXT, REFS)
def test_sentence_scores_equal_the_reference_implementation(name: str, hypothesis: str, references: list[str]) -> None:
    expected = REFERENCE_SCORES[name](hypothesis, references)
    assert abs(get_metric(name).sentence_score(hypothesis, references) - expected) <= 1e-12


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(TEXT, st.lists(TEXT, min_size=2, max_size=2)), min_size=1, max_size=5))
def test_chrf_corpus_equals_sacrebleu(pairs) -> None:
    hyps = [h for h, _ in pairs]
    refs = [r for _, r in pairs]
    streams = [[r[k] for r in refs] for k in range(2)]
    expected = CHRF().corpus_score(hyps, streams).score / 100
    assert abs(chrf.corpus_score(hyps, refs) - expected) <= 1e-12


def test_rouge_l_long_texts_use_the_bit_parallel_lcs_correctly() -> None:
    hyp = " ".join(f"w{(i * 7) % 131}" for i in range(900))
    ref = " ".join(f"w{(i * 5) % 127}" for i in range(1100))
    expected = _rouge_ref.score(ref, hyp)["rougeL"].fmeasure
    assert abs(rouge.sentence_score(hyp, [ref]) - expected) <= 1e-12


@settings(max_examples=500, deadline=None)
@given(TEXT, REFS)
def test_bleu_rouge_f1_is_the_harmonic_mean_of_the_reference_implementations(
    hypothesis: str, references: list[str]
) -> None:
    b = sacrebleu.sentence_bleu(hypothesis, references).score / 100
    r = _rouge_ref.score_multi(references, hypothesis)["rougeL"].fmeasure
    expected = 2 * b * r / (b + r) if b + r > 0 else 0.0
    assert abs(combo.sentence_score(hypothesis, references) - expected) <= 1e-12


def test_bleu_rouge_f1_by_hand() -> None:
    # BLEU is case-sensitive, ROUGE-L lowercases. "The" vs "the" costs BLEU one match per order:
    # precisions 5/6, 4/5, 3/4, 2/3, equal lengths (no brevity penalty): BLEU = (1/3) ** (1/4); ROUGE-L = 1.
    hyp, ref = "The cat sat on the mat", "the cat sat on the mat"
    b = (1 / 3) ** 0.25
    assert bleu.sentence_score(hyp, [ref]) == pytest.approx(b, abs=1e-12)
    assert rouge.sentence_score(hyp, [ref]) == 1.0
    assert combo.sentence_score(hyp, [ref]) == pytest.approx(2 * b / (1 + b), abs=1e-12)  # 0.8635
    # No BLEU match at all (case differs everywhere) but a perfect ROUGE-L: a harmonic mean is 0
    # (an arithmetic mean would give 0.5).
    assert bleu.sentence_score("THE CAT SAT", ["the cat sat"]) == 0.0
    assert rouge.sentence_score("THE CAT SAT", ["the cat sat"]) == 1.0
    assert combo.sentence_score("THE CAT SAT", ["the cat sat"]) == 0.0


def test_all_metrics_are_on_a_zero_to_one_scale() -> None:
    refs = ["The quick brown fox jumps over the lazy dog."]
    for name in STRING_METRICS:  # model-based and reference-free metrics: tests/test_rewards_*.py
        metric = get_metric(name)
        assert metric.sentence_score(refs[0], refs) == pytest.approx(1.0)
        assert metric.sentence_score("", refs) == 0.0
        assert 0.0 <= metric.sentence_score("a quick fox", refs) < 1.0
        assert name in metric.signature()


def test_unknown_metric_is_a_usage_error_listing_choices() -> None:
    with pytest.raises(UsageError, match="bleu-paper"):
        get_metric("meteor")


def test_references_must_be_a_list() -> None:
    with pytest.raises(TypeError):
        bleu.sentence_score("x", "x")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        bleu.sentence_score("x", [])
