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
from tests.conftest import demo_records, read_jsonl_text, sacrebleu_means, write_jsonl


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
    expected = sacrebleu_means(read_jsonl_text(evaluated.stdout))  # the answers bf16 gave, scored by sacrebleu
    means = {name: system["metrics"]["bleu"]["mean"] for name, system in summary["systems"].items()}
    assert means == pytest.approx(expected, abs=1e-12)


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


def _first_update_gradient(tiny_model, dtype: str, samples_from, records) -> tuple[dict, float]:
    """The LoRA gradient of the first update of a GRPO step (num_iterations=2) in `dtype`, on the completions
    `samples_from` sampled, with this dtype's own sampler log-probs, and the step's KL to the reference."""
    from stages.train.batches import micro_batches
    from stages.train.config import TrainConfig
    from stages.train.data import prepare_prompts
    from stages.train.distributed import Distributed
    from stages.train.grpo import micro_batch_loss, reference_logprobs, score_rollout
    from stages.train.loss import Denominator
    from stages.train.policy import load_policy

    # epsilon far below the tiny model's bf16 drift: a ratio taken against the sampler's log-probs would clip
    config = TrainConfig.of(model=str(tiny_model), dtype=dtype, device="cpu", num_generations=4,
                            per_device_train_batch_size=8, max_completion_length=8, num_iterations=2,
                            epsilon=1e-3, epsilon_high=1e-3, reward=["chrf"])  # fmt: skip
    torch.manual_seed(0)  # the same LoRA A in both dtypes
    policy = load_policy(config, torch.device("cpu"))
    prompts, _ = prepare_prompts(records, policy.generator.encoder)
    samples = samples_from(policy, prompts)
    rollout = score_rollout(policy.generator, config.scorer, prompts, samples, group_size=4, scale_rewards="group",
                            skip_zero_std=False, dist=Distributed())  # fmt: skip
    [mb] = micro_batches(rollout, size=8, pad_id=policy.generator.pad_id, device=torch.device("cpu"),
                         mask_truncated=False)  # fmt: skip
    policy.model.train()
    loss_config, temperature = config.loss_config(), config.sampling.temperature
    [reference] = reference_logprobs(policy, [mb], loss_config, temperature)
    tokens = float(mb.batch.completion_mask.sum())
    loss, _ = micro_batch_loss(policy, mb, reference, None, loss_config, Denominator(tokens), temperature)
    loss.loss.backward()
    grads = {name: p.grad.detach().float().clone() for name, p in policy.model.named_parameters() if p.requires_grad}
    return grads, loss.kl_sum / tokens


