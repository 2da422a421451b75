"""`train --parallel fsdp`: the policy sharded over the ranks (FSDP2 on gloo, on the CPU) trains the same adapter
as DDP and as one process, resumes exactly, samples as the unsharded policy does, and launches as two "nodes".

Tolerances, from first principles:
- FSDP vs DDP on the same 2 ranks: each rank computes its gradients on the same whole weights (FSDP gathers
  exact copies) and sums its own micro-batches first (FSDP reduces with the last one), and the sum of the two
  ranks' gradients is one correctly rounded addition either way, so the summed gradients are identical.
  Only the clipping norm is summed in another order (per shard, then over the ranks): an ulp of the norm
  scales the clipped gradient by an ulp, which AdamW divides out again (up to its eps). So the adapters
  agree to float32 rounding (measured: equal; we allow 1e-8, an ulp of values about 1e-2 is 1e-9).
- 2 ranks vs one process with the same global batch: the same gradient terms summed in another order
  (float32: about 1e-7 relative each). AdamW's first updates are lr * g / (|g| + eps), so an element whose
  gradient is within rounding of eps (1e-8) can move by a fraction of lr; we allow 2e-3 lr (1e-5 at lr
  5e-3), as tests/test_train.py does for DDP, far below the lr-sized moves of a real difference.
- Resumed vs uninterrupted: the same computation from bit-identical state: equal.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import torch
from safetensors.torch import load_file

from bleuberi_cli.app import app
from stages.core.errors import UsageError
from stages.core.options import DEFAULT_SEED
from stages.train.config import TrainConfig
from stages.train.data import step_items
from stages.train.distributed import LAUNCHER_VARIABLES, Distributed
from tests.conftest import ROOT, demo_records, free_port, torchrun, write_jsonl

LR = 5e-3
SETTINGS = [
    "--num-generations",
    "4",
    "--max-completion-length",
    "6",
    "--max-steps",
    "4",
    "--save-steps",
    "2",
    "--save-total-limit",
    "10",
    "--lr",
    str(LR),
    # clipping engages (step gradient norms are about 0.1), so the sharded norm is exercised
    "--max-grad-norm",
    "0.05",
    # chrF: random samples of a tiny model still differ in reward, so every step updates
    "--reward",
    "chrf",
    "--micro-batch",
    "2",
    "--gradient-checkpointing",
    "-q",
]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def train_args(
    model: Path, data: Path, out: Path, per_device: int, *extra: str, settings: list[str] = SETTINGS
) -> list[str]:
    batch = ["--per-device-train-batch-size", str(per_device)]
    where = ["-i", str(data), "-o", str(out), "--model", str(model)]
    return ["-m", "bleuberi_cli", "train", *where, *batch, *settings, *extra]


def run(command: list[str]) -> subprocess.CompletedProcess[bytes]:
    done = subprocess.run(command, env=env(), capture_output=True, timeout=600)
    assert done.returncode == 0, done.stderr.decode()[-3000:]
    return done


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def metrics(folder: Path) -> list[dict]:
    return [orjson.loads(line) for line in (folder / "metrics.jsonl").read_bytes().splitlines()]


def max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """The same 4 steps with the same global batch (2 prompts x 4 samples per step): one process, DDP on 2
    ranks, FSDP on 2 ranks (which also writes a merged model)."""
    root = tmp_path_factory.mktemp("fsdp")
    data = write_jsonl(root / "in.jsonl", demo_records(count=8))
    folders = {name: root / name for name in ("one", "ddp", "fsdp")}
    run([sys.executable, *train_args(tiny_model, data, folders["one"], 8)])
    run([*torchrun(), *train_args(tiny_model, data, folders["ddp"], 4)])
    merged = ["--merge-to", str(root / "merged")]
    run(
        [
            *torchrun(),
            *train_args(tiny_model, data, folders["fsdp"], 4, "--parallel", "fsdp", *merged),
        ]
    )
    return {**folders, "data": data, "merged": root / "merged"}


@pytest.mark.slow
def test_fsdp_trains_the_adapter_ddp_and_one_process_train(runs, tiny_model) -> None:
    one, ddp, fsdp = adapter(runs["one"]), adapter(runs["ddp"]), adapter(runs["fsdp"])
    assert any(float(t.abs().max()) > 2 * LR for k, t in fsdp.items() if "lora_B" in k)  # B starts at 0: it moved
    assert max_difference(fsdp, ddp) <= 1e-8
    assert max_difference(fsdp, one) <= 2e-3 * LR
    # gradients are summed over the ranks, not averaged: the norm before clipping is the whole batch's
    norms = {name: [r["grad_norm"] for r in metrics(runs[name])] for name in ("one", "ddp", "fsdp")}
    assert norms["fsdp"] == pytest.approx(norms["one"], rel=1e-4) and norms["fsdp"] == pytest.approx(norms["ddp"])
    assert max(norms["one"]) > 0.05  # clipping engaged at least once
    record = json.loads((runs["fsdp"] / "config.json").read_text())
    assert record["config"]["parallel"] == "fsdp" and record["world_size"] == 2


@pytest.mark.slow
def test_merge_to_after_fsdp_training(runs, tiny_model) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    merged = AutoModelForCausalLM.from_pretrained(runs["merged"])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model), str(runs["fsdp"] / "adapter"))
    ids = torch.tensor([[1, 20, 30, 40, 50]])
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(tiny_model)(ids).logits
        assert torch.allclose(merged(ids).logits, peft(ids).logits, atol=1e-5)
        assert not torch.allclose(merged(ids).logits, plain, atol=1e-4)  # the adapter is in it


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (torchrun's workers outlive a killed torchrun)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        found.append(todo.pop())
        todo.extend(children.get(found[-1], []))
    return found


@pytest.mark.slow
def test_fsdp_killed_after_a_checkpoint_resumes_to_the_same_adapter(runs, tiny_model, tmp_path) -> None:
    out = tmp_path / "killed"
    command = [
        *torchrun(),
        *train_args(tiny_model, runs["data"], out, 4, "--parallel", "fsdp"),
    ]
    proc = subprocess.Popen(command, env=env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    for line in proc.stdout:
        if orjson.loads(line)["step"] == 3:  # step-2 is checkpointed; step 3 is done but not saved
            for pid in descendants(proc.pid):
                os.kill(pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"] and not (out / "adapter").exists()
    command[command.index("--master_port") + 1] = str(free_port())
    resumed = run([*command, "--resume"])
    assert [orjson.loads(x)["step"] for x in resumed.stdout.splitlines()] == [3, 4]
    a, b = adapter(runs["fsdp"]), adapter(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in metrics(out)] == [1, 2, 3, 4]


@pytest.mark.slow
def test_two_nodes_with_a_c10d_rendezvous_on_one_machine(runs, tiny_model, tmp_path) -> None:
    """Two torchrun "nodes" of one process each meet at a c10d rendezvous on 127.0.0.1, as two machines would.
    They sample from the sharded policy in lockstep (--no-gather-for-sampling) and still end with the adapter
    of the same two ranks gathering the whole model for sampling: both ways compute the same numbers."""
    out, endpoint = tmp_path / "nodes", f"127.0.0.1:{free_port()}"
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                *("--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1"),
                *("--rdzv_backend", "c10d", "--rdzv_endpoint", endpoint, "--rdzv_id", "rehearsal"),
                *train_args(tiny_model, runs["data"], out, 4, "--parallel", "fsdp", "--no-gather-for-sampling"),
            ],
            env=env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        for node in (0, 1)
    ]
    for node in nodes:
        _, err = node.communicate(timeout=600)
        assert node.returncode == 0, err.decode()[-3000:]
    record = json.loads((out / "config.json").read_text())
    assert record["world_size"] == 2
    assert max_difference(adapter(out), adapter(runs["fsdp"])) <= 1e-8  # the same two ranks as one torchrun
    assert max_difference(adapter(out), adapter(runs["one"])) <= 2e-3 * LR


@pytest.mark.slow
def test_fsdp_on_one_process_under_torchrun(runs, tiny_model, tmp_path) -> None:
    out = tmp_path / "alone"
    run(
        [
            *torchrun(1),
            *train_args(tiny_model, runs["data"], out, 8, "--parallel", "fsdp"),
        ]
    )
    assert max_difference(adapter(out), adapter(runs["one"])) <= 1e-8


@pytest.mark.slow
def test_a_rank_whose_rows_were_all_left_out_steps_with_the_others(tiny_model, tmp_path) -> None:
    """--skip-zero-std: a rank whose groups all had equal rewards has no rows. It still takes part in the
    update (DDP: the gradient all-reduce, which hung before; FSDP: as many forward passes as the others)."""
    settings = [*SETTINGS[: SETTINGS.index("-q")], "--skip-zero-std", "-q"]
    settings[settings.index("--max-steps") + 1] = "2"
    # Each step's first prompt gets an empty reference: chrF scores all its samples 0, so its group ties and the
    # rank that takes it has no rows; the other prompt's samples differ in chrF.
    records = demo_records(count=8)
    for step in (0, 1):
        records[step_items(step, 2, len(records), DEFAULT_SEED)[0]]["references"] = [""]
    data = write_jsonl(tmp_path / "in.jsonl", records)
    run([sys.executable, *train_args(tiny_model, data, tmp_path / "one", 8, settings=settings)])
    for parallel in ("ddp", "fsdp"):
        out = tmp_path / parallel
        args = train_args(tiny_model, data, out, 4, "--parallel", parallel, settings=settings)
        run([*torchrun(), *args])
        # one prompt per rank: half the groups tied means one rank had no rows
        assert [r["zero_std_groups"] for r in metrics(out)] == [0.5, 0.5]
        assert max_difference(adapter(out), adapter(tmp_path / "one")) <= 2e-3 * LR
    assert any(float(t.abs().max()) > LR / 2 for k, t in adapter(tmp_path / "fsdp").items() if "lora_B" in k)


SHARDED_VS_WHOLE = """
import json, sys
import torch
from stages.engines.base import SamplingParams
from stages.engines.transformers_engine import sample
from stages.train.config import TrainConfig
from stages.train.distributed import Distributed
import stages.train.logprobs
from stages.train.logprobs import completion_logprobs, pack
from stages.train.policy import load_policy
from stages.train.sharding import gathered_adapter, whole_while_sampling
from torch.distributed.tensor import DTensor
from stages.train.batches import MicroBatch
from stages.train.grpo import policy_update

