"""Two bleuberi processes on one machine, with and without the thread budget (issue 18), in one invocation.

    python bench/threads_bench.py                          # the measurement: alone on the machine, ~25 min
    python bench/threads_bench.py --only generate          # generate only (~5 min)
    python bench/threads_bench.py --async-rollouts         # also: train with vLLM in process, --async-rollouts
    python bench/threads_bench.py --tiny --repeats 1       # smoke test on a tiny random model (seconds)

Every figure is the wall time of a whole command, as a user sees it, for
- train: `bleuberi train` on the embedded model, 4 steps of 2 prompts x G=4, <= 32 completion tokens;
- generate: `bleuberi generate` on 8 held-out prompts x 2 samples x <= 48 tokens, temperature 0.9;
in three situations:
- alone: the command alone on the machine (the budget then keeps all the cores: torch's own default);
- pair: two of the same command started together; the slower of the two is reported;
- busy: the command beside a busy single-threaded process (`python -c "while True: pass"`, started 1 s
  before it and pinned to the same cores).
pair and busy run with the budget (no override: each process chooses for itself) and without it
(BLEUBERI_THREADS = the cores, what every process did before: torch's default of one thread per core).
Each is repeated --repeats times in turn (alone, pair on, pair off, busy on, busy off, ...) and the
median is reported, as a ratio to the median alone time. The `threads:` line each process logs is
collected, so the table shows what the budget chose ("2>1": chosen again while it ran). Goals
(issue 18), with the budget: pair <= 2.3x alone, busy <= 1.5x alone.

--passive adds the same situations without the budget but with OMP_WAIT_POLICY=PASSIVE (OpenMP threads
sleep instead of spinning while they wait): the other cure for spinning threads, for comparison; its
"alone" row is what it costs a process alone.
--cpus 0,1 runs every process (the neighbour too) on those cores only, for a larger machine.
--async-rollouts adds `bleuberi train --backend vllm --async-rollouts` (vLLM in this process samples step
t+1 while step t trains) alone, with the budget's split (half the cores each to the trainer and the
engine) and without it (both take every core): the median step time after the first step.
Time figures from a shared machine mean little: the load average is printed before every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "examples" / "data"
THREADS_LINE = re.compile(r"threads: (\d+) of (\d+) cores")
# Variables that would decide the thread count instead of the budget: removed from every child's environment.
OVERRIDES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLEUBERI_THREADS", "BLEUBERI_CHILD_THREADS")
GOALS = {"pair": 2.3, "busy": 1.5}


@dataclass
class Sizes:
    model: str = "smollm2-135m"
    train_steps: int = 4
    completion_tokens: int = 32
    generate_prompts: int = 8
    new_tokens: int = 48


@dataclass
class Timing:
    seconds: float
    threads: list[str]  # what each process chose, in start order ("2>1": chosen again while it ran)
    step_seconds: float | None = None  # train: the median step after the first


@dataclass
class Row:
    command: str
    situation: str
    budget: str
    runs: list[Timing] = field(default_factory=list)

    @property
    def median(self) -> float:
        return statistics.median(t.seconds for t in self.runs)


def child_env(budget: str, cores: int) -> dict[str, str]:
    """budget "on" (or "-"): each process chooses; "off": torch's default, one thread per core whatever
    else runs; "passive": that, with OpenMP's threads sleeping instead of spinning while they wait."""
    env = {k: v for k, v in os.environ.items() if k not in (*OVERRIDES, "OMP_WAIT_POLICY")}
    env["PYTHONPATH"] = str(ROOT)
    if budget in ("off", "passive"):
        env["BLEUBERI_THREADS"] = str(cores)
    if budget == "passive":
        env["OMP_WAIT_POLICY"] = "PASSIVE"  # read when torch loads its OpenMP runtime
    return env


def pinned(cpus: set[int] | None) -> Callable[[], None] | None:
    return (lambda: os.sched_setaffinity(0, cpus)) if cpus else None


