"""Your own reward in Python (`py:FILE.py:FUNCTION`): the examples by hand, the arguments a function gets,
None, weights and z-scores, async, every error as one line, one import per process, and every entry point
on the tiny model (score, select, train, eval, run)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
import statistics
import sys
from pathlib import Path

import orjson
import pytest
import sacrebleu
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer

from bleuberi_cli.app import app
from stages.core.errors import UsageError
from stages.engines.base import Sample
from stages.metrics import Batch, MetricSpec, get_metric, parse_spec, parse_specs, python_signatures
from stages.metrics.python import RewardFunctionError
from stages.score import CHUNK_RECORDS, COMBINED, Scorer, score_records
from tests.conftest import ROOT, demo_records, read_jsonl_text, write_jsonl

EXAMPLE = ROOT / "examples" / "rewards.py"

# A reward file of our own: it logs its imports (one pid per line) and, for `seen`, its calls' arguments.
USER_REWARDS = '''
import asyncio, json, os
from pathlib import Path

HERE = Path(__file__).parent
with open(HERE / "imports.log", "a") as f:
    f.write(f"{os.getpid()}\\n")

NOT_A_FUNCTION = 3


def seen(**kwargs):
    with open(HERE / "calls.jsonl", "a") as f:
        f.write(json.dumps(kwargs) + "\\n")
    return [float(len(c)) for c in kwargs["completions"]]


def words(completions):
    return [float(len(c.split())) for c in completions]


def needs_answer(completions, answer):
    return [float(c == a) for c, a in zip(completions, answer)]


def skip_some(completions, **kwargs):
    return [None if "skip" in c else float(len(c.split())) for c in completions]


def all_none(completions, **kwargs):
    return [None] * len(completions)


async def later(completions, **kwargs):
    await asyncio.sleep(0)
    return [2.0] * len(completions)


def loud(completions, **kwargs):
    print("debugging output")
    return [1.0] * len(completions)


def raises(completions, **kwargs):
    raise ValueError("bad input\\nsecond line")


def short(completions, **kwargs):
    return [1.0] * (len(completions) - 1)


def text(completions, **kwargs):
    return ["high"] * len(completions)


def gives_nan(completions, **kwargs):
    return [float("nan")] * len(completions)


def gives_inf(completions, **kwargs):
    return [float("inf")] * len(completions)


def picky(completions, id, **kwargs):
    if id[0] == "rank1":
        raise ValueError("not this one")
    return [1.0] * len(completions)


def flaky(completions, **kwargs):
    """Fails on its 5th call while fail.flag exists; deterministic values otherwise."""
    counter = HERE / "calls.count"
    count = int(counter.read_text()) + 1 if counter.exists() else 1
    counter.write_text(str(count))
    if (HERE / "fail.flag").exists() and count == 5:
        raise RuntimeError("judge unavailable")
    return [len(c.split()) / 10 for c in completions]
'''


@pytest.fixture
def rewards(tmp_path) -> Path:
    """A fresh reward file per test (a new path, so a new module: its import log starts empty)."""
    folder = tmp_path / "user"
    folder.mkdir()
    path = folder / "my_rewards.py"
    path.write_text(USER_REWARDS)
    return path


def imports(path: Path) -> list[int]:
    log = path.parent / "imports.log"
    return [int(x) for x in log.read_text().split()] if log.exists() else []


def calls(path: Path) -> list[dict]:
    log = path.parent / "calls.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


# --- the worked examples, by hand --------------------------------------------------------------------


def test_length_band_by_hand() -> None:
    band = get_metric(f"py:{EXAMPLE}:length_band")
    ten = "w " * 10  # the reference: 10 words
    completions = ["", "a b c", "w " * 5, "w " * 15, "w " * 20, "w " * 30, "w " * 40]
    # 0 words: 0; 3/10 = 0.3 of the reference, under half: 0.3 / 0.5; 0.5 and 1.5: inside the band;
    # 2.0: (3 - 2) / 1.5; 3.0 and beyond: 0
    expected = [0.0, 0.6, 1.0, 1.0, 1 / 1.5, 0.0, 0.0]
    assert band.score_batch(Batch.group(completions, [ten])) == pytest.approx(expected, abs=1e-12)
    # two references: the closer one counts (13 words: 20-word reference, ratio 0.65; not the 4-word one)
    assert band.score_batch(Batch.group(["w " * 13], ["a b c d", "w " * 20])) == [1.0]


def test_no_lists_by_hand() -> None:
    check = get_metric(f"py:{EXAMPLE}:no_lists")
    completions = ["Mix, then bake.", "Steps:\n1. mix\n2. bake", "- flour", "well - maybe", "2) bake", "  * a"]
    assert check.score_batch(Batch.group(completions, ["r"])) == [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]


def test_the_async_example_is_awaited_and_skips_chat_prompts() -> None:
    echo = get_metric(f"py:{EXAMPLE}:no_echo")
    plain = {"id": "p", "prompt": "Name the largest planet.", "references": ["Jupiter."]}
    chat = {"id": "c", "messages": [{"role": "user", "content": "Hi"}], "references": ["Hello."]}
    batch = Batch(
        ["name the LARGEST planet: Jupiter", "Jupiter.", "Hi"],
        [["Jupiter."]] * 2 + [["Hello."]],
        None,
        [plain] * 2 + [chat],
    )
    assert echo.score_batch(batch) == [0.0, 1.0, None]  # repeats the prompt; does not; a chat prompt: no reward


# --- what a function is given --------------------------------------------------------------------------


def test_a_function_gets_trl_style_arguments(rewards) -> None:
    metric = get_metric(f"py:{rewards}:seen")
    record = {"id": "q1", "prompt": "Say hi.", "references": ["Hi.", "Hello."], "source": "demo", "completions": ["x"]}
    assert metric.score_batch(Batch.group(["Hi.", "Hello there."], record["references"], record=record)) == [3.0, 12.0]
    [call] = calls(rewards)
    assert call["completions"] == ["Hi.", "Hello there."]
    assert call["prompts"] == ["Say hi.", "Say hi."]  # text for a plain prompt
    assert call["references"] == [["Hi.", "Hello."]] * 2  # one list per completion
    assert call["id"] == ["q1", "q1"] and call["source"] == ["demo", "demo"]  # every other field, aligned
    assert call["completion_ids"] is None  # only training has token ids
    assert "prompt" not in call  # passed as `prompts`; the record's own `completions` is not a column

    chat = {
        "id": "q2",
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Say hi."},
            {"role": "assistant", "content": "Hi."},
        ],
        "references": ["Hi."],
    }
    across = Batch(["a", "b"], [["Hi."], ["Hello."]], None, [chat, record])
    metric.score_batch(across)
    call = calls(rewards)[1]
    assert call["prompts"] == [chat["messages"][:2], "Say hi."]  # chat turns, without the final answer
    assert call["id"] == ["q2", "q1"] and call["source"] == [None, "demo"]  # a field one record lacks: None


def test_a_function_without_kwargs_gets_only_what_it_names(rewards) -> None:
    assert get_metric(f"py:{rewards}:words").score_batch(Batch.group(["a b", "c"], ["r"])) == [2.0, 1.0]
    answer = get_metric(f"py:{rewards}:needs_answer")
    with_answer = {"id": "q", "prompt": "p", "references": ["r"], "answer": "yes"}
    assert answer.score_batch(Batch.group(["yes", "no"], ["r"], record=with_answer)) == [1.0, 0.0]
    with pytest.raises(RewardFunctionError, match=r"needs_answer\(\) needs 'answer', which the records do not have"):
        answer.score_batch(Batch.group(["yes"], ["r"], record={"id": "q", "prompt": "p", "references": ["r"]}))


def test_in_reasoning_mode_a_function_sees_the_whole_completion(rewards) -> None:
    scorer = Scorer.from_names([f"py:{rewards}:words", "bleu"], extract_answer=True)
    completion = "<think>a b c</think><answer>the cat</answer>"
    scores = scorer.score([completion], ["the cat"])
    assert scores[f"py:{rewards}:words"] == [4.0]  # the whole completion, as TRL passes it (2 in the answer)
    assert scores["bleu"] == [sacrebleu.sentence_bleu("the cat", ["the cat"]).score / 100]  # bleu: the answer


def test_spec_weight_and_signature_with_the_files_hash(rewards) -> None:
    assert parse_spec(f"py:{rewards}:words:0.3") == MetricSpec("py", f"{rewards}:words", 0.3)
    assert parse_spec("py:mypkg.rewards:judge") == MetricSpec("py", "mypkg.rewards:judge", None)
    digest = hashlib.sha256(rewards.read_bytes()).hexdigest()[:12]
    assert get_metric(f"py:{rewards}:words").signature() == f"py:{rewards}:words@sha256:{digest}"
    specs = parse_specs(["bleu", f"py:{rewards}:words:2"])
    assert python_signatures(specs) == [f"py:{rewards}:words@sha256:{digest}"]
    assert python_signatures(parse_specs(["bleu", "rm:/m/rm:0.5"])) == []


def test_a_module_by_its_dotted_name(rewards, monkeypatch) -> None:
    from stages.metrics import python

    monkeypatch.setattr(sys, "path", list(sys.path))  # the import adds the current directory: undone after
    monkeypatch.setattr(sys, "modules", dict(sys.modules))
    monkeypatch.setattr(python, "_SOURCES", {})
    monkeypatch.chdir(rewards.parent)  # found under the current directory, as `python -m` would
    metric = get_metric("py:my_rewards:words")
    assert metric.score_batch(Batch.group(["a b c"], ["r"])) == [3.0]
    digest = hashlib.sha256(rewards.read_bytes()).hexdigest()[:12]
    assert metric.signature() == f"py:my_rewards:words@sha256:{digest}"


def test_imported_once_per_process(rewards) -> None:
    for _ in range(3):
        get_metric(f"py:{rewards}:words")
    Scorer.from_names([f"py:{rewards}:words", f"py:{rewards}:skip_some:2"])
    get_metric(f"py:{rewards.parent}/../user/my_rewards.py:words")  # the same file, spelled otherwise
    assert imports(rewards) == [os.getpid()]


def test_jobs_workers_import_it_once_each_and_score_like_one_process(rewards) -> None:
    records = [
        {"id": str(i), "prompt": "p", "references": ["a b"], "completions": ["x " * (i % 5), "y"]}
        for i in range(3 * CHUNK_RECORDS + 1)
    ]
    scorer = Scorer.from_names([f"py:{rewards}:skip_some", "bleu"])
    parallel = list(score_records([dict(r) for r in records], scorer, jobs=2))
    assert [r["id"] for r in parallel] == [r["id"] for r in records]
    for record in parallel:
        words = len(record["completions"][0].split())
        assert record["scores"][f"py:{rewards}:skip_some"] == [float(words), 1.0]
    pids = imports(rewards)
    assert len(pids) == len(set(pids)) >= 2 and os.getpid() in pids  # this process and its workers, once each


def test_async_functions_are_awaited_also_from_inside_a_running_loop(rewards) -> None:
    scorer = Scorer.from_names([f"py:{rewards}:later"])
    assert scorer.rewards(["a", "b"], ["r"]) == [2.0, 2.0]

    async def inside() -> list:
        return scorer.rewards(["a"], ["r"])

    assert asyncio.run(inside()) == [2.0]


# --- None: no reward for this one --------------------------------------------------------------------


def test_none_is_left_out_of_the_weighted_sum_and_the_aggregate(rewards) -> None:
    py = f"py:{rewards}:skip_some"
    scorer = Scorer.from_names([f"{py}:2", "bleu:1"])
    record = {"id": "q", "prompt": "p", "references": ["the cat sat"], "completions": ["skip this", "the cat sat"]}
    scores = scorer.score_record(record)
    bleu = [sacrebleu.sentence_bleu(c, ["the cat sat"]).score / 100 for c in record["completions"]]
    assert scores[py] == [None, 3.0]
    assert scores[COMBINED] == pytest.approx([bleu[0], 2 * 3.0 + bleu[1]])  # None: only bleu's term
    scored = scorer.apply(record, scores)
    assert scored["score"] == pytest.approx((bleu[0] + 7.0) / 2)

    only = Scorer.from_names([py])
    alone = only.apply({"completions": ["skip", "a b"]}, only.score(["skip", "a b"], ["r"]))
    assert alone["scores"][py] == [None, 2.0] and alone["score"] == 2.0  # the record's mean leaves None out
    none = only.apply({"completions": ["skip"]}, only.score(["skip"], ["r"]))
    assert none["score"] is None  # nothing scored: null in the output
    both = Scorer.from_names([f"{py}:1", f"py:{rewards}:all_none:1"]).score(["skip"], ["r"])
    assert both[COMBINED] == [None]


def test_none_in_zscore_combination_by_hand(rewards) -> None:
    py = f"py:{rewards}:skip_some"
    completions, refs = ["skip", "the cat sat", "a cat sat on it"], ["the cat sat"]
    scores = Scorer.from_names([py, "bleu"], combine="zscore").score(completions, refs)
    bleu = [sacrebleu.sentence_bleu(c, refs).score / 100 for c in completions]
    z_bleu = [(b - statistics.mean(bleu)) / (statistics.stdev(bleu) + 1e-6) for b in bleu]
    z_py = [None, (3 - 4) / (math.sqrt(2) + 1e-6), (5 - 4) / (math.sqrt(2) + 1e-6)]  # over 3 and 5 only
    expected = [0.5 * z_bleu[0]] + [0.5 * z_py[i] + 0.5 * z_bleu[i] for i in (1, 2)]  # weights 1/2 each
    assert scores[COMBINED] == pytest.approx(expected, abs=1e-9)


def test_training_rewards_treat_none_as_trl_does(rewards) -> None:
    from stages.train.data import TrainPrompt
    from stages.train.grpo import _group_rewards

    py = f"py:{rewards}:skip_some"
    record = {"id": "q", "prompt": "p", "references": ["r"]}
    prompts = [TrainPrompt("q", [1], ["r"], None, record)] * 2
    samples = [Sample([5, 6], [0.0, 0.0], True), Sample([7], [0.0], False)] * 2
    completions = ["skip", "a b c", "skip too", "skip again"]
    parts, totals = _group_rewards(Scorer.for_rewards([py]), prompts, samples, completions, group_size=2)
    assert totals == [0.0, 3.0, 0.0, 0.0]  # TRL's nansum: a sample no function rewarded gets 0
    assert parts[py] == [3.0]  # the logged mean is over the values given (TRL's nanmean)

    _group_rewards(Scorer.for_rewards([f"py:{rewards}:seen"]), prompts, samples, completions, group_size=2)
    first, second = calls(rewards)  # one call per group of G = 2
    assert first["completions"] == completions[:2] and second["completions"] == completions[2:]
    assert first["completion_ids"] == [[5, 6], [7]] and first["id"] == ["q", "q"]


def test_eval_needs_a_score_for_every_answer(rewards) -> None:
    metric = get_metric(f"py:{rewards}:skip_some")
    batch = Batch(["fine", "skip"], [["r"], ["r"]], None, [{"id": "h1"}, {"id": "h2"}], missing_ok=False)
    with pytest.raises(RewardFunctionError, match=r"returned None \(record 'h2'\), but every answer needs a score"):
        metric.score_batch(batch)


# --- errors: one line, exit 1, naming the spec ------------------------------------------------------------


def _scored_input(tmp_path: Path) -> Path:
    rows = [{"id": "q1", "prompt": "Say hi.", "references": ["Hi."], "completions": ["Hi.", "Hello."]}]
    return write_jsonl(tmp_path / "in.jsonl", rows)


@pytest.mark.parametrize(
    ("function", "message"),
    [
        ("nope", "py:{f}:nope: no function 'nope' in {f} (it defines: all_none, flaky, gives_inf, "),
        ("NOT_A_FUNCTION", "py:{f}:NOT_A_FUNCTION: 'NOT_A_FUNCTION' is a int, not a function"),
        ("raises", "py:{f}:raises: ValueError: bad input (record 'q1')"),
        ("short", "py:{f}:short: returned 1 values for 2 completions (record 'q1')"),
        ("text", "py:{f}:text: returned 'high' (str), not a number or None (record 'q1', completion 0)"),
        ("gives_nan", "py:{f}:gives_nan: returned nan (record 'q1', completion 0); return None for no reward"),
        ("gives_inf", "py:{f}:gives_inf: returned inf (record 'q1', completion 0); return None for no reward"),
    ],
)
def test_function_errors_are_one_line_and_keep_the_output(runner, rewards, tmp_path, function, message) -> None:
    out = tmp_path / "out.jsonl"
    out.write_text("earlier results\n")
    args = ["score", "-i", str(_scored_input(tmp_path)), "-o", str(out), "-m", "bleu", "-m", f"py:{rewards}:{function}"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert line.startswith("bleuberi: error: " + message.format(f=rewards)), line
    assert "second line" not in result.stderr and "Traceback" not in result.stderr
    assert out.read_text() == "earlier results\n"  # nothing already written is lost


def test_load_errors_are_one_line(runner, tmp_path) -> None:
    data = str(_scored_input(tmp_path))
    broken = tmp_path / "broken.py"
    broken.write_text("def f(completions):\n    return [\n")
    cases = {
        f"py:{tmp_path}/missing.py:f": f"py:{tmp_path}/missing.py:f: no such file: {tmp_path}/missing.py",
        "py:nosuchmod.rewards:f": "py:nosuchmod.rewards:f: no such module: nosuchmod.rewards",
        f"py:{broken}:f": f"py:{broken}:f: importing broken.py failed: SyntaxError: ",
    }
    for spec, message in cases.items():
        result = runner.invoke(app, ["score", "-i", data, "-m", spec])
        assert result.exit_code == 1, (spec, result.stderr)
        [line] = result.stderr.splitlines()
        assert line.startswith(f"bleuberi: error: {message}"), line
    usage = runner.invoke(app, ["score", "-i", data, "-m", f"py:{broken}"])  # no function named: a usage error
    assert usage.exit_code == 2 and "expected py:FILE.py:FUNCTION or py:module.name:FUNCTION" in usage.stderr


def test_a_functions_prints_go_to_stderr(runner, rewards, tmp_path) -> None:
    result = runner.invoke(app, ["score", "-i", str(_scored_input(tmp_path)), "-m", f"py:{rewards}:loud"])
    assert result.exit_code == 0, result.stderr
    assert "debugging output" in result.stderr and "debugging output" not in result.stdout
    assert [r["scores"][f"py:{rewards}:loud"] for r in read_jsonl_text(result.stdout)] == [[1.0, 1.0]]


# --- every entry point -------------------------------------------------------------------------------------


def test_score_command_with_the_example_by_relative_path(runner, tmp_path, monkeypatch) -> None:
    rows = [
        {"id": "a", "prompt": "p", "references": ["w " * 10], "completions": ["w " * 10, "a b c", "- x"]},
        {"id": "b", "prompt": "p", "references": ["one two"], "completions": ["one two"]},
    ]
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    monkeypatch.chdir(ROOT)  # the file is named relative to the current directory
    spec = "py:examples/rewards.py:length_band"
    result = runner.invoke(app, ["score", "-i", str(data), "-m", "bleu", "-m", f"{spec}:0.5"])
    assert result.exit_code == 0, result.stderr
    first, second = read_jsonl_text(result.stdout)
    assert first["scores"][spec] == pytest.approx([1.0, 0.6, 0.4])  # 10/10; 3/10 -> 0.3/0.5; 2/10 -> 0.2/0.5
    bleu = [sacrebleu.sentence_bleu(c, rows[0]["references"]).score / 100 for c in rows[0]["completions"]]
    assert first["scores"][COMBINED] == pytest.approx([b + 0.5 * v for b, v in zip(bleu, [1.0, 0.6, 0.4])])
    assert second["scores"][COMBINED] == pytest.approx([1.0 + 0.5])
    digest = hashlib.sha256(EXAMPLE.read_bytes()).hexdigest()[:12]
    assert first["scoring"]["signatures"][spec] == f"{spec}@sha256:{digest}"
    assert first["scoring"]["weights"] == {"bleu": 1.0, spec: 0.5}


def test_score_then_select_by_your_own_reward(runner, rewards, tmp_path) -> None:
    rows = [{"id": str(n), "prompt": "p", "references": ["r"], "completions": ["w " * n, "skip"]} for n in (3, 1, 2, 5)]
    rows.append({"id": "none", "prompt": "p", "references": ["r"], "completions": ["skip"]})
    data = write_jsonl(tmp_path / "in.jsonl", rows)
    scored = runner.invoke(
        app, ["score", "-i", str(data), "-m", f"py:{rewards}:skip_some", "-o", str(tmp_path / "s.jsonl")]
    )
    assert scored.exit_code == 0, scored.stderr
    assert "mean py:" in scored.stderr and "= 2.7500 (1 records without a score)" in scored.stderr  # (3+1+2+5)/4
    by_id = {r["id"]: r for r in read_jsonl_text((tmp_path / "s.jsonl").read_text())}
    assert by_id["3"]["score"] == 3.0 and by_id["none"]["score"] is None
    picked = runner.invoke(
        app, ["select", "-i", str(tmp_path / "s.jsonl"), "--mode", "hard", "-n", "2", "--skip-invalid", "-q"]
    )
    assert picked.exit_code == 0, picked.stderr
    assert [r["id"] for r in read_jsonl_text(picked.stdout)] == ["1", "2"]  # the two lowest; the unscored one skipped


def _train_args(model: Path, data: Path, out: Path, steps: int, *rewards: str) -> list[str]:
    args = ["train", "-i", str(data), "-o", str(out), "--model", str(model), "--num-generations", "4"]
    args += ["--per-device-train-batch-size", "8", "--max-completion-length", "8", "--max-steps", str(steps)]
    args += ["--save-steps", "10", "--lr", "5e-3", "-q"]
    args += ["--threads", "2"]  # one count for every run a test compares bit for bit (docs/threads.md)
    for reward in rewards:
        args += ["--reward", reward]
    return args


def test_train_rewards_each_group_with_the_function(runner, tiny_model, rewards, tmp_path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", demo_records(count=4))
    py = f"py:{rewards}:seen"
    result = runner.invoke(app, _train_args(tiny_model, data, tmp_path / "run", 2, "bleu", f"{py}:0.5"))
    assert result.exit_code == 0, result.stderr
    steps = read_jsonl_text(result.stdout)
    groups = calls(rewards)
    assert len(groups) == 4  # 2 steps x 2 prompts (8 completions a step / 4 per group): one call per group
    references = {r["id"]: r["references"] for r in demo_records(count=4)}
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    for step, pair in zip(steps, (groups[:2], groups[2:])):
        values, totals = [], []
        for group in pair:
            [record_id] = set(group["id"])
            assert len(group["completions"]) == 4 and group["references"] == [references[record_id]] * 4
            decoded = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in group["completion_ids"]]
            assert decoded == group["completions"] and all(len(ids) <= 8 for ids in group["completion_ids"])
            for completion in group["completions"]:
                values.append(float(len(completion)))
                totals.append(
                    sacrebleu.sentence_bleu(completion, references[record_id]).score / 100 + 0.5 * len(completion)
                )
        assert step["rewards"][py]["mean"] == pytest.approx(statistics.mean(values), abs=1e-5)
        assert step["reward_mean"] == pytest.approx(statistics.mean(totals), abs=1e-4)


def test_a_failing_reward_stops_training_with_a_checkpoint_and_resumes_exactly(
    runner, tiny_model, rewards, tmp_path
) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", demo_records(count=8))
    py = f"py:{rewards}:flaky"
    straight = runner.invoke(app, _train_args(tiny_model, data, tmp_path / "straight", 4, "bleu", py))
    assert straight.exit_code == 0, straight.stderr

    (rewards.parent / "calls.count").unlink()
    (rewards.parent / "fail.flag").touch()  # the 5th call (step 3's first group) raises
    cut = tmp_path / "cut"
    failed = runner.invoke(app, _train_args(tiny_model, data, cut, 4, "bleu", py))
    assert failed.exit_code == 1
    [line] = failed.stderr.splitlines()
    assert line.startswith(f"bleuberi: error: {py}: RuntimeError: judge unavailable (record '"), line
    assert f"stopped at step 3, the 2 steps before it are saved in {cut}/checkpoints/step-2" in line
    assert line.endswith("fix the function, then rerun with --resume")
    assert not (cut / "adapter").exists()

    (rewards.parent / "fail.flag").unlink()
    resumed = runner.invoke(app, [*_train_args(tiny_model, data, cut, 4, "bleu", py), "--resume"])
    assert resumed.exit_code == 0, resumed.stderr
    a, b = (
        load_file(tmp_path / "straight/adapter/adapter_model.safetensors"),
        load_file(cut / "adapter/adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [orjson.loads(x)["step"] for x in (cut / "metrics.jsonl").read_bytes().splitlines()] == [1, 2, 3, 4]


def test_a_failure_at_the_first_step_leaves_nothing_to_resume(runner, tiny_model, rewards, tmp_path) -> None:
    data = write_jsonl(tmp_path / "in.jsonl", demo_records(count=4))
    result = runner.invoke(app, _train_args(tiny_model, data, tmp_path / "run", 2, f"py:{rewards}:gives_nan"))
    assert result.exit_code == 1
    [line] = result.stderr.splitlines()
    assert "returned nan" in line and line.endswith(
        "stopped at step 1, nothing trained yet: fix the function, then rerun"
    )
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_eval_scores_each_system_in_one_call(runner, tiny_model, tiny_adapter, rewards, tmp_path) -> None:
    held = write_jsonl(tmp_path / "held.jsonl", demo_records(count=3))
    py = f"py:{rewards}:seen"
    args = ["eval", "-i", str(held), "--model", str(tiny_model), "--adapter", f"{tiny_adapter}=tuned"]
    args += ["--max-new-tokens", "6", "-m", "bleu", "-m", py, "--bootstrap-resamples", "20", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    rows = read_jsonl_text(result.stdout)
    groups = calls(rewards)
    assert len(groups) == 3  # base, tuned and the length control base@len(tuned): one call each, all records
    for group in groups:
        assert group["id"] == [r["id"] for r in rows] and "evaluation" not in group
    for system, group in zip(("base", "tuned", "base@len(tuned)"), groups):
        answers = [r["evaluation"][system]["completion"] for r in rows]
        assert group["completions"] == answers
        assert [r["evaluation"][system]["scores"][py] for r in rows] == [float(len(a)) for a in answers]


RANKS_SCRIPT = """
import sys
from transformers import AutoModelForCausalLM, AutoTokenizer
from stages.engines.base import Sample
from stages.engines.generator import Generator
from stages.metrics.python import RewardFunctionError
from stages.score import Scorer
from stages.train.data import TrainPrompt
from stages.train.distributed import Distributed
from stages.train.grpo import score_rollout