model_dir, out = sys.argv[1], sys.argv[2]
# A sharded policy runs every row whole (a rank must run as many forward passes as every other); so does the
# whole one here, where the rows of a group would otherwise share their prompt's pass: one computation
stages.train.logprobs._shared_prompt_pass = lambda decoder, batch: None
config = TrainConfig.of(
    model=model_dir, device="cpu", dtype="bfloat16", parallel="fsdp", learning_rate=1e-2, max_grad_norm=1e3,
    num_generations=4, per_device_train_batch_size=4, max_completion_length=24, temperature=1.0, num_iterations=2,
)
ranks = Distributed.from_env("cpu", sharded=True)
cpu = torch.device("cpu")
torch.manual_seed(0)
sharded = load_policy(config, cpu, ranks)
torch.manual_seed(0)
whole = load_policy(config, cpu)  # every rank holds all of it; its gradients are all-reduced (DDP)
tokenizer = whole.generator.tokenizer
prompt = tokenizer.encode(["Name the largest planet.", "Write a haiku about tea and rain."][ranks.rank])
stops = set(range(0, len(tokenizer), 3)) | {tokenizer.eos_token_id}  # rows stop after a few tokens, unevenly
seeds = [[1000 * ranks.rank + k for k in range(4)]]
params = SamplingParams(max_new_tokens=24, temperature=1.0)
advantages = torch.tensor([1.0, -0.5, 0.25, -0.75])
rows = [[0, 1], [2, 3]] if ranks.rank == 0 else [[1, 2]]  # uneven micro-batch counts: 2 on rank 0, 1 on rank 1
got = {}
for name, policy in (("sharded", sharded), ("whole", whole)):
    [samples] = sample(policy.model, [prompt], seeds, params, stop_ids=stops, pad_id=tokenizer.pad_token_id)
    if name == "sharded":  # again, gathered whole once: the ranks decode on their own, no lockstep
        with whole_while_sampling(policy.model):
            [gathered] = sample(policy.model, [prompt], seeds, params, stop_ids=stops, pad_id=tokenizer.pad_token_id)
        still_sharded = any(isinstance(p, DTensor) for p in policy.model.parameters())
    batch = pack([prompt] * 4, [s.token_ids for s in samples], tokenizer.pad_token_id, cpu)
    with torch.no_grad(), policy.model.disable_adapter():
        reference = completion_logprobs(policy.model, batch, 1.0)
    batches = []
    for part in rows:
        picked = [samples[i] for i in part]
        packed = pack([prompt] * len(part), [s.token_ids for s in picked], tokenizer.pad_token_id, cpu)
        sampled = torch.zeros(packed.completion_ids.shape)
        for i, s in enumerate(picked):
            sampled[i, : len(s.logprobs)] = torch.tensor(s.logprobs)
        batches.append(MicroBatch(part, packed, advantages[part], sampled))
    stats = policy_update(policy, batches, config, ranks)
    lora = gathered_adapter(policy.model)
    if lora is None:
        lora = {n: p.detach() for n, p in policy.model.named_parameters() if p.requires_grad}
    got[name] = (samples, reference, stats, lora)
