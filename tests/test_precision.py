"""bf16 on the CPU: the precision policy (stages/core/precision.py) holds end to end on a tiny model."""

from __future__ import annotations

import json
import math

import orjson
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from bleuberi_cli.app import app
from stages.train.config import TrainConfig
from stages.train.logprobs import completion_logprobs, pack
from stages.train.loop import train
from tests.conftest import demo_records, read_jsonl_text, write_jsonl


def test_two_bf16_grpo_steps_end_with_a_float32_adapter_that_loads_with_peft(tiny_model, tmp_path) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = TrainConfig.of(
        model=str(tiny_model), dtype="bfloat16", device="cpu", num_generations=4, per_device_train_batch_size=8,
        max_completion_length=8, max_steps=2, learning_rate=1e-2, warmup_ratio=0.0, reward=["chrf"], save_steps=1,
    )  # fmt: skip
    result = train(demo_records(count=4), config, tmp_path / "run")
    numbers = ("loss", "kl", "reward_mean", "grad_norm", "logprob_drift_mean")
    assert all(math.isfinite(step[key]) for step in result.metrics for key in numbers)
    assert result.metrics[-1]["kl"] > 0  # the policy moved
    tensors = load_file(str(result.adapter / "adapter_model.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    stated = json.loads((result.adapter / "bleuberi_base_model.json").read_text())
    assert (stated["base_dtype"], stated["adapter_dtype"]) == ("bfloat16", "float32")
    assert json.loads((tmp_path / "run" / "config.json").read_text())["dtype"] == "bfloat16"
    # the optimizer state is float32 too (checkpoints hold it)
    optimizer = load_file(str(tmp_path / "run" / "checkpoints" / "step-2" / "optimizer.safetensors"))
    assert optimizer and {t.dtype for t in optimizer.values()} == {torch.float32}
    # plain peft loads it onto a float32 base, and it changes the model's outputs
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(result.adapter))
    ids = torch.tensor([[1, 20, 30, 40]])
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, tuned(ids).logits)


def _lora(model_dir, dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    torch.manual_seed(0)  # the same LoRA A for every dtype
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8))
    with torch.no_grad():
        for index, (name, param) in enumerate(sorted(model.named_parameters())):
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(index)) * 0.05)
    return model


def test_bf16_log_probs_are_within_the_stated_tolerance_of_float32(tiny_model) -> None:
    """The same LoRA on the same completions, base weights in fp32 and in bf16. bf16 keeps 8 significant
    bits: one ulp of a number x is about x * 2^-8. Activations are rounded at every op, so a log-prob
    (a logit minus a logsumexp of logits) moves by a few ulps of the largest logit L. Allowed: a mean of
    one ulp of L (L * 2^-8) and a maximum of four, per token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    generator = torch.Generator().manual_seed(0)
    completions = [torch.randint(3, len(tokenizer), (10,), generator=generator).tolist() for _ in range(4)]
    batch = pack([tokenizer.encode("The cat sat on the mat.")] * 4, completions, tokenizer.pad_token_id, "cpu")
    reference = _lora(tiny_model, torch.float32)
    with torch.no_grad():
        full = completion_logprobs(reference, batch)
        half = completion_logprobs(_lora(tiny_model, torch.bfloat16), batch)
        ulp = reference(input_ids=batch.input_ids).logits.abs().max() * 2**-8
    assert full.dtype == half.dtype == torch.float32  # log-probs are float32 whatever the weights
    gap = (full - half).abs()[batch.completion_mask.bool()]
    assert 0 < gap.mean() < ulp and gap.max() < 4 * ulp, (gap.mean(), gap.max(), ulp)


def test_the_sampler_and_the_trainer_take_logits_in_float32(tiny_model) -> None:
    """In bf16 both compute the output projection in float32 from the decoder's hidden state: the
    sampler's log-probs are log_softmax(float32 logits) of the tokens it picked, and so are the trainer's."""
    from transformers import AutoTokenizer

    from stages.engines.base import SamplingParams
    from stages.engines.transformers_engine import sample

    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    model = _lora(tiny_model, torch.bfloat16)
    prompt = tokenizer.encode("The cat sat on the mat.")
    [[drawn]] = sample(model, [prompt], [[7]], SamplingParams(8, 1.0), stop_ids={tokenizer.eos_token_id}, pad_id=0)
    ids = torch.tensor([prompt + drawn.token_ids])
    with torch.no_grad():
        hidden = model.get_base_model().model(input_ids=ids).last_hidden_state[0, len(prompt) - 1 : -1]
        weight = model.get_base_model().lm_head.weight.float()
        expected = torch.log_softmax(F.linear(hidden.float(), weight), dim=-1)
        expected = expected.gather(-1, torch.tensor(drawn.token_ids)[:, None])[:, 0]
        batch = pack([prompt], [drawn.token_ids], 0, "cpu")
        trainer = completion_logprobs(model, batch)[0, : len(drawn.token_ids)]
    rounded = torch.log_softmax(F.linear(hidden, model.get_base_model().lm_head.weight).float(), dim=-1)
    rounded = rounded.gather(-1, torch.tensor(drawn.token_ids)[:, None])[:, 0]
    assert torch.allclose(trainer, expected, atol=1e-5)
    # the sampler decodes with a KV cache (other kernels than one full pass), so bf16 activations may differ
    # by a few ulps; the float32 head is still closer to its log-probs than bf16-rounded logits would be
    assert (torch.tensor(drawn.logprobs) - expected).abs().max() < 0.02
    assert (rounded - expected).abs().max() > 0  # bf16 logits would round: the check can tell the two apart


def test_generate_and_eval_in_bf16_give_valid_records(runner, tiny_model, tiny_adapter, tmp_path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", demo_records(count=3))
    model = ["--model", str(tiny_model), "--dtype", "bfloat16", "--max-new-tokens", "5"]
    generated = runner.invoke(app, ["generate", "-i", str(data), *model, "-n", "2", "-q"])
    assert generated.exit_code == 0, generated.stderr
    rows = read_jsonl_text(generated.stdout)
    assert len(rows) == 3 and all(len(r["completions"]) == 2 for r in rows)
    assert all(1 <= n <= 5 for r in rows for n in r["generation"]["completion_tokens"])
    report = tmp_path / "r.json"
    evaluated = runner.invoke(
        app, ["eval", "-i", str(data), *model, "--adapter", f"{tiny_adapter}=lora", "-q", "--report", str(report)]
    )
    assert evaluated.exit_code == 0, evaluated.stderr
    summary = orjson.loads(report.read_bytes())
    assert list(summary["systems"]) == ["base", "lora", "base@len(lora)"]
    assert all(0 <= s["metrics"]["bleu"]["mean"] <= 1 for s in summary["systems"].values())


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_float32_head_copy_is_made_once_and_follows_changes(dtype) -> None:
    from stages.core.precision import float32_weight

    weight = torch.nn.Parameter(torch.randn(4, 3).to(getattr(torch, dtype)), requires_grad=False)
    first = float32_weight(weight)
    assert first.dtype == torch.float32 and torch.equal(first, weight.float())
    assert float32_weight(weight) is first  # cached (or the weight itself, in float32)
    with torch.no_grad():
        weight.add_(1)
    assert torch.equal(float32_weight(weight), weight.float())  # a changed weight gets a fresh copy
