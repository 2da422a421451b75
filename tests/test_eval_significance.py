"""Eval tells a real gain from noise: paired differences, the sign test, the length control, the verdict."""

from __future__ import annotations

import json
import math
import random

import pytest
import sacrebleu

from bleuberi_cli.app import app
from stages.eval.config import EvalConfig
from stages.eval.evaluate import evaluate
from stages.eval.length_control import TokenCutter, WordCutter, cut_answers
from stages.eval.report import eval_tables, gain_status, verdict
from stages.eval.stats import bootstrap_ci, excludes_zero, paired_difference, sign_test
from tests.conftest import write_jsonl


def test_sign_test_by_hand() -> None:
    # 9 wins, 1 loss: P(X <= 1) for X ~ Bin(10, 1/2) is (1 + 10) / 1024; two-sided doubles it
    assert sign_test(9, 1) == pytest.approx(22 / 1024)
    assert sign_test(1, 9) == sign_test(9, 1)
    assert sign_test(5, 5) == 1.0  # 2 * P(X <= 5) > 1 is capped
    assert sign_test(3, 0) == pytest.approx(2 / 8)
    assert sign_test(0, 0) is None
    # a large split against the normal approximation with continuity correction: z = (60 - 0.5 - 50) / 5
    z = (60 - 0.5 - 50) / math.sqrt(100 * 0.25)
    assert sign_test(60, 40) == pytest.approx(math.erfc(z / math.sqrt(2)), rel=0.02)


def test_paired_interval_sees_a_gain_the_separate_intervals_hide() -> None:
    rng = random.Random(0)
    base = [rng.uniform(0.0, 1.0) for _ in range(60)]
    system = [b + 0.02 + rng.uniform(-0.005, 0.005) for b in base]  # always a little better
    low_sys, _ = bootstrap_ci(system, seed=1)
    _, high_base = bootstrap_ci(base, seed=2)
    assert low_sys < high_base  # each system's own intervals overlap...
    difference = paired_difference(system, base, seed=3)
    assert difference["mean"] == pytest.approx(sum(s - b for s, b in zip(system, base)) / 60)
    assert excludes_zero(difference) and difference["ci95"][0] > 0.015  # ...the paired one does not


def test_paired_interval_of_a_constant_difference_is_that_constant() -> None:
    difference = paired_difference([0.5, 0.25, 0.75], [0.25, 0.0, 0.5], seed=0)
    assert difference["mean"] == 0.25 and difference["ci95"] == [0.25, 0.25]
    assert not excludes_zero(paired_difference([0.1, 0.2], [0.2, 0.1], seed=0))


def test_word_cutter_by_hand() -> None:
    cutter = WordCutter()
    assert cutter.count("  Été à Paris,\nvraiment  ") == 4
    assert cutter.cut("  Été à Paris,\nvraiment  ", 3) == "  Été à Paris,"
    assert cutter.cut("one two", 5) == "one two"
    assert cutter.cut("one two", 0) == "" and cutter.count("") == 0


class CharTokenizer:
    """One token per character: a tokenizer whose cuts are known by hand."""

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(chr(i) for i in ids)


def test_token_cutter_cuts_each_base_answer_to_the_system_length() -> None:
    cutter = TokenCutter(CharTokenizer())
    answers = cut_answers(["abcdef", "xy", "hello"], ["123", "12345", ""], cutter)
    assert [a["completion"] for a in answers] == ["abc", "xy", ""]  # never longer than the base's own answer
    assert [a["tokens"] for a in answers] == [3, 2, 0]


REFERENCE = "the cat sat on the mat"
HELDOUT = [{"id": f"h{i}", "prompt": f"q{i}", "references": [REFERENCE]} for i in range(6)]


def _answers(path, texts: list[str]):
    return write_jsonl(path, [{"id": f"h{i}", "completion": t} for i, t in enumerate(texts)])