def run_command(args: list[str], env: dict[str, str], cpus: set[int] | None, out: list[Timing]) -> None:
    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "bleuberi_cli", *args],
        env=env,
        capture_output=True,
        text=True,
        preexec_fn=pinned(cpus),
        check=False,
    )
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"bleuberi {args[0]} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    chosen = [">".join(m.group(1) for m in THREADS_LINE.finditer(done.stderr))]
    steps = [json.loads(line)["seconds"] for line in done.stdout.splitlines() if line.startswith('{"step"')]
    step = statistics.median(steps[1:]) if len(steps) > 1 else None
    out.append(Timing(seconds, chosen, step))


def together(commands: list[list[str]], env: dict[str, str], cpus: set[int] | None) -> Timing:
    """Start the commands at once; the slowest one's time, and every process's thread count."""
    results: list[list[Timing]] = [[] for _ in commands]
    workers = [
        threading.Thread(target=run_command, args=(args, env, cpus, out)) for args, out in zip(commands, results)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if any(not out for out in results):
        raise SystemExit("a command failed (see above)")
    timings = [out[0] for out in results]
    return Timing(max(t.seconds for t in timings), [n for t in timings for n in t.threads])


def beside_busy(args: list[str], env: dict[str, str], cpus: set[int] | None) -> Timing:
    neighbour = subprocess.Popen([sys.executable, "-c", "while True: pass"], preexec_fn=pinned(cpus))
    try:
        time.sleep(1.0)  # running before the command starts, as a job already there would be
        out: list[Timing] = []
        run_command(args, env, cpus, out)
        return out[0]
    finally:
        neighbour.kill()
        neighbour.wait()


def train_args(sizes: Sizes, data: Path, out: Path, extra: list[str]) -> list[str]:
    return [
        *("train", "-i", str(data), "-o", str(out), "--overwrite", "--model", sizes.model),
        *("--max-steps", str(sizes.train_steps), "--num-generations", "4", "--per-device-train-batch-size", "8"),
        *("--max-completion-length", str(sizes.completion_tokens), "--max-prompt-length", "256"),
        *("--save-steps", "1000", "--learning-rate", "3e-4", *extra),
    ]


def generate_args(sizes: Sizes, data: Path, out: Path) -> list[str]:
    return [
        *("generate", "-i", str(data), "-o", str(out), "--model", sizes.model),
        *("-n", "2", "--max-new-tokens", str(sizes.new_tokens), "--temperature", "0.9"),
    ]


def load_line() -> str:
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} (1 min), {five:.2f} (5 min)"


def measure(
    command: str, make: Callable[[str], list[str]], cores: int, cpus: set[int] | None, repeats: int, passive: bool
):
    """The situations of one command, repeated in turn; each call of `make(tag)` gives fresh outputs."""
    keys = [("alone", "-"), *((s, b) for s in GOALS for b in ("on", "off"))]
    keys += [(s, "passive") for s in ("alone", *GOALS)] if passive else []
    rows = {key: Row(command, *key) for key in keys}
    for repeat in range(repeats):
        for (situation, budget), row in rows.items():
            env = child_env(budget, cores)
            print(f"[{command} {situation} budget {budget} #{repeat + 1}] {load_line()}", file=sys.stderr)
            if situation == "alone":
                out: list[Timing] = []
                run_command(make("alone"), env, cpus, out)
                row.runs.append(out[0])
            elif situation == "pair":
                row.runs.append(together([make("a"), make("b")], env, cpus))
            else:
                row.runs.append(beside_busy(make("busy"), env, cpus))
            print(f"  {row.runs[-1].seconds:.1f}s, threads {row.runs[-1].threads}", file=sys.stderr)
    return list(rows.values())


def measure_async(sizes: Sizes, data: Path, folder: Path, cores: int, cpus: set[int] | None, repeats: int):
    rows = [Row("train vllm --async-rollouts", "alone", b) for b in ("on", "off")]
    extra = ["--backend", "vllm", "--async-rollouts"]
    for repeat in range(repeats):
        for row in rows:
            print(f"[{row.command} budget {row.budget} #{repeat + 1}] {load_line()}", file=sys.stderr)
            out: list[Timing] = []
            run_command(train_args(sizes, data, folder / "async", extra), child_env(row.budget, cores), cpus, out)
            row.runs.append(out[0])
    return rows