(s_samples, s_ref, s_stats, s_lora), (w_samples, w_ref, w_stats, w_lora) = got["sharded"], got["whole"]
result = {
    "lengths": [len(s.token_ids) for s in s_samples],
    "same_tokens": [s.token_ids for s in s_samples] == [s.token_ids for s in w_samples],
    "sampled_logprob_gap": max(
        abs(a - b) for s, w in zip(s_samples, w_samples) for a, b in zip(s.logprobs, w.logprobs)
    ),
    "reference_gap": float((s_ref - w_ref).abs().max()),
    "gathered_same": [s.token_ids for s in gathered] == [s.token_ids for s in s_samples]
    and [s.logprobs for s in gathered] == [s.logprobs for s in s_samples],
    "resharded_after": still_sharded,
    "stats": [[s.loss, s.kl, s.grad_norm, s.logprob_drift_max] for s in (s_stats, w_stats)],
}
if ranks.is_main:
    result["lora_keys_equal"] = sorted(s_lora) == sorted(w_lora)
    result["lora_gap"] = max(float((s_lora[k] - w_lora[k]).abs().max()) for k in w_lora)
    result["lora_moved"] = max(float(v.abs().max()) for k, v in w_lora.items() if "lora_B" in k)
    result["dtypes"] = sorted({str(v.dtype) for v in s_lora.values()})
