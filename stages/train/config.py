"""Every option of `train`, with its default and the reason for it where the reason is not obvious.

Names follow TRL's GRPOConfig where the meaning is the same. Batch sizes count completions, as in
TRL: one step samples `per_device_train_batch_size * grad_accum` completions per device, that is
`per_device_train_batch_size * grad_accum / num_generations` prompts, each sampled
`num_generations` times. A step is one such rollout followed by `num_iterations` optimizer updates.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any, Literal, get_args

from stages.core import options
from stages.core.errors import UsageError
from stages.core.options import ModelOptions, PromptOptions, group, option
from stages.engines.base import PANEL as ENGINE_PANEL
from stages.engines.base import EngineOptions, SamplingParams
from stages.metrics import MetricSpec, parse_spec, parse_specs
from stages.score import Combine, Scorer
from stages.train.algorithms import ALGORITHMS, Algo, Algorithm

LossType = Literal["grpo", "bnpo", "dapo", "dr_grpo", "cispo"]
ScaleRewards = Literal["group", "batch", "none"]
ImportanceLevel = Literal["token", "sequence"]
ImportanceSamplingMode = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
Schedule = Literal["constant_with_warmup", "linear", "cosine"]
Parallel = Literal["ddp", "fsdp"]
LOSS_TYPES: tuple[str, ...] = get_args(LossType)
# Losses that sum per-token terms: with sequence-level ratios each sequence then weighs by its length.
TOKEN_LEVEL_LOSSES = ("bnpo", "dr_grpo", "dapo", "cispo")
# CISPO's epsilon_high is an absolute cap on the ratio (epsilon_max), not 1 + epsilon_high: the ScaleRL
# paper's (and TRL's documented) recommendation, used when epsilon_high is not set.
CISPO_EPSILON_MAX = 5.0


@dataclass(frozen=True)
class LossConfig:
    """The settings the GRPO loss reads, resolved from a TrainConfig by `TrainConfig.loss_config()` (whose
    fields hold the defaults and the help: none are declared here)."""

    beta: float
    epsilon: float  # lower clip: ratio >= 1 - epsilon
    epsilon_high: float  # upper clip: ratio <= 1 + epsilon_high (cispo: ratio weight <= epsilon_high)
    loss_type: LossType
    importance_sampling_level: ImportanceLevel
    use_bias_correction_kl: bool  # weight the k3 KL term by the (differentiable) importance ratio
    delta: float | None  # two-sided clipping: the unclipped ratio is capped at delta
    top_entropy_quantile: float  # policy term only on the top quantile of tokens by entropy
    # TRL's truncated importance sampling against the sampler's log-probs (None: off), capped at the max
    importance_mode: ImportanceSamplingMode | None
    importance_clip_max: float


# --help panels
WHAT, LORA, SAMPLING, BATCH, LOSS, OUTPUTS = (
    "What to train",
    "LoRA",
    "Sampling",
    "Batch and schedule",
    "GRPO loss",
    "Checkpoints and logging",
)


@dataclass
class TrainConfig(options.Options):
    """Every option of `train`. Each field is declared once: `bleuberi train --FLAG`, the `[train]` key of
    `bleuberi run` and its `--print-config` comment all come from it."""

    # what to train
    model: ModelOptions = group(ModelOptions)
    algo: Algo = option("grpo", "grpo | sft (the paper's SFT baseline)", panel=WHAT)
    reward: list[str] = option(
        factory=lambda: ["bleu"],
        help="rewards: bleu, bleu-paper, chrf, rouge-l, bertscore, emb, rm:PATH, rm-url:URL, judge-url:URL, "
        "py:FILE.py:FUNCTION (your own); several are combined by reward_combine",
        metavar="NAME[:ARG][:WEIGHT]",
        panel=WHAT,
    )
    reward_combine: Combine = option(
        "sum", "sum (weighted sum; RM logits are not 0..1) | zscore (per-group z-scores, weighted mean)", panel=WHAT
    )
    reasoning: bool = options.reasoning_option()
    # TRL's default prompt cap; a run sets one for all of its stages
    prompt: PromptOptions = group(PromptOptions, max_prompt_length=512)
    # LoRA
    lora_r: int = option(16, "LoRA rank", metavar="R", panel=LORA)
    lora_alpha: int = option(32, "LoRA scale numerator (scale = alpha / r)", metavar="A", panel=LORA)
    # 0 keeps the training forward identical to the sampling forward (on-policy ratios are exactly 1).
    lora_dropout: float = option(
        0.0, "LoRA dropout; 0 keeps sampling and training forwards identical", metavar="P", panel=LORA
    )
    target_modules: list[str] = option(
        factory=lambda: ["all-linear"],
        help="LoRA targets; all-linear = every linear layer but the output head",
        metavar="NAME",
        panel=LORA,
    )
    # sampling (paper: G=8, temperature 0.9, 512/512)
    num_generations: int = option(8, "G: completions sampled per prompt (paper: 8)", metavar="G", panel=SAMPLING)
    # The paper's temperature and completion length; max_new_tokens is spelled as TRL spells it.
    sampling: SamplingParams = group(
        SamplingParams, rename={"max_new_tokens": "max_completion_length"}, max_new_tokens=512, temperature=0.9
    )
    # batch and schedule
    per_device_train_batch_size: int = option(
        8, "completions per sampling batch (a multiple of num_generations)", metavar="N", panel=BATCH
    )
    grad_accum: int = option(1, "sampling batches per optimizer step", metavar="K", panel=BATCH)
    micro_batch: int | None = option(
        None, "completions per forward/backward (default: per_device_train_batch_size)", metavar="N", panel=BATCH
    )
    max_steps: int | None = option(None, "optimizer steps (default: from num_train_epochs)", metavar="N", panel=BATCH)
    num_train_epochs: float = option(1.0, "passes over the prompts", metavar="E", panel=BATCH)
    # The paper's 1e-6 is for full fine-tuning. LoRA's best learning rate is about ten times the full
    # fine-tuning one (Schulman et al., "LoRA Without Regret", 2025), hence 1e-5.
    learning_rate: float = option(
        1e-5,
        "peak learning rate (bleuberi train's default 1e-5 is 10x the paper's full-FT 1e-6)",
        metavar="LR",
        flags=("--learning-rate", "--lr"),
        panel=BATCH,
    )
    lr_scheduler_type: Schedule = option("constant_with_warmup", "the learning rate after the warmup", panel=BATCH)
    warmup_ratio: float = option(0.05, "share of steps with a linear warmup", metavar="R", panel=BATCH)
    weight_decay: float = option(0.0, "AdamW weight decay", metavar="W", panel=BATCH)
    max_grad_norm: float = option(0.2, "gradient clipping (paper: 0.2)", metavar="N", panel=BATCH)
    # GRPO (paper: beta 0.04; TRL's current loss default is dapo)
    beta: float = option(
        0.04, "KL weight towards the base model (paper: 0.04); 0 skips the reference pass", metavar="B", panel=LOSS
    )
    epsilon: float = option(0.2, "lower clip range of the probability ratio", metavar="E", panel=LOSS)
    epsilon_high: float | None = option(
        None,
        "upper clip range (default: epsilon); for cispo the ratio cap itself (default 5.0)",
        metavar="E",
        panel=LOSS,
    )
    loss_type: LossType = option(
        "dapo",
        "how token losses are averaged (bnpo: a token mean per step, not per micro-batch as in TRL)",
        panel=LOSS,
    )
    scale_rewards: ScaleRewards = option(
        "group", "whose reward std the advantages are divided by: the group's, the batch's, or none", panel=LOSS
    )
    importance_sampling_level: ImportanceLevel = option(
        "token", "a ratio per token, or per sequence (GSPO; with a token-level loss a warning says why not)", panel=LOSS
    )
    # TRL 1.16 defaults to True. False is the objective the paper trained with (TRL before this option: the
    # plain k3 term); on-policy the ratio is 1 either way and only the KL gradient differs (~1e-2 relative).
    use_bias_correction_kl: bool = option(
        False,
        "weight the KL term by the ratio (TRL: true; false = the paper's objective)",
        flags=("--use-bias-correction-kl/--no-use-bias-correction-kl",),
        panel=LOSS,
    )
    delta: float | None = option(
        None, "cap the unclipped ratio at D > 1 + epsilon_high (two-sided clip, INTELLECT-2)", metavar="D", panel=LOSS
    )
    top_entropy_quantile: float = option(
        1.0,
        "policy loss only on this top share of tokens by entropy (1 = all; paper value 0.2)",
        metavar="Q",
        panel=LOSS,
    )
    num_iterations: int = option(1, "optimizer updates per rollout (mu)", metavar="MU", panel=LOSS)
    mask_truncated: bool = option(False, "leave completions cut at the length limit out of the loss", panel=LOSS)
    skip_zero_std: bool = option(False, "leave groups with equal rewards out of the loss pass", panel=LOSS)
    # rollout engine (who samples): transformers in this process, vllm in this process, or a server
    engine: EngineOptions = group(EngineOptions, table=True)
    # Sample step t+1 while step t trains, with the adapter of step t-1 (one step stale, never more).
    async_rollouts: bool = option(
        False,
        "sample step t+1 while step t trains, with the adapter of step t-1 (vllm/server only)",
        panel=ENGINE_PANEL,
    )
    # TRL's correction for the sampler-vs-trainer log-prob mismatch; TRL too has it on with vLLM.
    vllm_importance_sampling_correction: bool | None = option(
        None,
        "reweight the policy term by the truncated importance ratio trainer/sampler (TRL's); default: on where "
        "an engine of its own samples (vllm, server) with top_p 1, off for the policy's own sampling",
        flags=("--vllm-importance-sampling-correction/--no-vllm-importance-sampling-correction",),
        panel=ENGINE_PANEL,
    )
    vllm_importance_sampling_mode: ImportanceSamplingMode = option(
        "token_truncate", "per token or sequence: ratios truncated at C, or samples above C masked", panel=ENGINE_PANEL
    )
    vllm_importance_sampling_clip_max: float = option(
        3.0, "upper bound C of the importance ratio (truncate: clip; mask: drop above)", metavar="C", panel=ENGINE_PANEL
    )
    # hardware
    gradient_checkpointing: bool | None = option(
        None,
        "default: on for CUDA, off on CPU",
        flags=("--gradient-checkpointing/--no-gradient-checkpointing",),
        panel="Model",
    )
    # Under torchrun: ddp keeps the whole base model on every rank; fsdp shards it (stages/train/sharding.py).
    parallel: Parallel = option(
        "ddp",
        "under torchrun: ddp (every rank holds the whole model) | fsdp (the model sharded over the ranks: "
        "for a base larger than one GPU)",
        panel="Model",
    )
    gather_for_sampling: bool = option(
        True,
        "under --parallel fsdp, sampling with the live policy (transformers engine) gathers the whole model once "
        "per round (fast; every rank holds the whole base meanwhile); --no-gather-for-sampling keeps it "
        "sharded and gathers each layer for each token (slow; for a base that does not fit one device)",
        flags=("--gather-for-sampling/--no-gather-for-sampling",),
        panel="Model",
    )
    # bookkeeping
    seed: int = options.seed_option()
    save_steps: int = option(50, "checkpoint every N steps", metavar="N", panel=OUTPUTS)
    save_total_limit: int | None = option(3, "keep the newest N checkpoints", metavar="N", panel=OUTPUTS)
    logging_steps: int = option(1, "metrics every N steps", metavar="N", panel=OUTPUTS)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def algorithm(self) -> Algorithm:
        return ALGORITHMS[self.algo]

    def loss_config(self) -> LossConfig:
        """The loss settings, with epsilon_high resolved (None: epsilon; for cispo, CISPO_EPSILON_MAX) and the
        importance correction's mode None where the correction is off."""
        default_high = CISPO_EPSILON_MAX if self.loss_type == "cispo" else self.epsilon
        return LossConfig(
            beta=self.beta,
            epsilon=self.epsilon,
            epsilon_high=default_high if self.epsilon_high is None else self.epsilon_high,
            loss_type=self.loss_type,
            importance_sampling_level=self.importance_sampling_level,
            use_bias_correction_kl=self.use_bias_correction_kl,
            delta=self.delta,
            top_entropy_quantile=self.top_entropy_quantile,
            importance_mode=self.vllm_importance_sampling_mode if self.importance_correction else None,
            importance_clip_max=self.vllm_importance_sampling_clip_max,
        )

    @cached_property
    def rewards(self) -> list[MetricSpec]:
        """The rewards, parsed once: as given, plus `format` in reasoning mode (unless it is named already)."""
        specs = parse_specs(self.reward)
        if self.reasoning and "format" not in {spec.kind for spec in specs}:
            specs.append(parse_spec("format"))
        return specs

    @cached_property
    def scorer(self) -> Scorer:
        """The reward, built once: every spec, combined by reward_combine; answers extracted in reasoning mode.
        A model-based reward loads its model when first used, on the device the trainer gives it (`Scorer.to`)."""
        return Scorer.for_rewards(self.rewards, combine=self.reward_combine, extract_answer=self.reasoning)

    @property
    def system_prompt(self) -> str | None:
        """--system-prompt, else in reasoning mode the prompt that asks for <think>/<answer>."""
        from stages.metrics.reasoning import system_prompt_for

        return system_prompt_for(self.prompt.system_prompt, self.reasoning)

    def warnings(self) -> list[str]:
        """Settings that run but probably do not do what was meant (TRL warns about the same)."""
        notes = []
        if self.importance_sampling_level == "sequence" and self.loss_type in TOKEN_LEVEL_LOSSES:
            notes.append(
                f"importance_sampling_level=sequence with loss_type={self.loss_type}: this loss sums per-token "
                "terms, so each sequence weighs by its completion length instead of optimising the per-sequence "
                "objective; GSPO as published uses loss_type=grpo"
            )
        if self.delta is not None and self.loss_type == "cispo":
            notes.append("delta has no effect with loss_type=cispo (CISPO caps the ratio with epsilon_high)")
        return notes

    @property
    def importance_correction(self) -> bool:
        """Is the truncated importance correction on? Asked for, else on where an engine of its own samples
        (its kernels, precision and, with async rollouts, its adapter differ from the trainer's) with top_p 1
        (below 1 vLLM's log-probs are over the nucleus, not the trainer's distribution)."""
        if self.vllm_importance_sampling_correction is not None:
            return self.vllm_importance_sampling_correction
        return not self.engine.samples_with_live_policy and self.sampling.top_p == 1.0

    @property
    def prompts_per_step(self) -> int:
        """Items (prompts, or SFT examples) each step takes on each device."""
        return self.algorithm.items_per_step(self)

    def validate(self) -> None:
        """Every setting, for every algorithm, before anything is loaded (the rewards' specs and files too)."""
        options.check_literals(self)
        self.algorithm.check(self)
        self._validate_batches()
        self._validate_loss()
        self._validate_rollouts()
        need(bool(self.reward), "at least one --reward is needed")
        self.scorer  # noqa: B018 - bad specs fail now, whatever the algorithm; model-based rewards load when used

    def _validate_batches(self) -> None:
        need(self.per_device_train_batch_size >= 1 and self.grad_accum >= 1, "batch sizes must be >= 1")
        need(self.micro_batch is None or self.micro_batch >= 1, "micro_batch must be >= 1")
        need(self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1")
        need(self.num_train_epochs > 0, "num_train_epochs must be > 0")
        need(self.learning_rate > 0, "learning_rate must be > 0")
        need(0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)")
        need(self.max_grad_norm > 0, "max_grad_norm must be > 0")
        need(self.lora_r >= 1 and self.lora_alpha > 0 and 0 <= self.lora_dropout < 1, "bad LoRA settings")
        need(self.save_steps >= 1 and self.logging_steps >= 1, "save_steps and logging_steps must be >= 1")
        need(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit must be >= 1")

    def _validate_loss(self) -> None:
        need(self.beta >= 0, "beta must be >= 0")
        need(
            0 < self.epsilon < 1 and self.loss_config().epsilon_high > 0,
            "epsilon must be in (0, 1) and epsilon_high > 0",
        )
        need(
            self.delta is None or self.delta > 1 + self.loss_config().epsilon_high or self.loss_type == "cispo",
            "delta must be greater than 1 + epsilon_high (it caps the unclipped ratio above the clip range)",
        )
        need(0.0 <= self.top_entropy_quantile <= 1.0, "top_entropy_quantile must be in [0, 1]")
        need(self.num_iterations >= 1, "num_iterations must be >= 1")

    def _validate_rollouts(self) -> None:
        top_p = self.sampling.top_p
        need(self.sampling.temperature > 0, "temperature must be > 0 for training (sampling needs randomness)")
        need(
            not self.engine.chat_only, "training needs token ids: a chat-only server (server_chat_only) cannot be used"
        )
        live = self.engine.samples_with_live_policy
        need(
            not self.async_rollouts or not live,
            "async_rollouts needs an engine of its own (backend vllm or server): the transformers engine samples "
            "with the very weights being trained",
        )
        need(
            top_p == 1.0 or live or not (self.async_rollouts or self.vllm_importance_sampling_correction),
            "top_p < 1 cannot be used with async_rollouts or vllm_importance_sampling_correction on an engine: "
            "vLLM renormalises its log-probs over the nucleus, so the behaviour policy's log-probs would not be "
            "the trainer's (use top_p 1, as the paper does)",
        )
        need(self.vllm_importance_sampling_clip_max > 0, "vllm_importance_sampling_clip_max must be > 0")

    def to_dict(self) -> dict[str, Any]:
        """Every option by name, groups flattened (config.json, checkpoints, trackers)."""
        return options.values_of(self)


def need(condition: bool, message: str) -> None:
    """A setting that cannot work: a usage error naming it."""
    if not condition:
        raise UsageError(message)
