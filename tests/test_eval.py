"""`eval`: systems, summaries with seeded bootstrap intervals, win rates, reports, the reward-model judge."""

from __future__ import annotations

import json
import math
import statistics

import numpy as np
import pytest
import sacrebleu
import torch
from transformers import AutoTokenizer

from bleuberi_cli.app import app
from stages.core.errors import UsageError
from stages.eval.config import EvalConfig, parse_systems
from stages.eval.evaluate import evaluate
from stages.eval.stats import WinRate, bootstrap_ci, mean_with_ci
from tests.conftest import demo_records, read_jsonl_text, write_jsonl


def test_bootstrap_is_seeded() -> None:
    values = [0.1, 0.5, 0.2, 0.9, 0.4, 0.3, 0.0, 0.7]
    first = bootstrap_ci(values, seed=7)
    assert first == bootstrap_ci(values, seed=7)
    assert first != bootstrap_ci(values, seed=8)
    low, high = first
    assert low < statistics.fmean(values) < high
    assert bootstrap_ci([0.25] * 5, seed=1) == (0.25, 0.25)  # no spread: every resampled mean is 0.25
    assert bootstrap_ci([], seed=1) is None
    assert mean_with_ci([], seed=1) == {"mean": None, "ci95": None, "n": 0}


def test_bootstrap_interval_is_the_normal_interval_for_a_large_sample() -> None:
    # For n = 400 the resampled means are close to normal with sd = sd_pop / sqrt(n) (the plug-in
    # standard error, ddof 0), so the percentile interval is mean -+ 1.96 * sd_pop / sqrt(n).
    values = np.random.default_rng(0).uniform(0.0, 1.0, 400).tolist()
    mean = sum(values) / len(values)
    sd_pop = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    half = 1.959964 * sd_pop / math.sqrt(len(values))  # about 0.028
    low, high = bootstrap_ci(values, seed=3, resamples=4000)
    assert low == pytest.approx(mean - half, abs=0.1 * half)
    assert high == pytest.approx(mean + half, abs=0.1 * half)


def test_bootstrap_interval_narrows_like_one_over_root_n() -> None:
    values = [0.1, 0.5, 0.2, 0.9, 0.4, 0.3, 0.0, 0.7, 0.6, 0.35]
    low, high = bootstrap_ci(values, seed=1, resamples=4000)
    low16, high16 = bootstrap_ci(values * 16, seed=1, resamples=4000)  # same distribution, 16x the data
    assert 0.2 < (high16 - low16) / (high - low) < 0.3  # 1 / sqrt(16) = 0.25
    # a lower confidence gives an interval inside the 95% one
    low50, high50 = bootstrap_ci(values, seed=1, resamples=4000, confidence=0.5)
    assert low < low50 < high50 < high


def test_bootstrap_interval_covers_the_true_mean_about_95_percent_of_the_time() -> None:
    rng = np.random.default_rng(11)
    trials = 200
    covered = 0
    for trial in range(trials):
        sample = rng.uniform(0.0, 1.0, 40).tolist()  # true mean 0.5
        low, high = bootstrap_ci(sample, seed=trial, resamples=1000)
        covered += low <= 0.5 <= high
    # binomial sd at 95% over 200 trials is 1.5 points; the percentile bootstrap runs a little under 95%
    assert 0.88 <= covered / trials <= 0.99, covered


def test_win_rate_counts_ties_as_half() -> None:
    rates = WinRate.count([0.5, 0.2, 0.3, 0.9], [0.4, 0.2, 0.6, 0.1]).rates()
    assert rates == {"win": 0.5, "tie": 0.25, "loss": 0.25, "win_rate": 0.625, "sign_p": 1.0, "n": 4}
    assert WinRate.count([], []).rates()["win"] is None


