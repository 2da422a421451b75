"""Several servers behind one `server` engine (repeated --server-url): requests spread over them, a server
that fails is left out and its requests go to the others, and resuming works as with one server.
Against the vLLM stand-in (tests/openai_standin.py), whose tokens depend only on (prompt, seed, model):
so any server gives the same sample, and a result can be checked against the stand-in's own."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from bleuberi_cli.app import app
from stages.core.errors import ConfigError, UsageError
from stages.core.http import ServerError
from stages.core.journal import journals
from stages.engines.base import AdapterRef, EngineOptions, SamplingParams
from stages.engines.server import ServerEngine
from tests.conftest import demo_records, read_jsonl_text, write_jsonl
from tests.openai_standin import Standin

PROMPTS = [[1, 17, 23, 99], [1, 5, 6, 7, 8, 9]]
SEEDS = [list(range(10, 18)), list(range(20, 28))]


def started(**options: object) -> Standin:
    standin = Standin(**options).start()  # type: ignore[arg-type]
    standin.vocab_size = 300  # the tiny model's tokenizer decodes every id below this
    return standin


@pytest.fixture
def a() -> Iterator[Standin]:
    standin = started()
    yield standin
    standin.stop()


@pytest.fixture
def b() -> Iterator[Standin]:
    standin = started()
    yield standin
    standin.stop()


@pytest.fixture(autouse=True)
def quick_failover(monkeypatch) -> None:
    monkeypatch.setattr("stages.engines.server.BACKOFF", 0.01)  # a dead server is found in ms, not seconds


def fleet(*servers: Standin, notices: list[str] | None = None, **options) -> ServerEngine:
    options = {"timeout": 5.0, "retries": 1, "backoff": 0.01, **options}
    if notices is not None:
        options["notice"] = notices.append
    return ServerEngine([s.url for s in servers], **options)


def completions(server: Standin) -> list[tuple[tuple[int, ...], int]]:
    return [(tuple(e["body"]["prompt"]), e["body"]["seed"]) for e in server.requests_to("/v1/completions")]


def expected(server: Standin, max_tokens: int) -> list[list[list[int]]]:
    """The stand-in's own tokens for PROMPTS x SEEDS (any stand-in: they are functions of prompt and seed)."""
    return [[server.tokens(p, s, "smol", max_tokens, greedy=False)[0] for s in row] for p, row in zip(PROMPTS, SEEDS)]


def make_adapter(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "peft_type": "LORA"}))
    return folder


# --- the engine ---------------------------------------------------------------------------------------


def test_requests_are_spread_over_the_servers_and_each_sample_is_asked_once(a, b):
    samples = fleet(a, b, concurrency=2).sample(PROMPTS, SEEDS, SamplingParams(12, 0.9))
    assert [[s.token_ids for s in row] for row in samples] == expected(a, 12)
    on_a, on_b = completions(a), completions(b)
    assert on_a and on_b  # both servers answered
    asked = sorted(on_a + on_b)
    assert asked == sorted((tuple(p), s) for p, row in zip(PROMPTS, SEEDS) for s in row)  # 16, none twice


def test_concurrency_is_per_server(a, b):
    """Counted by the servers, not timed: each holds its limit of 2 requests at once (each stand-in holds a
    request until 2 have come, however loaded the machine), and no more (a reply then takes 1 s, far longer
    than sending the next request takes)."""
    engine = fleet(a, b, concurrency=2, timeout=60.0)  # no retry while a stand-in holds a request
    a.in_flight.gather = b.in_flight.gather = 2  # after the engine has asked each for its models
    a.slow = b.slow = 1.0
    engine.sample([PROMPTS[0]], [list(range(8))], SamplingParams(4, 1.0))
    assert a.in_flight.peak == 2 and b.in_flight.peak == 2


def test_a_server_that_dies_mid_run_is_left_out_once_and_the_others_answer_its_requests(a, b):
    notices: list[str] = []
    engine = fleet(a, b, notices=notices, concurrency=2)
    a.die_after = 3
    samples = engine.sample(PROMPTS, SEEDS, SamplingParams(12, 0.9))
    assert [[s.token_ids for s in row] for row in samples] == expected(b, 12)
    [notice] = notices
    assert notice.startswith(f"server {a.url} left out: ") and notice.endswith("; the other server continues")
    assert len(completions(b)) >= 16 - 3  # a answered 3 before it died: b answered the rest
    assert [s.url for s in engine.fleet.live] == [b.url]
    engine.sample(PROMPTS, SEEDS, SamplingParams(12, 0.9))  # later calls go to the live one without a word
    assert len(notices) == 1


