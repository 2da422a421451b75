"""Every option of `train`, with its default and the reason for it where the reason is not obvious.

Names follow TRL's GRPOConfig where the meaning is the same. Batch sizes count completions, as in
TRL: one step samples `per_device_train_batch_size * grad_accum` completions per device, that is
`per_device_train_batch_size * grad_accum / num_generations` prompts, each sampled
`num_generations` times. A step is one such rollout followed by `num_iterations` optimizer updates.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from stages.core.errors import UsageError
from stages.core.models import DEFAULT_MODEL

if TYPE_CHECKING:
    from stages.score import Scorer

LossType = Literal["grpo", "bnpo", "dapo", "dr_grpo", "cispo"]
ScaleRewards = Literal["group", "batch", "none"]
ImportanceLevel = Literal["token", "sequence"]
RewardCombine = Literal["sum", "zscore"]
LOSS_TYPES: tuple[str, ...] = ("grpo", "bnpo", "dapo", "dr_grpo", "cispo")
# Losses that sum per-token terms: with sequence-level ratios each sequence then weighs by its length.
TOKEN_LEVEL_LOSSES = ("bnpo", "dr_grpo", "dapo", "cispo")
# CISPO's epsilon_high is an absolute cap on the ratio (epsilon_max), not 1 + epsilon_high: the ScaleRL
# paper's (and TRL's documented) recommendation, used when epsilon_high is not set.
CISPO_EPSILON_MAX = 5.0


@dataclass(frozen=True)
class LossConfig:
    beta: float = 0.04
    epsilon: float = 0.2  # lower clip: ratio >= 1 - epsilon
    epsilon_high: float = 0.2  # upper clip: ratio <= 1 + epsilon_high (cispo: ratio weight <= epsilon_high)
    loss_type: LossType = "dapo"
    importance_sampling_level: ImportanceLevel = "token"
    use_bias_correction_kl: bool = False  # weight the k3 KL term by the (differentiable) importance ratio
    delta: float | None = None  # two-sided clipping: the unclipped ratio is capped at delta
    top_entropy_quantile: float = 1.0  # policy term only on the top quantile of tokens by entropy


Algo = Literal["grpo", "sft"]
Backend = Literal["transformers", "vllm", "server"]
ImportanceSamplingMode = Literal["token_truncate", "token_mask", "sequence_truncate", "sequence_mask"]
IS_MODES: tuple[str, ...] = ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")
Schedule = Literal["constant_with_warmup", "linear", "cosine"]


@dataclass
class TrainConfig:
    # what to train
    model: str = DEFAULT_MODEL
    algo: Algo = "grpo"
    reward: list[str] = field(default_factory=lambda: ["bleu"])  # NAME[:ARG][:WEIGHT], combined by reward_combine
    reward_combine: RewardCombine = "sum"
    reasoning: bool = False  # <think>/<answer> system prompt, a format reward, metrics on the answer only
    system_prompt: str | None = None
    trust_remote_code: bool = False
    # LoRA
    lora_r: int = 16
    lora_alpha: int = 32
    # 0 keeps the training forward identical to the sampling forward (on-policy ratios are exactly 1).
    lora_dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    # sampling (paper: G=8, temperature 0.9, 512/512)
    num_generations: int = 8
    temperature: float = 0.9
    top_p: float = 1.0
    max_prompt_length: int = 512
    max_completion_length: int = 512
    drop_long: bool = False  # drop prompts over max_prompt_length instead of cutting them from the left
    # batch and schedule
    per_device_train_batch_size: int = 8  # completions per device per sampling batch
    grad_accum: int = 1  # sampling batches per optimizer step
    micro_batch: int | None = None  # completions per forward/backward (default: per_device_train_batch_size)
    max_steps: int | None = None  # default: enough steps for num_train_epochs
    num_train_epochs: float = 1.0
    # The paper's 1e-6 is for full fine-tuning. LoRA's best learning rate is about ten times the full
    # fine-tuning one (Schulman et al., "LoRA Without Regret", 2025), hence 1e-5.
    learning_rate: float = 1e-5
    lr_scheduler_type: Schedule = "constant_with_warmup"
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    max_grad_norm: float = 0.2
    # GRPO (paper: beta 0.04; TRL's current loss default is dapo)
    beta: float = 0.04
    epsilon: float = 0.2
    epsilon_high: float | None = None  # default: epsilon
    loss_type: LossType = "dapo"
    scale_rewards: ScaleRewards = "group"
    importance_sampling_level: ImportanceLevel = "token"
    # TRL 1.16 defaults to True. False is the objective the paper trained with (TRL before this option: the
    # plain k3 term); on-policy the ratio is 1 either way and only the KL gradient differs (~1e-2 relative).
    use_bias_correction_kl: bool = False
    delta: float | None = None
    top_entropy_quantile: float = 1.0
    num_iterations: int = 1
    mask_truncated: bool = False
    skip_zero_std: bool = False
    # rollout engine (who samples): transformers in this process, vllm in this process, or a server
    backend: Backend = "transformers"
    server_url: str | None = None  # base URL ending in /v1 (backend server)
    server_model: str | None = None  # default: the one model the server lists
    api_key_env: str | None = None  # environment variable holding the server's API key
    concurrency: int = 8  # requests in flight to the server
    # Sample step t+1 while step t trains, with the adapter of step t-1 (one step stale, never more).
    async_rollouts: bool = False
    # TRL's correction for the engine-vs-trainer log-prob mismatch (off: engines here run fp32 on CPU).
    vllm_importance_sampling_correction: bool = False
    vllm_importance_sampling_mode: ImportanceSamplingMode = "token_truncate"
    vllm_importance_sampling_clip_max: float = 3.0
    # hardware
    device: str = "auto"
    dtype: str = "auto"
    gradient_checkpointing: bool | None = None  # default: on for CUDA, off on CPU (where it only costs time)
    # bookkeeping
    seed: int = 42
    save_steps: int = 50
    save_total_limit: int | None = 3
    logging_steps: int = 1

    def __post_init__(self) -> None:
        self.validate()

    def loss_config(self) -> LossConfig:
        """The loss settings, with epsilon_high resolved (None: epsilon; for cispo, CISPO_EPSILON_MAX)."""
        default_high = CISPO_EPSILON_MAX if self.loss_type == "cispo" else self.epsilon
        high = default_high if self.epsilon_high is None else self.epsilon_high
        return LossConfig(
            self.beta,
            self.epsilon,
            high,
            self.loss_type,
            self.importance_sampling_level,
            use_bias_correction_kl=self.use_bias_correction_kl,
            delta=self.delta,
            top_entropy_quantile=self.top_entropy_quantile,
        )

    def reward_specs(self) -> list[str]:
        """The rewards as given, plus `format` in reasoning mode (unless it is named already)."""
        named = {spec.partition(":")[0] for spec in self.reward}
        return [*self.reward, "format"] if self.reasoning and "format" not in named else list(self.reward)

    def resolved_system_prompt(self) -> str | None:
        """--system-prompt, else in reasoning mode the prompt that asks for <think>/<answer>."""
        from stages.metrics.reasoning import system_prompt_for

        return system_prompt_for(self.system_prompt, self.reasoning)

    def scorer(self, device: str = "auto") -> Scorer:
        """The reward: every spec, combined by reward_combine; answers extracted in reasoning mode."""
        from stages.score import Scorer

        return Scorer.for_rewards(
            self.reward_specs(), combine=self.reward_combine, extract_answer=self.reasoning, device=device
        )

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
    def completions_per_step(self) -> int:
        return self.per_device_train_batch_size * self.grad_accum

    @property
    def prompts_per_step(self) -> int:
        """Per device. SFT has no sampling: one example per completion slot."""
        if self.algo == "sft":
            return self.completions_per_step
        return self.completions_per_step // self.num_generations

    def validate(self) -> None:
        def need(condition: bool, message: str) -> None:
            if not condition:
                raise UsageError(message)

        need(self.algo in ("grpo", "sft"), f"unknown algo {self.algo!r}; choose grpo or sft")
        need(self.num_generations >= 2 or self.algo == "sft", "num_generations must be >= 2 (GRPO compares samples)")
        need(self.per_device_train_batch_size >= 1 and self.grad_accum >= 1, "batch sizes must be >= 1")
        if self.algo == "grpo":
            need(
                self.per_device_train_batch_size % self.num_generations == 0,
                f"per_device_train_batch_size ({self.per_device_train_batch_size}) counts completions and must be "
                f"a multiple of num_generations ({self.num_generations})",
            )
        need(self.micro_batch is None or self.micro_batch >= 1, "micro_batch must be >= 1")
        need(self.max_steps is None or self.max_steps >= 1, "max_steps must be >= 1")
        need(self.num_train_epochs > 0, "num_train_epochs must be > 0")
        need(self.learning_rate > 0, "learning_rate must be > 0")
        need(0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)")
        need(self.max_grad_norm > 0, "max_grad_norm must be > 0")
        need(self.beta >= 0, "beta must be >= 0")
        need(
            0 < self.epsilon < 1 and self.loss_config().epsilon_high > 0,
            "epsilon must be in (0, 1) and epsilon_high > 0",
        )
        need(self.loss_type in LOSS_TYPES, f"unknown loss_type {self.loss_type!r}; choose from {', '.join(LOSS_TYPES)}")
        need(
            self.delta is None or self.delta > 1 + self.loss_config().epsilon_high or self.loss_type == "cispo",
            "delta must be greater than 1 + epsilon_high (it caps the unclipped ratio above the clip range)",
        )
        need(0.0 <= self.top_entropy_quantile <= 1.0, "top_entropy_quantile must be in [0, 1]")
        need(self.reward_combine in ("sum", "zscore"), "reward_combine must be sum or zscore")
        need(self.scale_rewards in ("group", "batch", "none"), "scale_rewards must be group, batch or none")
        need(self.importance_sampling_level in ("token", "sequence"), "importance_sampling_level: token or sequence")
        need(self.num_iterations >= 1, "num_iterations must be >= 1")
        need(self.temperature > 0, "temperature must be > 0 for training (sampling needs randomness)")
        need(0 < self.top_p <= 1, "top_p must be in (0, 1]")
        need(self.max_prompt_length >= 1 and self.max_completion_length >= 1, "length limits must be >= 1")
        need(self.lora_r >= 1 and self.lora_alpha > 0 and 0 <= self.lora_dropout < 1, "bad LoRA settings")
        need(bool(self.reward), "at least one --reward is needed")
        if self.algo == "grpo":
            self.scorer()  # bad specs fail now; model-based rewards only load when first used
        need(self.save_steps >= 1 and self.logging_steps >= 1, "save_steps and logging_steps must be >= 1")
        need(self.save_total_limit is None or self.save_total_limit >= 1, "save_total_limit must be >= 1")
        need(self.backend in ("transformers", "vllm", "server"), "backend must be transformers, vllm or server")
        need(self.backend != "server" or bool(self.server_url), "backend server needs server_url (ending in /v1)")
        need(self.concurrency >= 1, "concurrency must be >= 1")
        need(
            not self.async_rollouts or self.backend != "transformers",
            "async_rollouts needs an engine of its own (backend vllm or server): the transformers engine samples "
            "with the very weights being trained",
        )
        need(
            self.top_p == 1.0
            or self.backend == "transformers"
            or not (self.async_rollouts or self.vllm_importance_sampling_correction),
            "top_p < 1 cannot be used with async_rollouts or vllm_importance_sampling_correction on an engine: "
            "vLLM renormalises its log-probs over the nucleus, so the behaviour policy's log-probs would not be "
            "the trainer's (use top_p 1, as the paper does)",
        )
        need(
            self.vllm_importance_sampling_mode in IS_MODES,
            f"vllm_importance_sampling_mode must be one of {', '.join(IS_MODES)}",
        )
        need(self.vllm_importance_sampling_clip_max > 0, "vllm_importance_sampling_clip_max must be > 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# One line per option, for `bleuberi run --print-config` (a test checks every field has one).
TRAIN_HELP: dict[str, str] = {
    "model": "causal LM to train",
    "algo": "grpo | sft (the paper's SFT baseline)",
    "reward": "NAME[:ARG][:WEIGHT] rewards: bleu, bleu-paper, chrf, rouge-l, bertscore, emb, rm:PATH, rm-url:URL",
    "reward_combine": "sum (weighted sum; RM logits are not 0..1) | zscore (per-group z-scores, weighted mean)",
    "reasoning": "ask for <think>...</think><answer>...</answer>, add a format reward, score only the answer",
    "system_prompt": "a system turn for every prompt",
    "trust_remote_code": "let the model repository run its own code",
    "lora_r": "LoRA rank",
    "lora_alpha": "LoRA scale numerator (scale = alpha / r)",
    "lora_dropout": "LoRA dropout; 0 keeps sampling and training forwards identical",
    "target_modules": "LoRA targets; all-linear = every linear layer but the output head",
    "num_generations": "G: completions sampled per prompt (paper: 8)",
    "temperature": "sampling temperature (paper: 0.9)",
    "top_p": "nucleus sampling mass",
    "max_prompt_length": "longer prompts are cut from the left (or dropped, with drop_long)",
    "max_completion_length": "new tokens per completion (paper: 512)",
    "drop_long": "drop over-long prompts instead of cutting them",
    "per_device_train_batch_size": "completions per sampling batch (a multiple of num_generations)",
    "grad_accum": "sampling batches per optimizer step",
    "micro_batch": "completions per forward/backward (default: per_device_train_batch_size)",
    "max_steps": "optimizer steps (default: from num_train_epochs)",
    "num_train_epochs": "passes over the prompts",
    "learning_rate": "peak learning rate (bleuberi train's default 1e-5 is 10x the paper's full-FT 1e-6)",
    "lr_scheduler_type": "constant_with_warmup | linear | cosine",
    "warmup_ratio": "share of steps with a linear warmup",
    "weight_decay": "AdamW weight decay",
    "max_grad_norm": "gradient clipping (paper: 0.2)",
    "beta": "KL weight towards the base model (paper: 0.04); 0 skips the reference pass",
    "epsilon": "lower clip range of the probability ratio",
    "epsilon_high": "upper clip range (default: epsilon); for cispo the ratio cap itself (default 5.0)",
    "loss_type": (
        "grpo | bnpo | dapo | dr_grpo | cispo: how token losses are averaged (bnpo: a token mean per step, "
        "not per micro-batch as in TRL)"
    ),
    "scale_rewards": "group | batch | none: the std advantages are divided by",
    "importance_sampling_level": "token | sequence (GSPO; with a token-level loss a warning says why not)",
    "use_bias_correction_kl": "weight the KL term by the ratio (TRL: true; false = the paper's objective)",
    "delta": "two-sided clipping: cap the unclipped ratio at delta (> 1 + epsilon_high; INTELLECT-2)",
    "top_entropy_quantile": "policy loss only on this top share of tokens by entropy (1 = all; paper value 0.2)",
    "num_iterations": "optimizer updates per rollout (mu)",
    "mask_truncated": "leave completions cut at the length limit out of the loss",
    "skip_zero_std": "leave groups with equal rewards out of the loss pass",
    "backend": "rollout engine: transformers (in process) | vllm (in process) | server (OpenAI-compatible)",
    "server_url": "base URL of the server, ending in /v1 (backend server)",
    "server_model": "the served model's name (default: the one the server lists)",
    "api_key_env": "environment variable holding the server's API key (sent to that host only)",
    "concurrency": "requests in flight to the server",
    "async_rollouts": "sample step t+1 while step t trains, with the adapter of step t-1 (vllm/server only)",
    "vllm_importance_sampling_correction": "TRL's truncated importance sampling for engine-vs-trainer log-prob drift",
    "vllm_importance_sampling_mode": "token_truncate | token_mask | sequence_truncate | sequence_mask",
    "vllm_importance_sampling_clip_max": "upper bound C of the importance ratio (truncate: clip; mask: drop above)",
    "device": "auto | cpu | cuda | mps",
    "dtype": "auto | float32 | bfloat16 | float16",
    "gradient_checkpointing": "default: on for CUDA, off on CPU",
    "seed": "random seed",
    "save_steps": "checkpoint every N steps",
    "save_total_limit": "keep the newest N checkpoints",
    "logging_steps": "metrics every N steps",
}
