"""`eval`: systems, summaries with seeded bootstrap intervals, win rates, reports, the reward-model judge."""

from __future__ import annotations

import json
import statistics

import pytest

from bleuberi_cli.app import app
from stages.core.errors import UsageError
from stages.eval.evaluate import EvalConfig, evaluate, parse_systems
from stages.eval.stats import WinRate, bootstrap_ci, mean_with_ci
from tests.conftest import demo_records, read_jsonl_text, write_jsonl


def test_bootstrap_is_seeded_and_brackets_the_mean() -> None:
    values = [0.1, 0.5, 0.2, 0.9, 0.4, 0.3, 0.0, 0.7]
    first = bootstrap_ci(values, seed=7)
    assert first == bootstrap_ci(values, seed=7)
    assert first != bootstrap_ci(values, seed=8)
    low, high = first
    assert low < statistics.fmean(values) < high
    assert min(values) <= low and high <= max(values)
    assert bootstrap_ci([0.25] * 5, seed=1) == (0.25, 0.25)
    assert bootstrap_ci([], seed=1) is None
    assert mean_with_ci([], seed=1) == {"mean": None, "ci95": None, "n": 0}


def test_win_rate_counts_ties_as_half() -> None:
    rates = WinRate.count([0.5, 0.2, 0.3, 0.9], [0.4, 0.2, 0.6, 0.1]).rates()
    assert rates == {"win": 0.5, "tie": 0.25, "loss": 0.25, "win_rate": 0.625, "n": 4}
    assert WinRate.count([], []).rates()["win"] is None


def test_systems_are_named_from_adapter_paths() -> None:
    systems = parse_systems(["runs/bleu/adapter", "runs/sft/adapter=sft-baseline", "/x/my-lora/"])
    assert [(s.name, s.adapter) for s in systems] == [
        ("base", None),
        ("bleu", "runs/bleu/adapter"),
        ("sft-baseline", "runs/sft/adapter"),
        ("my-lora", "/x/my-lora/"),
    ]
    with pytest.raises(UsageError, match="two systems are named 'a'"):
        parse_systems(["x/a", "y/a"])
    with pytest.raises(UsageError, match="PATH=NAME"):
        parse_systems(["x/a="])
    with pytest.raises(UsageError, match="unknown metric"):
        EvalConfig(metrics=["bleu", "blue"])


@pytest.fixture(scope="module")
def evaluated(tiny_model, tiny_adapter):
    records = demo_records(count=6)
    config = EvalConfig(
        model=str(tiny_model), adapters=[f"{tiny_adapter}=lora"], max_new_tokens=6, resamples=200, device="cpu"
    )
    return evaluate(records, config), config


def test_eval_scores_every_system_and_compares_with_base(evaluated) -> None:
    from stages.metrics import get_metric

    result, config = evaluated
    assert [r["id"] for r in result.records] == [r["id"] for r in demo_records(count=6)]
    for record in result.records:
        assert set(record["evaluation"]) == {"base", "lora"}
        for answer in record["evaluation"].values():
            assert set(answer["scores"]) == set(config.metrics)
            # Scores are the registry's metrics on the answer, not something computed on the side.
            assert answer["scores"]["bleu"] == get_metric("bleu").sentence_score(
                answer["completion"], record["references"]
            )
            assert 1 <= answer["tokens"] <= 6 and answer["finish_reason"] in ("stop", "length")
    # The adapter changes the answers (it is random and non-zero).
    assert any(r["evaluation"]["base"]["completion"] != r["evaluation"]["lora"]["completion"] for r in result.records)

    summary = result.summary
    assert summary["prompts"] == 6 and list(summary["systems"]) == ["base", "lora"]
    for name, entry in summary["systems"].items():
        chrf = [r["evaluation"][name]["scores"]["chrf"] for r in result.records]
        assert entry["metrics"]["chrf"]["mean"] == pytest.approx(statistics.fmean(chrf))
        low, high = entry["metrics"]["chrf"]["ci95"]
        assert low <= entry["metrics"]["chrf"]["mean"] <= high
        tokens = [r["evaluation"][name]["tokens"] for r in result.records]
        assert entry["length"]["tokens_mean"] == statistics.fmean(tokens)
        assert entry["length"]["tokens_median"] == statistics.median(tokens)
        truncated = sum(r["evaluation"][name]["finish_reason"] == "length" for r in result.records)
        assert entry["truncation_rate"] == truncated / 6
    assert "vs_base" not in summary["systems"]["base"]
    chrf_rates = summary["systems"]["lora"]["vs_base"]["chrf"]
    expected = WinRate.count(
        [r["evaluation"]["lora"]["scores"]["chrf"] for r in result.records],
        [r["evaluation"]["base"]["scores"]["chrf"] for r in result.records],
    )
    assert chrf_rates == expected.rates()