def _bleu(text: str) -> float:
    return sacrebleu.sentence_bleu(text, [REFERENCE]).score / 100


def test_a_gain_that_is_only_length_is_called_length(tmp_path) -> None:
    # the base says the reference and then rambles; "short" says exactly the base's first six words
    base = [f"{REFERENCE} and then some more words number {i}" for i in range(6)]
    short = [REFERENCE] * 6
    config = EvalConfig.of(
        model=None,
        answers=[f"base={_answers(tmp_path / 'b.jsonl', base)}", f"short={_answers(tmp_path / 's.jsonl', short)}"],
        metrics=["bleu"],
        bootstrap_resamples=200,
    )
    result = evaluate([dict(r) for r in HELDOUT], config)
    systems = result.summary["systems"]
    assert list(systems) == ["base", "short", "base@len(short)"]
    control = systems["base@len(short)"]
    assert control["length_of"] == "short" and control["metrics"]["bleu"]["mean"] == pytest.approx(1.0)
    gain = systems["short"]["vs_base"]["bleu"]["difference"]
    assert gain["mean"] == pytest.approx(1.0 - statistics_mean([_bleu(t) for t in base]))
    assert excludes_zero(gain)
    assert systems["short"]["vs_length_control"]["bleu"]["difference"]["mean"] == 0.0
    assert gain_status(systems["short"], "bleu") == "length"
    line = verdict(result.summary, "short", "bleu")
    assert "a change of length, not learning" in line and "sign test p=0.031" in line  # 6-0: 2 / 64
    assert line.endswith("(significantly more wins)")


def test_a_gain_beyond_length_survives(tmp_path) -> None:
    base = [f"a dog ran in the park {i}" for i in range(6)]
    good = [REFERENCE] * 6  # as long as the base's cut, and right
    config = EvalConfig.of(
        model=None,
        answers=[f"base={_answers(tmp_path / 'b.jsonl', base)}", f"good={_answers(tmp_path / 'g.jsonl', good)}"],
        metrics=["bleu", "chrf"],
        bootstrap_resamples=200,
    )
    result = evaluate([dict(r) for r in HELDOUT], config)
    entry = result.summary["systems"]["good"]
    cut = [" ".join(t.split()[:6]) for t in base]
    expected = statistics_mean([1.0 - _bleu(c) for c in cut])
    assert entry["vs_length_control"]["bleu"]["difference"]["mean"] == pytest.approx(expected)
    assert gain_status(entry, "bleu") == "survives"
    assert verdict(result.summary, "good", "bleu").startswith("gain in bleu (x100) +")
    titles = [title for title, _, _ in eval_tables(result.summary)]
    assert any(t.startswith("Difference from base") for t in titles)
    assert any(t.startswith("Length control") for t in titles)
    # and a system worse than the base is a loss, not "no gain"
    flipped = EvalConfig.of(
        model=None,
        answers=[f"good={tmp_path / 'g.jsonl'}", f"base={tmp_path / 'b.jsonl'}"],
        metrics=["bleu"],
        baseline="good",
        bootstrap_resamples=200,
    )
    summary = evaluate([dict(r) for r in HELDOUT], flipped).summary
    assert gain_status(summary["systems"]["base"], "bleu") == "loss"
    assert verdict(summary, "base", "bleu").endswith("sign test p=0.031 (significantly more losses)")  # 0-6


def test_the_verdict_names_the_sign_test_direction_only_when_significant() -> None:
    # a mean gain from a few large wins while most prompts get worse: the line must say so
    def summary(win: float, loss: float, sign_p: float) -> dict:
        comparison = {"win": win, "tie": 1 - win - loss, "loss": loss, "sign_p": sign_p,
                      "difference": {"mean": 0.02, "ci95": [-0.001, 0.04], "n": 175}}  # fmt: skip
        return {"systems": {"sft": {"vs_base": {"bleu": comparison}}}}

    worse = verdict(summary(0.32, 0.53, 0.0031), "sft", "bleu")
    assert worse.startswith("no significant gain in mean bleu (x100): +2.0 [-0.1, 4.0]")  # x100, as the tables
    assert worse.endswith("wins 32% / losses 53%, sign test p=0.0031 (significantly more losses)")
    assert verdict(summary(0.45, 0.29, 0.21), "sft", "bleu").endswith("sign test p=0.21")
    assert verdict(summary(0.45, 0.29, 0.05), "sft", "bleu").endswith("sign test p=0.05")  # not below the level