def test_all_servers_dead_is_one_error_after_one_notice(a, b):
    notices: list[str] = []
    engine = fleet(a, b, notices=notices)
    a.die_after = b.die_after = 2
    with pytest.raises(ServerError) as caught:
        engine.sample(PROMPTS, SEEDS, SamplingParams(12, 0.9))
    message = str(caught.value)
    assert "\n" not in message and message.endswith("no server is left (all 2 failed)")
    assert len(notices) == 1  # the first to die; the last one's failure is the error itself


def test_a_server_down_at_start_is_left_out(a, b):
    b.stop()
    notices: list[str] = []
    engine = fleet(a, b, notices=notices)
    assert [n.split(" left out:")[0] for n in notices] == [f"server {b.url}"]
    samples = engine.sample(PROMPTS, SEEDS, SamplingParams(6, 0.9))
    assert [[s.token_ids for s in row] for row in samples] == expected(a, 6)


def test_every_server_must_serve_the_same_model(a):
    odd = started(models=("other",))
    try:
        with pytest.raises(ConfigError) as caught:
            fleet(a, odd)
    finally:
        odd.stop()
    message = str(caught.value)
    assert message.startswith(f"{odd.url}/models does not list model 'smol', which {a.url} serves")
    assert "it lists: other" in message and "\n" not in message


def test_a_request_the_server_refuses_is_an_error_not_a_failover(a, b):
    notices: list[str] = []
    engine = fleet(a, b, notices=notices)
    with pytest.raises(ServerError, match="HTTP 400: this stand-in takes token-id prompts only"):
        engine.sample([["not", "ids"]], [[1]], SamplingParams(4, 1.0))  # type: ignore[list-item]
    assert len(a.requests_to("/v1/completions")) + len(b.requests_to("/v1/completions")) == 1
    assert notices == [] and len(engine.fleet.live) == 2


def test_a_url_given_twice_is_refused(a):
    with pytest.raises(UsageError, match="is given twice"):
        EngineOptions("server", [a.url, a.url])
    with pytest.raises(UsageError, match="is given twice"):  # a final slash makes no other server
        EngineOptions("server", [a.url, a.url + "/"])


# --- adapters ---------------------------------------------------------------------------------------------


def test_each_adapter_version_is_loaded_on_every_server_before_it_is_used(a, b, tmp_path):
    engine = fleet(a, b)
    for version in (1, 2):
        engine.set_adapter(AdapterRef(make_adapter(tmp_path / f"v{version}"), f"run-step{version}", version))
        engine.sample(PROMPTS, SEEDS, SamplingParams(4, 1.0))
    for server in (a, b):
        calls = [(e["path"].rsplit("/", 1)[1], (e["body"] or {}).get("lora_name")) for e in server.log]
        adapters = [c for c in calls if c[0] != "completions" and c[1]]
        assert adapters == [
            ("load_lora_adapter", "run-step1"),
            ("load_lora_adapter", "run-step2"),
            ("unload_lora_adapter", "run-step1"),
        ]
        newest = None  # every request names the version this server loaded last
        for name, body in [(e["path"], e["body"] or {}) for e in server.log]:
            newest = body["lora_name"] if name.endswith("/load_lora_adapter") else newest
            assert not name.endswith("/v1/completions") or body["model"] == newest
        assert completions(server)
        assert server.adapters == {"run-step2": str(tmp_path / "v2")}
    engine.close()
    assert a.adapters == b.adapters == {}


def test_a_server_failing_an_adapter_load_is_left_out(a, b, tmp_path):
    notices: list[str] = []
    engine = fleet(a, b, notices=notices)
    a.fail_next = 10  # HTTP 500s: every retry of the load fails
    engine.set_adapter(AdapterRef(make_adapter(tmp_path / "v1"), "run-step1", 1))
    assert len(notices) == 1 and notices[0].startswith(f"server {a.url} left out: HTTP 500")
    a.fail_next = 0
    engine.sample(PROMPTS, SEEDS, SamplingParams(4, 1.0))
    assert completions(a) == [] and {e["body"]["model"] for e in b.requests_to("/v1/completions")} == {"run-step1"}


# --- through the CLI ------------------------------------------------------------------------------------------


def urls(*servers: Standin) -> list[str]:
    return [arg for s in servers for arg in ("--server-url", s.url)]


