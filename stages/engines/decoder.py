"""The decode loop of the transformers engine for the Llama family (Llama, Mistral, Qwen2, SmolLM): one token
per row and step, through the model's own modules, without the framework around them.

Why not the model's forward for each step? On a 2-core AMD EPYC a transformers decode step with 16 rows and
100 cached tokens took 121 ms where the same matmuls alone, reading every weight once, take 86 (bench/RESULTS.md,
"Generation"). Much of the rest is memory traffic the arithmetic does not need: the dynamic cache concatenates every
layer's keys and values with the new token's at each step (a copy of the whole cache), and a grouped-query
model's keys and values are copied to every query head before attention. Here the cache is one buffer per
batch, written in place, and each key/value head attends for its group of query heads (a reshape, no copy).
The matmuls, norms, rotary embedding and activation are the model's own modules and functions, so the
arithmetic is the model's.

A LoRA being trained is applied as merged float32 weights (base + each adapter's delta), made again when
the adapter's weights change (after each optimizer step): the sampler then runs plain matmuls, the cost of
the model without an adapter, and its log-probs are the policy's to float32 rounding. In bf16 the modules run
as they are (merging would round most of a small update away: stages/core/precision.py).

`Decoder.of(model)` is None for anything else (other architectures, sliding-window attention shorter than
the batch, a model sharded by FSDP): the engine then decodes through the model's forward.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

SUPPORTED = ("llama", "mistral", "qwen2")  # the same decoder layer: pre-norm attention with RoPE, gated MLP

Linear = Callable[["torch.Tensor"], "torch.Tensor"]


@dataclass
class LayerMatmuls:
    """One decoder layer's projections as the sampler calls them: the modules, or merged LoRA weights."""

    q: Linear
    k: Linear
    v: Linear
    o: Linear
    gate: Linear
    up: Linear
    down: Linear