def test_bf16_starts_at_kl_zero_and_its_first_gradient_is_float32_s_to_bf16_precision(tiny_model) -> None:
    """At step 1 LoRA B is zero, so the reference and the policy are one function: their KL is exactly 0 in
    bf16 too. The clipped ratio's old policy is the trainer's own forward, never the sampler's: the
    sampler (a KV-cached bf16 decode) differs from it by rounding, and taken as the old policy (as before
    this issue, with num_iterations > 1) that rounding moves the ratio off 1 and clips real gradient away.
    Tolerance: bf16 keeps 8 significant bits (unit roundoff u = 2**-8); a gradient of the 2-layer tiny
    model passes through about 16 bf16 roundings (4 matmuls and their inputs per layer, forward and back),
    so it may differ from float32's by 16u relative, by the norm."""
    records = demo_records(count=2)
    drawn: list = []

    def sampled(policy, prompts):  # the same completions for both dtypes: the float32 policy's draws
        if not drawn:
            ids = [p.ids for p in prompts]
            seeds = [[11 * i + k for k in range(4)] for i in range(len(prompts))]
            drawn.extend(s for group in policy.generator.sample_ids(ids, seeds, _sampling()) for s in group)
        return [_rescored(policy, prompts[i // 4].ids, sample) for i, sample in enumerate(drawn)]

    full, kl_full = _first_update_gradient(tiny_model, "float32", sampled, records)
    half, kl_half = _first_update_gradient(tiny_model, "bfloat16", sampled, records)
    assert kl_full == kl_half == 0.0  # the reference is the policy, to the last bit
    norm = torch.sqrt(sum((g**2).sum() for g in full.values()))
    gap = torch.sqrt(sum(((half[k] - full[k]) ** 2).sum() for k in full))
    assert norm > 0 and gap <= 16 * 2**-8 * norm, (float(gap / norm), 16 * 2**-8)


def _sampling():
    from stages.engines.base import SamplingParams

    return SamplingParams(8, 0.9)  # train's temperature


def _rescored(policy, prompt: list[int], sample):
    """`sample`'s tokens with the log-probs this policy's own sampler gives them: a KV-cached decode of the
    same tokens (teacher-forced), as the sampler records them while drawing."""
    from transformers import DynamicCache

    from stages.engines.base import Sample
    from stages.engines.transformers_engine import cache_keyword

    model = policy.model
    ids = torch.tensor([prompt + sample.token_ids])
    cache = {cache_keyword(model): DynamicCache(config=model.config)}  # filled in place, as the sampler does
    with torch.no_grad():
        logits, logps = model(input_ids=ids[:, : len(prompt)], use_cache=True, **cache).logits[0, -1], []
        for token in sample.token_ids:
            logps.append(float(torch.log_softmax(logits.float() / 0.9, -1)[token]))
            logits = model(input_ids=torch.tensor([[token]]), use_cache=True, **cache).logits[0, -1]
    return Sample(list(sample.token_ids), logps, sample.finished)


def test_the_sampler_mismatch_is_measured_by_hand() -> None:
    """mismatch_kl is the k3 estimate of KL(sampler || trainer) on the sampled tokens, and
    mismatch_clip_fraction the share of importance weights the cap changed."""
    from stages.train.grpo import LossInputs, sampler_drift
    from stages.train.logprobs import pack
    from stages.train.loss import engine_importance_weights, engine_log_ratio

    trainer = torch.tensor([[0.0, 0.1, 0.0]])
    sampler = torch.tensor([[0.1, 0.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding: it counts nowhere
    batch = pack([[5]], [[6, 7, 8]], 0, torch.device("cpu"))
    batch.completion_mask = mask
    log_ratio = engine_log_ratio(trainer, sampler, mask)

    def drift(importance):
        return sampler_drift([LossInputs(batch, torch.ones(1), trainer, None, log_ratio, importance)])

    weight = engine_importance_weights(log_ratio, "token_truncate", 1.05)
    total, largest, k3, clipped, weighed = drift(weight)
    # r = log trainer/sampler = -0.1 and 0.1: k3 = (e^-0.1 + 0.1 - 1) + (e^0.1 - 0.1 - 1)
    assert k3 == pytest.approx(math.exp(-0.1) + 0.1 - 1 + math.exp(0.1) - 0.1 - 1, rel=1e-5)
    assert total == pytest.approx(0.2, rel=1e-5) and largest == pytest.approx(0.1, rel=1e-5)
    # the weights e^-0.1 = 0.905 (kept) and e^0.1 = 1.105, cut to 1.05: one of the two
    assert weight.weights[0, :2].tolist() == pytest.approx([math.exp(-0.1), 1.05], rel=1e-5)
    assert (clipped, weighed) == (1.0, 2.0)
    masked = engine_importance_weights(log_ratio, "sequence_mask", 1.05)
    *_, clipped, weighed = drift(masked)  # e^(0.1 - 0.1) = 1: within the cap, kept
    assert masked.weights.tolist() == [[1.0]] and (clipped, weighed) == (0.0, 1.0)


def test_the_correction_is_on_by_default_where_an_engine_of_its_own_samples(tiny_model) -> None:
    from stages.engines.base import EngineOptions
    from stages.train.config import TrainConfig

    server = EngineOptions("server", ["http://127.0.0.1:9/v1"])
    assert not TrainConfig.of(model=str(tiny_model)).importance_correction  # the policy samples itself
    assert TrainConfig.of(model=str(tiny_model), engine=server).importance_correction
    assert TrainConfig.of(model=str(tiny_model), engine=EngineOptions("vllm")).importance_correction
    # top_p < 1: vLLM's log-probs are over the nucleus, not the trainer's distribution: left off
    assert not TrainConfig.of(model=str(tiny_model), engine=server, top_p=0.9).importance_correction
    asked = TrainConfig.of(model=str(tiny_model), vllm_importance_sampling_correction=True)
    assert asked.importance_correction  # any engine, when asked for


def test_a_bf16_base_keeps_the_adapters_small_updates(tiny_model) -> None:
    """A LoRA update below half a bf16 unit in the last place of the base layer's product: peft alone
    rounds the sum back to bf16 and the update vanishes (a bf16 LoRA learned less than fp32 at the same
    rate); with float32 activations it arrives whole, as the float32 computation of it says."""
    from stages.core.precision import float32_activations

    model = _lora(tiny_model, torch.bfloat16)
    layer = model.get_base_model().model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.fill_(1e-6)  # far below half an ulp of products of size ~0.1-1
    x = torch.randn(3, layer.in_features).to(torch.bfloat16)
    with torch.no_grad():
        base = layer.base_layer(x).float()
        update = layer.lora_B["default"](layer.lora_A["default"](x.float())) * layer.scaling["default"]
        rounded = layer(x).float()
        assert torch.equal(rounded, base)  # peft's own sum: the update is gone
        linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.weight.dtype == torch.bfloat16]
        assert float32_activations(model) == len(linears)  # every bf16 linear: 2 layers x 7, and the head
        kept = layer(x)
    assert kept.dtype == torch.float32 and update.abs().min() > 0
    # the update, whole: to float32's rounding of the sum (an ulp of the product, 2**-23 relative)
    assert torch.allclose(kept - base, update, rtol=0, atol=float(base.abs().max()) * 2**-23)
    assert float32_activations(model) == 0  # once per model
    with torch.no_grad():  # and the model still runs end to end, its own head included
        assert model(input_ids=torch.tensor([[1, 20, 30]])).logits.dtype == torch.bfloat16


def test_generate_and_eval_in_bf16_sample_with_the_adapter_as_trained(tiny_model, tmp_path) -> None:
    """A trained adapter's entries are small next to the weights they change. Merged into bf16 weights
    (as the engine did), `W + BA` rounds back to `W` wherever the update is below half an ulp; so in
    bf16 the engine keeps it a LoRA, under the trainer's float32 activations, and each adapted layer adds
    the update whole. In float32 it still merges."""
    from peft import PeftModel

    from stages.engines.generator import Generator
    from tests.tiny_model import make_lora_adapter

    adapter = make_lora_adapter(tiny_model, tmp_path / "adapter", scale=1e-5)
    merged = Generator.load(str(tiny_model), adapter=str(adapter), dtype="float32", threads=1).model
    assert not isinstance(merged, PeftModel)
    kept = Generator.load(str(tiny_model), adapter=str(adapter), dtype="bfloat16", threads=1).model
    assert isinstance(kept, PeftModel)
    layer = kept.get_base_model().model.layers[0].self_attn.q_proj
    x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    with torch.no_grad():
        weight = layer.base_layer.weight
        delta = (layer.lora_B["default"].weight @ layer.lora_A["default"].weight) * layer.scaling["default"]
        # merged into the bf16 weights, the update survives in few entries (where |W| is tiny)
        survives = ((weight.float() + delta).to(torch.bfloat16) != weight).float().mean()
        base = F.linear(x, weight).float()
        update = F.linear(x.float(), delta)
        out = layer(x)
    assert survives < 0.2 and update.abs().min() > 0
    assert out.dtype == torch.float32  # the product in float32, as the trainer's (float32_activations)
    tolerance = float(base.abs().max()) * 2**-22  # float32's rounding of the sum and of BA
    assert torch.allclose(out - base, update, rtol=0, atol=tolerance)