def statistics_mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_eval_cli_prints_the_verdict_and_can_leave_the_control_out(runner, tmp_path) -> None:
    held = write_jsonl(tmp_path / "held.jsonl", HELDOUT)
    base = _answers(tmp_path / "b.jsonl", [f"{REFERENCE} and more {i}" for i in range(6)])
    short = _answers(tmp_path / "s.jsonl", [REFERENCE] * 6)
    argv = ["eval", "-i", str(held), "--answers", f"base={base}", "--answers", f"short={short}", "-m", "bleu"]
    report = tmp_path / "r.json"
    result = runner.invoke(app, [*argv, "--report", str(report)])
    assert result.exit_code == 0, result.output
    assert "short: gain in bleu" in result.stderr and "length" in result.stderr
    assert "base@len(short)" in json.loads(report.read_text())["systems"]
    result = runner.invoke(app, [*argv, "--no-length-control", "--report", str(report)])
    assert result.exit_code == 0, result.output
    summary = json.loads(report.read_text())
    assert list(summary["systems"]) == ["base", "short"]
    assert "vs_length_control" not in summary["systems"]["short"]
    assert "(no length control)" in result.stderr


def test_reasoning_mode_scores_the_answer_and_the_format(tmp_path) -> None:
    think = [f"<think>step {i}</think><answer>{REFERENCE}</answer>" for i in range(6)]
    plain = [f"{REFERENCE} and more {i}" for i in range(6)]
    specs = [f"plain={_answers(tmp_path / 'p.jsonl', plain)}", f"think={_answers(tmp_path / 't.jsonl', think)}"]
    summary = evaluate(
        [dict(r) for r in HELDOUT],
        EvalConfig.of(model=None, answers=specs, metrics=["bleu", "format"], reasoning=True, bootstrap_resamples=50),
    ).summary
    think_entry, plain_entry = summary["systems"]["think"], summary["systems"]["plain"]
    assert think_entry["metrics"]["bleu"]["mean"] == pytest.approx(1.0)  # only the <answer> part is scored
    assert think_entry["metrics"]["format"]["mean"] == 1.0 and plain_entry["metrics"]["format"]["mean"] == 0.0
    assert plain_entry["metrics"]["bleu"]["mean"] == pytest.approx(statistics_mean([_bleu(t) for t in plain]))
    without = evaluate([dict(r) for r in HELDOUT], EvalConfig.of(model=None, answers=specs, metrics=["bleu"]))
    assert without.summary["systems"]["think"]["metrics"]["bleu"]["mean"] < 1.0  # the tags count against it
    reasoning = EvalConfig.of(model=None, answers=specs, reasoning=True)
    assert reasoning.prompting.system_prompt.startswith("You are a helpful assistant")


def test_a_bound_that_rounds_to_zero_keeps_its_sign() -> None:
    # x100 "+1.0 [0.0, 2.2]" reads as touching zero; the interval excludes it, so the line must show that
    comparison = {"win": 0.5, "tie": 0.1, "loss": 0.4, "sign_p": 0.5,
                  "difference": {"mean": 0.010, "ci95": [0.0003, 0.022], "n": 175}}  # fmt: skip
    summary = {"systems": {"s": {"vs_base": {"bleu": comparison}}}}
    line = verdict(summary, "s", "bleu")
    assert line.startswith("gain in bleu (x100) +1.0 [0.03, 2.2] over base (no length control)")
    comparison["difference"] = {"mean": -0.0002, "ci95": [-0.010, 0.008], "n": 175}
    assert "-0.02 [-1.0, 0.8]" in verdict(summary, "s", "bleu")


