"""`bleuberi generate` on a tiny random model: templates, sampling, seeds, resume, adapters, errors."""

from __future__ import annotations

import shutil

import orjson
import pytest

from bleuberi_cli.app import app
from stages.core.errors import ModelError
from stages.core.files import publish_folder
from stages.core.models import resolve_model
from stages.engines.prompts import PromptEncoder, plain_prompt
from stages.generate import Batching, Generator, SamplingParams, generate_records
from tests.conftest import demo_records, read_jsonl_text, write_jsonl


@pytest.fixture(scope="module")
def generator(tiny_model) -> Generator:
    return Generator.load(str(tiny_model))


def test_chat_template_is_applied(generator) -> None:
    text = generator.tokenizer.decode(generator.encode({"prompt": "Name a planet."}))
    assert text == "<|im_start|>user\nName a planet.<|im_end|>\n<|im_start|>assistant\n"


def test_messages_and_system_prompt(generator, tiny_model) -> None:
    messages = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Name a planet."},
        {"role": "assistant", "content": "Mars."},  # the reference: not part of the prompt
    ]
    text = generator.tokenizer.decode(generator.encode({"messages": messages}))
    assert text.endswith("<|im_start|>user\nName a planet.<|im_end|>\n<|im_start|>assistant\n")
    assert "Mars." not in text and text.count("<|im_start|>") == 4
    with_system = Generator.load(str(tiny_model), system_prompt="Be brief.")
    assert with_system.tokenizer.decode(with_system.encode({"prompt": "Hi"})).startswith(
        "<|im_start|>system\nBe brief.<|im_end|>\n"
    )


def test_plain_prompt_fallback_without_chat_template(generator) -> None:
    tokenizer = generator.tokenizer
    saved = tokenizer.chat_template
    tokenizer.chat_template = None
    try:
        encoder = PromptEncoder(tokenizer, system_prompt="Be brief.")
        text = tokenizer.decode(encoder.encode({"prompt": "Name a planet."}), skip_special_tokens=True)
    finally:
        tokenizer.chat_template = saved
    turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a planet."}]
    assert text == plain_prompt(turns)
    assert text == "Be brief.\n\nUser: Name a planet.\n\nAssistant:"


def test_left_truncation_is_counted(tiny_model) -> None:
    short = Generator.load(str(tiny_model), max_prompt_length=12, long_prompts="cut-left")
    ids = short.encode({"prompt": "A long prompt that certainly has more than twelve tokens in it, many more."})
    assert len(ids) == 12 and short.encoder.truncated == 1
    assert short.tokenizer.decode(ids).endswith("<|im_start|>assistant\n")


def test_n_samples_and_generation_fields(generator) -> None:
    records = demo_records(count=3)
    out = list(generate_records(records, generator, SamplingParams(8, 1.0), Batching(n=3, seed=5, batch_size=2)))
    assert [r["id"] for r in out] == [r["id"] for r in demo_records(count=3)]
    for record in out:
        assert len(record["completions"]) == 3 and all(isinstance(c, str) for c in record["completions"])
        info = record["generation"]
        assert info["num_samples"] == 3 and info["seed"] == 5 and info["max_new_tokens"] == 8
        assert len(info["finish_reasons"]) == 3 and set(info["finish_reasons"]) <= {"stop", "length"}
        assert all(1 <= n <= 8 for n in info["completion_tokens"])
        assert all(n == 8 for n, why in zip(info["completion_tokens"], info["finish_reasons"]) if why == "length")


def test_samples_end_at_the_first_stop_token(generator) -> None:
    prompts = [generator.encode({"prompt": f"Question {i}"}) for i in range(4)]
    seeds = [[i * 10 + k for k in range(4)] for i in range(4)]
    for group in generator.sample_ids(prompts, seeds, SamplingParams(24, 1.5)):
        for sample in group:
            stops = [i for i, t in enumerate(sample.token_ids) if t in generator.stop_ids]
            assert stops == ([len(sample.token_ids) - 1] if sample.finished else [])
            assert len(sample.logprobs) == len(sample.token_ids) and all(lp <= 0 for lp in sample.logprobs)


