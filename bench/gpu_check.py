"""GPU acceptance check: bleuberi's own sampler and GRPO step on random-weight Qwen2.5-0.5B- and 7B-shaped
models in bf16, in one command that fits in 8 minutes on one H100/H200. Nothing is downloaded.

It prints one table (stdout) with, per model shape: the model build, sampling tokens/s with the
transformers engine (G=8 samples of 256 tokens for each 256-token prompt), the GRPO step (G=8, 256 prompt +
256 completion tokens, LoRA r16, gradient checkpointing, BLEU reward) under torchrun with one process, once
with `--parallel ddp` and once with `--parallel fsdp` (median step time of the steps after the first, and
peak GPU memory), and the bf16-vs-fp32 drift of the trainer's log-probs and loss (first shape). `--json
FILE` writes the raw figures as one JSON line. Exit codes: 0 every part ran and passed; 1 a part failed,
timed out, or a package is missing; 2 bad usage; 3 nothing failed but parts were skipped for time.

On the project's GPU machine (torch 2.11, transformers 5.17, peft, safetensors, sacrebleu; no orjson),
carry an orjson wheel. Once, here, in the repository root:

    echo /.whl/ >> .git/info/exclude
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl orjson==3.13.0

then the device tool's `run` with `carry: [".whl"]`, `timeout_s: 600` and the command

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl
    && export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 && set -o pipefail
    && python3 bench/gpu_check.py --json $OUT/gpu_check.json 2>&1 | tee $OUT/gpu_check.log

(one line, joined with spaces; the JSON line and the whole log come back from $OUT). Anywhere else with bleuberi
installed: `python bench/gpu_check.py`.
On a CPU, `python bench/gpu_check.py --device cpu --tiny` runs every code path on a tiny model in about a
minute (tests/test_gpu_check.py). Record the GPU figures in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import itertools
import json
import math
import os
import random
import signal
import statistics
import string
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

STARTED = time.monotonic()
ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run as a script (and by torchrun): `stages` lives in the repository root
    sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; a machine without network must not wait

NEEDED = ("torch", "transformers", "peft", "safetensors", "tokenizers", "sacrebleu", "orjson", "numpy")
# Real Qwen2.5 shapes (Qwen/Qwen2.5-0.5B and Qwen/Qwen2.5-7B config.json); weights are random.
SHAPES: dict[str, dict[str, Any]] = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    # untied: at width 64 a random tied model repeats its input token (its layers add little to the embedding)
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
}  # fmt: skip
QWEN_COMMON = dict(rope_theta=1e6, rms_norm_eps=1e-6, max_position_embeddings=32768, initializer_range=0.02)
SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 (unk, bos, eos and pad)
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Random init gives logits of std 0.02 * sqrt(hidden) (0.6 at 0.5B): nearly uniform, where bf16 rounding
# costs almost nothing. The final norm is scaled so logits have about a trained model's spread.
LOGIT_STD = 4.0
TEMPERATURE = 0.9
# The least each part needs on one H200 (a guess until a run measures it; CPU figures for --tiny): a part
# starts only when this much of the budget is left, and a GRPO child is stopped when the budget runs out.
LEAST_SECONDS = {"build": (5, 30, 1), "sample": (5, 10, 1), "grpo": (30, 60, 10), "drift": (10, 30, 2)}
PARTS, MODES = ("sample", "grpo", "drift"), ("ddp", "fsdp")


@dataclass
class Result:
    part: str
    shape: str
    mode: str = "-"
    status: str = "ok"  # ok | FAIL | timed out | skipped
    figures: dict[str, Any] = field(default_factory=dict)
    detail: str = ""


def say(message: str) -> None:
    print(f"[gpu_check {time.monotonic() - STARTED:5.0f}s] {message}", file=sys.stderr, flush=True)


def remaining(args: argparse.Namespace) -> float:
    return args.budget_seconds - (time.monotonic() - STARTED)


def least(part: str, shape: str) -> int:
    small, large, tiny = LEAST_SECONDS[part]
    return tiny if shape == "tiny" else large if shape == "qwen2.5-7b" else small


@functools.cache
def words_of(vocab_size: int) -> list[str]:
    """The words the tokenizer has as single tokens (" a" .. " z", " aa" ..: each a merge of a shorter one and a
    letter, so that transformers' byte-level Qwen2 tokenizer, which a saved Qwen2 folder reloads as, keeps them)."""
    names = (
        "".join(letters) for n in itertools.count(1) for letters in itertools.product(string.ascii_lowercase, repeat=n)
    )
    return list(itertools.islice(names, vocab_size - len(SPECIALS) - 256))


def make_records(count: int, vocab_size: int, prompt_words: int, seed: int, answer_words: int = 8) -> list[dict]:
    """Prompts of random words (one token each; the encoder cuts them to max_prompt_length). Two references:
    one of an answer's length (BLEU's brevity penalty takes the closest) and one of vocab/40 words, so that a
    random completion matches a few words, rewards differ within a group and the update has a gradient."""
    rng, words = random.Random(seed), words_of(vocab_size)

    def text(n: int) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    references = lambda: [text(answer_words), text(vocab_size // 40)]  # noqa: E731
    return [{"id": f"p{i}", "prompt": text(prompt_words + 8), "references": references()} for i in range(count)]


def build_tokenizer(vocab_size: int) -> Any:
    """A byte-level BPE tokenizer with exactly `vocab_size` ids and ChatML: the specials, the 256 bytes, then
    one token per word, so random ids decode to words and BLEU rewards compute. Built as the Qwen2Tokenizer that
    transformers 5 reloads a Qwen2 folder's tokenizer as (any other decoder or pre-tokenizer it would replace)."""
    from tokenizers import pre_tokenizers
    from transformers import Qwen2Tokenizer

    vocab = {token: i for i, token in enumerate([*SPECIALS, *sorted(pre_tokenizers.ByteLevel.alphabet())])}
    merges = [("Ġ" + word[:-1], word[-1]) for word in words_of(vocab_size)]  # "Ġ" is the byte-level space
    vocab.update({"Ġ" + word: len(vocab) + i for i, word in enumerate(words_of(vocab_size))})
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=SPECIALS[0],
        bos_token=SPECIALS[1],
        eos_token=SPECIALS[2],
        pad_token=SPECIALS[2],
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def build_model(shape: str, device: str, dtype: Any) -> Any:
    """Random weights, built directly on `device` (a 7B model initialised on the CPU would take minutes)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**SHAPES[shape], **QWEN_COMMON, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    with torch.no_grad():
        model.get_decoder().norm.weight.mul_(LOGIT_STD / (config.initializer_range * config.hidden_size**0.5))
    return model.eval()


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def memory_gb(device: str, peak: bool = True, reset: bool = False) -> float | None:
    """Peak (or current) GPU memory allocated since the last reset, in GiB; None on the CPU."""
    import torch

    if not device.startswith("cuda"):
        return None
    value = (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**30
    if reset:
        torch.cuda.reset_peak_memory_stats()
    return round(value, 2)


def part_build(args: argparse.Namespace, shape: str, folder: Path) -> tuple[Result, Any, Any]:
    import torch

    t0 = time.perf_counter()
    tokenizer = build_tokenizer(SHAPES[shape]["vocab_size"])
    model = build_model(shape, args.device, torch.bfloat16)
    sync(args.device)
    built = time.perf_counter() - t0
    model.save_pretrained(folder)  # the trainer loads a folder, as a user's model would be
    tokenizer.save_pretrained(folder)
    saved = time.perf_counter() - t0 - built
    params = sum(p.numel() for p in model.parameters()) / 1e9
    figures = {"parameters_b": round(params, 3), "build_seconds": round(built, 1), "save_seconds": round(saved, 1)}
    figures["weights_gb"] = memory_gb(args.device, peak=False)
    detail = f"{params:.2f} B parameters, built in {built:.0f} s, saved in {saved:.0f} s"
    problem = reload_problem(tokenizer, folder, SHAPES[shape]["vocab_size"])
    return Result("build", shape, "-", "FAIL" if problem else "ok", figures, problem or detail), model, tokenizer


def reload_problem(tokenizer: Any, folder: Path, vocab_size: int) -> str | None:
    """The trainer reloads the folder's tokenizer (transformers may pick another class for it): the same prompt
    ids and the same words back from random ids, or what differs."""
    from stages.core.models import load_tokenizer, resolve_model
    from stages.engines.prompts import PromptEncoder

    reloaded = load_tokenizer(resolve_model(str(folder)))
    record = make_records(1, vocab_size, 16, seed=0)[0]
    ids = random.Random(0).sample(range(vocab_size), 64)
    mine, theirs = PromptEncoder(tokenizer).encode(record), PromptEncoder(reloaded).encode(record)
    if mine != theirs or tokenizer.decode(ids) != reloaded.decode(ids) or len(reloaded) != vocab_size:
        return f"the saved tokenizer reloads as another one ({type(reloaded).__name__}, {len(reloaded)} ids)"
    return None


def part_sample(args: argparse.Namespace, shape: str, model: Any, tokenizer: Any) -> Result:
    """Tokens/s of the transformers engine: sample_prompts prompts x G samples of completion_tokens."""
    from stages.engines.base import SamplingParams, derive_seed
    from stages.engines.generator import Generator

    generator = Generator.for_model(model, tokenizer, model_name=shape, max_prompt_length=args.prompt_tokens)
    records = make_records(args.sample_prompts, SHAPES[shape]["vocab_size"], args.prompt_tokens, seed=1)
    prompts = [generator.encode(record) for record in records]
    seeds = [[derive_seed(42, record["id"], k) for k in range(args.generations)] for record in records]
    params = SamplingParams(args.completion_tokens, TEMPERATURE)
    generator.sample_ids(prompts[:1], [[1, 2]], SamplingParams(4, TEMPERATURE))  # warm-up: kernels, cuBLAS
    sync(args.device)
    memory_gb(args.device, reset=True)
    t0 = time.perf_counter()
    groups = generator.sample_ids(prompts, seeds, params)
    sync(args.device)
    seconds = time.perf_counter() - t0
    lengths = [len(s.token_ids) for group in groups for s in group]
    rows = len(prompts) * args.generations
    tokens = sum(lengths)
    figures = {"rows": rows, "prompt_tokens": [len(p) for p in prompts], "tokens": tokens, "seconds": round(seconds, 6)}
    figures.update(tokens_per_second=round(tokens / seconds, 1), peak_gb=memory_gb(args.device))
    problems = []
    if len(lengths) != rows or not all(1 <= n <= args.completion_tokens for n in lengths):
        problems.append(f"expected {rows} samples of 1..{args.completion_tokens} tokens, got lengths {lengths}")
    if any(len(p) != args.prompt_tokens for p in prompts):
        problems.append(f"prompts should be {args.prompt_tokens} tokens, are {sorted({len(p) for p in prompts})}")
    detail = f"{len(prompts)} prompts x {args.generations} samples, {tokens} tokens in {seconds:.1f} s"
    return Result(
        "sample", shape, status="FAIL" if problems else "ok", figures=figures, detail="; ".join(problems) or detail
    )


def part_grpo(args: argparse.Namespace, shape: str, mode: str, folder: Path, work: Path) -> Result:
    """One child under torchrun (one process) trains `steps` GRPO steps with bleuberi's own loop."""
    spec = {
        "model": str(folder), "mode": mode, "device": args.device, "steps": args.steps, "generations": args.generations,
        "batch": args.batch, "prompt_tokens": args.prompt_tokens, "completion_tokens": args.completion_tokens,
        "lora_r": args.lora_r, "vocab_size": SHAPES[shape]["vocab_size"], "out": str(work / f"run-{shape}-{mode}"),
        "result": str(work / f"result-{shape}-{mode}.json"),
    }  # fmt: skip
    spec_path = work / f"spec-{shape}-{mode}.json"
    spec_path.write_text(json.dumps(spec))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    command += [str(Path(__file__).resolve()), "--child", str(spec_path)]
    timeout = max(1.0, remaining(args))
    # A session of its own, so a child past the budget is stopped with everything torchrun started.
    child = subprocess.Popen(command, stdout=sys.stderr.fileno(), start_new_session=True)
    try:
        code = child.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_session(child)
        return Result("grpo", shape, mode, "timed out", detail=f"stopped after {timeout:.0f} s (the budget's end)")
    result_file = Path(spec["result"])
    if not result_file.is_file():
        return Result("grpo", shape, mode, "FAIL", detail=f"the child exited with {code} and wrote no result")
    outcome = json.loads(result_file.read_text())
    if not outcome.get("ok"):
        return Result("grpo", shape, mode, "FAIL", figures=outcome, detail=outcome.get("error", f"exit code {code}"))
    return grpo_result(args, shape, mode, outcome)


def stop_session(child: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the child's session (torchrun passes it on to its worker), SIGKILL if it lingers; returns once
    the child is reaped (SIGKILL cannot be caught, so that wait ends; a bounded one left it running on a busy
    machine)."""
    try:
        os.killpg(child.pid, signal.SIGTERM)
        child.wait(timeout=15)
        return
    except ProcessLookupError:  # the whole session already ended
        child.wait()
        return
    except subprocess.TimeoutExpired:
        pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(child.pid, signal.SIGKILL)
    child.wait()


def grpo_result(args: argparse.Namespace, shape: str, mode: str, outcome: dict[str, Any]) -> Result:
    """Medians over the steps after the first (it includes warm-up); checks that every step trained."""
    steps = outcome["steps"]
    timed = steps[1:] or steps

    def median(key: str) -> float:
        return statistics.median(s[key] for s in timed)

    figures = {k: median(k) for k in ("seconds", "sample_seconds", "update_seconds", "tokens_per_second")}
    peaks = [s["peak_gb"] for s in steps if s.get("peak_gb") is not None]
    figures.update(peak_gb=max(peaks) if peaks else None, first_step_seconds=steps[0]["seconds"], raw=outcome)
    problems = []
    if len(steps) != args.steps:
        problems.append(f"{len(steps)} steps logged, {args.steps} asked for")
    numbers = [s[k] for s in steps for k in ("loss", "kl", "grad_norm")]
    if not all(math.isfinite(x) for x in numbers):
        problems.append(f"non-finite loss, kl or grad norm: {numbers}")
    if not any(s["grad_norm"] > 0 for s in steps):
        problems.append("the gradient was zero in every step (nothing trained)")
    if not outcome.get("adapter_saved"):
        problems.append("no adapter_model.safetensors written")
    last = steps[-1]
    detail = (
        f"{len(steps)} steps, first {steps[0]['seconds']:.1f} s, setup {outcome['setup_seconds']:.0f} s; "
        f"reward {last['reward_mean']:.3f}, grad norm {last['grad_norm']:.3g}, sampler-vs-trainer drift "
        f"{last['logprob_drift_mean']:.3g} mean / {last['logprob_drift_max']:.3g} max"
    )
    return Result("grpo", shape, mode, "FAIL" if problems else "ok", figures, "; ".join(problems) or detail)


def child_main(spec_path: Path) -> int:
    """Inside torchrun: train, then write the steps' records (with GPU memory) as JSON for the parent."""
    spec = json.loads(spec_path.read_text())
    outcome: dict[str, Any] = {"ok": False}
    try:
        outcome.update(child_train(spec), ok=True)
    except BaseException as error:  # any failure becomes the table's one-line reason
        traceback.print_exc()
        text = str(error).strip().splitlines()
        outcome["error"] = f"{type(error).__name__}: {text[0] if text else ''}"
    if os.environ.get("RANK", "0") == "0":
        tmp = Path(spec["result"] + ".tmp")
        tmp.write_text(json.dumps(outcome))
        tmp.replace(spec["result"])
    return 0 if outcome["ok"] else 1


def child_train(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    from stages.train.config import TrainConfig
    from stages.train.loop import train

    options: dict[str, Any] = dict(
        model=spec["model"], reward=["bleu"], num_generations=spec["generations"], lora_r=spec["lora_r"],
        per_device_train_batch_size=spec["batch"], max_prompt_length=spec["prompt_tokens"],
        max_completion_length=spec["completion_tokens"], lora_alpha=2 * spec["lora_r"], dtype="bfloat16",
        device=spec["device"], gradient_checkpointing=True, max_steps=spec["steps"], save_steps=spec["steps"],
        temperature=TEMPERATURE, learning_rate=1e-5, seed=42, parallel=spec["mode"],
    )  # fmt: skip
    config = TrainConfig.of(**options)
    count, vocab = config.prompts_per_step * spec["steps"], spec["vocab_size"]
    records = make_records(count, vocab, spec["prompt_tokens"], seed=2, answer_words=spec["completion_tokens"])
    device, steps = spec["device"], []
    memory_gb(device, reset=True)
    t0 = time.perf_counter()

    def on_step(record: dict[str, Any]) -> None:
        keep = ("step", "seconds", "sample_seconds", "score_seconds", "update_seconds", "tokens_per_second", "loss")
        keep += ("kl", "grad_norm", "reward_mean", "logprob_drift_mean", "logprob_drift_max", "completion_length_mean")
        steps.append(
            {k: record[k] for k in keep} | {"peak_gb": memory_gb(device, reset=True), "at": time.perf_counter() - t0}
        )

    result = train(records, config, spec["out"], on_step=on_step, on_message=say)
    name = torch.cuda.get_device_name() if device.startswith("cuda") else "cpu"
    return {
        "steps": steps,
        "setup_seconds": round(steps[0]["at"] - steps[0]["seconds"], 1) if steps else None,
        "adapter_saved": (result.adapter / "adapter_model.safetensors").is_file(),
        "device_name": name,
    }


def part_drift(args: argparse.Namespace, shape: str, tokenizer: Any) -> Result:
    """The same samples' completion log-probs from the trainer's function, with the model in fp32 and then
    cast to bf16 (as the trainer runs it), and the GRPO loss on the same advantages: exact (fp32 log-probs;
    ratio 1, KL 0) against bf16 log-probs with the fp32 ones as sampler and reference log-probs."""
    import contextlib

    import torch

    from stages.engines.base import SamplingParams, derive_seed
    from stages.engines.generator import Generator
    from stages.train.config import TrainConfig
    from stages.train.logprobs import completion_logprobs, pack
    from stages.train.loss import Denominator, group_advantages, grpo_loss

    memory_gb(args.device, reset=True)
    model = build_model(shape, args.device, torch.float32)
    generator = Generator.for_model(model, tokenizer, model_name=shape, max_prompt_length=args.prompt_tokens)
    records = make_records(args.batch // args.generations, SHAPES[shape]["vocab_size"], args.prompt_tokens, seed=3)
    prompts = [generator.encode(record) for record in records]
    seeds = [[derive_seed(7, record["id"], k) for k in range(args.generations)] for record in records]
    groups = generator.sample_ids(prompts, seeds, SamplingParams(args.completion_tokens, TEMPERATURE))
    rows = [(prompts[i], s.token_ids) for i, group in enumerate(groups) for s in group]
    batch = pack([p for p, _ in rows], [c for _, c in rows], generator.pad_id, torch.device(args.device))
    # the trainer's bf16 forward: autocast on CUDA (stages/train/policy.py), plain bf16 weights on the CPU
    cuda = args.device.startswith("cuda")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    with torch.no_grad():
        exact = completion_logprobs(model, batch, TEMPERATURE)
        model.to(torch.bfloat16)
        with autocast:
            rounded = completion_logprobs(model, batch, TEMPERATURE)
    mask = batch.completion_mask
    gap = (rounded - exact).abs()[mask.bool()]
    rewards = torch.rand(len(rows), generator=torch.Generator().manual_seed(3))
    advantages = group_advantages(rewards, args.generations).to(exact.device)
    loss_config, tokens = TrainConfig().loss_config(), int(mask.sum())
    denominator = Denominator.for_step(
        loss_config.loss_type, n_sequences=len(rows), n_tokens_global=tokens, n_tokens_local=tokens, world_size=1,
        max_completion_length=args.completion_tokens,
    )  # fmt: skip
    loss32 = grpo_loss(exact, exact, exact, advantages, mask, loss_config, denominator)
    loss16 = grpo_loss(rounded, exact, exact, advantages, mask, loss_config, denominator)
    figures = {
        "logprob_diff_mean": float(gap.mean()), "logprob_diff_max": float(gap.max()), "tokens": tokens,
        "loss_fp32": float(loss32.loss), "loss_bf16": float(loss16.loss),
        "loss_diff": abs(float(loss16.loss) - float(loss32.loss)), "kl_bf16": loss16.kl_sum / tokens,
        "clip_fraction_bf16": loss16.clipped_tokens / tokens, "surprise_fp32": float(-exact[mask.bool()].mean()),
        "peak_gb": memory_gb(args.device),
    }  # fmt: skip
    detail = (
        f"log p |bf16 - fp32| mean {figures['logprob_diff_mean']:.2g}, max {figures['logprob_diff_max']:.2g} over "
        f"{tokens} tokens; loss {figures['loss_fp32']:.4g} fp32 vs {figures['loss_bf16']:.4g} bf16 (diff "
        f"{figures['loss_diff']:.2g}); mean -log p {figures['surprise_fp32']:.2f} (uniform "
        f"{math.log(SHAPES[shape]['vocab_size']):.2f})"
    )
    finite = all(math.isfinite(figures[k]) for k in ("logprob_diff_mean", "logprob_diff_max", "loss_diff"))
    if not finite or figures["logprob_diff_mean"] > args.max_drift:
        why = f"over --max-drift {args.max_drift}" if finite else "not finite"
        return Result("drift", shape, "bf16 vs fp32", "FAIL", figures, f"{why}: {detail}")
    return Result("drift", shape, "bf16 vs fp32", figures=figures, detail=detail)


def guarded(args: argparse.Namespace, part: str, shape: str, mode: str, run: Any) -> Result:
    """Run one part if the budget still holds its least time; an exception is the part's one-line failure."""
    need, left = least(part, shape), remaining(args)
    if left < need:
        return Result(
            part, shape, mode, "skipped", detail=f"{max(left, 0):.0f} s of the budget left, needs at least {need} s"
        )
    say(f"{part} {shape} {mode}: start ({left:.0f} s of the budget left)")
    try:
        result: Result = run()
    except Exception as error:
        traceback.print_exc()
        text = str(error).strip().splitlines()
        result = Result(part, shape, mode, "FAIL", detail=f"{type(error).__name__}: {text[0] if text else ''}")
    say(f"{part} {shape} {mode}: {result.status}: {result.detail}")
    return result


def free_memory(device: str) -> None:
    import gc

    import torch

    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()


def run_parts(args: argparse.Namespace, work: Path) -> list[Result]:
    """Per shape: build (and save), sample, GRPO in each parallel mode; the drift on the first shape."""
    import shutil

    results: list[Result] = []
    for shape in args.shapes:
        folder, built = work / f"model-{shape}", {}
        if {"sample", "grpo"} & set(args.parts):

            def build(shape: str = shape, folder: Path = folder, built: dict = built) -> Result:
                result, built["model"], built["tokenizer"] = part_build(args, shape, folder)
                return result

            results.append(guarded(args, "build", shape, "-", build))
        tokenizer = built.get("tokenizer")
        missing = "skipped", "no model: the build did not run or failed"
        if "sample" in args.parts:
            model = built.pop("model", None)
            run = lambda model=model, shape=shape, tok=tokenizer: part_sample(args, shape, model, tok)  # noqa: E731
            results.append(guarded(args, "sample", shape, "-", run) if model else Result("sample", shape, *missing))
            del model, run
        built.pop("model", None)
        free_memory(args.device)  # the GRPO children need the GPU to themselves
        for mode in args.parallel if "grpo" in args.parts else ():
            run = lambda mode=mode, shape=shape, folder=folder: part_grpo(args, shape, mode, folder, work)  # noqa: E731
            results.append(
                guarded(args, "grpo", shape, mode, run) if tokenizer else Result("grpo", shape, mode, *missing)
            )
        shutil.rmtree(folder, ignore_errors=True)  # 15 GB for the 7B shape
        if "drift" in args.parts and shape == args.shapes[0]:
            tok = tokenizer or build_tokenizer(SHAPES[shape]["vocab_size"])
            results.append(
                guarded(args, "drift", shape, "bf16 vs fp32", lambda shape=shape, tok=tok: part_drift(args, shape, tok))
            )
            free_memory(args.device)
    return results


def cell(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}" if isinstance(value, float) else str(value)


def render_table(results: list[Result]) -> str:
    """A Markdown table (it pastes into bench/RESULTS.md); figures only for parts that passed."""
    lines = ["| part | model | mode | status | tokens/s | step s | sample s | update s | peak GB | detail |"]
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        f = r.figures if r.status == "ok" else {}
        peak = f.get("weights_gb") if r.part == "build" else f.get("peak_gb")
        timing = ("seconds", "sample_seconds", "update_seconds") if r.part == "grpo" else ()
        step = " | ".join([cell(f.get(k), 2) for k in timing] or ["-"] * 3)
        row = [r.part, r.shape, r.mode, r.status, cell(f.get("tokens_per_second")), step, cell(peak), r.detail]
        lines.append(f"| {' | '.join(row)} |")
    return "\n".join(lines)


def verdict(results: list[Result]) -> tuple[int, str]:
    """The exit code and the last line: a failure or a timeout is 1; parts skipped for time alone are 3."""
    failed = [r for r in results if r.status in ("FAIL", "timed out")]
    skipped = [r for r in results if r.status == "skipped"]

    def names(rs: list[Result]) -> str:
        return ", ".join(f"{r.part} {r.shape}" + ("" if r.mode == "-" else f" {r.mode}") for r in rs)

    if failed:
        return 1, f"FAILED: {len(failed)} of {len(results)} part(s) ({names(failed)})"
    if skipped:
        passed = len(results) - len(skipped)
        return 3, f"incomplete: {len(skipped)} part(s) skipped ({names(skipped)}); the other {passed} passed"
    return 0, f"ok: all {len(results)} part(s) passed"


def environment(args: argparse.Namespace) -> dict[str, Any]:
    import peft
    import torch
    import transformers

    cuda = args.device.startswith("cuda")
    return {
        "device_name": torch.cuda.get_device_name() if cuda else "cpu",
        "torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
        "peft": peft.__version__,
    }  # fmt: skip


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line, exit 2 (argparse prints the usage block too)
        self.exit(2, f"gpu_check.py: error: {message}\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="a tiny model and a few tokens: every code path, on a CPU")
    p.add_argument(
        "--shapes", help=f"comma list of {', '.join(SHAPES)} (default qwen2.5-0.5b,qwen2.5-7b; --tiny: tiny)"
    )
    p.add_argument("--parts", default=",".join(PARTS), help="comma list of sample, grpo, drift (build runs as needed)")
    p.add_argument("--parallel", default=",".join(MODES), help="comma list of ddp, fsdp (the GRPO modes)")
    p.add_argument("--steps", type=int, help="GRPO steps per mode; medians over those after the first (3; --tiny 2)")
    p.add_argument("--generations", type=int, default=8, help="G, samples per prompt (8)")
    p.add_argument("--batch", type=int, default=16, help="completions per GRPO step, a multiple of G (16)")
    p.add_argument("--prompt-tokens", type=int, help="prompt length (256; --tiny 16)")
    p.add_argument("--completion-tokens", type=int, help="completion length (256; --tiny 8)")
    p.add_argument(
        "--sample-prompts", type=int, help="prompts in the sampling measurement, G samples each (8; --tiny 2)"
    )
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (16; alpha 2r)")
    p.add_argument("--budget-seconds", type=float, default=450.0, help="parts that no longer fit are skipped (450)")
    p.add_argument("--max-drift", type=float, default=0.5, help="fail if the mean bf16-fp32 log-prob gap exceeds it")
    p.add_argument("--json", help="write the raw figures to this file as one JSON line")
    p.add_argument("--workdir", help="where models and runs go (default: a temporary folder, removed after)")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    sizes = {"steps": (3, 2), "prompt_tokens": (256, 16), "completion_tokens": (256, 8), "sample_prompts": (8, 2)}
    for name, (full, tiny) in sizes.items():
        if getattr(args, name) is None:
            setattr(args, name, tiny if args.tiny else full)
    args.shapes = (args.shapes or ("tiny" if args.tiny else "qwen2.5-0.5b,qwen2.5-7b")).split(",")
    args.parts, args.parallel = args.parts.split(","), args.parallel.split(",")
    for option, values, allowed in (
        ("--shapes", args.shapes, SHAPES),
        ("--parts", args.parts, PARTS),
        ("--parallel", args.parallel, MODES),
    ):
        if not values or any(v not in allowed for v in values):
            p.error(f"{option} {','.join(values)}: choose from {', '.join(allowed)}")
    numbers = ("steps", "generations", "batch", "prompt_tokens", "completion_tokens", "sample_prompts", "lora_r")
    for name in numbers:
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.generations < 2 or args.batch % args.generations:
        p.error(f"--batch {args.batch} must be a multiple of --generations {args.generations} (>= 2)")
    if args.device != "cpu" and not args.device.startswith("cuda"):
        p.error(f"--device {args.device}: choose cuda (or cuda:N) or cpu")
    if args.budget_seconds <= 0 or args.max_drift < 0:
        p.error("--budget-seconds must be > 0 and --max-drift >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(Path(args.child))
    missing = [name for name in NEEDED if importlib.util.find_spec(name) is None]
    if missing:
        print(
            f"gpu_check.py: missing Python packages: {', '.join(missing)} (to carry wheels, see the docstring)",
            file=sys.stderr,
        )
        return 1
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(
            f"gpu_check.py: error: --device {args.device}: torch {torch.__version__} sees no CUDA GPU",
            file=sys.stderr,
        )
        return 2
    env = environment(args)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        results = run_parts(args, work)
    finally:
        if not args.workdir:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
    code, line = verdict(results)
    elapsed = time.monotonic() - STARTED
    print(
        f"bleuberi GPU acceptance on {env['device_name']} (torch {env['torch']}, transformers {env['transformers']}), "
        f"bf16, G={args.generations}, {args.prompt_tokens} prompt + {args.completion_tokens} completion tokens, "
        f"{args.batch} completions a step, LoRA r{args.lora_r}, {args.steps} steps; {elapsed:.0f} s"
    )
    print(render_table(results))
    print(f"gpu_check: {line}", flush=True)
    if args.json:
        record = {"environment": env, "settings": {k: v for k, v in vars(args).items() if k != "child"}}
        record.update(elapsed_seconds=round(elapsed, 1), exit_code=code, results=[asdict(r) for r in results])
        target = Path(args.json)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(record) + "\n")
        tmp.replace(target)
    return code


if __name__ == "__main__":
    sys.exit(main())
