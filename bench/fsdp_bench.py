"""FSDP vs DDP: step time and peak memory per rank on 2 CPU processes, and the memory per GPU a user needs.

    python bench/fsdp_bench.py                     # alone on the machine: both measurements, then the table
    python bench/fsdp_bench.py --table-only        # the computed table only (no training)

Measured: `bleuberi train` under `torchrun --nproc_per_node 2` (gloo), with `--parallel ddp`, with
`--parallel fsdp` (sampling gathers the whole model once per round, the default) and with `--parallel fsdp
--no-gather-for-sampling` (sampling gathers each layer for each token): the default model (smollm2-135m),
LoRA r16 all-linear, G=4 samples of 1 prompt per rank per step, 32 completion tokens, float32, 1 warm-up step
then --steps timed steps. Each rank's peak RSS (VmHWM) is read when it exits; the step time is the median of
`seconds` in metrics.jsonl after the warm-up.
Printed as ratios to DDP. Rank 0 reads the whole model under all three (under FSDP it then broadcasts it and
keeps its shard), so the sharding shows in rank 1's peak. Each mode runs twice: with glibc's default
allocator settings, and with its mmap threshold fixed (see FIXED_THRESHOLD), which counts live memory only.
Six runs; about 10 minutes alone on a 2-core machine.

Computed: peak memory per GPU for a LoRA (r16, all linear layers) on 7B/32B/70B bases under DDP and FSDP
over 8 GPUs, from the parameter counts (the formula is in `memory_per_gpu`), checked against the CPU
measurement at small scale: the memory FSDP saves on rank 1, predicted by the same formula for the 135M
model in float32, against the measured difference.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GIB = 2**30


@dataclass(frozen=True)
class Arch:
    """A decoder-only transformer's shape, as its config.json gives it."""

    name: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    qkv_bias: bool = False

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    def linears(self) -> list[tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer: q, k, v, o, gate, up, down."""
        h, i, kv = self.hidden, self.intermediate, self.kv_dim
        return [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]

    def layer_params(self) -> int:
        bias = (self.hidden + 2 * self.kv_dim) if self.qkv_bias else 0
        return sum(a * b for a, b in self.linears()) + bias + 2 * self.hidden  # + the two RMSNorms

    def head_params(self) -> int:
        return self.vocab * self.hidden

    def params(self) -> int:
        embeddings = self.vocab * self.hidden
        return self.layers * self.layer_params() + embeddings + (0 if self.tied else self.head_params()) + self.hidden

    def lora_params(self, rank: int) -> int:
        return self.layers * sum(rank * (a + b) for a, b in self.linears())


# From the models' published config.json files.
SMOLLM2_135M = Arch("SmolLM2-135M", 576, 30, 1536, 9, 3, 49152, tied=True)
MODELS = [
    Arch("Qwen2.5-7B", 3584, 28, 18944, 28, 4, 152064, tied=False, qkv_bias=True),
    Arch("Qwen2.5-32B", 5120, 64, 27648, 40, 8, 152064, tied=False, qkv_bias=True),
    Arch("Llama-3.1-70B", 8192, 80, 28672, 64, 8, 128256, tied=False),
]
CHUNK_ELEMENTS = 2**27  # stages/train/logprobs.py: rows x vocabulary logits alive at once


def memory_per_gpu(
    arch: Arch,
    parallel: str,
    *,
    gpus: int = 8,
    weight_bytes: int = 2,
    rank: int = 16,
    tokens: int = 8 * (256 + 256),
    float32_head_copy: bool = True,
) -> dict[str, float]:
    """Bytes per GPU at the peak of a training step (the backward pass), by part.

    - base weights: every parameter in `weight_bytes` (bf16: 2). FSDP keeps 1/gpus of the layers and of the
      input embeddings, the head whole (it is never sharded: stages/train/sharding.py; tied, it is the
      embeddings, and they stay whole with it), and two decoder layers gathered at once (the one running and
      the one prefetched);
    - the float32 copy of a bf16 head (stages/core/precision.py), on every GPU under both;
    - LoRA: float32 weights, gradients and AdamW's two moments (16 bytes a parameter). FSDP shards the weights
      and moments, and holds whole float32 gradients while a rank sums its micro-batches (they are reduced
      with the last one);
    - activations with gradient checkpointing, for `tokens` tokens per micro-batch (8 x 256 + 256): each
      layer's input (hidden, 4 bytes: float32 between the bf16 matmuls, stages/core/precision.py) kept for
      the recomputation, plus one layer's tensors saved for its
      backward, (7 hidden + 2 kv + 3 intermediate) values a token (norm inputs and outputs, q, k, v, the
      attention output, gate, up and their product; flash/SDPA attention keeps no tokens x tokens scores);
    - logits: the chunked log-prob head keeps at most CHUNK_ELEMENTS float32 logits and their gradient.
    Not counted: the CUDA context and allocator slack (about 1-2 GiB), and the rollout KV cache (sampling
    runs before the backward pass; with a vLLM server it is on the server's GPUs).
    """
    base, head, layer = arch.params(), arch.head_params(), arch.layer_params()
    lora = arch.lora_params(rank)
    if parallel == "ddp":
        weights = base * weight_bytes
        lora_bytes = lora * 16
    else:
        sharded = arch.layers * layer + (0 if arch.tied else arch.vocab * arch.hidden)
        weights = (sharded / gpus + 2 * layer + head + arch.hidden) * weight_bytes
        lora_bytes = lora * 12 / gpus + lora * 4
    per_token_layer = 7 * arch.hidden + 2 * arch.kv_dim + 3 * arch.intermediate
    activations = tokens * (arch.layers * arch.hidden + per_token_layer) * 4  # float32 activations
    return {
        "weights": weights,
        "float32 head": head * 4 if float32_head_copy else 0,
        "LoRA + AdamW": lora_bytes,
        "activations": activations,
        "logits": 2 * CHUNK_ELEMENTS * 4,
    }


def memory_table(gpus: int = 8) -> str:
    lines = [
        f"| base | parameters | LoRA r16 | DDP GiB per GPU | FSDP over {gpus} GPUs, GiB per GPU |",
        "|---|---|---|---|---|",
    ]
    for arch in MODELS:
        ddp, fsdp = (sum(memory_per_gpu(arch, mode, gpus=gpus).values()) / GIB for mode in ("ddp", "fsdp"))
        parts = memory_per_gpu(arch, "fsdp", gpus=gpus)
        detail = ", ".join(f"{name} {value / GIB:.1f}" for name, value in parts.items())
        lines.append(
            f"| {arch.name} | {arch.params() / 1e9:.2f} B | {arch.lora_params(16) / 1e6:.0f} M | {ddp:.1f} "
            f"| {fsdp:.1f} ({detail}) |"
        )
    return "\n".join(lines)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker(out: Path, argv: list[str]) -> None:
    """One rank under torchrun: `bleuberi <argv>`, then its peak RSS to out/rank-N.json at exit."""

    def record() -> None:
        status = Path("/proc/self/status").read_text()
        peak = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
        (out / f"rank-{os.environ.get('RANK', '0')}.json").write_text(json.dumps({"peak_rss_kib": peak}))

    atexit.register(record)
    sys.argv = ["bleuberi", *argv]
    from bleuberi_cli.app import main

    main()


# the modes compared, as `train` options
MODES = {
    "DDP": ["--parallel", "ddp"],
    "FSDP": ["--parallel", "fsdp"],
    "FSDP, sharded sampling": ["--parallel", "fsdp", "--no-gather-for-sampling"],
}


def measure(mode: str, args: argparse.Namespace, folder: Path, allocator: dict[str, str]) -> dict[str, object]:
    data = folder / "prompts.jsonl"
    rows = (ROOT / "examples" / "data" / "pool.jsonl").read_text().splitlines()[: 2 * (args.steps + 1)]
    data.write_text("\n".join(rows) + "\n")
    out = Path(tempfile.mkdtemp(prefix="run-", dir=folder))
    command = [
        *(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port())),
        *(__file__, "--worker", str(out), "train", "-i", str(data), "-o", str(out / "run")),
        *("--model", args.model, *MODES[mode], "--dtype", args.dtype, "--device", "cpu"),
        *("--num-generations", "4", "--per-device-train-batch-size", "4"),
        *("--max-completion-length", str(args.tokens), "--max-steps", str(args.steps + 1)),
        *("--save-steps", "100000", "-q"),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), **allocator}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{done.stderr[-3000:]}")
    steps = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    peaks = [json.loads((out / f"rank-{r}.json").read_text())["peak_rss_kib"] * 1024 for r in (0, 1)]
    return {"step_seconds": statistics.median(s["seconds"] for s in steps[1:]), "peak_rss": peaks}


# glibc raises its mmap threshold (up to 32 MiB) the first time a large block is freed, and from then on keeps
# freed blocks in its heap: FSDP's per-layer gather buffers, freed after each layer, then stay resident
# (malloc_trim gives them back). A fixed threshold returns them at once, so peak RSS counts live memory.
FIXED_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}


def report(runs: dict[tuple[str, str], dict], dtype: str, *, check: bool) -> None:
    others = [mode for mode in MODES if mode != "DDP"]
    print("| | DDP | " + " | ".join(f"{m} | / DDP" for m in others) + " |")
    print("|---|---|" + "---|---|" * len(others))

    def row(label: str, value: Callable[[str], float], digits: int) -> None:
        base = value("DDP")
        cells = " | ".join(f"{value(m):.{digits}f} | {value(m) / base:.2f}" for m in others)
        print(f"| {label} | {base:.{digits}f} | {cells} |")

    row("median step (s)", lambda m: runs[m, "default"]["step_seconds"], 2)
    for allocator, label in (("default", "glibc default"), ("fixed", "mmap threshold 1 MiB")):
        for r in (0, 1):
            row(f"peak RSS rank {r}, {label} (MiB)", lambda m, a=allocator, r=r: runs[m, a]["peak_rss"][r] / 2**20, 0)
    if not check:  # the formula below has the default model's shape
        return
    weight_bytes = 4 if dtype == "float32" else 2
    # The part of the formula that differs between the two: what FSDP saves on a rank that did not load the model.
    predicted = {
        mode: memory_per_gpu(SMOLLM2_135M, mode, gpus=2, weight_bytes=weight_bytes, float32_head_copy=False)
        for mode in ("ddp", "fsdp")
    }
    saved = sum(predicted["ddp"][k] - predicted["fsdp"][k] for k in ("weights", "LoRA + AdamW")) / 2**20
    # the formula counts a training step's peak: sampling that gathers the whole model peaks as DDP does
    measured = (runs["DDP", "fixed"]["peak_rss"][1] - runs["FSDP, sharded sampling", "fixed"]["peak_rss"][1]) / 2**20
    print(
        f"\nrank 1 saves {measured:.0f} MiB under FSDP with sharded sampling (fixed mmap threshold); "
        f"the formula predicts {saved:.0f} MiB"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up step)")
    parser.add_argument("--tokens", type=int, default=32, help="completion tokens")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--table-only", action="store_true")
    if sys.argv[1:2] == ["--worker"]:  # a rank under torchrun: the rest are bleuberi's arguments
        worker(Path(sys.argv[2]), sys.argv[3:])
        return
    args = parser.parse_args()
    if not args.table_only:
        with tempfile.TemporaryDirectory() as tmp:
            runs = {
                (mode, allocator): measure(mode, args, Path(tmp), env)
                for allocator, env in (("default", {}), ("fixed", FIXED_THRESHOLD))
                for mode in MODES
            }
        print(f"{args.model}, 2 CPU processes (gloo), {args.dtype}, G=4 x 1 prompt per rank, {args.tokens} tokens\n")
        report(runs, args.dtype, check=args.model == "smollm2-135m")
        print()
    print(memory_table())


if __name__ == "__main__":
    main()
