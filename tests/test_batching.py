"""Batches sized by tokens (issue 32): as many rows as the key/value cache budget holds unless --batch-size or
--max-batch-tokens say fewer; engines that size their own memory get fixed batches of prompts."""

from __future__ import annotations

import pytest
import torch

from stages.engines.base import CACHE_BUDGET_BYTES, MAX_ROWS, SERVER_BATCH
from stages.engines.generator import Batching, BatchLimits, _batches, batch_limits
from stages.engines.transformers_engine import cache_bytes_per_token


def batches(lengths: list[int], n: int, limits: BatchLimits, max_new: int = 10) -> list[list[int]]:
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return list(_batches(order, [[0] * length for length in lengths], n, limits, max_new))


def test_a_token_budget_fills_each_batch_up_to_it() -> None:
    lengths = [30, 10, 20, 20, 5, 40]
    got = batches(lengths, 2, BatchLimits(None, None, 2 * 2 * (40 + 10)))  # two prompts x two samples of 50
    # by hand: 40+30 -> 4 rows x 50 = 200 (with 20: 300); 20+20+10 -> 6 x 30 = 180 (with 5: 240); 5 alone
    assert got == [[5, 0], [2, 3, 1], [4]]
    for batch in got:
        assert len(batch) * 2 * (max(lengths[i] for i in batch) + 10) <= 200


def test_the_prompt_and_row_caps_hold_too() -> None:
    lengths = [3] * 10
    assert [len(b) for b in batches(lengths, 1, BatchLimits(4, None, None))] == [4, 4, 2]
    assert [len(b) for b in batches(lengths, 3, BatchLimits(None, 6, None))] == [2, 2, 2, 2, 2]
    assert [len(b) for b in batches([500], 4, BatchLimits(None, None, 10))] == [1]  # too large alone: still sampled


def test_the_limits_a_batch_keeps_by_engine() -> None:
    per_token = 46 * 1024
    assert batch_limits(Batching(), per_token) == BatchLimits(None, MAX_ROWS, CACHE_BUDGET_BYTES // per_token)
    assert batch_limits(Batching(batch_size=8), per_token) == BatchLimits(8, None, CACHE_BUDGET_BYTES // per_token)
    assert batch_limits(Batching(max_batch_tokens=999), per_token) == BatchLimits(None, MAX_ROWS, 999)
    assert batch_limits(Batching(), None) == BatchLimits(SERVER_BATCH, None, None)  # vLLM, a server
    assert batch_limits(Batching(batch_size=3), None) == BatchLimits(3, None, None)


@pytest.mark.parametrize(("dtype", "size"), [(torch.float32, 4), (torch.bfloat16, 2)])
def test_the_cache_bytes_per_token_follow_the_config(dtype, size) -> None:
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2,
    )  # fmt: skip
    model = transformers.LlamaForCausalLM(config).to(dtype)
    assert cache_bytes_per_token(model) == 2 * 3 * 2 * 8 * size  # keys and values, 3 layers, 2 heads of 8
    from stages.core.precision import float32_activations

    float32_activations(model)  # bf16 weights, float32 activations: the cache holds float32
    assert cache_bytes_per_token(model) == 2 * 3 * 2 * 8 * 4
