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


def test_pack_runs_each_distinct_prompt_once() -> None:
    batch = pack([[5, 6], [7], [5, 6], [5, 6], [7, 7]], [[1], [2], [3], [4], [5]], pad_id=0, device=torch.device("cpu"))
    assert batch.prompt_rows.tolist() == [0, 1, 4]  # the first row of [5, 6], of [7] and of [7, 7]
    assert batch.prompt_of_row.tolist() == [0, 1, 0, 0, 2]


def grouped_rows() -> tuple[list[list[int]], list[list[int]]]:
    """Two prompts of different lengths, three completions of each (of different lengths), as GRPO packs them."""
    prompts = [[1, 20, 30, 40, 2, 11], [1, 50, 2]]
    completions = [[60, 70, 2], [61, 2], [62, 63, 64, 65], [80, 2], [81, 82, 83, 2], [84]]
    return [prompts[row // 3] for row in range(6)], completions


def lora_model(architecture: str = "llama", **settings: object) -> torch.nn.Module:
    """A tiny random decoder with a LoRA whose B is not zero (so the adapter takes a gradient through A too)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    shape = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = AutoConfig.for_model(architecture, vocab_size=100, num_key_value_heads=2, **shape, **settings)
    model = get_peft_model(AutoModelForCausalLM.from_config(config), LoraConfig(r=4, target_modules="all-linear"))
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            parameter.data.normal_(0.0, 0.5)
    return model.train()


def checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Activation checkpointing on or off, by the name this transformers has (5.23 renamed it)."""
    base = model.base_model.model
    name = "activation_checkpointing" if hasattr(base, "activation_checkpointing_enable") else "gradient_checkpointing"
    if on:
        getattr(base, f"{name}_enable")(**{f"{name}_kwargs": {"use_reentrant": False}})
    else:
        getattr(base, f"{name}_disable")()


def tokens_through_the_decoder(model: torch.nn.Module, run) -> int:
    """How many token positions the embedding layer embedded while `run()` ran."""
    seen = [0]

    def count(module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        seen[0] += args[0].numel()

    handle = model.get_input_embeddings().register_forward_hook(count)
    try:
        run()
    finally:
        handle.remove()
    return seen[0]


def row_by_row(model: torch.nn.Module, prompts: list[list[int]], completions: list[list[int]]) -> list[torch.Tensor]:
    """Each row's completion log-probs from the model's own logits over that row alone: the reference."""
    rows = []
    for prompt, completion in zip(prompts, completions):
        logits = model(torch.tensor([prompt + completion])).logits[0, len(prompt) - 1 : -1]
        rows.append(torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(completion)[:, None])[:, 0])
    return rows


def check_against_row_by_row(model: torch.nn.Module, gradient_checkpointing: bool = False) -> int:
    """Asserts our log-probs and their gradient equal the row-by-row reference; returns the tokens embedded."""
    prompts, completions = grouped_rows()
    batch = pack(prompts, completions, pad_id=0, device=torch.device("cpu"))
    lora = [p for n, p in model.named_parameters() if "lora_" in n]
    ours: list[torch.Tensor] = []
    embedded = tokens_through_the_decoder(model, lambda: ours.append(completion_logprobs(model, batch)))
    upstream = torch.randn(batch.completion_ids.shape, generator=torch.Generator().manual_seed(3))
    grad_ours = torch.autograd.grad((ours[0] * upstream).sum(), lora)
    if gradient_checkpointing:
        checkpointing(model, False)  # the reference: plain forward passes
    reference = row_by_row(model, prompts, completions)
    grad_reference = torch.autograd.grad(sum((r * upstream[i, : len(r)]).sum() for i, r in enumerate(reference)), lora)
    for row, expected in enumerate(reference):
        assert torch.allclose(ours[0][row, : len(expected)], expected, atol=1e-5)
        assert (ours[0][row, len(expected) :] == 0).all()
    for mine, theirs in zip(grad_ours, grad_reference):
        assert torch.allclose(mine, theirs, atol=1e-5, rtol=1e-4)
    return embedded


def test_a_group_runs_its_prompt_once_with_the_same_logprobs_and_gradient() -> None:
    """Six rows of two prompts (widths 6 and 3, completions up to 4): the prompts go through the decoder
    once each (2 x 6 positions, then 6 x 4 of completions), not once per row (6 x (6 + 4))."""
    embedded = check_against_row_by_row(lora_model())
    assert embedded == 2 * 6 + 6 * 4


def test_activation_checkpointing_runs_every_row_whole() -> None:
    """Checkpointing recomputes each layer without the cache, so the prompts cannot be shared: every row
    runs whole, with the same values."""
    model = lora_model()
    checkpointing(model, True)
    assert check_against_row_by_row(model, gradient_checkpointing=True) == 6 * (6 + 4)


def test_a_sliding_window_model_runs_every_row_whole() -> None:
    """A sliding-window cache keeps only the window's keys: sharing them would change what a completion sees."""
    model = lora_model("mistral", sliding_window=3)
    assert check_against_row_by_row(model) == 2 * 6 + 6 * (6 + 4)  # the prompt pass, then every row whole
    assert check_against_row_by_row(model) == 6 * (6 + 4)  # remembered: no prompt pass of its own again
