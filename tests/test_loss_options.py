"""TRL 1.16's loss options in bleuberi's GRPO loss, each checked against an independent implementation
written here from the formula, token by token with scalar operations (values and gradients, float64).

Formulas (TRL `GRPOTrainer._compute_loss`; r = importance ratio, A = advantage, lp = log-prob):
  clipped losses      P = -min(u * A, clip(r, 1 - eps, 1 + eps_high) * A), u = r, or min(r, delta) with delta
  cispo               P = -min(r, eps_high) * A * lp, the capped ratio taken as a constant (no gradient)
  top_entropy_quantile P *= [entropy >= quantile(entropies of active tokens, 1 - q)]
  KL                  K = exp(ref - lp) - (ref - lp) - 1, times r with use_bias_correction_kl
  per token           L = P + beta * K, then aggregated by loss_type
"""

from __future__ import annotations

import math

import pytest
import torch

from stages.train.config import LossConfig, TrainConfig
from stages.train.loss import Denominator, grpo_loss, high_entropy_mask


@pytest.fixture(autouse=True)
def float64():
    """Every tensor of these tests in float64, for this module's tests only (the default is global state)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


ROWS, WIDTH = 3, 4
MASK = [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
ADVANTAGES = [1.5, -0.7, 0.4]
ENTROPIES = [[0.2, 1.4, 0.9, 5.0], [0.05, 2.2, 1.1, 0.7], [1.6, 9.0, 9.0, 9.0]]  # masked slots hold junk


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log-probs now, when sampled (old), and under the reference model; ratios spread over 0.5..1.8."""
    generator = torch.Generator().manual_seed(seed)
    old = -torch.rand(ROWS, WIDTH, generator=generator) * 3
    logp = old + (torch.rand(ROWS, WIDTH, generator=generator) - 0.4) * 1.2
    ref = old + (torch.rand(ROWS, WIDTH, generator=generator) - 0.5) * 0.8
    return logp, old, ref


def quantile_by_hand(values: list[float], q: float) -> float:
    """Linear interpolation between the order statistics at position q * (n - 1)."""
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def reference_loss(
    logp: torch.Tensor,
    old: torch.Tensor,
    ref: torch.Tensor,
    *,
    loss_type: str = "dapo",
    level: str = "token",
    beta: float = 0.04,
    eps: float = 0.2,
    eps_high: float = 0.28,
    delta: float | None = None,
    bias_kl: bool = False,
    top_entropy_quantile: float = 1.0,
    max_len: int = WIDTH,
) -> torch.Tensor:
    keep = None
    if top_entropy_quantile < 1.0:
        active = [ENTROPIES[i][t] for i in range(ROWS) for t in range(WIDTH) if MASK[i][t]]
        threshold = quantile_by_hand(active, 1.0 - top_entropy_quantile)
        keep = [
            [1.0 if MASK[i][t] and ENTROPIES[i][t] >= threshold else 0.0 for t in range(WIDTH)] for i in range(ROWS)
        ]
    total, n_tokens, per_sequence = 0.0, 0, []
    for i in range(ROWS):
        tokens = [t for t in range(WIDTH) if MASK[i][t]]
        if level == "sequence":
            mean_log_ratio = sum(logp[i, t] - old[i, t] for t in tokens) / len(tokens)
        row_sum = 0.0
        for t in tokens:
            r = torch.exp(mean_log_ratio if level == "sequence" else logp[i, t] - old[i, t])
            a = ADVANTAGES[i]
            if loss_type == "cispo":
                p = -min(float(r.detach()), eps_high) * a * logp[i, t]  # a constant weight
            else:
                clipped = min(max(r, torch.tensor(1 - eps)), torch.tensor(1 + eps_high))
                unclipped = r if delta is None else min(r, torch.tensor(delta))
                p = -min(unclipped * a, clipped * a)
            if keep is not None:
                p = p * keep[i][t]
            k = torch.exp(ref[i, t] - logp[i, t]) - (ref[i, t] - logp[i, t]) - 1
            if bias_kl:
                k = k * r
            row_sum = row_sum + p + beta * k
        per_sequence.append(row_sum / len(tokens))
        total = total + row_sum
        n_tokens += len(tokens)
    if loss_type == "grpo":
        return sum(per_sequence) / ROWS
    if loss_type == "dr_grpo":
        return total / (ROWS * max_len)
    return total / n_tokens  # dapo, cispo; bnpo too with one micro-batch on one rank


