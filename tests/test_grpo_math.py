"""The GRPO objective against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from stages.train.config import LossConfig
from stages.train.loss import Denominator, group_advantages, grpo_loss, zero_std_groups


def test_group_advantages_by_hand() -> None:
    rewards = torch.tensor([1.0, 2.0, 3.0, 5.0])
    std_a, std_b = math.sqrt(0.5), math.sqrt(2.0)  # unbiased std of [1, 2] and [3, 5]
    assert group_advantages(rewards, 2, "group").tolist() == pytest.approx(
        [-0.5 / (std_a + 1e-4), 0.5 / (std_a + 1e-4), -1 / (std_b + 1e-4), 1 / (std_b + 1e-4)]
    )
    # mean 11/4 = 2.75; squared deviations 3.0625 + 0.5625 + 0.0625 + 5.0625 = 8.75; unbiased: / 3
    batch_std = math.sqrt(8.75 / 3)  # 1.7078
    assert group_advantages(rewards, 2, "batch").tolist() == pytest.approx(
        [-0.5 / (batch_std + 1e-4), 0.5 / (batch_std + 1e-4), -1 / (batch_std + 1e-4), 1 / (batch_std + 1e-4)]
    )
    assert group_advantages(rewards, 2, "none").tolist() == [-0.5, 0.5, -1.0, 1.0]


def test_equal_rewards_give_zero_advantages_and_are_flagged() -> None:
    rewards = torch.tensor([0.3, 0.3, 0.3, 0.1, 0.2, 0.3])
    advantages = group_advantages(rewards, 3, "group")
    assert advantages[:3].tolist() == [0.0, 0.0, 0.0]
    assert zero_std_groups(rewards, 3).tolist() == [True, False]
    assert group_advantages(torch.tensor([0.7]), 1, "group").tolist() == [0.0]


# Two completions of three token slots; the second token of row 0 is padding.
MASK = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
ADV = torch.tensor([2.0, -1.0])


def _loss(logp, old, ref=None, *, beta=0.0, loss_type="dapo", level="token", denominator=1.0):
    config = LossConfig(
        beta=beta, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type, importance_sampling_level=level,
        use_bias_correction_kl=False, delta=None, top_entropy_quantile=1.0, importance_mode=None,
        importance_clip_max=3.0,
    )  # fmt: skip
    return grpo_loss(logp, old, ref, ADV, MASK, config, Denominator(denominator))


def test_on_policy_loss_is_minus_advantage_per_token() -> None:
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.2, -1.5]], requires_grad=True)
    parts = _loss(logp, logp.detach(), denominator=5.0)  # 5 active tokens
    # ratio 1 everywhere: each active token contributes -A; (-2 * 2 + 1 * 3) / 5
    assert float(parts.loss.detach()) == pytest.approx((-2.0 * 2 + 1.0 * 3) / 5)
    parts.loss.backward()
    expected = -ADV[:, None] * MASK / 5  # d(-ratio * A)/d logp = -A at ratio 1
    assert torch.allclose(logp.grad, expected)
    assert parts.active_tokens == 5 and parts.clipped_tokens == 0


def test_clipping_by_hand() -> None:
    old = torch.zeros(2, 3)
    # row 0 (A = +2): ratios e^0.5 = 1.65 (clipped at 1.28), e^-0.5 = 0.61 (not clipped for A > 0)
    # row 1 (A = -1): ratios e^-0.5 = 0.61 (clipped at 0.8), e^0.1 = 1.105, e^0.4 = 1.49 (not clipped for A < 0)
    logp = torch.tensor([[0.5, 9.0, -0.5], [-0.5, 0.1, 0.4]])
    parts = _loss(logp, old)
    # The objective is pessimistic: a positive advantage earns at most 1.28 A, a negative one costs at
    # least 0.8 A; inside the range the ratio counts as it is. Per token, -(what counts):
    tokens = [
        -1.28 * 2,  # ratio 1.65 > 1.28 with A = +2: capped
        -math.exp(-0.5) * 2,  # ratio 0.61 with A = +2: a lower ratio is never raised to 0.8
        0.8 * 1,  # ratio 0.61 < 0.8 with A = -1: the penalty is kept at 0.8 A
        math.exp(0.1) * 1,  # ratio 1.105 inside [0.8, 1.28]
        math.exp(0.4) * 1,  # ratio 1.49 with A = -1: a higher ratio is never lowered to 1.28
    ]
    assert sum(tokens) == pytest.approx(-0.37607, abs=1e-5)  # -2.56 - 1.21306 + 0.8 + 1.10517 + 1.49182
    assert float(parts.loss) == pytest.approx(sum(tokens))
    assert parts.clipped_tokens == 2  # row 0 token 0 and row 1 token 0; the padded 9.0 never counts


def test_kl_penalty_is_k3_and_weighted_by_beta() -> None:
    logp = torch.tensor([[-1.0, 0.0, -2.0], [-0.5, -0.5, -0.5]], requires_grad=True)
    ref = torch.tensor([[-1.5, 0.0, -1.0], [-0.5, -0.7, -0.1]])
    plain = _loss(logp.detach(), logp.detach())
    with_kl = _loss(logp.detach(), logp.detach(), ref, beta=0.1)

    def k3(d: float) -> float:
        return math.exp(d) - d - 1

    kl_terms = [k3(-0.5), k3(1.0), k3(0.0), k3(-0.2), k3(0.4)]
    assert with_kl.kl_sum == pytest.approx(sum(kl_terms), rel=1e-6)
    assert float(with_kl.loss) - float(plain.loss) == pytest.approx(0.1 * sum(kl_terms), rel=1e-5)
    same = _loss(logp.detach(), logp.detach(), logp.detach(), beta=0.5)  # identical to the reference: no KL
    assert same.kl_sum == 0.0 and float(same.loss) == pytest.approx(float(plain.loss))


def test_masked_tokens_do_not_matter() -> None:
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.2, -1.5]])
    changed = logp.clone()
    changed[0, 1] = 7.0  # a padding slot
    ref = torch.full((2, 3), -1.0)
    for loss_type in ("grpo", "bnpo", "dapo", "dr_grpo"):
        a = _loss(logp, torch.zeros(2, 3), ref, beta=0.04, loss_type=loss_type)
        b = _loss(changed, torch.zeros(2, 3), ref, beta=0.04, loss_type=loss_type)
        assert float(a.loss) == pytest.approx(float(b.loss))


def test_aggregations_by_hand() -> None:
    logp = torch.zeros(2, 3)
    # on-policy: token losses are -2 (row 0, 2 active) and +1 (row 1, 3 active)
    assert float(_loss(logp, logp, loss_type="grpo", denominator=2).loss) == pytest.approx((-2.0 + 1.0) / 2)
    assert float(_loss(logp, logp, loss_type="dapo", denominator=5).loss) == pytest.approx(-1.0 / 5)
    assert float(_loss(logp, logp, loss_type="dr_grpo", denominator=2 * 3).loss) == pytest.approx(-1.0 / 6)


def test_denominators() -> None:
    common = {
        "n_sequences": 6,
        "n_tokens_global": 40,
        "n_tokens_local": 18,
        "world_size": 2,
        "max_completion_length": 8,
    }
    assert Denominator.for_step("grpo", **common).value == 6
    assert Denominator.for_step("dapo", **common).value == 40
    assert Denominator.for_step("bnpo", **common).value == 36
    assert Denominator.for_step("dr_grpo", **common).value == 48
    with pytest.raises(ValueError):
        Denominator.for_step("ppo", **common)  # type: ignore[arg-type]


def test_sequence_level_ratio_is_the_mean_log_ratio() -> None:
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.2, 5.0, 0.4], [0.1, -0.1, 0.3]], requires_grad=True)  # row 0 masked slot ignored
    parts = _loss(logp, old, level="sequence")
    # mean log-ratio over active tokens: (0.2 + 0.4) / 2 = 0.3 and (0.1 - 0.1 + 0.3) / 3 = 0.1
    # row 0: ratio e^0.3 = 1.35 > 1.28 with A = +2, capped: -2.56 on each of its 2 tokens
    # row 1: ratio e^0.1 = 1.105 inside the range with A = -1: +1.105 on each of its 3 tokens
    expected = 2 * -2.56 + 3 * math.exp(0.1)  # -1.80448
    assert float(parts.loss.detach()) == pytest.approx(expected, rel=1e-6)
    parts.loss.backward()
    # the capped row has no gradient; row 1's loss is 3 e^m (m its mean log-ratio, dm / dlogp_t = 1/3),
    # so each of its tokens gets 3 e^m / 3 = e^0.1
    assert logp.grad[0].abs().sum() == 0
    assert logp.grad[1].tolist() == pytest.approx([math.exp(0.1)] * 3, rel=1e-6)
