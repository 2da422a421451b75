"""The reward registry: spec grammar, z-score combination, reasoning mode, and lazy model-based metrics."""

from __future__ import annotations

import math
import statistics

import pytest
import sacrebleu

from stages.core.errors import ModelError, UsageError
from stages.metrics import METRICS, MetricSpec, get_metric, parse_spec
from stages.metrics.reasoning import Format, extract_answer
from stages.score import COMBINED, Scorer, zscores
from stages.train.config import TrainConfig


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("bleu", ("bleu", None, None)),
        ("rouge-l:0.5", ("rouge-l", None, 0.5)),
        ("bleu:-2", ("bleu", None, -2.0)),
        ("rm:/models/rm", ("rm", "/models/rm", None)),
        ("rm:/models/rm:0.5", ("rm", "/models/rm", 0.5)),
        ("rm:/models/rm:v2:3", ("rm", "/models/rm:v2", 3.0)),  # only the trailing number is the weight
        ("rm:0.5", ("rm", None, 0.5)),  # no path: `rm` itself then says it needs one
        ("rm-url:http://10.0.0.1:8001/score", ("rm-url", "http://10.0.0.1:8001/score", None)),
        ("rm-url:http://10.0.0.1:8001/score:0.25", ("rm-url", "http://10.0.0.1:8001/score", 0.25)),
        ("rm-url:https://host/v1/score:1e-1", ("rm-url", "https://host/v1/score", 0.1)),
        ("bertscore", ("bertscore", None, None)),
        ("bertscore:2", ("bertscore", None, 2.0)),
        ("bertscore:/enc/distilbert-base-uncased@5:2", ("bertscore", "/enc/distilbert-base-uncased@5", 2.0)),
        ("emb:/enc/minilm", ("emb", "/enc/minilm", None)),
    ],
)
def test_spec_grammar_a_trailing_number_is_the_weight(spec, expected) -> None:
    parsed = parse_spec(spec)
    assert parsed == MetricSpec(*expected)
    # the name records and reports use: kind and argument, the weight left out
    assert parsed.name == (expected[0] if expected[1] is None else f"{expected[0]}:{expected[1]}")


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bleu:x", "takes no argument"),
        ("bleu:inf", "must be finite"),
        ("rm-url:http://10.0.0.1:8001", "needs a path.*8001/score"),  # the port would otherwise be read as a weight
        ("rm-url:ftp://host/score", "http"),
        ("rm:", "needs a model"),
        ("meteor", "unknown metric"),
    ],
)
def test_bad_specs_are_usage_errors(spec, message) -> None:
    with pytest.raises(UsageError, match=message):
        Scorer.from_names([spec])


def test_plain_metrics_take_no_argument_and_model_metrics_are_cheap_to_create(tmp_path) -> None:
    with pytest.raises(UsageError, match="takes no argument"):
        get_metric("chrf:something")
    # Creating model-based metrics loads nothing: a missing encoder folder is only noticed when used...
    emb = get_metric(f"emb:{tmp_path / 'nowhere'}")
    assert emb._encoder is None
    assert get_metric("bertscore")._encoder is None
    # ...while a folder that exists without a model config is refused at once.
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match=r"config\.json"):
        get_metric(f"rm:{tmp_path / 'empty'}")
    for name in ("bertscore", "emb", "rm", "rm-url", "format"):
        assert name in METRICS


def test_zscores_by_hand() -> None:
    # values 1, 2, 6: mean 3; deviations -2, -1, 3; unbiased variance (4 + 1 + 9) / 2 = 7
    std = math.sqrt(7)
    assert zscores([1.0, 2.0, 6.0]) == pytest.approx([-2 / (std + 1e-6), -1 / (std + 1e-6), 3 / (std + 1e-6)])
    assert zscores([0.4, 0.4]) == [0.0, 0.0]  # no spread: (x - mean) = 0
    assert zscores([7.0]) == [0.0]