model_dir, out_dir, spec = sys.argv[1:4]
dist = Distributed.from_env("cpu")
tokenizer = AutoTokenizer.from_pretrained(model_dir)
generator = Generator.for_model(AutoModelForCausalLM.from_pretrained(model_dir), tokenizer)
record = {"id": f"rank{dist.rank}", "prompt": "Say it.", "references": ["ok"]}
prompts = [TrainPrompt(record["id"], tokenizer.encode("Say it."), ["ok"], None, record)]
ids = tokenizer.encode("ok", add_special_tokens=False)
samples = [Sample(ids, [0.0] * len(ids), True)] * 2
try:
    score_rollout(
        generator, Scorer.for_rewards([spec]), prompts, samples,
        group_size=2, scale_rewards="group", skip_zero_std=False, dist=dist,
    )
    outcome = "scored"
except RewardFunctionError as error:
    outcome = str(error)
with open(f"{out_dir}/rank{dist.rank}.txt", "w") as f:
    f.write(outcome)
dist.close()
"""


@pytest.mark.slow
def test_a_reward_failing_on_one_rank_stops_every_rank(tiny_model, rewards, tmp_path) -> None:
    """Under torchrun the ranks agree on a failure before any other collective, so none waits forever."""
    import subprocess

    from tests.conftest import torchrun

    script = tmp_path / "ranks.py"
    script.write_text(RANKS_SCRIPT)
    launcher = torchrun(2)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*launcher, str(script), str(tiny_model), str(tmp_path), f"py:{rewards}:picky"],
        env=env,
        capture_output=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    assert (tmp_path / "rank1.txt").read_text() == f"py:{rewards}:picky: ValueError: not this one (record 'rank1')"
    assert (tmp_path / "rank0.txt").read_text() == "a reward function failed on another rank (its message is there)"
    assert sorted(imports(rewards)) == sorted(set(imports(rewards))) and len(imports(rewards)) == 2  # once per rank


def test_run_selects_trains_and_reports_with_your_reward(runner, tiny_model, tmp_path, monkeypatch) -> None:
    from tests.conftest import run_args

    monkeypatch.chdir(ROOT)
    band, lists = "py:examples/rewards.py:length_band", "py:examples/rewards.py:no_lists"
    rewards = [f'score.metrics=["{band}"]', f'train.reward=["bleu", "{lists}:0.3"]', "train.reward_combine=zscore"]
    result = runner.invoke(app, run_args(tmp_path / "run", tiny_model, *rewards))
    assert result.exit_code == 0, result.stderr
    [summary] = read_jsonl_text(result.stdout)
    assert summary["ran"] == ["select", "train", "eval"]
    pool = read_jsonl_text((tmp_path / "run/pool.scored.jsonl").read_text())
    digest = hashlib.sha256(EXAMPLE.read_bytes()).hexdigest()[:12]
    assert pool[0]["scoring"]["signatures"] == {band: f"{band}@sha256:{digest}"}
    metrics = read_jsonl_text((tmp_path / "run/train/metrics.jsonl").read_text())
    assert {"bleu", lists, COMBINED} <= set(metrics[0]["rewards"])
    report = json.loads((tmp_path / "run/eval/report.json").read_text())
    assert lists in report["metrics"] and report["signatures"][lists] == f"{lists}@sha256:{digest}"


def test_a_changed_function_changes_the_stage_hashes_that_use_it(tiny_model, rewards, monkeypatch) -> None:
    from stages.metrics import python
    from stages.run.config_file import load_config
    from stages.run.recipe import stage_digests

    plain = load_config(None, [f"model={tiny_model}"])
    select, _, _ = stage_digests(plain)

    config = load_config(None, [f"model={tiny_model}", f'train.reward=["bleu", "py:{rewards}:words:0.5"]'])
    before = stage_digests(config)
    rewards.write_text(USER_REWARDS + "\n# a changed function\n")
    monkeypatch.setattr(python, "_SOURCES", {})  # a new process would import the new file
    after = stage_digests(config)
    assert before[0] == after[0] == select  # select does not use it
    assert before[1] != after[1] and before[2] != after[2]  # train does, and eval reports it


def test_usage_error_for_an_empty_py_spec() -> None:
    with pytest.raises(UsageError, match="py needs a function"):
        get_metric("py")
