"""Reward models as rewards and scores: `rm:PATH` on a tiny random sequence-classification model built
here, and `rm-url:URL` against a stand-in scoring server on 127.0.0.1 (no monkeypatching of the client)."""

from __future__ import annotations

import contextlib
import json
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from bleuberi_cli.app import app
from stages.core.errors import ModelError, UsageError
from stages.core.http import ServerError
from stages.metrics import get_metric
from stages.metrics.reward_model import RemoteReward
from stages.score import COMBINED, Scorer, zscores
from tests.conftest import read_jsonl_text, reply, serve, write_jsonl

PROMPT = [{"role": "user", "content": "Name the largest planet."}]
ANSWERS = ["Jupiter is the largest planet.", "Saturn.", "The largest planet in our solar system is Jupiter.", ""]


def build_tiny_rm(folder: Path, *, num_labels: int = 1) -> Path:
    """A random Llama sequence classifier with the tiny test tokenizer (ChatML; pad = <|im_end|>, which every
    ChatML conversation contains: the case where padding with the pad id would read the wrong token)."""
    import torch
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from tests.tiny_model import build_tiny_model, tiny_llama_config

    tokenizer = AutoTokenizer.from_pretrained(build_tiny_model(folder / "lm"))
    torch.manual_seed(3)
    model = LlamaForSequenceClassification(tiny_llama_config(tokenizer, num_labels=num_labels))
    with torch.no_grad():
        model.score.weight.normal_(0, 1.0)  # visible differences between conversations
    out = folder / "rm"
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny_rm(tmp_path_factory) -> Path:
    return build_tiny_rm(tmp_path_factory.mktemp("rm"))


