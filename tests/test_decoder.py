"""The Llama-family decode loop (stages/engines/decoder.py) against the model's own forward, step by step:
the same tokens and log-probs for greedy and sampled decoding, with and without a LoRA (merged while it
samples, and merged again after an update), for Llama, Qwen2 (biases) and Mistral; and the vectorised
sampler draws from the distribution it is given."""

from __future__ import annotations

import math

import pytest
import torch

from stages.engines import prefill
from stages.engines import transformers_engine as engine
from stages.engines.base import SamplingParams
from stages.engines.decoder import Decoder
from stages.engines.transformers_engine import _pick_tokens, sample

PROMPTS = [[5, 9, 23, 41, 7], [11, 3], [60, 61, 62, 63, 64, 65, 66, 67], [8, 8, 8, 2]]
STOP = {1}


def tiny(kind: str, seed: int = 0) -> torch.nn.Module:
    """A random 2-layer model of the family `kind` with grouped-query attention (4 heads, 2 key/value heads)."""
    import transformers

    torch.manual_seed(seed)
    shape = {"vocab_size": 96, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2}
    shape |= {"num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 256}
    config = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "mistral": transformers.MistralConfig,
    }[kind](**shape)
    model = getattr(transformers, {"llama": "Llama", "qwen2": "Qwen2", "mistral": "Mistral"}[kind] + "ForCausalLM")(
        config
    )
    if kind == "qwen2":  # its q/k/v biases start at zero: give them values, so they are tested
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.data.normal_(0, 0.5)
    return model.eval()


def with_lora(model: torch.nn.Module) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.3)  # B starts at zero: a trained adapter's is not
    return peft_model


def both_ways(model, sampling: SamplingParams, monkeypatch, seeds=None):
    """The samples through the decoder, and through the model's forward (the decoder switched off)."""
    seeds = seeds or [[100 + 10 * p + k for k in range(2)] for p in range(len(PROMPTS))]
    assert Decoder.of(model, 64) is not None
    fast = sample(model, PROMPTS, seeds, sampling, stop_ids=STOP, pad_id=0)
    with monkeypatch.context() as patch:
        patch.setattr(engine.Decoder, "of", classmethod(lambda cls, model, total: None))
        slow = sample(model, PROMPTS, seeds, sampling, stop_ids=STOP, pad_id=0)
    return fast, slow


def assert_same(fast, slow, tolerance: float = 2e-5) -> None:
    for fast_prompt, slow_prompt in zip(fast, slow):
        for a, b in zip(fast_prompt, slow_prompt):
            assert a.token_ids == b.token_ids and a.finished == b.finished
            assert max((abs(x - y) for x, y in zip(a.logprobs, b.logprobs)), default=0.0) < tolerance


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("sampling", [SamplingParams(12, 0.0), SamplingParams(12, 1.0), SamplingParams(12, 0.8, 0.9)])
def test_the_decoder_gives_what_the_models_forward_gives(kind, sampling, monkeypatch) -> None:
    fast, slow = both_ways(tiny(kind), sampling, monkeypatch)
    assert_same(fast, slow)
    assert len({tuple(s.token_ids) for prompt in fast for s in prompt}) > 1  # not one degenerate answer


def test_rows_that_stop_early_leave_the_batch_and_the_rest_go_on(monkeypatch) -> None:
    """Half the rows stop at once (their first token is a stop token): the cache is cut to the others."""
    model = tiny("llama")
    first = sample(model, PROMPTS, [[1, 2]] * 4, SamplingParams(1, 1.0), stop_ids=STOP, pad_id=0)
    firsts = {token for prompt in first for s in prompt for token in s.token_ids}
    stops = set(list(firsts)[:2])  # tokens some rows pick first: those rows stop after one token
    fast = sample(model, PROMPTS, [[1, 2]] * 4, SamplingParams(10, 1.0), stop_ids=stops, pad_id=0)
    with monkeypatch.context() as patch:
        patch.setattr(engine.Decoder, "of", classmethod(lambda cls, model, total: None))
        slow = sample(model, PROMPTS, [[1, 2]] * 4, SamplingParams(10, 1.0), stop_ids=stops, pad_id=0)
    assert_same(fast, slow)
    lengths = sorted(len(s.token_ids) for prompt in fast for s in prompt)
    assert lengths[0] == 1 and lengths[-1] > 1


def test_a_lora_is_merged_for_sampling_and_merged_again_after_an_update(monkeypatch) -> None:
    model = with_lora(tiny("llama"))
    sampling = SamplingParams(10, 1.0)
    assert_same(*both_ways(model, sampling, monkeypatch))
    with torch.no_grad():  # an optimizer step changes the adapter in place
        for name, param in model.named_parameters():
            if "lora_A" in name:
                param.add_(0.5 * torch.randn_like(param))
    fast, slow = both_ways(model, sampling, monkeypatch)
    assert_same(fast, slow)
    with model.disable_adapter():  # the base model answers otherwise: the adapter was applied above
        base = sample(
            model, PROMPTS, [[100 + 10 * p + k for k in range(2)] for p in range(4)], sampling, stop_ids=STOP, pad_id=0
        )
    assert [[s.token_ids for s in p] for p in base] != [[s.token_ids for s in p] for p in fast]