def test_logprobs_match_a_full_forward_pass(generator) -> None:
    import torch

    prompt = generator.encode({"prompt": "Name a planet."})
    [[sample]] = generator.sample_ids([prompt], [[3]], SamplingParams(10, 0.7))
    ids = torch.tensor([prompt + sample.token_ids])
    with torch.no_grad():
        logits = generator.model(ids).logits[0, len(prompt) - 1 : -1] / 0.7
    expected = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(sample.token_ids)[:, None])[:, 0]
    assert torch.allclose(torch.tensor(sample.logprobs), expected, atol=1e-4)


def test_the_kv_cache_goes_by_the_name_the_model_takes(generator) -> None:
    """transformers 5.24 renamed forward's `past_key_values` to `cache` (the old name warns, and goes in 5.40):
    the sampler passes whichever name the model takes, on either side of the rename."""
    import torch
    import transformers
    from packaging.version import Version

    from stages.engines.transformers_engine import cache_keyword

    class Before(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None): ...

    class After(torch.nn.Module):
        def forward(self, input_ids, past_key_values=None, cache=None): ...

    assert (cache_keyword(Before()), cache_keyword(After())) == ("past_key_values", "cache")
    renamed = Version(transformers.__version__) >= Version("5.24")
    assert cache_keyword(generator.model) == ("cache" if renamed else "past_key_values")


def test_same_seed_same_outputs_and_batching_does_not_matter(generator) -> None:
    params = SamplingParams(12, 1.0, top_p=0.9)

    def run(seed: int, batch_size: int) -> list[list[str]]:
        out = generate_records(
            demo_records(count=5), generator, params, Batching(n=2, seed=seed, batch_size=batch_size)
        )
        return [r["completions"] for r in out]

    first = run(7, 2)
    assert run(7, 2) == first
    assert run(7, 1) == first  # per-sample random streams: batch composition does not matter
    assert run(8, 2) != first


def test_greedy_is_deterministic(generator) -> None:
    out = [
        r["completions"]
        for r in generate_records(demo_records(count=2), generator, SamplingParams(8, 0.0), Batching(n=2))
    ]
    assert all(c[0] == c[1] for c in out)