def test_summary_by_hand() -> None:
    from stages.eval.config import System
    from stages.eval.summary import summarise

    def answer(score: float, tokens: int, reason: str = "stop") -> dict:
        return {"completion": "x", "scores": {"bleu": score}, "tokens": tokens, "words": 1, "finish_reason": reason}

    base = [answer(0.2, 3), answer(0.5, 5, "length"), answer(0.5, 8), answer(0.9, 10)]
    lora = [answer(0.4, 2), answer(0.5, 2), answer(0.1, 4, "length"), answer(0.9, 9, "length")]
    records = [{"id": str(i), "evaluation": {"base": b, "lora": t}} for i, (b, t) in enumerate(zip(base, lora))]
    config = EvalConfig.of(metrics=["bleu"], bootstrap_resamples=200)
    summary = summarise(records, [System("base", None), System("lora", "x")], config)
    got_base, got_lora = summary["systems"]["base"], summary["systems"]["lora"]
    assert got_base["metrics"]["bleu"]["mean"] == pytest.approx((0.2 + 0.5 + 0.5 + 0.9) / 4)  # 0.525
    assert got_lora["metrics"]["bleu"]["mean"] == pytest.approx((0.4 + 0.5 + 0.1 + 0.9) / 4)  # 0.475
    assert got_base["length"]["tokens_mean"] == 6.5 and got_base["length"]["tokens_median"] == 6.5  # (5 + 8) / 2
    assert got_lora["length"]["tokens_mean"] == 4.25 and got_lora["length"]["tokens_median"] == 3.0  # (2 + 4) / 2
    assert got_base["truncation_rate"] == 0.25 and got_lora["truncation_rate"] == 0.5
    # prompt 0 lora wins (0.4 > 0.2), 1 and 3 tie, 2 loses (0.1 < 0.5): win rate (1 + 2 / 2) / 4
    against = dict(got_lora["vs_base"]["bleu"])
    difference = against.pop("difference")
    # one win, one loss: the sign test's two-sided p is 2 * P(X <= 1 | n=2) = 2 * 3/4, capped at 1
    assert against == {"win": 0.25, "tie": 0.5, "loss": 0.25, "win_rate": 0.5, "sign_p": 1.0, "n": 4}
    assert difference["mean"] == pytest.approx((0.2 + 0.0 - 0.4 + 0.0) / 4) and difference["n"] == 4
    assert "vs_base" not in got_base


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
        EvalConfig.of(metrics=["bleu", "blue"])


@pytest.fixture(scope="module")
def evaluated(tiny_model, tiny_adapter):
    records = demo_records(count=6)
    config = EvalConfig.of(
        model=str(tiny_model),
        adapters=[f"{tiny_adapter}=lora"],
        max_new_tokens=6,
        bootstrap_resamples=200,
        device="cpu",
    )
    return evaluate(records, config), config