def test_unsupported_models_decode_through_their_forward() -> None:
    import transformers

    config = transformers.GPT2Config(vocab_size=96, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    assert Decoder.of(model, 64) is None
    out = sample(model, PROMPTS, [[1]] * 4, SamplingParams(5, 1.0), stop_ids=STOP, pad_id=0)
    assert all(len(p[0].token_ids) >= 1 for p in out)
    short = transformers.MistralConfig(vocab_size=96, hidden_size=32, intermediate_size=48, num_hidden_layers=1)
    short.num_attention_heads, short.num_key_value_heads, short.sliding_window = 4, 2, 8
    assert Decoder.of(transformers.MistralForCausalLM(short), 64) is None  # a window shorter than the batch


def test_the_vectorised_sampler_draws_from_the_distribution() -> None:
    """Each row's token is where its uniform falls in the cumulative distribution: over many rows the counts
    follow the probabilities (a chi-square test against the softmax computed here), top-p keeps only the
    nucleus, and the log-prob returned is the token's under the temperature."""
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    rows = 40_000
    generator = torch.Generator().manual_seed(7)
    uniforms = torch.rand(rows, generator=generator, dtype=torch.float64)
    tokens, logps = _pick_tokens(logits.expand(rows, -1), SamplingParams(1, 0.7), uniforms)
    probs = torch.softmax(logits / 0.7, dim=-1)
    counts = torch.bincount(tokens, minlength=len(logits)).double()
    chi2 = float((((counts - rows * probs) ** 2) / (rows * probs)).sum())
    assert chi2 < 20.5  # 5 degrees of freedom: p = 0.001
    assert torch.allclose(logps, torch.log(probs)[tokens], atol=1e-5)
    nucleus, _ = _pick_tokens(logits.expand(rows, -1), SamplingParams(1, 1.0, 0.6), uniforms)
    kept = torch.softmax(logits, -1)
    assert set(nucleus.tolist()) == {0, 1}  # 0.53 alone is under 0.6; with the second it is reached
    share = float(kept[0] / (kept[0] + kept[1]))
    assert math.isclose(float((nucleus == 0).double().mean()), share, abs_tol=0.01)


def test_prompts_prefilled_in_groups_give_what_one_prefill_gives(monkeypatch) -> None:
    """Groups of prompts, each padded to its own longest, right-aligned in one cache: the same samples as the
    forward's single padded prefill (here a group holds at most 12 prompt tokens: three groups)."""
    monkeypatch.setattr(prefill, "PREFILL_TOKENS", 12)
    prompts = sorted(PROMPTS, key=len, reverse=True)
    seeds = [[3 * p + k for k in range(2)] for p in range(len(prompts))]
    model, sampling = tiny("llama"), SamplingParams(8, 1.0)
    fast = sample(model, prompts, seeds, sampling, stop_ids=STOP, pad_id=0)
    with monkeypatch.context() as patch:
        patch.setattr(engine.Decoder, "of", classmethod(lambda cls, model, total: None))
        slow = sample(model, prompts, seeds, sampling, stop_ids=STOP, pad_id=0)
    assert_same(fast, slow)


SYSTEM_TURN = [1, 30, 31, 32, 33, 34, 35, 36, 37, 2, 4]  # 11 tokens every prompt starts with, as a chat template's


def test_shared_start_is_what_every_prompt_begins_with() -> None:
    shared = prefill.shared_start
    assert shared([SYSTEM_TURN + [5, 6], SYSTEM_TURN + [7], SYSTEM_TURN + [5, 9, 9]]) == 11
    assert shared([SYSTEM_TURN, SYSTEM_TURN + [7]]) == 10  # a prompt keeps one token of its own
    assert shared([SYSTEM_TURN + [5], SYSTEM_TURN[:7] + [8, 8, 8, 8, 8]]) == 0  # 7 shared: under the minimum
    assert shared([SYSTEM_TURN + [5, 6]]) == 0  # one prompt: nothing to share


def test_a_start_every_prompt_shares_is_prefilled_once(monkeypatch) -> None:
    """Prompts with a common system turn, in prefill groups of their own (PREFILL_TOKENS 12): the shared
    start goes through the model once, each prompt's rest once per prompt, and the samples are those of the
    model's forward over each whole prompt (the decoder switched off, which prefills every prompt whole)."""
    monkeypatch.setattr(prefill, "PREFILL_TOKENS", 12)
    prompts = [SYSTEM_TURN + rest for rest in ([5, 9, 23, 41, 7], [60, 61, 62], [11, 3], [8])]
    seeds = [[3 * p + k for k in range(2)] for p in range(len(prompts))]
    model, sampling = tiny("llama"), SamplingParams(8, 1.0)
    embedded = [0]

    def count(module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        if args[0].dim() == 2:  # a prefill (a decode step of the decoder embeds one token per row, 1-d)
            embedded[0] += args[0].numel()

    model.get_input_embeddings().register_forward_hook(count)
    fast = sample(model, prompts, seeds, sampling, stop_ids=STOP, pad_id=0)
    assert embedded[0] == 11 + (2 * 5 + 2 * 2)  # the system turn once; the rests in groups of 2 rows: 5 and 2 wide
    with monkeypatch.context() as patch:
        patch.setattr(engine.Decoder, "of", classmethod(lambda cls, model, total: None))
        slow = sample(model, prompts, seeds, sampling, stop_ids=STOP, pad_id=0)
    assert_same(fast, slow)
    assert len({tuple(s.token_ids) for prompt in fast for s in prompt}) > 1
