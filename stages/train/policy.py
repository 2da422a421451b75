"""The policy being trained: the base model with a LoRA adapter, its optimizer, and the generator that
samples rollouts (the policy itself, or an engine of its own holding the base model)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from stages.engines.generator import Generator
from stages.train.config import TrainConfig
from stages.train.distributed import Distributed

Autocast = Callable[[], contextlib.AbstractContextManager[None]]


@dataclass
class Policy:
    model: Any  # the PEFT-wrapped model
    generator: Generator  # the tokenizer and the engine that samples rollouts
    trainable: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    device: torch.device
    autocast: Autocast

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        """The backward pass of one micro-batch of an optimizer step. A sharded policy reduces gradients over
        the ranks with the step's last micro-batch only: each rank first sums its own, as under DDP (the
        same sums in the same order, and one reduce-scatter per step instead of one per micro-batch)."""
        from stages.train.sharding import gradient_sync

        gradient_sync(self.model, last)
        loss.backward()

    def apply_gradients(self, dist: Distributed, max_grad_norm: float) -> float:
        """One optimizer step on the summed gradients of every rank; returns the gradient norm before clipping."""
        from stages.train.sharding import gradient_norm

        dist.sum_gradients(self.trainable)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, max_grad_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return gradient_norm(grad_norm)


def load_policy(config: TrainConfig, device: torch.device, dist: Distributed | None = None) -> Policy:
    """The base model with a fresh LoRA (seeded by the caller), an AdamW over the LoRA weights, and the
    rollout engine: the policy itself (transformers) or vLLM / a server holding the base model. Under
    `--parallel fsdp` the policy is sharded over the ranks before the optimizer sees its weights."""
    from stages.core.models import load_model, load_tokenizer, resolve_dtype, resolve_model
    from stages.engines.base import start_engine
    from stages.engines.generator import engine_target

    options = config.model
    resolved = resolve_model(options.model)
    tokenizer = load_tokenizer(resolved, trust_remote_code=options.trust_remote_code)
    dtype, remote = resolve_dtype(options.dtype, device), options.trust_remote_code
    if dist is not None and dist.sharded:
        from stages.train import sharding

        base = sharding.load_base(resolved, dtype=dtype, ranks=dist, trust_remote_code=remote)
        model = _with_lora(base, config, device)
        sharding.shard(model, device, dist)
    else:
        model = _with_lora(load_model(resolved, device=device, dtype=dtype, trust_remote_code=remote), config, device)
    target = engine_target(resolved, tokenizer, options, device=str(device), lora_rank=config.lora_r, live_policy=model)
    engine = start_engine(config.engine, target)
    prompt = config.prompt
    generator = Generator(
        tokenizer,
        engine,
        target.stop_ids,
        options.model,
        None,
        config.system_prompt,
        prompt.max_prompt_length,
        prompt.long_prompts,
    )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=config.weight_decay)
    return Policy(model, generator, trainable, optimizer, device, _autocast(model, device))


def _with_lora(base: Any, config: TrainConfig, device: torch.device) -> Any:
    from peft import LoraConfig, get_peft_model

    from stages.core.precision import float32_activations

    targets: str | list[str] = "all-linear" if config.target_modules == ["all-linear"] else config.target_modules
    lora = LoraConfig(
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(base, lora)
    float32_activations(model)  # a bf16 base must not round the adapter's updates away (precision.py)
    gradient_checkpointing = (
        device.type == "cuda" if config.gradient_checkpointing is None else config.gradient_checkpointing
    )
    if gradient_checkpointing:
        base_model = model.get_base_model()
        if hasattr(base_model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            base_model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            base_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@contextlib.contextmanager
def adapter_scaled_to_zero(model: Any) -> Iterator[None]:
    """While inside, every LoRA layer adds its contribution times zero: the base model's function through
    the policy's own modules and kernels (peft's `disable_adapter` takes another path, which in bf16 may
    round differently)."""
    from peft.tuners.lora import LoraLayer

    saved = [(module, dict(module.scaling)) for module in model.modules() if isinstance(module, LoraLayer)]
    try:
        for module, scaling in saved:
            module.scaling.update(dict.fromkeys(scaling, 0.0))
        yield
    finally:
        for module, scaling in saved:
            module.scaling.update(scaling)


def _autocast(model: Any, device: torch.device) -> Autocast:
    if device.type == "cuda" and next(model.parameters()).dtype == torch.bfloat16:
        return lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext
