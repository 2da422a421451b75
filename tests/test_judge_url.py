"""`judge-url:` against a stand-in judge on 127.0.0.1 (tests/judge_standin.py; no monkeypatching of the client):
its grades where they go (score, select, train rewards, eval), the template, reading replies, the cache, the
concurrency bound, and the faults: a server that is down or hangs, garbage replies, a redirect."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from bleuberi_cli.app import app
from stages.core.errors import ConfigError, UsageError
from stages.core.http import ServerError
from stages.metrics import Batch, JudgeError, get_metric, parse_spec
from stages.metrics.judge import JudgeReward, JudgeSettings, split_target
from stages.metrics.judge_prompt import DEFAULT_TEMPLATE, load_template, parse_score
from stages.score import COMBINED, Scorer, zscores
from tests.conftest import ROOT, free_port, read_jsonl_text, train_args, write_jsonl
from tests.judge_standin import JudgeStandin

REFERENCE = "Jupiter is the largest planet."
PROMPT = [{"role": "user", "content": "Name the largest planet."}]
# answers, and the stand-in's grades of them (tests/judge_standin.py's rule) on 0..1
ANSWERS = [REFERENCE, "Jupiter.", "Saturn, I think.", ""]
GRADES = [1.0, 0.5, 0.0, 0.0]


@pytest.fixture
def judge(monkeypatch, tmp_path) -> Iterator[JudgeStandin]:
    monkeypatch.setenv("BLEUBERI_JUDGE_CACHE", str(tmp_path / "judge-cache"))
    monkeypatch.setenv("BLEUBERI_JUDGE_RETRIES", "0")
    standin = JudgeStandin()
    yield standin
    standin.close()


def rows(answers: list[list[str]]) -> list[dict]:
    return [
        {"id": f"q{i}", "prompt": PROMPT[0]["content"], "references": [REFERENCE], "completions": completions}
        for i, completions in enumerate(answers)
    ]


# --- the spec, the settings, the template --------------------------------------------------------------


def test_spec_url_model_and_weight() -> None:
    spec = parse_spec("judge-url:http://127.0.0.1:8000/v1#smol:0.5")
    assert (spec.kind, spec.argument, spec.weight) == ("judge-url", "http://127.0.0.1:8000/v1#smol", 0.5)
    assert split_target("http://h:8000/v1/chat/completions") == ("http://h:8000/v1", None)
    assert split_target("https://api.example.com/v1#gpt-4.1-mini") == ("https://api.example.com/v1", "gpt-4.1-mini")
    with pytest.raises(UsageError, match=r"needs a path.*8000/v1"):  # the port would be read as a weight
        parse_spec("judge-url:http://127.0.0.1:8000")
    with pytest.raises(UsageError, match="http"):
        get_metric("judge-url:ftp://host/v1")


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("SCALE", "10..0", "LOW..HIGH"),
        ("REFERENCES", "best", "all or first"),
        ("CONCURRENCY", "0", "CONCURRENCY must be an integer >= 1"),
        ("TIMEOUT", "soon", "TIMEOUT must be a number"),
    ],
)
def test_bad_settings_are_one_line_naming_the_variable(name, value, message) -> None:
    with pytest.raises(ConfigError, match=message) as caught:
        JudgeSettings.from_env({f"BLEUBERI_JUDGE_{name}": value})
    assert f"$BLEUBERI_JUDGE_{name}" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("7", 0.7),
        ("score: 7", 0.7),
        ("Score: 8/10", 0.8),
        ("**Score:** 9", 0.9),
        ('{"score": 6}', 0.6),
        ('The verdict: {"rating": "3"}', 0.3),
        ("[[4]]", 0.4),
        ("I would give it 7 out of 10.", 0.7),
        ("Rating: 4/5", 0.8),  # another scale's fraction, on this one
        ("<think>score: 2? no</think>score: 10", 1.0),  # a reasoning model's drafts are not its answer
        ("score: 3\nOn reflection, score: 5", 0.5),  # the last one given
        ("The answer is good.", None),
        ("It lists 3 planets.", None),  # a number that is not a grade
        ("score: 11", None),  # off the scale
        ("", None),
    ],
)
def test_replies_are_read_in_the_shapes_judges_write(reply, score) -> None:
    parsed = parse_score(reply, 0, 10)
    assert parsed.score == (pytest.approx(score) if score is not None else None)
    assert (parsed.problem == "") == (score is not None)


def test_a_scale_of_one_to_five_maps_onto_0_to_1() -> None:
    assert [parse_score(str(n), 1, 5).score for n in (1, 3, 5)] == [0.0, 0.5, 1.0]


def test_templates_from_files_and_their_checks(tmp_path) -> None:
    text = tmp_path / "judge.txt"
    text.write_text("Ref: {{ references }}\nAnswer: {{answer}}\nScore {{low}}-{{high}}.\n")
    template = load_template(str(text))
    # one pass: an answer that holds a placeholder is sent as written
    turns = template.render(
        {"references": "R", "answer": "{{references}}", "low": "0", "high": "10", "instruction": ""}
    )
    assert turns == [{"role": "user", "content": "Ref: R\nAnswer: {{references}}\nScore 0-10."}]
    chat = tmp_path / "judge.json"
    chat.write_text(
        json.dumps(
            [{"role": "system", "content": "Be strict."}, {"role": "user", "content": "{{answer}} vs {{references}}"}]
        )
    )
    assert [role for role, _ in load_template(str(chat)).turns] == ["system", "user"]
    text.write_text("{{answer}} {{reference}}")
    with pytest.raises(ConfigError, match=r"unknown placeholder \{\{reference\}\}"):
        load_template(str(text))
    text.write_text("Grade {{answer}}.")
    with pytest.raises(ConfigError, match=r"must show the judge \{\{references\}\}"):
        load_template(str(text))
    with pytest.raises(ConfigError, match="cannot read"):
        load_template(str(tmp_path / "missing.txt"))


# A value other than the default for each variable docs/rewards.md lists (the key and the cache: any value).
CHANGED = {
    "KEY": "k",
    "TEMPLATE": "t.txt",
    "REFERENCES": "first",
    "SCALE": "1..5",
    "FORMAT": "json",
    "TEMPERATURE": "0.7",
    "MAX_TOKENS": "200",
    "CONCURRENCY": "2",
    "TIMEOUT": "5",
    "RETRIES": "0",
    "CACHE": "off",
}


def test_the_docs_show_the_default_template_and_the_settings_there_are() -> None:
    text = (ROOT / "docs" / "rewards.md").read_text()
    section = text.split("## An LLM judge given the references", 1)[1].split("\n## ", 1)[0]
    assert f"```text\n{DEFAULT_TEMPLATE}\n```" in section
    documented = re.findall(r"^\| `BLEUBERI_JUDGE_([A-Z_]+)` \|", section, re.M)
    assert sorted(documented) == sorted(CHANGED)
    for name, value in CHANGED.items():  # each one is read, and changes what it names
        assert JudgeSettings.from_env({f"BLEUBERI_JUDGE_{name}": value}) != JudgeSettings(), name


# --- grades where they go ------------------------------------------------------------------------------


def test_grades_the_completions_against_the_references(judge, monkeypatch) -> None:
    monkeypatch.setenv("BLEUBERI_JUDGE_KEY", "sekret")
    metric = get_metric(f"judge-url:{judge.url}")
    assert metric.sentence_scores(ANSWERS, [REFERENCE], messages=PROMPT) == pytest.approx(GRADES)
    bodies = judge.chats()
    assert len(bodies) == len(ANSWERS)
    assert {b["model"] for b in bodies} == {"judge"}  # the one model the server lists
    assert all(b["temperature"] == 0 and b["max_tokens"] == 32 and "seed" not in b for b in bodies)
    assert "### Instruction\nName the largest planet.\n" in bodies[0]["messages"][0]["content"]
    assert {r["auth"] for r in judge.requests} == {"Bearer sekret"}
    assert metric.signature().startswith("judge-url|model:judge|template:default@sha256:")


def test_json_format_asks_for_structured_outputs_on_the_scale(judge, monkeypatch) -> None:
    monkeypatch.setenv("BLEUBERI_JUDGE_FORMAT", "json")
    monkeypatch.setenv("BLEUBERI_JUDGE_SCALE", "1..5")
    judge.reply = lambda body: json.dumps({"score": 4})
    assert get_metric(f"judge-url:{judge.url}").sentence_scores(["Jupiter."], [REFERENCE], messages=PROMPT) == [0.75]
    [body] = judge.chats()
    schema = body["response_format"]["json_schema"]["schema"]
    assert body["response_format"]["type"] == "json_schema" and schema["required"] == ["score"]
    assert schema["properties"]["score"] == {"type": "integer", "minimum": 1, "maximum": 5}
    assert "a whole number from 1 to 5" in body["messages"][0]["content"]


def test_all_references_or_only_the_first(judge, monkeypatch) -> None:
    refs = ["Mars is red.", REFERENCE]
    assert get_metric(f"judge-url:{judge.url}").sentence_scores(["Jupiter."], refs, messages=PROMPT) == [0.5]
    assert "Reference 2:\nJupiter is the largest planet." in judge.chats()[-1]["messages"][0]["content"]
    monkeypatch.setenv("BLEUBERI_JUDGE_REFERENCES", "first")
    assert get_metric(f"judge-url:{judge.url}").sentence_scores(["Jupiter."], refs, messages=PROMPT) == [0.0]
    assert "Jupiter is the largest" not in judge.chats()[-1]["messages"][0]["content"]


def test_score_command_then_select_and_a_second_run_from_the_cache(runner, judge, tmp_path) -> None:
    path = write_jsonl(tmp_path / "gen.jsonl", rows([[a] for a in ANSWERS]))
    spec = f"judge-url:{judge.url}"
    first = runner.invoke(app, ["score", "-i", str(path), "-m", spec])
    assert first.exit_code == 0, first.output
    out = read_jsonl_text(first.stdout)
    assert [r["scores"][spec] for r in out] == [[g] for g in GRADES]
    assert out[0]["scoring"]["signatures"][spec].startswith("judge-url|model:judge|")
    assert f"judge: {len(ANSWERS)} requests, 0 answered from the cache, 0 nulls" in first.stderr
    again = runner.invoke(app, ["score", "-i", str(path), "-m", spec])
    assert again.exit_code == 0 and again.stdout == first.stdout
    assert f"judge: 0 requests, {len(ANSWERS)} answered from the cache" in again.stderr
    assert len(judge.chats()) == len(ANSWERS)  # nothing asked twice
    hard = runner.invoke(app, ["select", "--mode", "hard", "-n", "2", "-q"], input=first.stdout)
    assert hard.exit_code == 0, hard.output
    assert {r["id"] for r in read_jsonl_text(hard.stdout)} == {"q2", "q3"}  # the two graded 0


def test_the_cache_key_is_what_changes_the_answer(judge, monkeypatch, tmp_path) -> None:
    def ask() -> int:
        before = len(judge.chats())
        get_metric(f"judge-url:{judge.url}").sentence_scores(["Jupiter."], [REFERENCE], messages=PROMPT)
        return len(judge.chats()) - before

    assert ask() == 1
    assert ask() == 0  # the same request: from the cache
    other = JudgeStandin()  # the same model (name and weights) on another port: still the same answer
    try:
        assert get_metric(f"judge-url:{other.url}").sentence_scores(["Jupiter."], [REFERENCE], messages=PROMPT)
        assert other.chats() == []
    finally:
        other.close()
    judge.models[0]["root"] = "/models/judge-v2"  # other weights under the same name: asked again
    assert ask() == 1
    monkeypatch.setenv("BLEUBERI_JUDGE_MAX_TOKENS", "8")
    assert ask() == 1
    (tmp_path / "t.txt").write_text("{{references}}\n{{answer}}\nscore: N")
    monkeypatch.setenv("BLEUBERI_JUDGE_TEMPLATE", str(tmp_path / "t.txt"))
    judge.reply = lambda body: "7"
    assert ask() == 1
    files = list((tmp_path / "judge-cache").rglob("*.json"))
    assert len(files) == 4 and not list((tmp_path / "judge-cache").rglob("*.tmp"))  # written whole, renamed
    assert {"reply", "request"} <= set(json.loads(files[0].read_text()))  # JSON, never pickle


def test_a_cache_that_cannot_be_written_is_said_once_and_left_off(judge, monkeypatch, tmp_path) -> None:
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("BLEUBERI_JUDGE_CACHE", str(tmp_path / "a-file" / "cache"))  # under a file: no folder
    notices: list[str] = []
    metric = JudgeReward(judge.url, notice=notices.append)
    assert metric.sentence_scores(ANSWERS, [REFERENCE], messages=PROMPT) == pytest.approx(GRADES)
    assert len(notices) == 1 and "cannot be written" in notices[0] and "going on without it" in notices[0]


def test_requests_run_concurrently_up_to_the_bound(judge, monkeypatch) -> None:
    monkeypatch.setenv("BLEUBERI_JUDGE_CONCURRENCY", "3")
    judge.in_flight.gather = 3  # the first requests wait for each other: 3 in flight at once, however loaded
    judge.slow = 0.2  # each one then takes a while, so a client without a bound would send more meanwhile
    scorer = Scorer.from_names([f"judge-url:{judge.url}"])
    groups = [([f"answer {i} {j}" for j in range(2)], [REFERENCE], PROMPT, {"id": f"q{i}"}) for i in range(6)]
    scorer.prefetch(groups)  # what score and train do: a chunk's or a step's groups at once
    assert judge.in_flight.peak == 3 and len(judge.chats()) == 12
    asked = len(judge.chats())
    for completions, refs, messages, record in groups:  # the scores read what was asked
        assert scorer.score(completions, refs, messages=messages, record=record)[scorer.score_key] == [0.0, 0.0]
    assert len(judge.chats()) == asked
    assert scorer.usage().requests == 12


def test_bleu_and_judge_z_mixed_as_the_paper_mixes_bleu_and_an_rm(judge) -> None:
    scorer = Scorer.for_rewards(["bleu", f"judge-url:{judge.url}"], combine="zscore")
    scores = scorer.score(ANSWERS, [REFERENCE], messages=PROMPT)
    z_bleu, z_judge = zscores(scores["bleu"]), zscores(GRADES)
    assert scores[COMBINED] == pytest.approx([(a + b) / 2 for a, b in zip(z_bleu, z_judge)], abs=1e-6)


# --- faults --------------------------------------------------------------------------------------------


def one_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_a_judge_that_is_down_stops_score_and_train_before_anything_loads(
    runner, tmp_path, tiny_model, monkeypatch
) -> None:
    from transformers import AutoModelForCausalLM

    url = f"http://127.0.0.1:{free_port()}/v1"
    path = write_jsonl(tmp_path / "gen.jsonl", rows([["Jupiter."]]))
    result = runner.invoke(
        app, ["score", "-i", str(path), "-m", f"judge-url:{url}"], env={"BLEUBERI_JUDGE_RETRIES": "0"}
    )
    assert result.exit_code == 1 and result.stdout == ""
    assert "connection refused" in one_line(result) and url in one_line(result)
    data = write_jsonl(tmp_path / "train.jsonl", [{"id": "a", "prompt": "p", "references": ["r"]}])
    args = train_args(data, tmp_path / "run", tiny_model, reward=f"judge-url:{url}")
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", lambda *a, **k: pytest.fail("the model loaded"))
    trained = runner.invoke(app, args, env={"BLEUBERI_JUDGE_RETRIES": "0"})
    assert trained.exit_code == 1 and url in one_line(trained) and "connection refused" in one_line(trained)
    assert not (tmp_path / "run").exists()  # preflight: before the folder, the model, the first step


def test_a_model_the_judge_does_not_serve_is_named_at_preflight(runner, judge, tmp_path) -> None:
    path = write_jsonl(tmp_path / "gen.jsonl", rows([["Jupiter."]]))
    result = runner.invoke(app, ["score", "-i", str(path), "-m", f"judge-url:{judge.url}#big"])
    assert result.exit_code == 1
    assert "model 'big' is not served" in one_line(result) and "lists judge" in one_line(result)
    assert judge.chats() == []


def test_a_hanging_judge_times_out_in_one_line(runner, judge, tmp_path) -> None:
    judge.hang = 5.0  # /models answers; each grade never comes in time (it would, after 5 s, without a timeout)
    path = write_jsonl(tmp_path / "gen.jsonl", rows([["Jupiter."]]))
    result = runner.invoke(
        app, ["score", "-i", str(path), "-m", f"judge-url:{judge.url}"], env={"BLEUBERI_JUDGE_TIMEOUT": "0.5"}
    )
    assert result.exit_code == 1 and result.stdout == ""
    assert "timed out" in one_line(result) and judge.url in one_line(result)


def test_garbage_replies_are_counted_nulls_never_zeros(runner, judge, tmp_path) -> None:
    judge.reply = lambda body: (
        "score: 10" if "Jupiter is" in body["messages"][0]["content"].split("Answer to grade")[1] else "Nice answer!"
    )
    path = write_jsonl(tmp_path / "gen.jsonl", rows([[REFERENCE, "Mars."], ["Venus."], ["Saturn."], ["Pluto."]]))
    spec = f"judge-url:{judge.url}"
    result = runner.invoke(app, ["score", "-i", str(path), "-m", spec, "-m", "bleu"])
    assert result.exit_code == 0, result.output
    out = read_jsonl_text(result.stdout)
    assert [r["scores"][spec] for r in out] == [[1.0, None], [None], [None], [None]]
    assert out[0]["score"] == 1.0 and out[1]["score"] is None  # left out of the aggregate, as py: None is
    assert "4 nulls (no readable score)" in result.stderr
    shown = [line for line in result.stderr.splitlines() if "null for record" in line]
    assert len(shown) == 3 and "'Nice answer!'" in shown[0] and "further nulls are counted" in shown[-1]
    # in a mixed reward a null is left out of the sum (TRL's nansum): the bleu part alone
    scorer = Scorer.for_rewards(["bleu", spec])
    mixed = scorer.score([REFERENCE, "Mars."], [REFERENCE], messages=PROMPT)
    assert mixed[COMBINED] == pytest.approx([1.0 + 1.0, mixed["bleu"][1]])
    # eval needs every answer scored: one line, naming the first record
    batch = Batch(["Mars."], [[REFERENCE]], [PROMPT], [{"id": "q9"}], missing_ok=False)
    with pytest.raises(JudgeError, match=r"no score for 1 of 1 answers \(first: record 'q9'"):
        get_metric(spec).score_batch(batch)


def test_a_redirect_is_refused_and_the_key_stays_home(runner, judge, tmp_path) -> None:
    elsewhere = JudgeStandin()
    try:
        path = write_jsonl(tmp_path / "gen.jsonl", rows([["Jupiter."]]))
        env = {"BLEUBERI_JUDGE_KEY": "sekret"}
        # the judge's host answers /models, then sends its grades elsewhere
        metric = JudgeReward(judge.url)
        metric.served()
        judge.redirect_to = elsewhere.url + "/chat/completions"
        with pytest.raises(ServerError, match=r"redirect to .* refused"):
            metric.sentence_scores(["Jupiter."], [REFERENCE], messages=PROMPT)
        result = runner.invoke(app, ["score", "-i", str(path), "-m", f"judge-url:{judge.url}"], env=env)
        assert result.exit_code == 1 and "refused" in one_line(result)
        assert [r["auth"] for r in judge.requests][-1] == "Bearer sekret"  # sent to its own host
        assert elsewhere.requests == []  # never followed, so the key never left
    finally:
        elsewhere.close()


# --- training and eval -----------------------------------------------------------------------------------


def test_a_grpo_step_logs_the_judges_requests_hits_and_nulls(runner, judge, tiny_model, tmp_path) -> None:
    def reply(body: dict) -> str:  # a null for every answer of odd length: the same answer, the same reply
        answer = body["messages"][0]["content"].split("### Answer to grade\n")[1].split("\n\n### Rubric")[0]
        return "no idea" if len(answer) % 2 else "score: 6"

    judge.reply = reply
    data = write_jsonl(
        tmp_path / "train.jsonl", [{"id": f"p{i}", "prompt": f"Say {i}.", "references": [f"{i}"]} for i in range(2)]
    )
    spec = f"judge-url:{judge.url}"

    def train(out: str) -> list[dict]:
        args = train_args(data, tmp_path / out, tiny_model, reward="bleu", per_device_train_batch_size=8, max_steps=2)
        result = runner.invoke(app, [*args, "--reward", spec])
        assert result.exit_code == 0, result.output
        assert "judge " in result.stderr and " requests, " in result.stderr and " nulls" in result.stderr
        return read_jsonl_text(result.stdout)

    steps = train("run")
    replies = [reply(body) for body in judge.chats()]
    assert sum(s["judge_requests"] for s in steps) == len(replies) > 0
    start = 0
    for step in steps:  # 2 prompts x 4 samples; identical samples are asked once
        asked = replies[start : start + step["judge_requests"]]
        start += step["judge_requests"]
        assert step["judge_requests"] + step["judge_cache_hits"] <= 8 and step["judge_seconds"] >= 0
        if step["judge_requests"] == 8:  # no sample twice: one null per reply without a score
            assert step["judge_nulls"] == asked.count("no idea")
        assert step["judge_nulls"] >= asked.count("no idea")
        assert set(step["rewards"]) >= {"bleu", spec}
    # the same run again (same seed, same samples): every grade from the cache, none asked
    repeat = train("run2")
    assert [s["judge_requests"] for s in repeat] == [0, 0] and len(judge.chats()) == len(replies)
    assert [s["judge_cache_hits"] for s in repeat] == [s["judge_requests"] + s["judge_cache_hits"] for s in steps]
    assert [s["judge_nulls"] for s in repeat] == [s["judge_nulls"] for s in steps]
    assert [s["reward_mean"] for s in repeat] == [s["reward_mean"] for s in steps]


def test_a_step_whose_judge_gave_no_grade_logs_no_mean_and_trains_on_bleu(runner, judge, tiny_model, tmp_path) -> None:
    judge.reply = lambda body: "Looks fine to me."
    data = write_jsonl(tmp_path / "train.jsonl", [{"id": "p0", "prompt": "Say 0.", "references": ["0"]}])
    spec = f"judge-url:{judge.url}"
    result = runner.invoke(app, [*train_args(data, tmp_path / "run", tiny_model, reward="bleu"), "--reward", spec])
    assert result.exit_code == 0, result.output
    [step] = read_jsonl_text(result.stdout)
    assert step["judge_nulls"] == 4 and step["rewards"][spec] == {"mean": None, "std": None}  # not a mean of 0
    assert step["reward_mean"] == pytest.approx(step["rewards"]["bleu"]["mean"])  # the sum left the nulls out


def test_eval_with_the_judge_as_a_metric(runner, judge, tmp_path) -> None:
    heldout = write_jsonl(
        tmp_path / "heldout.jsonl",
        [{"id": f"q{i}", "prompt": f"Name the largest planet ({i}).", "references": [REFERENCE]} for i in range(3)],
    )
    base = write_jsonl(
        tmp_path / "base.jsonl",
        [{"id": f"q{i}", "completion": a} for i, a in enumerate(["Saturn.", "Jupiter.", "Mars."])],
    )
    tuned = write_jsonl(tmp_path / "tuned.jsonl", [{"id": f"q{i}", "completion": REFERENCE} for i in range(3)])
    spec = f"judge-url:{judge.url}"
    args = [
        "eval",
        "-i",
        str(heldout),
        "--answers",
        f"base={base}",
        "--answers",
        f"tuned={tuned}",
        "--baseline",
        "base",
    ]
    result = runner.invoke(app, [*args, "--metric", spec, "--metric", "bleu", "--report", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    out = read_jsonl_text(result.stdout)
    assert [r["evaluation"]["base"]["scores"][spec] for r in out] == [0.0, 0.5, 0.0]
    assert [r["evaluation"]["tuned"]["scores"][spec] for r in out] == [1.0, 1.0, 1.0]
    # 6 answers asked; the length control's base answers (already shorter than tuned's) come from the cache
    assert f"{spec}: 6 requests, 3 answered from the cache, 0 nulls" in result.stderr
    judge.reply = lambda body: "hmm"  # with the cache off, a judge that gives no score: one line, exit 1
    result = runner.invoke(app, [*args, "--metric", spec, "-q"], env={"BLEUBERI_JUDGE_CACHE": "off"})
    assert result.exit_code == 1 and "no score for 3 of 3 answers (first: record 'q0'" in one_line(result)


# --- bleuberi run ------------------------------------------------------------------------------------------


def test_run_trains_with_the_judge_and_a_changed_template_redoes_its_stages(
    runner, judge, tiny_model, tmp_path, monkeypatch
) -> None:
    from stages.run.config_file import load_config
    from stages.run.recipe import stage_digests
    from tests.conftest import run_args

    spec = f"judge-url:{judge.url}"
    reward = f'train.reward=["bleu", "{spec}:0.5"]'
    result = runner.invoke(app, run_args(tmp_path / "run", tiny_model, reward))
    assert result.exit_code == 0, result.stderr
    metrics = read_jsonl_text((tmp_path / "run/train/metrics.jsonl").read_text())
    trained = sum(step["judge_requests"] for step in metrics)
    assert trained > 0
    # eval reports the trained reward too: what it asked is the rest
    assert f"{spec}: {len(judge.chats()) - trained} requests, " in result.stderr
    assert any(line.startswith("train: step") and "judge " in line for line in result.stderr.splitlines())
    config = load_config(None, [f"model={tiny_model}", reward])
    before = stage_digests(config)
    template = tmp_path / "strict.txt"
    template.write_text("{{references}}\n{{answer}}\nscore: N")
    monkeypatch.setenv("BLEUBERI_JUDGE_TEMPLATE", str(template))
    after = stage_digests(config)
    assert before[0] == after[0]  # select does not use the judge
    assert before[1] != after[1] and before[2] != after[2]  # train does (and eval follows it)


def test_run_stops_at_once_when_its_judge_is_down(runner, tiny_model, tmp_path) -> None:
    from tests.conftest import run_args

    url = f"http://127.0.0.1:{free_port()}/v1"
    args = run_args(tmp_path / "run", tiny_model, f'eval.metrics=["bleu", "judge-url:{url}"]')
    result = runner.invoke(app, args, env={"BLEUBERI_JUDGE_RETRIES": "0"})
    assert result.exit_code == 1 and url in one_line(result)
    assert not (tmp_path / "run").exists()  # before the run folder, the model, the selection


def test_agreement_with_human_preferences_asks_the_judge_with_the_prompt(judge) -> None:
    from stages.eval.agreement import measure_agreement

    pairs = [
        {"id": "p1", "prompt": "Largest planet?", "response_a": REFERENCE, "response_b": "Mars.", "winner": "a"},
        {"id": "p2", "prompt": "Largest planet?!", "response_a": "Mars.", "response_b": "Jupiter.", "winner": "a"},
    ]
    for pair in pairs:
        pair["references"] = [REFERENCE]
    spec = f"judge-url:{judge.url}"
    result = measure_agreement(pairs, [spec])
    assert [(p["agreement"]["metrics"][spec]["a"], p["agreement"]["metrics"][spec]["b"]) for p in pairs] == [
        (1.0, 0.0),
        (0.0, 0.5),
    ]
    assert [p["agreement"]["metrics"][spec]["agrees"] for p in pairs] == [True, False]
    assert result.summary["agreement"][spec]["mean"] == 0.5
    assert "### Instruction\nLargest planet?!\n" in judge.chats()[-1]["messages"][0]["content"]