def generate_args(tiny_model: Path, path: Path, servers: list[Standin], *extra: str) -> list[str]:
    argv = ["generate", "-i", str(path), "--model", str(tiny_model), "-n", "2", "--max-new-tokens", "5", *extra]
    return [*argv, "--backend", "server", *urls(*servers), "-q"]


def test_generate_on_two_servers_equals_one_server(runner, tiny_model, a, b, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", demo_records(count=6))
    one = runner.invoke(app, generate_args(tiny_model, path, [a]))
    assert one.exit_code == 0, one.stderr
    sent_to_a = len(completions(a))
    two = runner.invoke(app, generate_args(tiny_model, path, [a, b]))
    assert two.exit_code == 0 and two.stderr == ""
    assert read_jsonl_text(two.stdout) == read_jsonl_text(one.stdout)
    assert len(completions(a)) > sent_to_a and completions(b)  # the second run used both
    assert len(completions(a)) - sent_to_a + len(completions(b)) == 12  # 6 records x 2 samples, once each


def test_the_environment_variable_takes_urls_separated_by_spaces(runner, tiny_model, a, b, tmp_path, monkeypatch):
    monkeypatch.setenv("BLEUBERI_SERVER_URL", f"{a.url} {b.url}")
    path = write_jsonl(tmp_path / "in.jsonl", demo_records(count=4))
    argv = ["generate", "-i", str(path), "--model", str(tiny_model), "--backend", "server", "-q"]
    result = runner.invoke(app, argv)
    assert result.exit_code == 0, result.stderr
    assert completions(a) and completions(b)


@pytest.mark.slow
def test_a_server_killed_mid_generate_leaves_every_record_written_once(runner, tiny_model, a, b, tmp_path):
    records = demo_records("pool", 40)
    path = write_jsonl(tmp_path / "in.jsonl", records)
    a.die_after = 15  # of 80 requests
    out = tmp_path / "out.jsonl"
    result = runner.invoke(app, generate_args(tiny_model, path, [a, b], "-o", str(out)))
    assert result.exit_code == 0, result.stderr
    [notice] = result.stderr.splitlines()
    assert notice.startswith(f"bleuberi: warning: server {a.url} left out: ")
    written = read_jsonl_text(out.read_text())
    assert [r["id"] for r in written] == [r["id"] for r in records]  # each once, in input order
    reference = started()
    try:
        whole = runner.invoke(app, generate_args(tiny_model, path, [reference]))
    finally:
        reference.stop()
    assert written == read_jsonl_text(whole.stdout)


def test_all_servers_killed_is_one_error_and_resume_completes_the_file(runner, tiny_model, a, b, tmp_path):
    records = demo_records("pool", 40)
    path = write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.jsonl"
    a.die_after = b.die_after = 10  # 20 of 40 requests; records are written 16 at a time (--batch-size 1)
    resumable = ["-n", "1", "--batch-size", "1", "-o", str(out), "--resume"]
    result = runner.invoke(app, generate_args(tiny_model, path, [a, b], *resumable))
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("bleuberi: error: ")]
    assert errors == [result.stderr.splitlines()[-1]] and "no server is left (all 2 failed); " in errors[0]
    [journal] = journals(out)  # what was finished, kept for --resume, and the error line says so
    kept = read_jsonl_text(journal.read_text())
    assert 0 < len(kept) < len(records) and not out.exists()
    assert errors[0].endswith(
        f"{len(kept)} finished records of {out} kept: add --resume to the same command to keep them"
    )
    live = started()
    try:
        resumed = runner.invoke(app, generate_args(tiny_model, path, [live], *resumable))
        assert resumed.exit_code == 0, resumed.stderr
        whole = runner.invoke(app, generate_args(tiny_model, path, [live], "-n", "1"))
    finally:
        live.stop()
    assert read_jsonl_text(out.read_text()) == read_jsonl_text(whole.stdout)