with open(f"{out}/rank{ranks.rank}.json", "w") as f:
    json.dump(result, f)
ranks.close()
"""


@pytest.mark.slow
def test_a_sharded_policy_samples_and_trains_as_the_whole_one(tiny_model, tmp_path) -> None:
    """bf16, 2 ranks: sampling from the sharded policy (the transformers engine, each rank its own prompt, rows
    stopping at different lengths, so the ranks decode in lockstep), the reference pass with the adapter off,
    and two updates (chunked float32 log-probs, KL, clipping, AdamW) over uneven micro-batch counts (the rank
    with fewer runs idle ones) give what the whole policy under DDP gives. Clipping is off here: in bf16 a clip
    coefficient an ulp apart (the norm is summed per shard) moves the first update by ~1e-9, which can flip a
    bf16 rounding in the second forward pass; the fp32 runs above test clipping."""
    script = tmp_path / "sharded_vs_whole.py"
    script.write_text(SHARDED_VS_WHOLE)
    run([*torchrun(), str(script), str(tiny_model), str(tmp_path)])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert max(ranks[0]["lengths"]) != max(ranks[1]["lengths"])  # one rank went on decoding alone
    for rank in ranks:
        # the same bf16 weights (gathered exactly): the same tokens and reference log-probs. The whole policy
        # decodes with bleuberi's decoder, the sharded one through the model's forward (lockstep): the same
        # bf16 logits, whose float32 log-softmax may round an ulp apart (log-probs of 1 to 10: ulps up to 1e-6)
        assert rank["same_tokens"] and rank["sampled_logprob_gap"] <= 2e-6 and rank["reference_gap"] == 0.0
        # gathered whole for the round (the default in train), then sharded again for the update
        assert rank["gathered_same"] and rank["resharded_after"]
        sharded, whole = rank["stats"]
        # loss, KL, gradient norm: the same to float32 sums in another order
        assert sharded[:3] == pytest.approx(whole[:3], rel=1e-6, abs=1e-9)
        # the largest sampler-to-trainer log-prob gap is itself rounding (log-probs of 1 to 10 in float32, whose
        # ulps are 1e-7 to 1e-6), and the second update's weights differ by an ulp where gradients summed in
        # another order: the two agree to a few ulps, not exactly
        assert sharded[3] == pytest.approx(whole[3], abs=2e-6) and max(sharded[3], whole[3]) < 1e-5
        assert whole[1] > 0 and whole[2] > 0  # a KL term (the second update), a gradient
    main = ranks[0]
    assert main["lora_keys_equal"] and main["dtypes"] == ["torch.float32"]
    assert main["lora_moved"] > 1e-3 and main["lora_gap"] <= 1e-8


ENGINE_OF_ITS_OWN = """
import json, sys
from pathlib import Path
import orjson
from stages.engines.base import ENGINES, EngineOptions, EngineSpec
from stages.train.config import TrainConfig
from stages.train.loop import train
from tests.test_train_engines import FileSyncedEngine

model_dir, data, out = sys.argv[1], sys.argv[2], Path(sys.argv[3])
made = []

def start(options, target):
    made.append(FileSyncedEngine(target.model.path, target.stop_ids))
    return made[-1]

