"""bleuberi's GRPO loss against TRL's own `GRPOTrainer._compute_loss`, option by option.

    pip install -e ".[bench]" && python bench/trl_loss_parity.py

TRL's method is called unbound on a stand-in trainer (one process, one micro-batch per step, the
model's forward replaced by fixed log-probs and entropies), so both sides see the same inputs. Every
combination of loss_type (grpo, bnpo, dapo, dr_grpo, cispo) x importance_sampling_level x
use_bias_correction_kl x delta x top_entropy_quantile is compared in float64: the loss value and its
gradient with respect to the log-probs. Prints the largest difference; exits 1 above 1e-12.
"""

from __future__ import annotations

import collections
import itertools
import sys
import types
from importlib.metadata import version

import torch
from trl.trainer.grpo_trainer import GRPOTrainer

from stages.train.config import LossConfig
from stages.train.loss import Denominator, grpo_loss, high_entropy_mask

torch.set_default_dtype(torch.float64)


class OneProcess:
    """The accelerator calls `_compute_loss` makes, for a single process."""

    num_processes = 1
    sync_gradients = True

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    gather_for_metrics = gather

    def pad_across_processes(self, x: torch.Tensor, dim: int = 0, pad_index: float = 0) -> torch.Tensor:
        return x

    def reduce(self, x: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return x


def trl_loss(logp, old, ref, advantages, mask, entropies, options: dict) -> torch.Tensor:
    args = types.SimpleNamespace(use_bias_correction_kl=options["bias"], delta=options["delta"], steps_per_generation=1)
    trainer = types.SimpleNamespace(
        top_entropy_quantile=options["quantile"],
        off_policy_mask_threshold=None,
        importance_sampling_level=options["level"],
        beta=options["beta"],
        args=args,
        loss_type=options["loss_type"],
        epsilon_low=options["epsilon"],
        epsilon_high=options["epsilon_high"],
        use_vllm=False,
        model=types.SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        accelerator=OneProcess(),
        max_completion_length=logp.shape[1],
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": collections.defaultdict(list)},
    )
    trainer.get_high_entropy_mask = lambda e, m, t: GRPOTrainer.get_high_entropy_mask(trainer, e, m, t)
    trainer._get_per_token_logps_and_entropies = lambda *a, **k: (logp, entropies, None)
    rows = logp.shape[0]
    inputs = {
        "prompt_ids": torch.zeros(rows, 1, dtype=torch.long),
        "prompt_mask": torch.ones(rows, 1, dtype=torch.long),
        "completion_ids": torch.zeros_like(mask),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    return GRPOTrainer._compute_loss(trainer, None, inputs)


def bleuberi_loss(logp, old, ref, advantages, mask, entropies, options: dict) -> torch.Tensor:
    config = LossConfig(
        beta=options["beta"],
        epsilon=options["epsilon"],
        epsilon_high=options["epsilon_high"],
        loss_type=options["loss_type"],
        importance_sampling_level=options["level"],
        use_bias_correction_kl=options["bias"],
        delta=options["delta"],
        top_entropy_quantile=options["quantile"],
        importance_mode=None,  # TRL's loss alone: no engine importance weights
        importance_clip_max=3.0,
    )
    tokens = int(mask.sum())
    denominator = Denominator.for_step(
        options["loss_type"],
        n_sequences=logp.shape[0],
        n_tokens_global=tokens,
        n_tokens_local=tokens,
        world_size=1,
        max_completion_length=logp.shape[1],
    )
    keep = high_entropy_mask(entropies, mask, options["quantile"]) if options["quantile"] < 1 else None
    return grpo_loss(logp, old, ref, advantages, mask, config, denominator, None, keep).loss


def main() -> int:
    generator = torch.Generator().manual_seed(0)
    rows, width = 4, 6
    mask = torch.ones(rows, width, dtype=torch.long)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    old = -torch.rand(rows, width, generator=generator) * 3
    logp = old + (torch.rand(rows, width, generator=generator) - 0.4) * 1.2  # ratios about 0.6..1.9
    ref = old + (torch.rand(rows, width, generator=generator) - 0.5) * 0.8
    advantages = torch.tensor([1.2, -0.8, 0.5, -0.3])
    entropies = torch.rand(rows, width, generator=generator) * 3
    worst, cases = 0.0, 0
    grid = itertools.product(
        ["grpo", "bnpo", "dapo", "dr_grpo", "cispo"], ["token", "sequence"], [False, True], [None, 1.4], [1.0, 0.3]
    )
    for loss_type, level, bias, delta, quantile in grid:
        options = {
            "loss_type": loss_type,
            "level": level,
            "bias": bias,
            "delta": delta,
            "quantile": quantile,
            "beta": 0.1,
            "epsilon": 0.2,
            "epsilon_high": 3.0 if loss_type == "cispo" else 0.28,
        }
        theirs, ours = logp.clone().requires_grad_(True), logp.clone().requires_grad_(True)
        a = trl_loss(theirs, old, ref, advantages, mask, entropies, options)
        b = bleuberi_loss(ours, old, ref, advantages, mask, entropies, options)
        a.backward()
        b.backward()
        difference = max(abs(float(a.detach() - b.detach())), float((theirs.grad - ours.grad).abs().max()))
        worst, cases = max(worst, difference), cases + 1
        if difference > 1e-12:
            print(f"differs by {difference:.3g}: {options}")
    print(f"TRL {version('trl')}: {cases} option combinations, largest difference (loss or gradient) {worst:.3g}")
    return 0 if worst <= 1e-12 else 1


if __name__ == "__main__":
    sys.exit(main())