def test_eval_summary_is_reproducible(evaluated, tiny_model, tiny_adapter) -> None:
    result, config = evaluated
    again = evaluate(demo_records(count=6), config)
    assert again.summary == result.summary


def test_eval_command_writes_records_and_reports(runner, tiny_model, tiny_adapter, tmp_path) -> None:
    data = write_jsonl(tmp_path / "heldout.jsonl", demo_records(count=3))
    args = ["eval", "-i", str(data), "--model", str(tiny_model), "--adapter", f"{tiny_adapter}=lora"]
    args += ["--max-new-tokens", "4", "-m", "bleu", "-m", "rouge-l", "--bootstrap-resamples", "50"]
    md = runner.invoke(app, [*args, "--report", str(tmp_path / "report.md")])
    assert md.exit_code == 0, md.stderr
    rows = read_jsonl_text(md.stdout)
    assert [set(r["evaluation"]) for r in rows] == [{"base", "lora"}] * 3
    report = (tmp_path / "report.md").read_text()
    assert "| system | bleu | rouge-l | tokens mean / median | truncated |" in report
    assert "| lora |" in report and "win / tie / loss" in report
    assert "Held-out scores" in md.stderr  # the table on stderr

    as_json = runner.invoke(app, [*args, "-q", "--report", str(tmp_path / "report.json")])
    assert as_json.exit_code == 0 and as_json.stderr == ""
    summary = json.loads((tmp_path / "report.json").read_text())
    assert summary["metrics"] == ["bleu", "rouge-l"] and set(summary["systems"]) == {"base", "lora"}


def test_eval_rejects_a_missing_adapter(runner, tiny_model, tmp_path) -> None:
    data = write_jsonl(tmp_path / "heldout.jsonl", demo_records(count=1))
    result = runner.invoke(app, ["eval", "-i", str(data), "--model", str(tiny_model), "--adapter", str(tmp_path)])
    assert result.exit_code == 1
    assert "not a LoRA adapter folder" in result.stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def tiny_reward_model(tiny_model, tmp_path_factory):
    """A random one-label sequence classifier on the tiny model's tokenizer, saved as safetensors."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    folder = tmp_path_factory.mktemp("reward")
    config = AutoConfig.from_pretrained(tiny_model, num_labels=1)
    torch.manual_seed(3)
    LlamaForSequenceClassification(config).save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(folder)
    return folder


def test_reward_model_judge_scores_each_answer(tiny_reward_model, tiny_model, tiny_adapter) -> None:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from stages.eval.judges import RewardModelJudge

    judge = RewardModelJudge(str(tiny_reward_model), device="cpu", batch_size=2)
    records = demo_records(count=3)
    config = EvalConfig(model=str(tiny_model), adapters=[str(tiny_adapter)], max_new_tokens=5, resamples=50)
    result = evaluate(records, config, reward_judge=judge)
    # Each reward equals the model's logit on the chat-templated conversation, batching or not.
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model)
    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_model)
    for record in result.records:
        answer = record["evaluation"]["base"]
        turns = [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": answer["completion"]}]
        ids = tokenizer(tokenizer.apply_chat_template(turns, tokenize=False), return_tensors="pt")
        with torch.no_grad():
            expected = model(**ids).logits[0, 0].item()
        assert answer["judge_reward"] == pytest.approx(expected, abs=1e-5)
    system = result.summary["systems"][config.systems[1].name]
    assert system["judge_reward_vs_base"]["n"] == 3
    assert result.summary["judge_model"] == str(tiny_reward_model)