def test_eval_on_two_servers_equals_one_server(runner, tiny_model, a, b, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", demo_records(count=4))
    argv = ["eval", "-i", str(path), "--model", str(tiny_model), "--max-new-tokens", "5", "--bootstrap-resamples", "20"]
    argv += ["--backend", "server", "-q"]
    one = runner.invoke(app, [*argv, *urls(a), "--report", str(tmp_path / "one.json")])
    assert one.exit_code == 0, one.stderr
    two = runner.invoke(app, [*argv, *urls(a, b), "--report", str(tmp_path / "two.json")])
    assert two.exit_code == 0, two.stderr
    assert b.requests_to("/v1/completions")  # the second eval sent requests to b too (greedy: no seeds)
    assert read_jsonl_text(two.stdout) == read_jsonl_text(one.stdout)
    scores = [orjson.loads((tmp_path / name).read_bytes())["systems"] for name in ("one.json", "two.json")]
    assert scores[0] == scores[1]


def test_eval_served_system_on_two_servers(runner, tiny_model, a, b, tmp_path):
    path = write_jsonl(tmp_path / "in.jsonl", demo_records(count=4))
    argv = ["eval", "-i", str(path), "--model", str(tiny_model), "--max-new-tokens", "5", "--bootstrap-resamples", "20"]
    result = runner.invoke(app, [*argv, "--served", f"remote={a.url},{b.url}", "-q"])
    assert result.exit_code == 0, result.stderr
    assert all("remote" in r["evaluation"] for r in read_jsonl_text(result.stdout))
    sent = [len(s.requests_to("/v1/completions")) for s in (a, b)]
    assert min(sent) > 0 and sum(sent) == 4  # the remote system's 4 answers, spread; the base answered here


def test_training_loads_every_adapter_version_on_both_servers(runner, tiny_model, a, b, tmp_path, monkeypatch):
    # The stand-in's log-probs are not the tiny model's, so the same-model probe would refuse it.
    monkeypatch.setattr("stages.train.rollouts.check_same_base_model", lambda *args, **kwargs: 0.0)
    path = write_jsonl(tmp_path / "in.jsonl", demo_records("pool", 4))
    argv = ["train", "-i", str(path), "-o", str(tmp_path / "run"), "--model", str(tiny_model), "--max-steps", "2"]
    argv += ["--num-generations", "2", "--per-device-train-batch-size", "4", "--max-completion-length", "4"]
    result = runner.invoke(app, [*argv, "--backend", "server", *urls(a, b), "-q"])
    assert result.exit_code == 0, result.stderr
    loaded = [[e["body"]["lora_name"] for e in s.requests_to("/v1/load_lora_adapter")] for s in (a, b)]
    # One version before the first step and one after each of the 2 steps, on each server, in order.
    assert loaded[0] == loaded[1] and [name.rsplit("-", 1)[1] for name in loaded[0]] == ["0", "1", "2"]
    assert completions(a) and completions(b)
    assert a.adapters == b.adapters == {}  # unloaded at the end, on each


# --- the run configuration -------------------------------------------------------------------------------------


def test_the_run_config_takes_a_list_of_servers(tmp_path):
    from stages.run.config_file import load_config

    file = tmp_path / "fleet.toml"
    file.write_text('[engine]\nbackend = "server"\nserver_url = ["http://a:8000/v1", "http://b:8000/v1"]\n')
    assert load_config(file).engine.server_url == ["http://a:8000/v1", "http://b:8000/v1"]
    single = load_config(None, ['engine.server_url=["http://c:8000/v1"]'])
    assert single.engine.server_url == ["http://c:8000/v1"]
    with pytest.raises(UsageError, match=r"expected a list of str, got a string .*a TOML list"):
        load_config(None, ['engine.server_url="http://c:8000/v1"'])


def test_a_run_selects_trains_and_evaluates_on_two_servers_one_killed(runner, tiny_model, a, b, tmp_path, monkeypatch):
    from tests.conftest import tiny_overrides

    monkeypatch.setattr("stages.train.rollouts.check_same_base_model", lambda *args, **kwargs: 0.0)
    a.die_after = 1  # in the selection pass: it answers one of the 6 pool prompts, then dies
    args = ["run", "-o", str(tmp_path / "run"), "-q"]
    for item in [*tiny_overrides(tiny_model), 'engine.backend="server"', f'engine.server_url=["{a.url}", "{b.url}"]']:
        args += ["--set", item]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.stderr
    assert read_jsonl_text(result.stdout)[0]["ran"] == ["select", "train", "eval"]
    # Each engine (select's, train's, eval's for each system) finds the dead server and says so once.
    notices = [line for line in result.stderr.splitlines() if "left out" in line]
    assert notices and all(n.startswith(f"bleuberi: warning: server {a.url} left out: ") for n in notices)
    generated = read_jsonl_text((tmp_path / "run" / "pool.generated.jsonl").read_text())
    assert len({r["id"] for r in generated}) == len(generated) == 6  # data.max_pool, each once
    assert b.requests_to("/v1/load_lora_adapter") and not a.requests_to("/v1/load_lora_adapter")