# The length-control table's label, derived by hand for every pair of intervals: (trained - base, trained -
# base@len), each above 0 (+), including 0 (0) or below 0 (-). The label says what both intervals say.
LABELS = {
    ("+", "+"): "gain over base, survives the length control",
    ("+", "0"): "gain over base, length only",  # the cut base gains as much: shorter answers did it
    ("+", "-"): "gain over base, length only; worse than cut base",  # cutting alone would gain more
    ("0", "+"): "no gain over base, but a gain over cut base",  # shorter, yet above the base cut as short
    ("0", "0"): "no gain over base or cut base",
    ("0", "-"): "no gain over base, worse than cut base",
    ("-", "+"): "worse than base, but a gain over cut base",  # the loss is the length; at that length it wins
    ("-", "0"): "worse than base, length only",  # the cut base loses as much
    ("-", "-"): "worse than base and than cut base",
}
# (mean, low, high) of each kind of interval, and its cell x100 written out by hand
INTERVALS = {"+": (0.079, 0.026, 0.137), "0": (0.032, -0.006, 0.082), "-": (-0.05, -0.09, -0.01)}
CELLS = {"+": "+7.9 [2.6, 13.7]", "0": "+3.2 [-0.6, 8.2]", "-": "-5.0 [-9.0, -1.0]"}


def _difference(side: str) -> dict:
    mean, low, high = INTERVALS[side]
    return {"mean": mean, "ci95": [low, high], "n": 56}


def _labelled_summary(baseline: str | None = None) -> dict:
    metric = {"mean": 0.2, "ci95": [0.1, 0.3]}
    plain = {"metrics": {"bleu": metric}, "length": {"tokens_mean": 20.0, "tokens_median": 18}, "truncation_rate": 0}
    systems = {"base": plain}
    for base_side, control_side in LABELS:
        comparison = {"win": 0.4, "tie": 0.2, "loss": 0.4, "sign_p": 1.0, "difference": _difference(base_side)}
        control = {"win": 0.4, "tie": 0.2, "loss": 0.4, "sign_p": 1.0, "difference": _difference(control_side)}
        name = f"s{base_side}{control_side}"
        systems[name] = {**plain, "vs_base": {"bleu": comparison}, "vs_length_control": {"bleu": control}}
    return {"metrics": ["bleu"], "prompts": 56, "systems": systems, **({"baseline": baseline} if baseline else {})}


def test_each_length_control_label_follows_from_its_two_intervals() -> None:
    summary = _labelled_summary()
    [(title, _, rows)] = [table for table in eval_tables(summary) if table[0].startswith("Length control")]
    cells = {row[0]: row[1] for row in rows}
    for (base_side, control_side), label in LABELS.items():
        assert cells[f"s{base_side}{control_side}"] == f"{CELLS[control_side]} ({label})", (base_side, control_side)
        # the label's word on the base is the verdict's: a gain, no significant gain, or worse
        line = verdict(summary, f"s{base_side}{control_side}", "bleu")
        said = "+" if line.startswith("gain in") else "0" if line.startswith("no significant gain") else "-"
        assert said == base_side and (base_side != "-" or "got worse" in line)
    assert "length only" in title and "survives the length control" in title  # the title explains the words
    # the demo run's emb: no gain over base, a clear one over base cut to the trained lengths
    assert cells["s0+"] == "+7.9 [2.6, 13.7] (no gain over base, but a gain over cut base)"


def test_the_length_control_label_names_the_baseline_in_use() -> None:
    [(_, _, rows)] = [t for t in eval_tables(_labelled_summary("sft")) if t[0].startswith("Length control")]
    assert dict((row[0], row[1]) for row in rows)["s0+"].endswith("(no gain over sft, but a gain over cut sft)")