def test_zscore_combination_is_the_weighted_mean_of_group_zscores() -> None:
    refs = ["The cat sat on the mat."]
    group = ["The cat sat on the mat.", "A cat sat on a mat.", "Dogs bark.", "the cat"]
    bleu = [sacrebleu.sentence_bleu(c, refs).score / 100 for c in group]
    chrf = [sacrebleu.sentence_chrf(c, refs).score / 100 for c in group]

    def z(values):  # written out again here: (x - mean) / (sample std + 1e-6)
        mean, std = statistics.fmean(values), statistics.stdev(values)
        return [(v - mean) / (std + 1e-6) for v in values]

    scorer = Scorer.from_names(["bleu:3", "chrf:1"], combine="zscore")
    scores = scorer.score(group, refs)
    expected = [(3 * a + 1 * b) / 4 for a, b in zip(z(bleu), z(chrf))]
    assert scores[COMBINED] == pytest.approx(expected, abs=1e-9)
    assert scores["bleu"] == pytest.approx(bleu, abs=1e-12)  # the raw metrics are kept beside it
    assert scorer.info()["combine"] == "zscore"
    # the paper's BLEU+RM: equal weights, (z_bleu + z_other) / 2
    unweighted = Scorer.from_names(["bleu", "chrf"], combine="zscore").score(group, refs)[COMBINED]
    assert unweighted == pytest.approx([(a + b) / 2 for a, b in zip(z(bleu), z(chrf))], abs=1e-9)
    # a sum is a different thing: the z-scored mean is 0 over the group, the weighted sum is not
    summed = Scorer.from_names(["bleu:3", "chrf:1"]).score(group, refs)[COMBINED]
    assert sum(scores[COMBINED]) == pytest.approx(0.0, abs=1e-9)
    assert summed == pytest.approx([3 * a + b for a, b in zip(bleu, chrf)])


def test_trainer_rewards_always_combine_several_specs() -> None:
    scorer = Scorer.for_rewards(["bleu", "rouge-l"])
    assert scorer.score_key == COMBINED and scorer.weights == [1.0, 1.0]
    refs = ["the cat sat on the mat"]
    scores = scorer.score(["the cat sat", "a dog"], refs)
    assert scores[COMBINED] == pytest.approx([b + r for b, r in zip(scores["bleu"], scores["rouge-l"])])
    assert Scorer.for_rewards(["bleu"]).score_key == "bleu"


@pytest.mark.parametrize(
    ("completion", "answer", "formatted"),
    [
        ("<think>add 2 and 2</think><answer>4</answer>", "4", 1.0),
        ("<think>\nmulti\nline\n</think>\n<answer>\nParis is the capital.\n</answer>\n", "Paris is the capital.", 1.0),
        ("<think>cut off</think><answer>The capital is", "The capital is", 0.0),  # truncated: answer kept, no format
        ("Paris.", "Paris.", 0.0),  # no tags: the whole completion is the answer
        ("<answer>Paris</answer>", "Paris", 0.0),  # no think block
        ("<think>a</think><answer>b</answer> trailing words", "b", 0.0),
    ],
)
def test_reasoning_format_and_answer_extraction(completion, answer, formatted) -> None:
    assert extract_answer(completion) == answer
    assert Format().sentence_score(completion, ["unused"]) == formatted


def test_reasoning_mode_scores_the_answer_and_the_format() -> None:
    config = TrainConfig.of(reasoning=True, reward=["bleu"])
    assert [str(spec) for spec in config.rewards] == ["bleu", "format"]
    assert "<think>" in config.system_prompt
    assert TrainConfig.of(reasoning=True, system_prompt="Mine.").system_prompt == "Mine."
    assert TrainConfig().system_prompt is None
    scorer = config.scorer
    ref = "Jupiter is the largest planet."
    completions = [f"<think>Which planet? Big ones: Saturn, Jupiter.</think><answer>{ref}</answer>", ref]
    scores = scorer.score(completions, [ref])
    # BLEU sees only the answer: both completions answer with the reference itself
    assert scores["bleu"] == pytest.approx([1.0, 1.0])
    assert scores["format"] == [1.0, 0.0]
    assert scores[COMBINED] == pytest.approx([2.0, 1.0])
    # without reasoning mode the think block costs BLEU
    plain = Scorer.from_names(["bleu"]).score(completions, [ref])["bleu"]
    assert plain[0] < 0.5 and plain[1] == pytest.approx(1.0)


def test_score_command_combines_by_zscore(runner) -> None:
    from bleuberi_cli.app import app
    from tests.conftest import EXAMPLES, read_jsonl_text

    argv = ["score", "-i", str(EXAMPLES / "sample.jsonl"), "-m", "bleu", "-m", "chrf", "--combine", "zscore", "-q"]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.output
    for row in read_jsonl_text(result.stdout):
        z_bleu, z_chrf = zscores(row["scores"]["bleu"]), zscores(row["scores"]["chrf"])
        assert row["scores"][COMBINED] == pytest.approx([(a + b) / 2 for a, b in zip(z_bleu, z_chrf)])
        assert row["scoring"]["combine"] == "zscore" and row["scoring"]["score"] == COMBINED
