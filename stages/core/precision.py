"""One precision policy for every device: what runs in the model's dtype and what runs in float32.

- The base weights are in `--dtype` (bfloat16 halves memory and, on CPUs with AVX-512 BF16 and on
  GPUs, speeds up the matmuls).
- LoRA weights and the optimizer state stay float32 (peft keeps adapter weights in float32 when the base
  is bf16/fp16; AdamW's state follows its parameters), and the saved adapter is float32.
- The output projection (the logits) is computed in float32, by the sampler and the trainer alike.
  Rounding logits to bf16 costs up to half an ulp of a logit (about 0.03 for logits near 10): the largest
  share of the sampler-vs-trainer log-prob drift and of the KL noise in bf16 (bench/precision_bench.py).
- Log-probs, entropies, the loss, advantages and the KL are float32 (stages/train/logprobs.py, loss.py).
- In training, the activations between the bf16 matmuls are float32 (`float32_activations`): a LoRA's
  small updates would otherwise be rounded away where peft adds them to the base layer's bf16 product.
- Reward models (`rm:`, `--judge-model`) load as `auto` does: bfloat16 on a CUDA GPU that has it, else
  float32 (never float16: reward logits are unbounded). The encoder metrics (`bertscore`, `emb`) stay
  float32: their scores are promised equal to the bert-score / sentence-transformers computation.

What bf16 still costs after that: every matmul's input is rounded to bf16, so a KV-cached decode and a
full forward pass (different kernels, different summation orders) differ by a few ulps that propagate,
and a tiny LoRA update moves some matmul inputs by one ulp and leaves others: a KL noise floor of about
5e-4 after one tiny step on a 135M model (fp32: 2e-5; bench/RESULTS.md). At step 1, before any update,
the reference and the policy are the same computation, and their KL is exactly 0.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Where a frozen low-precision weight keeps its float32 copy (with the weight's version when it was made),
# so the copy is made once and lives as long as the weight: the head is not a LoRA target, so in training
# it never changes.
_COPY = "_bleuberi_float32_copy"


def float32_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` in float32: itself when it already is; a differentiable cast when it is trained; else a
    cached copy."""
    import torch

    if weight.dtype == torch.float32:
        return weight
    if weight.requires_grad:
        return weight.float()
    cached = getattr(weight, _COPY, None)
    if cached is None or cached[0] != weight._version:
        with torch.inference_mode(False):  # a normal tensor, usable by autograd later, even if made while sampling
            cached = (weight._version, weight.detach().float())
        setattr(weight, _COPY, cached)
    return cached[1]


@contextlib.contextmanager
def float32_logits(model: Any) -> Iterator[None]:
    """While inside, the model's output projection computes its logits in float32 from the last hidden
    state (nothing changes for a float32 model). The model's own forward still runs, so any scaling it
    applies to the logits afterwards is kept."""
    import torch
    import torch.nn.functional as F

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    head = base.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear) or head.weight.dtype == torch.float32:
        yield
        return

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        bias = None if head.bias is None else float32_weight(head.bias)
        return F.linear(hidden.float(), float32_weight(head.weight), bias)

    head.forward = forward  # an instance attribute: shadows nn.Linear.forward for this module only
    try:
        yield
    finally:
        del head.forward


def float32_activations(model: Any) -> int:
    """In a model whose base weights are lower precision (bf16), make every linear layer take its input in
    its weight's dtype and give its product in float32: the matmuls run in bf16 on bf16 weights, everything
    between them (the residual stream, norms, attention, activations, a LoRA's update) in float32. Returns
    how many layers it changed; a float32 model is left as it is.

    Why: peft adds a LoRA's float32 update to the base layer's bf16 product and rounds the sum back to
    bf16, so an update smaller than half a unit in the last place of the product vanishes and a larger one
    moves it by whole units. A LoRA's early updates are that small: in bf16 they were partly lost (the demo
    learned less than in fp32 at the same rate: KL 0.002 after its first step against fp32's 0.010) and
    partly turned into rounding noise. With the sums in float32 the update reaches the residual stream
    whole (the demo's first step: KL 0.009); only the rounding of each matmul's input is left (the KL after
    a tiny step falls from 1.3e-3 to 5e-4; fp32: 2e-5)."""
    import torch

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    changed = 0
    for module in model.modules():
        if not isinstance(module, torch.nn.Linear) or module.weight.dtype == torch.float32:
            continue
        if getattr(module, _HOOKED, False):
            continue
        module.register_forward_pre_hook(_input_in_weight_dtype)
        if module is not head:  # the logits: float32 already where bleuberi takes them (float32_logits)
            module.register_forward_hook(_output_in_float32)
        setattr(module, _HOOKED, True)
        changed += 1
    return changed


_HOOKED = "_bleuberi_float32_activations"


def _input_in_weight_dtype(layer: Any, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    if "forward" in vars(layer):  # float32_logits' own forward takes the float32 hidden state as it is
        return None
    return (args[0].to(layer.weight.dtype), *args[1:])


def _output_in_float32(layer: Any, args: tuple[Any, ...], output: Any) -> Any:
    import torch

    return output.to(torch.float32)


def reward_model_dtype(device: torch.device) -> torch.dtype:
    """The dtype a reward model scores in on `device` (see the module docstring)."""
    import torch

    return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