def test_eval_scores_every_system_and_compares_with_base(evaluated) -> None:

    result, config = evaluated
    assert [r["id"] for r in result.records] == [r["id"] for r in demo_records(count=6)]
    tokenizer = AutoTokenizer.from_pretrained(config.model.name)
    for record in result.records:
        assert set(record["evaluation"]) == {"base", "lora", "base@len(lora)"}
        # the length control: the base's answer cut to as many of the model's tokens as the lora's answer has
        ids = tokenizer(record["evaluation"]["base"]["completion"], add_special_tokens=False)["input_ids"]
        keep = len(tokenizer(record["evaluation"]["lora"]["completion"], add_special_tokens=False)["input_ids"])
        cut = record["evaluation"]["base"]["completion"] if keep >= len(ids) else tokenizer.decode(ids[:keep])
        assert record["evaluation"]["base@len(lora)"]["completion"] == cut
        for answer in (record["evaluation"][name] for name in ("base", "lora")):
            assert set(answer["scores"]) == set(config.metrics)
            # Scores are sacrebleu's sentence BLEU on the answer (the reference implementation, / 100)
            expected = sacrebleu.sentence_bleu(answer["completion"], record["references"]).score / 100
            assert answer["scores"]["bleu"] == pytest.approx(expected, abs=1e-12)
            assert 1 <= answer["tokens"] <= 6 and answer["finish_reason"] in ("stop", "length")
    # The adapter changes the answers (it is random and non-zero).
    assert any(r["evaluation"]["base"]["completion"] != r["evaluation"]["lora"]["completion"] for r in result.records)

    summary = result.summary
    assert summary["prompts"] == 6 and list(summary["systems"]) == ["base", "lora", "base@len(lora)"]
    # chrF straight from sacrebleu on each answer (not the records' `scores`), per system and prompt
    chrf = {
        name: [
            sacrebleu.sentence_chrf(r["evaluation"][name]["completion"], r["references"]).score / 100
            for r in result.records
        ]
        for name in ("base", "lora")
    }
    for name in ("base", "lora"):
        entry = summary["systems"][name]
        assert entry["metrics"]["chrf"]["mean"] == pytest.approx(sum(chrf[name]) / 6, abs=1e-12)
        low, high = entry["metrics"]["chrf"]["ci95"]
        assert low <= entry["metrics"]["chrf"]["mean"] <= high
        tokens = [r["evaluation"][name]["tokens"] for r in result.records]
        assert entry["length"]["tokens_mean"] == statistics.fmean(tokens)
        assert entry["length"]["tokens_median"] == statistics.median(tokens)
        truncated = sum(r["evaluation"][name]["finish_reason"] == "length" for r in result.records)
        assert entry["truncation_rate"] == truncated / 6
    assert "vs_base" not in summary["systems"]["base"]
    # per prompt: lora wins, ties or loses against base; the win rate counts a tie as half a win
    outcomes = ["tie" if abs(a - b) <= 1e-9 else "win" if a > b else "loss" for a, b in zip(chrf["lora"], chrf["base"])]
    wins, ties, losses = outcomes.count("win"), outcomes.count("tie"), outcomes.count("loss")
    expected = {"win": wins / 6, "tie": ties / 6, "loss": losses / 6, "win_rate": (wins + ties / 2) / 6, "n": 6}
    got = summary["systems"]["lora"]["vs_base"]["chrf"]
    assert {k: got[k] for k in expected} == pytest.approx(expected)
    differences = [a - b for a, b in zip(chrf["lora"], chrf["base"])]
    assert got["difference"]["mean"] == pytest.approx(statistics.fmean(differences), abs=1e-12)


def test_eval_answers_are_transformers_greedy_answers(evaluated, tiny_model, tiny_adapter) -> None:
    """Each system's answer is what transformers' own greedy `generate` gives for the prompt through the chat
    template: the base model, and the base with the adapter merged."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result, _ = evaluated
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    base = AutoModelForCausalLM.from_pretrained(tiny_model)
    tuned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(tiny_adapter))
    for name, model in (("base", base), ("lora", tuned.merge_and_unload())):
        for record in result.records:
            turns = [{"role": "user", "content": record["prompt"]}]
            text = tokenizer.apply_chat_template(turns, add_generation_prompt=True, tokenize=False)
            ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                out = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
            expected = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
            assert record["evaluation"][name]["completion"] == expected


def test_eval_command_writes_records_and_reports(runner, tiny_model, tiny_adapter, tmp_path) -> None:
    data = write_jsonl(tmp_path / "heldout.jsonl", demo_records(count=3))
    args = ["eval", "-i", str(data), "--model", str(tiny_model), "--adapter", f"{tiny_adapter}=lora"]
    args += ["--max-new-tokens", "4", "-m", "bleu", "-m", "rouge-l", "--bootstrap-resamples", "50"]
    md = runner.invoke(app, [*args, "--report", str(tmp_path / "report.md")])
    assert md.exit_code == 0, md.stderr
    rows = read_jsonl_text(md.stdout)
    assert [set(r["evaluation"]) for r in rows] == [{"base", "lora", "base@len(lora)"}] * 3
    report = (tmp_path / "report.md").read_text()
    assert "| system | bleu | rouge-l | tokens mean / median | truncated |" in report
    assert "| lora |" in report and "win / tie / loss" in report
    assert "Held-out scores" in md.stderr  # the table on stderr

    as_json = runner.invoke(app, [*args, "-q", "--report", str(tmp_path / "report.json")])
    assert as_json.exit_code == 0 and as_json.stderr == ""
    summary = json.loads((tmp_path / "report.json").read_text())
    assert summary["metrics"] == ["bleu", "rouge-l"] and set(summary["systems"]) == {"base", "lora", "base@len(lora)"}


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
    config = EvalConfig.of(
        model=str(tiny_model), adapters=[str(tiny_adapter)], max_new_tokens=5, bootstrap_resamples=50
    )
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