# the options the formulas above take as off, unless a test sets them (the importance correction is never on here)
PLAIN = {"use_bias_correction_kl": False, "delta": None, "top_entropy_quantile": 1.0}


def ours(logp, old, ref, *, loss_type="dapo", level="token", beta=0.04, eps=0.2, eps_high=0.28, **options):
    config = LossConfig(
        beta=beta, epsilon=eps, epsilon_high=eps_high, loss_type=loss_type, importance_sampling_level=level,
        importance_mode=None, importance_clip_max=3.0, **{**PLAIN, **options},
    )  # fmt: skip
    mask = torch.tensor(MASK, dtype=torch.float64)
    n_tokens = int(mask.sum())
    denominator = Denominator.for_step(
        loss_type, n_sequences=ROWS, n_tokens_global=n_tokens, n_tokens_local=n_tokens, world_size=1,
        max_completion_length=WIDTH,
    )  # fmt: skip
    entropy_mask = None
    if config.top_entropy_quantile < 1.0:
        entropy_mask = high_entropy_mask(torch.tensor(ENTROPIES), mask, config.top_entropy_quantile)
    return grpo_loss(logp, old, ref, torch.tensor(ADVANTAGES), mask, config, denominator, None, entropy_mask)


def assert_same_loss_and_gradient(options: dict, reference_options: dict | None = None, seed: int = 0) -> None:
    logp, old, ref = inputs(seed)
    mine = logp.clone().requires_grad_(True)
    theirs = logp.clone().requires_grad_(True)
    parts = ours(mine, old, ref, **options)
    expected = reference_loss(theirs, old, ref, **(reference_options or options))
    assert float(parts.loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-12, abs=1e-14)
    parts.loss.backward()
    expected.backward()
    assert torch.allclose(mine.grad, theirs.grad, rtol=1e-10, atol=1e-14)
    assert float(mine.grad.abs().sum()) > 0


