"""Chosen-token log-probs: the chunked head equals a full log-softmax, in value and gradient."""

from __future__ import annotations

import pytest
import torch

import stages.train.logprobs as logprobs
from stages.train.logprobs import chosen_logprobs, completion_logprobs, pack


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_head_matches_log_softmax(monkeypatch, temperature) -> None:
    torch.manual_seed(0)
    rows, hidden_size, vocab = 37, 16, 101
    monkeypatch.setattr(logprobs, "CHUNK_ELEMENTS", 10 * vocab)  # force several chunks
    hidden = torch.randn(rows, hidden_size, dtype=torch.float64, requires_grad=True)
    head = torch.nn.Linear(hidden_size, vocab, bias=True).double()
    targets = torch.randint(0, vocab, (rows,))
    ours = chosen_logprobs(hidden, head, targets, temperature)
    reference = torch.log_softmax(head(hidden) / temperature, -1).gather(-1, targets[:, None])[:, 0]
    assert torch.allclose(ours.double(), reference, atol=1e-6)
    upstream = torch.randn(rows, dtype=torch.float64)
    (grad_ours, weight_ours) = torch.autograd.grad(ours, [hidden, head.weight], upstream.float())
    (grad_ref, weight_ref) = torch.autograd.grad(reference, [hidden, head.weight], upstream)
    assert torch.allclose(grad_ours, grad_ref, atol=1e-6)
    assert torch.allclose(weight_ours, weight_ref, atol=1e-6)


def test_pack_layout() -> None:
    batch = pack([[5, 6, 7], [8]], [[1, 2], [3, 4, 9]], pad_id=0, device=torch.device("cpu"))
    assert batch.input_ids.tolist() == [[5, 6, 7, 1, 2, 0], [0, 0, 8, 3, 4, 9]]
    assert batch.attention_mask.tolist() == [[1, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]]
    assert batch.completion_ids.tolist() == [[1, 2, 0], [3, 4, 9]]
    assert batch.completion_mask.tolist() == [[1, 1, 0], [1, 1, 1]]
    assert batch.prompt_width == 3


def test_completion_logprobs_match_the_model_logits(tiny_model) -> None:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    prompts, completions = [[1, 20, 30, 40, 2], [1, 50, 2]], [[60, 70, 2], [80, 2]]
    batch = pack(prompts, completions, pad_id=2, device=torch.device("cpu"))
    ours = completion_logprobs(model, batch, temperature=0.8)
    for row, (prompt, completion) in enumerate(zip(prompts, completions)):
        ids = torch.tensor([prompt + completion])
        with torch.no_grad():
            logits = model(ids).logits[0, len(prompt) - 1 : -1] / 0.8
        expected = torch.log_softmax(logits, -1).gather(-1, torch.tensor(completion)[:, None])[:, 0]
        assert torch.allclose(ours[row, : len(completion)], expected, atol=1e-5)
        assert (ours[row, len(completion) :] == 0).all()
