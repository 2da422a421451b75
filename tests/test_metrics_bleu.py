"""BLEU parity: `bleu` must equal sacrebleu on every input; `bleu-paper` must follow the paper's formula."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import sacrebleu
from hypothesis import given, settings
from hypothesis import strategies as st
from sacrebleu.metrics import BLEU
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from stages.metrics import get_metric
from stages.metrics.tokenize_13a import tokenize_13a

# Text with everything the 13a rules care about: digits next to dots, commas and dashes, entities,
# newlines (also "-\n"), <skipped>, unicode letters and unicode whitespace.
PIECES = st.sampled_from(
    list("0123456789.,-  \n\t\u00a0\u2028\u3000abcXYZ&;<>!?()[]{}/'\"é中ß")
    + ["&amp;", "&quot;", "&lt;", "&gt;", "<skipped>", "-\n", "1.5", "3,000", "e.g.", "...", "the", "cat", "--"]
)
TEXT = st.lists(PIECES, max_size=40).map("".join)
ANY_TEXT = st.one_of(TEXT, st.text(max_size=60))
REFS = st.lists(ANY_TEXT, min_size=1, max_size=4)

bleu = get_metric("bleu")
paper = get_metric("bleu-paper")
_sacre_tok = Tokenizer13a()


@settings(max_examples=3000, deadline=None)
@given(ANY_TEXT)
def test_tokenizer_matches_sacrebleu(text: str) -> None:
    assert tokenize_13a(text) == _sacre_tok(text).split()


@settings(max_examples=2000, deadline=None)
@given(ANY_TEXT, REFS)
def test_bleu_equals_sacrebleu_sentence_bleu(hypothesis: str, references: list[str]) -> None:
    expected = sacrebleu.sentence_bleu(hypothesis, references).score / 100
    assert abs(bleu.sentence_score(hypothesis, references) - expected) <= 1e-12


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(ANY_TEXT, REFS), min_size=1, max_size=6))
def test_bleu_corpus_equals_sacrebleu(pairs) -> None:
    hyps = [h for h, _ in pairs]
    refs = [r for _, r in pairs]
    width = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
    expected = BLEU(effective_order=True).corpus_score(hyps, streams).score / 100
    assert abs(bleu.corpus_score(hyps, refs) - expected) <= 1e-12


@pytest.mark.parametrize(
    ("hypothesis", "references"),
    [
        ("", ["a reference"]),
        ("   ", ["a reference"]),
        ("a hypothesis", [""]),
        ("", [""]),
        ("\t\n", ["\u3000"]),
        ("Ünïcödé naïve café — 東京 😀", ["Ünïcödé café 東京 😀", "naïve"]),
        ("short", ["a much longer reference with many words in it", "tiny", "medium length one here"]),
        (" ".join(f"word{i % 97}" for i in range(20000)), [" ".join(f"word{i % 89}" for i in range(15000))]),
        ("The value is 3.5, not 3,5 - see item-4 and 12-3.", ["The value is 3.5, not 3,5 - see item-4 and 12-3."]),
    ],
)
def test_bleu_edge_cases_match_sacrebleu(hypothesis: str, references: list[str]) -> None:
    expected = sacrebleu.sentence_bleu(hypothesis, references).score / 100
    assert abs(bleu.sentence_score(hypothesis, references) - expected) <= 1e-12


def test_sentence_scores_reuse_prepared_references() -> None:
    refs = ["the cat sat on the mat", "there is a cat on the mat"]
    hyps = ["the cat is on the mat", "a dog", ""]
    assert bleu.sentence_scores(hyps, refs) == [bleu.sentence_score(h, refs) for h in hyps]


# --- bleu-paper: HF evaluate "bleu", smooth=True (tensorflow/nmt compute_bleu) -----------------------


def test_paper_bleu_hand_worked_single_reference() -> None:
    # hyp "the cat sat" vs ref "the cat sat on the mat": 3 tokens vs 6.
    # matches/possible per order: 3/3, 2/2, 1/1, 0/0 -> smoothed (m+1)/(c+1): 4/4, 3/3, 2/2, 1/1 = all 1.
    # BP = exp(1 - 6/3) = exp(-1).
    score = paper.sentence_score("the cat sat", ["the cat sat on the mat"])
    assert score == pytest.approx(math.exp(-1), abs=1e-15)


def test_paper_bleu_hand_worked_partial_matches() -> None:
    # hyp "a b c d" vs ref "a b x d": unigrams 3/4, bigrams 1/3 (a b), trigrams 0/2, 4-grams 0/1.
    # smoothed: 4/5, 2/4, 1/3, 1/2; lengths equal so BP = 1 (ratio 1.0 -> exp(0)).
    expected = math.exp((math.log(4 / 5) + math.log(2 / 4) + math.log(1 / 3) + math.log(1 / 2)) / 4)
    assert paper.sentence_score("a b c d", ["a b x d"]) == pytest.approx(expected, abs=1e-15)


def test_paper_bleu_uses_shortest_reference_and_max_clipping() -> None:
    # refs of length 2 and 5: the brevity penalty uses 2 (shortest), so a 3-token hypothesis has BP 1.
    # "the the the": unigram "the" clipped by the max count over refs (2, from the second ref).
    # unigrams 2/3, bigrams "the the" matches 1 (ref2 has one "the the") of 2, trigrams 0/1, 4-grams 0/0.
    refs = ["the cat", "the the dog ran off"]
    expected = math.exp((math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2) + math.log(1 / 1)) / 4)
    assert paper.sentence_score("the the the", refs) == pytest.approx(expected, abs=1e-15)
    # sacrebleu's variant picks the closest reference length instead (5 vs 2 -> 2, |3-2| < |3-5|) and
    # does not smooth unigrams, so the two metrics differ on this input.
    assert bleu.sentence_score("the the the", refs) != pytest.approx(expected)


def test_paper_bleu_empty_candidate_scores_zero() -> None:
    assert paper.sentence_score("", ["anything at all"]) == 0.0
    assert paper.sentence_score("  \n ", ["anything at all"]) == 0.0
    assert paper.sentence_score("words", [""]) == 0.0  # shortest reference is empty


def test_paper_bleu_is_case_sensitive_and_tokenises_punctuation() -> None:
    assert paper.sentence_score("Hello, world!", ["Hello, world!"]) == pytest.approx(1.0, abs=1e-15)
    assert paper.sentence_score("hello, world!", ["Hello, world!"]) < 1.0


def _reference_paper_bleu(hypothesis: str, references: list[str]) -> float:
    """An independent, deliberately plain reading of the paper's formula for property tests."""
    hyp = _sacre_tok(hypothesis).split()
    refs = [_sacre_tok(r).split() for r in references]
    if not hyp:
        return 0.0
    log_sum = 0.0
    for n in range(1, 5):
        hyp_grams = Counter(tuple(hyp[i : i + n]) for i in range(len(hyp) - n + 1))
        best: Counter = Counter()
        for ref in refs:
            best |= Counter(tuple(ref[i : i + n]) for i in range(len(ref) - n + 1))
        matches = sum(min(c, best[g]) for g, c in hyp_grams.items())
        possible = max(len(hyp) - n + 1, 0)
        log_sum += math.log((matches + 1) / (possible + 1)) / 4
    shortest = min(len(r) for r in refs)
    if shortest == 0:
        return 0.0
    bp = 1.0 if len(hyp) > shortest else math.exp(1 - shortest / len(hyp))
    return math.exp(log_sum) * bp


@settings(max_examples=1500, deadline=None)
@given(ANY_TEXT, REFS)
def test_paper_bleu_matches_plain_formula(hypothesis: str, references: list[str]) -> None:
    # The plain version folds "-\n" like HF evaluate (no rstrip); the formula differs only in float order.
    assert paper.sentence_score(hypothesis, references) == pytest.approx(
        _reference_paper_bleu(hypothesis, references), rel=1e-12, abs=1e-15
    )


def test_paper_bleu_does_not_rstrip_like_sacrebleu() -> None:
    # HF evaluate tokenises without rstrip, so a trailing "-\n" is removed with its dash; sacrebleu keeps it.
    assert tokenize_13a("well-\n") == ["well"]
    assert paper.sentence_score("well-\n", ["well"]) == pytest.approx(paper.sentence_score("well", ["well"]))