def test_generate_command_writes_records_and_summary(runner, tiny_model, tmp_path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", demo_records(count=4))
    result = runner.invoke(
        app, ["generate", "-i", str(path), "--model", str(tiny_model), "-n", "2", "--max-new-tokens", "6"]
    )
    assert result.exit_code == 0, result.stderr
    rows = read_jsonl_text(result.stdout)
    assert len(rows) == 4 and all(len(r["completions"]) == 2 for r in rows)
    assert rows[0]["source"] == "rewrite"  # unknown fields pass through
    assert rows[0]["generation"]["model"] == str(tiny_model)
    assert "generated 8 completions for 4 prompts" in result.stderr


def test_resume_after_a_truncated_file(runner, tiny_model, tmp_path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", demo_records(count=6))
    args = [
        "generate",
        "-i",
        str(path),
        "--model",
        str(tiny_model),
        "-n",
        "2",
        "--max-new-tokens",
        "6",
        "-q",
        "--batch-size",
        "1",
    ]
    full = tmp_path / "full.jsonl"
    assert runner.invoke(app, [*args, "-o", str(full)]).exit_code == 0
    lines = full.read_bytes().splitlines(keepends=True)
    partial = tmp_path / "partial.jsonl"
    partial.write_bytes(b"".join(lines[:3]) + lines[3][: len(lines[3]) // 2])  # killed mid-line
    result = runner.invoke(app, [*args, "-o", str(partial), "--resume"])
    assert result.exit_code == 0, result.stderr
    resumed = [orjson.loads(line) for line in partial.read_bytes().splitlines()]
    assert [r["id"] for r in resumed] == [r["id"] for r in demo_records(count=6)]
    assert resumed == [orjson.loads(line) for line in lines]
    again = runner.invoke(app, [*args, "-o", str(partial), "--resume"])  # nothing left to do
    assert again.exit_code == 0 and len(partial.read_bytes().splitlines()) == 6


def test_resume_refuses_a_damaged_file(runner, tiny_model, tmp_path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", demo_records(count=2))
    out = tmp_path / "out.jsonl"
    out.write_bytes(b'{"id": "x"}\nnot json\n{"id": "y"}\n')
    result = runner.invoke(app, ["generate", "-i", str(path), "--model", str(tiny_model), "-o", str(out), "--resume"])
    assert result.exit_code == 1
    assert f"{out}:2: not valid JSON; cannot resume" in result.stderr


def test_adapter_changes_outputs_and_matches_unmerged_peft(tiny_model, tiny_adapter, generator) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    tuned = Generator.load(str(tiny_model), adapter=str(tiny_adapter))
    prompt = torch.tensor([generator.encode({"prompt": "Name a planet."})])
    unmerged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(tiny_adapter))
    with torch.no_grad():
        merged_logits = tuned.model(prompt).logits
        peft_logits = unmerged(prompt).logits
        base_logits = generator.model(prompt).logits
    # Merging reorders float32 sums: logits of magnitude ~1 agree to a few hundred ulps (~1e-5), far closer
    # than the adapter moves them (over 1e-2).
    assert (merged_logits - peft_logits).abs().max() < 1e-4
    assert (merged_logits - base_logits).abs().max() > 1e-2


def test_adapter_option_in_the_command(runner, tiny_model, tiny_adapter, tmp_path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", demo_records(count=2))
    base_args = ["generate", "-i", str(path), "--model", str(tiny_model), "--temperature", "0", "--max-new-tokens", "8"]
    base = read_jsonl_text(runner.invoke(app, [*base_args, "-q"]).stdout)
    tuned = read_jsonl_text(runner.invoke(app, [*base_args, "--adapter", str(tiny_adapter), "-q"]).stdout)
    assert tuned[0]["generation"]["adapter"] == str(tiny_adapter)
    assert [r["completions"] for r in tuned] != [r["completions"] for r in base]


def test_pickled_adapters_are_refused(tiny_model, tiny_adapter, tmp_path) -> None:
    folder = tmp_path / "bin_adapter"
    shutil.copytree(tiny_adapter, folder)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(ModelError, match="pickle files are not loaded"):
        Generator.load(str(tiny_model), adapter=str(folder))
    with pytest.raises(ModelError, match=r"no adapter_config\.json"):
        Generator.load(str(tiny_model), adapter=str(tmp_path))


def test_unknown_hub_id_offline_fails_fast_and_clearly(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"cannot load model 'someone/no-such-model'.*unreachable \(offline\)"):
        resolve_model("someone/no-such-model")
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: refused at once
    with pytest.raises(ModelError, match="unreachable"):
        resolve_model("someone/no-such-model")


def test_model_errors_in_the_command(runner, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = write_jsonl(tmp_path / "in.jsonl", demo_records(count=1))
    result = runner.invoke(app, ["generate", "-i", str(path), "--model", "someone/no-such-model"])
    assert result.exit_code == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("bleuberi: error: cannot load model 'someone/no-such-model'")
    (tmp_path / "not_a_model").mkdir()
    result = runner.invoke(app, ["generate", "-i", str(path), "--model", str(tmp_path / "not_a_model")])
    assert result.exit_code == 1 and "needs a config.json" in result.stderr


def test_usage_errors(runner, tiny_model, tmp_path) -> None:
    path = write_jsonl(tmp_path / "in.jsonl", demo_records(count=1))
    model = ["--model", str(tiny_model)]
    cases = [
        (["--resume"], "--resume needs -o/--output"),
        (["--backend", "server"], "--backend server needs --server-url URL"),
        (["--top-p", "0"], "--top-p must be in (0, 1]"),
        (["-n", "0"], "-n/--num-samples must be >= 1"),
    ]
    for extra, message in cases:
        result = runner.invoke(app, ["generate", "-i", str(path), *model, *extra])
        assert result.exit_code == 2, (extra, result.stderr)
        assert message in result.stderr


def test_publish_folder_keeps_the_winner_of_a_race(tmp_path) -> None:
    target = tmp_path / "model"
    winner = tmp_path / "winner"
    winner.mkdir()
    (winner / "model.safetensors").write_bytes(b"first")
    publish_folder(winner, target)
    loser = tmp_path / "loser"
    loser.mkdir()
    (loser / "model.safetensors").write_bytes(b"second")
    (loser / "extra").write_bytes(b"x")
    publish_folder(loser, target)
    assert (target / "model.safetensors").read_bytes() == b"first"
    assert not loser.exists()