class Decoder:
    """Decode steps for a supported model: `start` a batch from its prefilled cache, then `step` per token."""

    def __init__(self, model: PreTrainedModel, base: Any) -> None:
        self.model, self.base = model, base
        self.layers = list(base.model.layers)
        attention = self.layers[0].self_attn
        self.heads = base.config.num_attention_heads
        self.kv_heads = base.config.num_key_value_heads
        self.head_dim = attention.head_dim
        self.scaling = attention.scaling
        self.rope = sys.modules[type(attention).__module__].apply_rotary_pos_emb
        self._merged: tuple[Any, list[LayerMatmuls]] | None = None

    @classmethod
    def of(cls, model: PreTrainedModel, total_length: int) -> Decoder | None:
        """A decoder for `model`, or None where the generic loop must run (see the module docstring)."""
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = getattr(base, "config", None)
        if getattr(config, "model_type", None) not in SUPPORTED or not hasattr(base, "model"):
            return None
        window = getattr(config, "sliding_window", None)
        if window is not None and getattr(config, "use_sliding_window", True) and window < total_length:
            return None
        layers = getattr(base.model, "layers", None)
        if not layers or not all(_plain_layer(layer) for layer in layers):
            return None
        return cls(model, base)

    def matmuls(self) -> list[LayerMatmuls]:
        """Each layer's projections: merged float32 weights when a float32 LoRA is active (made again when its
        weights have changed since), else the modules themselves."""
        version = _adapter_version(self.model)
        if version is None:
            return [_modules(layer) for layer in self.layers]
        if self._merged is None or self._merged[0] != version:
            self._merged = None  # let the old copies go before the new ones are made
            self._merged = (version, [_merged(layer) for layer in self.layers])
        return self._merged[1]

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.base.model.embed_tokens(tokens)

    def step(
        self, tokens: torch.Tensor, positions: torch.Tensor, cache: StaticCache, matmuls: list[LayerMatmuls]
    ) -> torch.Tensor:
        """The next-token hidden states of `tokens` (one per row) at `positions`, written into `cache` at its
        next column; returns the final norm's output (rows, hidden)."""
        hidden = self.embed(tokens)[:, None, :]  # (rows, 1, hidden), the layout the modules expect
        cos, sin = self.base.model.rotary_emb(hidden, positions[:, None])
        column = cache.advance()
        bias = cache.bias(column)  # one additive mask for every layer
        for index, (layer, mm) in enumerate(zip(self.layers, matmuls)):
            hidden = self._layer(layer, mm, hidden, (cos, sin), cache, index, bias)
        return self.base.model.norm(hidden)[:, 0]

    def _layer(
        self,
        layer: Any,
        mm: LayerMatmuls,
        hidden: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        cache: StaticCache,
        index: int,
        bias: torch.Tensor,
    ) -> torch.Tensor:
        import torch

        rows = hidden.shape[0]
        normed = layer.input_layernorm(hidden)
        q = mm.q(normed).view(rows, 1, self.heads, self.head_dim).transpose(1, 2)
        k = mm.k(normed).view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        v = mm.v(normed).view(rows, 1, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = self.rope(q, k, *rotary)
        keys_t, values = cache.write(index, k, v)
        # Each key/value head attends for its group of query heads (no copy of keys and values per head), as
        # plain batched matmuls: a kernel built for long queries spent 1 ms per layer on this one-token query.
        q = q.reshape(rows, self.kv_heads, self.heads // self.kv_heads, self.head_dim).to(keys_t.dtype)
        weights = torch.softmax(torch.matmul(q, keys_t) * self.scaling + bias, dim=-1)
        out = torch.matmul(weights, values).reshape(rows, 1, self.heads * self.head_dim).to(hidden.dtype)
        hidden = hidden + mm.o(out)
        normed = layer.post_attention_layernorm(hidden)
        return hidden + mm.down(layer.mlp.act_fn(mm.gate(normed)) * mm.up(normed))

    def head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits of the final hidden states, in float32 (stages/core/precision.py)."""
        import torch.nn.functional as F

        from stages.core.precision import float32_weight

        head = self.base.get_output_embeddings()
        bias = None if head.bias is None else float32_weight(head.bias)
        return F.linear(hidden.float(), float32_weight(head.weight), bias)


class StaticCache:
    """Every layer's keys and values for a batch, in one buffer allocated for its whole length, written in
    place one column per step; and which columns each row may attend to (left padding excluded). Keys are
    kept transposed (head_dim before length), so both attention products read the buffer as it is. Rows are
    filled from prefills of groups of prompts (`place`), right-aligned, so every row's prompt ends at the
    same column."""

    def __init__(
        self, shape: tuple[int, int, int, int, int], width: int, dtype: torch.dtype, device: torch.device
    ) -> None:
        import torch

        layers, rows, kv_heads, head_dim, total = shape
        # Zeros, not empty: a masked column still enters the products (weight 0 times its value), and 0 x NaN
        # left in uninitialised memory would be NaN; the left padding of shorter groups is never written.
        self.keys_t = torch.zeros((layers, rows, kv_heads, head_dim, total), dtype=dtype, device=device)
        self.values = torch.zeros((layers, rows, kv_heads, total, head_dim), dtype=dtype, device=device)
        self.valid = torch.ones((rows, total), dtype=torch.bool, device=device)
        self.length = width  # columns written so far (every prompt is right-aligned to end here)

    def place(self, rows: slice, keys: list[torch.Tensor], values: list[torch.Tensor], valid: torch.Tensor) -> None:
        """A prefill's keys and values (per layer: rows, kv_heads, width, head_dim) and its attention mask, for
        `rows`, ending at column `length`."""
        start = self.length - keys[0].shape[2]
        for layer, (k, v) in enumerate(zip(keys, values)):
            self.keys_t[layer, rows, ..., start : self.length] = k.transpose(-1, -2)
            self.values[layer, rows, :, start : self.length] = v
        self.valid[rows, :start] = False
        self.valid[rows, start : self.length] = valid.bool()

    def advance(self) -> int:
        """The column this step writes (all rows end at the same column: prompts are left-padded)."""
        self.length += 1
        return self.length - 1

    def write(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's key and value (rows, kv_heads, 1, head_dim) in the current column; the layer's keys
        (transposed) and values so far."""
        column = self.length - 1
        self.keys_t[layer, ..., column] = k[:, :, 0]
        self.values[layer, :, :, column] = v[:, :, 0]
        return self.keys_t[layer, ..., : column + 1], self.values[layer, :, :, : column + 1]

    def bias(self, column: int) -> torch.Tensor:
        """0 where a row may attend, minus infinity on its left padding: (rows, 1, 1, columns so far)."""
        import torch

        mask = self.valid[:, None, None, : column + 1]
        return torch.zeros(mask.shape, dtype=self.keys_t.dtype, device=mask.device).masked_fill_(~mask, float("-inf"))

    def keep(self, rows: torch.Tensor) -> None:
        """Only these rows go on (a copy of the rows kept; the others' memory is let go)."""
        self.keys_t = self.keys_t[:, rows]
        self.values = self.values[:, rows]
        self.valid = self.valid[rows]


def prefilled(cache: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each layer's keys and values from a transformers cache after the prefill (4.x and 5.x layouts)."""
    if hasattr(cache, "layers"):
        return [layer.keys for layer in cache.layers], [layer.values for layer in cache.layers]
    return list(cache.key_cache), list(cache.value_cache)


def _plain_layer(layer: Any) -> bool:
    attention, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
    needed = (
        (attention, ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling")),
        (mlp, ("gate_proj", "up_proj", "down_proj", "act_fn")),
        (layer, ("input_layernorm", "post_attention_layernorm")),
    )
    if not all(part is not None and all(hasattr(part, name) for name in names) for part, names in needed):
        return False
    return not hasattr(attention, "q_norm")  # Qwen3-style per-head norms: another layer


def _modules(layer: Any) -> LayerMatmuls:
    attention, mlp = layer.self_attn, layer.mlp
    return LayerMatmuls(
        attention.q_proj,
        attention.k_proj,
        attention.v_proj,
        attention.o_proj,
        mlp.gate_proj,
        mlp.up_proj,
        mlp.down_proj,
    )


def _lora_layers(model: Any) -> list[Any]:
    """The LoRA-wrapped linear layers of a PEFT model (none for a plain model)."""
    return [m for m in model.modules() if hasattr(m, "base_layer") and hasattr(m, "get_delta_weight")]


def _adapter_version(model: Any) -> tuple[int, ...] | None:
    """A key that changes whenever an active float32 LoRA's weights change (the optimizer updates them in place),
    or None when there is nothing to merge: no LoRA, adapters disabled, or a low-precision base (see the module
    docstring)."""
    import torch

    wrapped = _lora_layers(model)
    if not wrapped or any(getattr(m, "disable_adapters", False) or getattr(m, "merged", False) for m in wrapped):
        return None
    if any(m.base_layer.weight.dtype != torch.float32 for m in wrapped):
        return None
    versions = []
    for module in wrapped:
        for name in module.active_adapters:
            for factor in (module.lora_A[name].weight, module.lora_B[name].weight):
                versions += [id(factor), factor._version]
            versions.append(hash(module.scaling[name]))
    return tuple(versions)


def _merged(layer: Any) -> LayerMatmuls:
    parts = _modules(layer)
    return LayerMatmuls(*(_merged_linear(module) for module in vars(parts).values()))


def _merged_linear(module: Any) -> Linear:
    """`module` as one matmul: a LoRA layer's base weight plus each active adapter's delta, in float32."""
    import torch
    import torch.nn.functional as F

    if not hasattr(module, "base_layer"):
        return module
    base = module.base_layer
    with torch.no_grad():
        weight = base.weight.detach().clone()
        for name in module.active_adapters:
            if name in module.lora_A:
                weight += module.get_delta_weight(name).detach()
    bias = None if base.bias is None else base.bias.detach()
    return lambda x: F.linear(x, weight, bias)