@pytest.mark.parametrize("loss_type", ["grpo", "dapo", "dr_grpo", "bnpo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_the_base_losses_match_the_formula(loss_type, level) -> None:
    assert_same_loss_and_gradient({"loss_type": loss_type, "level": level})


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("loss_type", ["dapo", "grpo"])
def test_use_bias_correction_kl_matches_the_formula_and_changes_the_gradient(level, loss_type) -> None:
    options = {"loss_type": loss_type, "level": level, "beta": 0.3}
    assert_same_loss_and_gradient({**options, "use_bias_correction_kl": True}, {**options, "bias_kl": True})
    # on-policy (old = logp) the value is the same with or without it, the gradient is not
    logp, _, ref = inputs(1)
    a, b = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
    plain = ours(a, logp.detach(), ref, **options)
    corrected = ours(b, logp.detach(), ref, **options, use_bias_correction_kl=True)
    assert float(plain.loss.detach()) == pytest.approx(float(corrected.loss.detach()), rel=1e-12)
    plain.loss.backward()
    corrected.loss.backward()
    assert not torch.allclose(a.grad, b.grad)


@pytest.mark.parametrize("delta", [1.3, 1.5])
def test_delta_two_sided_clipping_matches_the_formula(delta) -> None:
    assert_same_loss_and_gradient({"delta": delta})
    # it bites only where the ratio exceeds delta with a negative advantage (row 1: A < 0)
    logp, old, ref = inputs(0)
    ratios = torch.exp(logp - old)
    assert bool(((ratios > delta) & (torch.tensor(MASK) > 0))[1].any())
    assert float(ours(logp, old, ref, delta=delta).loss) != pytest.approx(float(ours(logp, old, ref).loss))


@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("cap", [1.1, 5.0])
def test_cispo_matches_the_formula(level, cap) -> None:
    options = {"loss_type": "cispo", "level": level, "eps_high": cap}
    assert_same_loss_and_gradient(options)
    # the gradient of -w * A * lp with w a constant is -w * A per token (beta 0), divided by the token count
    logp, old, ref = inputs(0)
    mine = logp.clone().requires_grad_(True)
    ours(mine, old, ref, beta=0.0, **options).loss.backward()
    if level == "token":
        w = torch.clamp(torch.exp(logp - old), max=cap)
        expected = -w * torch.tensor(ADVANTAGES)[:, None] * torch.tensor(MASK) / sum(map(sum, MASK))
        assert torch.allclose(mine.grad, expected)


@pytest.mark.parametrize("quantile", [0.0, 0.2, 0.5, 0.99])
def test_top_entropy_quantile_matches_the_formula(quantile) -> None:
    assert_same_loss_and_gradient({"top_entropy_quantile": quantile, "beta": 0.1})


def test_high_entropy_mask_by_hand() -> None:
    mask = torch.tensor(MASK, dtype=torch.float64)
    # active entropies sorted: 0.05 0.2 0.7 0.9 1.1 1.4 1.6 2.2 (8 tokens); q = 0.5 -> the 0.5 quantile
    # sits at position 3.5: (0.9 + 1.1) / 2 = 1.0, so the 4 tokens with entropy >= 1.0 are kept
    kept = high_entropy_mask(torch.tensor(ENTROPIES), mask, 0.5)
    assert kept.tolist() == [
        [False, True, False, False],
        [False, True, True, False],
        [True, False, False, False],  # the masked 9.0s never count
    ]
    only_top = high_entropy_mask(torch.tensor(ENTROPIES), mask, 0.0)
    assert int(only_top.sum()) == 1 and bool(only_top[1, 1])
    assert high_entropy_mask(torch.tensor(ENTROPIES), mask, 1.0).tolist() == (mask > 0).tolist()


def test_entropies_of_the_training_forward_equal_a_full_softmax(tiny_model) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from stages.train.logprobs import completion_logprobs, completion_logprobs_and_entropy, pack

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    prompts = [tokenizer.encode("The cat sat"), tokenizer.encode("Jupiter is the largest")]
    completions = [tokenizer.encode(" on the mat."), tokenizer.encode(" planet")]
    batch = pack(prompts, completions, tokenizer.pad_token_id, torch.device("cpu"))
    with torch.no_grad():
        logp, entropy = completion_logprobs_and_entropy(model, batch, temperature=0.7)
        assert torch.equal(logp, completion_logprobs(model, batch, temperature=0.7))
        for row, (prompt, completion) in enumerate(zip(prompts, completions)):
            ids = torch.tensor([prompt + completion])
            logits = model(input_ids=ids).logits[0].double() / 0.7
            for t in range(len(completion)):
                probs = torch.softmax(logits[len(prompt) - 1 + t], dim=-1)
                by_hand = float(-(probs * probs.log()).sum())
                assert float(entropy[row, t]) == pytest.approx(by_hand, rel=1e-4)
        assert float(entropy[1, len(completions[1]) :].abs().sum()) == 0.0  # padding


def test_sequence_ratios_with_token_level_losses_warn_like_trl() -> None:
    for loss_type in ("bnpo", "dr_grpo", "dapo", "cispo"):
        [warning] = TrainConfig.of(importance_sampling_level="sequence", loss_type=loss_type).warnings()
        assert "each sequence weighs by its completion length" in warning and loss_type in warning
    assert TrainConfig.of(importance_sampling_level="sequence", loss_type="grpo").warnings() == []
    assert TrainConfig.of(importance_sampling_level="token", loss_type="dapo").warnings() == []


def test_loss_option_defaults_and_validation() -> None:
    from dataclasses import MISSING, fields

    from stages.engines.base import EngineOptions

    # one set of defaults: TrainConfig's; the loss settings resolved from them declare none of their own
    assert [f.name for f in fields(LossConfig) if f.default is not MISSING or f.default_factory is not MISSING] == []
    default = TrainConfig().loss_config()
    assert default.use_bias_correction_kl is False  # the paper's objective; TRL 1.16 defaults to True
    assert default.delta is None and default.top_entropy_quantile == 1.0
    assert (default.beta, default.epsilon, default.epsilon_high, default.loss_type) == (0.04, 0.2, 0.2, "dapo")
    assert default.importance_mode is None  # the policy samples itself: no correction
    server = TrainConfig.of(engine=EngineOptions("server", ["http://127.0.0.1:9/v1"])).loss_config()
    assert (server.importance_mode, server.importance_clip_max) == ("token_truncate", 3.0)
    assert TrainConfig.of(loss_type="cispo").loss_config().epsilon_high == 5.0
    assert TrainConfig.of(loss_type="cispo", epsilon_high=2.0).loss_config().epsilon_high == 2.0
    from stages.core.errors import UsageError

    with pytest.raises(UsageError, match="delta must be greater than 1 \\+ epsilon_high"):
        TrainConfig.of(delta=1.1)
    with pytest.raises(UsageError, match="top_entropy_quantile"):
        TrainConfig.of(top_entropy_quantile=1.5)