def print_table(rows: list[Row]) -> None:
    print("| command | situation | budget | median s | x alone | goal | threads chosen | runs s |")
    print("|---|---|---|---|---|---|---|---|")
    alone = {r.command: r.median for r in rows if r.situation == "alone" and r.budget == "-"}
    for row in rows:
        base = alone.get(row.command)
        ratio = f"{row.median / base:.2f}x" if base else "-"
        goal = f"<= {GOALS[row.situation]}x" if row.budget == "on" and row.situation in GOALS else ""
        chosen = "; ".join(",".join(t.threads) or "?" for t in row.runs)
        runs = ", ".join(f"{t.seconds:.1f}" for t in row.runs)
        cells = [row.command, row.situation, row.budget, f"{row.median:.1f}", ratio, goal, chosen, runs]
        print("| " + " | ".join(cells) + " |")
    for row in rows:
        steps = [t.step_seconds for t in row.runs if t.step_seconds is not None]
        if row.command.startswith("train vllm") and steps:
            print(f"{row.command}, budget {row.budget}: median step {statistics.median(steps):.2f}s (after the first)")


def prepare(args: argparse.Namespace, folder: Path) -> tuple[Sizes, Path, Path]:
    sizes = Sizes()
    if args.tiny:
        sys.path.insert(0, str(ROOT))
        from tests.tiny_model import build_tiny_model

        sizes = Sizes(str(build_tiny_model(folder / "tiny")), 2, 8, 4, 8)
        os.environ["VLLM_ALLOW_LONG_MAX_MODEL_LEN"] = "1"  # the tiny model knows 512 positions; vLLM asks 2048
    train_data, generate_data = folder / "train.jsonl", folder / "generate.jsonl"
    pool = (DATA / "pool.jsonl").read_text().splitlines()
    heldout = (DATA / "heldout.jsonl").read_text().splitlines()
    train_data.write_text("\n".join(pool[: 2 * sizes.train_steps]) + "\n")
    generate_data.write_text("\n".join(heldout[: sizes.generate_prompts]) + "\n")
    return sizes, train_data, generate_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--only", choices=("train", "generate"), default=None)
    parser.add_argument("--tiny", action="store_true", help="a tiny random model: a smoke test, not a measurement")
    parser.add_argument("--cpus", default=None, help="comma-separated core ids every process is pinned to")
    parser.add_argument("--async-rollouts", action="store_true", help="also train with vLLM in process, async")
    parser.add_argument(
        "--passive", action="store_true", help="also: no budget, with OMP_WAIT_POLICY=PASSIVE (alone, pair, busy)"
    )
    parser.add_argument("--json", default=None, help="also write the rows here")
    args = parser.parse_args()
    cpus = {int(c) for c in args.cpus.split(",")} if args.cpus else None
    cores = len(cpus) if cpus else len(os.sched_getaffinity(0))
    started = time.perf_counter()
    print(f"{cores} cores; at the start: {load_line()}", file=sys.stderr)
    with tempfile.TemporaryDirectory(prefix="threads-bench-") as tmp:
        folder = Path(tmp)
        sizes, train_data, generate_data = prepare(args, folder)
        rows: list[Row] = []
        if args.only in (None, "train"):
            make = lambda tag: train_args(sizes, train_data, folder / f"t-{tag}", [])  # noqa: E731
            rows += measure("train", make, cores, cpus, args.repeats, args.passive)
        if args.only in (None, "generate"):
            make = lambda tag: generate_args(sizes, generate_data, folder / f"g-{tag}.jsonl")  # noqa: E731
            rows += measure("generate", make, cores, cpus, args.repeats, args.passive)
        if args.async_rollouts:
            # vLLM's CPU attention has no kernel for the tiny model's head size: the smoke test uses the real one
            small = Sizes(train_steps=3, completion_tokens=8) if args.tiny else sizes
            rows += measure_async(small, train_data, folder, cores, cpus, args.repeats)
    print(f"\n{cores} cores, {args.repeats} repeats, {time.perf_counter() - started:.0f}s; at the end: {load_line()}")
    print_table(rows)
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=2) + "\n")


if __name__ == "__main__":
    main()