def alone(rm_folder: Path, messages: list[dict], answer: str) -> float:
    """The RM's score of one conversation, unpadded, read at its last token (no pad id configured)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(rm_folder)
    model = AutoModelForSequenceClassification.from_pretrained(rm_folder).eval()
    text = tokenizer.apply_chat_template([*messages, {"role": "assistant", "content": answer}], tokenize=False)
    assert text.startswith(f"<|im_start|>user\n{messages[0]['content']}<|im_end|>")  # the RM's own template
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state[0, -1]
        return float(model.score(hidden)[0])


def test_rm_scores_are_raw_logits_at_each_conversations_last_token_whatever_the_batch(tiny_rm) -> None:
    expected = [alone(tiny_rm, PROMPT, a) for a in ANSWERS]
    assert len({round(v, 6) for v in expected}) == len(expected)  # the model tells them apart
    rm = get_metric(f"rm:{tiny_rm}", device="cpu")
    assert rm._loaded is None  # nothing loads before the first score
    scores = rm.sentence_scores(ANSWERS, ["unused reference"], messages=PROMPT)
    assert scores == pytest.approx(expected, abs=1e-5)
    rm.batch_size = 1  # one at a time gives the same numbers as the padded batch
    assert rm.sentence_scores(ANSWERS, ["x"], messages=PROMPT) == pytest.approx(expected, abs=1e-5)
    # across records (eval): each answer with its own prompt
    other = [{"role": "user", "content": "Say hi."}]
    mixed = rm.paired_scores(ANSWERS[:2], [["r"], ["r"]], [PROMPT, other])
    assert mixed == pytest.approx([expected[0], alone(tiny_rm, other, ANSWERS[1])], abs=1e-5)
    assert any(not 0.0 <= v <= 1.0 for v in expected)  # raw logits, not squashed to 0..1
    with pytest.raises(UsageError, match="needs the prompt"):
        rm.sentence_score("Jupiter.", ["Jupiter."])


def test_a_classifier_with_two_labels_is_not_a_reward_model(tmp_path) -> None:
    folder = build_tiny_rm(tmp_path, num_labels=2)
    with pytest.raises(ModelError, match="one output label"):
        get_metric(f"rm:{folder}", device="cpu").sentence_scores(["a"], ["b"], messages=PROMPT)


def test_score_by_rm_then_select_hard_by_rm(runner, tiny_rm, tmp_path) -> None:
    rows = [
        {"id": f"q{i}", "prompt": p, "references": ["unused"], "completions": [a]}
        for i, (p, a) in enumerate([("Name a planet.", "Mars."), ("Say hi.", "Hello!"), ("Count.", "1 2 3")])
    ]
    path = write_jsonl(tmp_path / "gen.jsonl", rows)
    scored = runner.invoke(app, ["score", "-i", str(path), "-m", f"rm:{tiny_rm}", "--device", "cpu", "-q"])
    assert scored.exit_code == 0, scored.output
    out = read_jsonl_text(scored.stdout)
    key = f"rm:{tiny_rm}"
    for row in out:
        messages = [{"role": "user", "content": row["prompt"]}]
        assert row["scores"][key] == pytest.approx([alone(tiny_rm, messages, row["completions"][0])], abs=1e-5)
        assert row["scoring"]["signatures"][key].startswith("rm|")
    hard = runner.invoke(app, ["select", "--mode", "hard", "-n", "1", "-q"], input=scored.stdout)
    assert hard.exit_code == 0, hard.output
    [picked] = read_jsonl_text(hard.stdout)
    assert picked["id"] == min(out, key=lambda r: r["score"])["id"]


def test_bleu_plus_rm_zscore_reward_by_hand(tiny_rm) -> None:
    scorer = Scorer.for_rewards(["bleu", f"rm:{tiny_rm}"], combine="zscore", device="cpu")
    refs = ["Jupiter is the largest planet."]
    scores = scorer.score(ANSWERS, refs, messages=PROMPT)
    rm = [alone(tiny_rm, PROMPT, a) for a in ANSWERS]
    z_bleu, z_rm = zscores(scores["bleu"]), zscores(rm)
    assert scores[COMBINED] == pytest.approx([(a + b) / 2 for a, b in zip(z_bleu, z_rm)], abs=1e-5)


# --- rm-url: a stand-in scoring server -----------------------------------------------------------------


TIMEOUT, SLOW_SECONDS = 1.5, 4.0  # generous: the stand-in must answer in time on a loaded machine


class ScoringServer:
    """Scores a conversation by the length of its last turn. `faults` is a queue of misbehaviours, one per
    request: "500", "slow", "garbled", "short" (too few scores), "redirect"."""

    def __init__(self) -> None:
        self.faults: list[str] = []
        self.requests: list[dict] = []
        self.auth: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests.append(body)
                outer.auth.append(self.headers.get("Authorization"))
                fault = outer.faults.pop(0) if outer.faults else "ok"
                if fault == "slow":
                    time.sleep(SLOW_SECONDS)
                if fault in ("500", "redirect"):
                    self.send_response(500 if fault == "500" else 302)
                    if fault == "redirect":
                        self.send_header("Location", "http://elsewhere.example/score")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                scores = [float(len(c[-1]["content"])) for c in body["batch_conversations"]]
                payload = json.dumps({"scores": scores[:-1] if fault == "short" else scores}).encode()
                if fault == "garbled":
                    payload = b"<html>not json</html>"
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    reply(self, 200, payload, Content_Type="application/json")

            def log_message(self, *args: object) -> None:
                pass

        self.server = serve(Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/score"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def server():
    running = ScoringServer()
    yield running
    running.close()


def test_rm_url_protocol_and_credentials(server, monkeypatch) -> None:
    monkeypatch.setenv("BLEUBERI_RM_KEY", "sekret")
    metric = get_metric(f"rm-url:{server.url}")
    assert metric.sentence_scores(ANSWERS, ["unused"], messages=PROMPT) == [float(len(a)) for a in ANSWERS]
    [request] = server.requests
    assert request == {"batch_conversations": [[*PROMPT, {"role": "assistant", "content": a}] for a in ANSWERS]}
    assert server.auth == ["Bearer sekret"]
    # a spec with a weight: the port is not taken for a weight, the trailing number is
    scorer = Scorer.from_names([f"rm-url:{server.url}:0.5", "bleu:1"])
    scores = scorer.score(["Jupiter."], ["Jupiter."], messages=PROMPT)
    assert scores[COMBINED] == pytest.approx([0.5 * len("Jupiter.") + 1.0])


@pytest.mark.slow
def test_rm_url_retries_server_errors_and_timeouts(server) -> None:
    metric = RemoteReward(server.url, timeout=TIMEOUT, retries=2, backoff=0.0)
    server.faults = ["500", "slow"]  # two failures, then an answer within the retries
    assert metric.sentence_scores(["abc"], ["r"], messages=PROMPT) == [3.0]
    assert len(server.requests) == 3
    server.faults = ["500", "500", "500"]
    with pytest.raises(ServerError, match="HTTP 500 after 2 retries"):
        metric.sentence_scores(["abc"], ["r"], messages=PROMPT)
    server.faults = ["slow", "slow", "slow"]
    with pytest.raises(ServerError, match="no reply in time"):
        metric.sentence_scores(["abc"], ["r"], messages=PROMPT)


@pytest.mark.parametrize(
    ("fault", "message"),
    [
        ("garbled", "not JSON"),
        ("short", r"expected \{'scores': \[2 numbers\]\}, got 1 scores"),
        ("redirect", "redirect to http://elsewhere.example/score refused"),
    ],
)
def test_rm_url_bad_replies_fail_at_once_with_one_line(server, fault, message) -> None:
    metric = RemoteReward(server.url, timeout=2, retries=3, backoff=0.0)
    server.faults = [fault]
    with pytest.raises(ServerError, match=message) as caught:
        metric.sentence_scores(["a", "bb"], ["r"], messages=PROMPT)
    assert len(server.requests) == 1  # not retried: the server is wrong, not busy
    assert "\n" not in str(caught.value) and server.url in str(caught.value)


def test_rm_url_failure_in_score_command_is_one_line_exit_1(runner, server, tmp_path) -> None:
    server.faults = ["garbled"]
    path = write_jsonl(tmp_path / "g.jsonl", [{"id": "a", "prompt": "p", "references": ["r"], "completions": ["c"]}])
    result = runner.invoke(app, ["score", "-i", str(path), "-m", f"rm-url:{server.url}", "-q"])
    assert result.exit_code == 1
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1 and "not JSON" in result.stderr


def _hub_cache_with(folder: Path, cache: Path, repo_id: str) -> None:
    """`folder` laid out as the Hugging Face hub cache stores `repo_id` at one revision (files, not symlinks)."""
    import shutil

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / "0123abcd")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0123abcd")


@pytest.mark.slow
def test_rm_by_hub_id_from_the_local_cache_offline(tiny_rm, tmp_path) -> None:
    # `rm:ORG/NAME` is found in the hub cache without a network; env vars are read at import: a fresh process
    import os
    import subprocess
    import sys

    cache = tmp_path / "hub"
    _hub_cache_with(tiny_rm, cache, "acme/tiny-rm")
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    row_in = {"id": "q0", "prompt": "Name a planet.", "references": ["unused"], "completions": ["Mars."]}

    def score(spec: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "bleuberi_cli", "score", "-m", spec, "--device", "cpu", "-q"]
        return subprocess.run(command, input=json.dumps(row_in) + "\n", capture_output=True, text=True, env=env)

    done = score("rm:acme/tiny-rm")
    assert done.returncode == 0, done.stderr
    [row] = read_jsonl_text(done.stdout)
    expected = alone(tiny_rm, [{"role": "user", "content": "Name a planet."}], "Mars.")
    assert row["scores"]["rm:acme/tiny-rm"] == pytest.approx([expected], abs=1e-5)
    # a hub id the cache does not hold: one line naming it, exit 1, nothing on stdout
    failed = score("rm:acme/other-rm")
    assert failed.returncode != 0 and failed.stdout == ""
    assert "acme/other-rm" in failed.stderr and "Traceback" not in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1