ENGINES[FileSyncedEngine.name] = EngineSpec(start, samples_with_live_policy=False)
records = [orjson.loads(line) for line in Path(data).read_bytes().splitlines()]
config = TrainConfig.of(
    model=model_dir, num_generations=4, per_device_train_batch_size=4, max_completion_length=6, max_steps=4,
    save_steps=2, save_total_limit=10, learning_rate=float(sys.argv[4]), max_grad_norm=0.05, reward=["chrf"],
    micro_batch=2, gradient_checkpointing=True, parallel="fsdp", engine=EngineOptions(FileSyncedEngine.name),
    vllm_importance_sampling_correction=False,  # an exact engine: the same adapter as sampling from the policy
)
train(records, config, out / "run")
import os
(out / f"engine-{os.environ['RANK']}.json").write_text(json.dumps({"calls": made[0].calls, "loaded": made[0].loaded}))
"""


@pytest.mark.slow
def test_fsdp_with_rollouts_from_an_engine_of_its_own(runs, tiny_model, tmp_path) -> None:
    """Each step's adapter is gathered from the shards and published to an engine holding the base model (as a
    vLLM server or a per-rank vLLM engine does): the same adapter as the run sampling from the sharded policy."""
    script = tmp_path / "engine_of_its_own.py"
    script.write_text(ENGINE_OF_ITS_OWN)
    command = [str(script), str(tiny_model), str(runs["data"]), str(tmp_path), str(LR)]
    run([*torchrun(), *command])
    for rank in (0, 1):
        engine = json.loads((tmp_path / f"engine-{rank}.json").read_text())
        assert engine["calls"] == [None, 0, 1, 2, 3]  # the probe, then each step with the adapter before it
        assert len(set(engine["loaded"])) == 5  # versions 0..4, each under a new name
    ours, theirs = adapter(tmp_path / "run"), adapter(runs["fsdp"])
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_fsdp_without_torchrun_is_one_line(runner, tiny_model, tmp_path, monkeypatch) -> None:
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    data = write_jsonl(tmp_path / "in.jsonl", demo_records(count=4))
    out = tmp_path / "run"
    result = runner.invoke(
        app, ["train", "-i", str(data), "-o", str(out), "--model", str(tiny_model), "--parallel", "fsdp"]
    )
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == [
        "bleuberi: error: --parallel fsdp needs torchrun to start the processes: torchrun --nproc_per_node N "
        "-m bleuberi_cli train ... (N=1 for one process)"
    ]
    assert result.stdout == "" and not out.exists()


def test_parallel_takes_ddp_or_fsdp(tiny_model) -> None:
    assert TrainConfig.of(model=str(tiny_model)).parallel == "ddp"
    with pytest.raises(UsageError, match="unknown parallel 'zero'; choose from ddp, fsdp"):
        TrainConfig.of(model=str(tiny_model), parallel="zero")  # type: ignore[arg-type]


def test_a_batch_that_cannot_be_split_over_the_ranks_is_refused() -> None:
    four = Distributed(rank=0, world_size=4)
    four.check_split(8, 2, "prompts")  # 2 prompts for each of 4 ranks: exactly one step's worth
    with pytest.raises(UsageError) as caught:
        four.check_split(7, 2, "prompts")
    assert str(caught.value) == (
        "7 prompts cannot be split over 4 ranks: each step gives every rank 2 of its own (8 in all); lower "
        "--per-device-train-batch-size or start fewer processes"
    )
    Distributed().check_split(1, 2, "prompts")  # one process: a step may wrap around the data


def test_an_idle_micro_batch_adds_nothing(tiny_model) -> None:
    """What a rank without rows runs so that every rank runs as many forward passes: no loss, no gradient."""
    from stages.train.batches import idle_batch
    from stages.train.grpo import LossInputs, micro_batch_loss
    from stages.train.loss import Denominator
    from stages.train.policy import load_policy

    config = TrainConfig.of(model=str(tiny_model), device="cpu", beta=0.04)
    policy = load_policy(config, torch.device("cpu"))
    for p in policy.trainable:  # LoRA B starts at 0, which would zero most gradients anyway
        torch.nn.init.normal_(p, std=0.5)
    idle = idle_batch(policy)
    pull = torch.full_like(idle.sampled_logp, -3.0)  # log-probs that would pull, were they counted
    inputs = LossInputs(idle.batch, idle.advantages, pull, pull, torch.zeros_like(pull), None)
    loss_config, temperature = config.loss_config(), config.sampling.temperature
    parts, _ = micro_batch_loss(policy, idle, None, inputs, loss_config, Denominator(1.0), temperature)
    parts.loss.backward()
    assert float(parts.loss.detach()) == 0.0 and parts.kl_sum == 0.0
    grads = [p.grad for p in policy.trainable]
    assert all(g is not None for g in grads) and all(float(g.abs().max()) == 0.0 for g in grads)
